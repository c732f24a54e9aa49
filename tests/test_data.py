"""Preference files: formats, row validation, chat rendering, tokenization and truncation."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lora_dpo.config import DataConfig
from lora_dpo.data import (DataReport, PreferenceExample, load_examples, load_preference_data, render,
                           tokenize_examples)
from lora_dpo.errors import DataError

COLUMNS = ("prompt", "chosen", "rejected")
GOOD = {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."}


def load(path, on_bad_row="error"):
    report = DataReport(str(path))
    return load_examples(str(path), "train", COLUMNS, on_bad_row, report), report


@pytest.mark.parametrize("row,field,problem", [
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "must be a string or a list of chat messages, got null"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "got int"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "is empty"),
    ({"prompt": "p", "chosen": "   \n", "rejected": "r"}, "chosen", "is empty"),
    ({"prompt": "   ", "chosen": "c", "rejected": "r"}, "prompt", "is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "is identical to chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]}, "rejected", "mix plain text and chat"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]},
     "prompt", "is plain text but the responses are chat messages"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "robot", "content": "c"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "unknown role 'robot'"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": 5}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "content must be a string"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "not an object with 'role' and 'content'"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"},
                                                               {"role": "user", "content": "more?"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "the response ends with a 'user' message"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c", "tool_calls": "f()"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "message 0 tool_calls must be a list of objects, got str"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": ["a\nb"], "content": "c"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "message 0 has unknown role ['a\\nb']"),
    # lone surrogate escapes ("\ud83d": half an emoji) in every kind of text field
    ({"prompt": "tell me \ud83d", "chosen": "c", "rejected": "r"}, "prompt",
     "holds a lone surrogate escape \\ud83d at character 8 (half of a character such as an emoji"),
    ({"prompt": "p", "chosen": "c", "rejected": "\ude00 r"}, "rejected", "holds a lone surrogate escape \\ude00 at character 0"),
    ({"prompt": [{"role": "user", "content": "p\ud83d"}], "chosen": [{"role": "assistant", "content": "c"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "prompt", "message 0 content holds a lone surrogate escape \\ud83d"),
    ({"prompt": [{"role": "user", "content": "p"}],
      "chosen": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"q": "\udc00"}}}]}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "message 0 'tool_calls' holds a lone surrogate escape \\udc00"),
])
def test_each_bad_row_kind_names_file_line_field_and_fix(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: field '{field}': ")
    assert problem in message
    assert "Fix:" in message and "data.on_bad_row=skip" in message
    assert "\n" not in message and message.isascii()  # one printable line, whatever the row held


def test_skip_policy_counts_and_logs_each_bad_row(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "p"}, GOOD, {"prompt": "p", "chosen": "x", "rejected": "x"}])
    examples, report = load(path, on_bad_row="skip")
    assert len(examples) == 2 and report.skipped == 2 and report.rows == 4
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert [m.split(":")[1] for m in skipped] == ["2", "4"]


def test_invalid_json_and_truncated_last_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json}\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON .*each line must be one JSON object"):
        load(path)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20])
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON .*the last line looks cut off"):
        load(path)


def test_bom_is_accepted_and_non_utf8_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(load(path)[0]) == 1
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text"):
        load(path)


def test_utf16_files_and_runaway_nesting_are_one_line_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
    with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8 text \(it starts with a UTF-16 byte-order mark\)\. "
                                        "Fix: re-save the file as UTF-8"):
        load(path)
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: JSON nested too deeply to read"):
        load(path)
    json_path = tmp_path / "d.json"
    json_path.write_text("[" * 100_000)
    with pytest.raises(DataError, match=rf"^{json_path}: JSON nested too deeply to read"):
        load(json_path)


def test_empty_file_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no usable preference pairs"):
        load(path)
    with pytest.raises(DataError, match="file not found"):
        load(tmp_path / "nope.jsonl")


def test_mixed_plain_and_chat_rows_in_one_file(tmp_path):
    chat = {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat])
    with pytest.raises(DataError, match=rf"{path}:2: .*chat messages but earlier rows are plain text"):
        load(path)


def test_json_and_parquet_files(tmp_path):
    rows = [GOOD, {**GOOD, "chosen": "Hello!"}]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(rows))
    assert [e.chosen for e in load(json_path)[0]] == ["Hi there!", "Hello!"]
    json_path.write_text(json.dumps([GOOD, {"prompt": "p"}]))
    with pytest.raises(DataError, match=rf"{json_path}:row 1: field 'chosen': missing"):
        load(json_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    assert [e.chosen for e in load(parquet_path)[0]] == ["Hi there!", "Hello!"]


def test_configurable_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "good": "yes", "bad": "no"}])
    report = DataReport(str(path))
    (example,) = load_examples(str(path), "train", ("question", "good", "bad"), "error", report)
    assert (example.prompt, example.chosen, example.rejected) == ("q?", "yes", "no")


def test_full_conversations_share_their_prompt():
    user = {"role": "user", "content": "Hello?"}
    row = {"chosen": [user, {"role": "assistant", "content": "Hi!"}], "rejected": [user, {"role": "assistant", "content": "Go."}]}
    from lora_dpo.data import parse_row

    prompt, chosen, rejected = parse_row(row, *COLUMNS)
    assert prompt == [user]
    assert chosen == [{"role": "assistant", "content": "Hi!"}] and rejected == [{"role": "assistant", "content": "Go."}]
    # a prompt column plus full conversations: the prompt part is stripped from the responses
    prompt, chosen, _ = parse_row({"prompt": [user], **row}, *COLUMNS)
    assert prompt == [user] and chosen == [{"role": "assistant", "content": "Hi!"}]


def test_chat_rendering_uses_the_template(tokenizer):
    example = PreferenceExample([{"role": "user", "content": "Tell me about tea."}],
                                [{"role": "assistant", "content": "Tea is lovely."}],
                                [{"role": "assistant", "content": "No."}], "x:1")
    rendered = render(example, tokenizer)
    assert rendered.prompt == "<|bos|><|im_start|>user\nTell me about tea.<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.chosen == "Tea is lovely.<|im_end|>"  # the newline after the end of turn is not the response's
    assert rendered.rejected == "No.<|im_end|>"
    (pair,) = tokenize_examples([example], tokenizer, 128, 64, DataReport("x"))
    assert pair.prompt_ids[0] == tokenizer.bos_token_id and pair.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(pair.chosen_ids) == "Tea is lovely.<|im_end|>"  # the template's end of turn is the EOS
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id and pair.chosen_ids.count(tokenizer.eos_token_id) == 1


def test_chat_rows_without_a_chat_template(tokenizer):
    import copy

    plain = copy.copy(tokenizer)
    plain.chat_template = None
    example = PreferenceExample([{"role": "user", "content": "p"}], [{"role": "assistant", "content": "c"}],
                                [{"role": "assistant", "content": "r"}], "f.jsonl:3")
    with pytest.raises(DataError, match="f.jsonl:3: rows are chat messages but the tokenizer has no chat template"):
        render(example, plain)


def test_plain_rows_get_bos_and_eos(tokenizer):
    (pair,) = tokenize_examples([PreferenceExample("Say hi.", " Hi there!", " No.", "x:1")], tokenizer, 128, 64, DataReport("x"))
    assert pair.prompt_ids == tokenizer("Say hi.").input_ids and pair.prompt_ids[0] == tokenizer.bos_token_id
    assert pair.chosen_ids == tokenizer(" Hi there!", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert pair.rejected_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_prompt_end_and_the_response_start(tokenizer):
    words = " ".join(f"w{i}" for i in range(60))
    example = PreferenceExample("start " + words + " END", " kind answer " + words, " rude", "x:1")
    report = DataReport("x")
    (pair,) = tokenize_examples([example], tokenizer, max_length=40, max_prompt_length=16, report=report)
    full_prompt = tokenizer("start " + words + " END").input_ids
    assert pair.prompt_ids == full_prompt[-16:]  # the end of the prompt is kept
    assert tokenizer.decode(pair.prompt_ids).endswith(" END")
    full_chosen = tokenizer(" kind answer " + words, add_special_tokens=False).input_ids
    assert pair.chosen_ids == full_chosen[:24]  # responses are cut at their end, losing the EOS
    assert tokenizer.eos_token_id not in pair.chosen_ids and pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert (report.truncated_prompts, report.truncated_responses, report.dropped) == (1, 1, 0)


def test_pairs_identical_after_truncation_are_dropped_and_counted(tokenizer):
    shared = " same words " * 20
    example = PreferenceExample("p", shared + "good", shared + "bad", "x:1")
    report = DataReport("x")
    assert tokenize_examples([example, PreferenceExample("p", " a", " b", "x:2")], tokenizer, 20, 8, report) != []
    assert report.dropped == 1
    assert "1 pairs dropped" in report.summary()


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = DataConfig(train_file=str(path), eval_fraction=0.25)
    a = load_preference_data(config, tokenizer, seed=1)
    b = load_preference_data(config, tokenizer, seed=1)
    c = load_preference_data(config, tokenizer, seed=2)
    assert (len(a.train), len(a.eval)) == (30, 10)
    key = lambda pairs: sorted(tuple(p.prompt_ids) for p in pairs)  # noqa: E731
    assert key(a.eval) == key(b.eval) and key(a.eval) != key(c.eval)
    assert not set(key(a.eval)) & set(key(a.train))
    config = DataConfig(train_file=str(path), eval_file=str(path))
    both = load_preference_data(config, tokenizer, seed=1)
    assert (len(both.train), len(both.eval)) == (40, 40)


def test_hub_dataset_name_reads_the_split(monkeypatch):
    """A name that is no local file goes to datasets.load_dataset (faked here: the tests are offline)."""
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        return [GOOD, {"prompt": "p", "chosen": " c"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = load_examples("org/prefs", "test", COLUMNS, "skip", DataReport("org/prefs"))
    assert calls == [("org/prefs", "test")] and len(examples) == 1
    with pytest.raises(DataError, match=r"org/prefs\[train\]:row 1: field 'rejected': missing"):
        load_examples("org/prefs", "train", COLUMNS, "error", DataReport("x"))
    with pytest.raises(DataError, match=r"org/missing \(split train\): cannot load this dataset \(FileNotFoundError"):
        load_examples("org/missing", "train", COLUMNS, "error", DataReport("x"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"no such local file or folder, and reading Hugging Face datasets needs the datasets package"):
        load_examples("org/prefs", "train", COLUMNS, "error", DataReport("x"))


def test_hh_rlhf_text_rows_take_the_shared_dialogue_as_prompt(tmp_path):
    """Anthropic HH-RLHF: only chosen and rejected, each the whole dialogue as text."""
    one_turn = {"chosen": "\n\nHuman: Do you like tea?\n\nAssistant: I like tea a lot.",
                "rejected": "\n\nHuman: Do you like tea?\n\nAssistant: I hate it."}
    history = "\n\nHuman: Hi.\n\nAssistant: Hello! What can I do?\n\nHuman: Name a fruit."
    two_turns = {"chosen": history + "\n\nAssistant: An apple.", "rejected": history + "\n\nAssistant: A chair."}
    path = write_jsonl(tmp_path / "hh.jsonl", [one_turn, two_turns, GOOD])
    (first, second, third), report = load(path)
    # cut at the turn boundary, not inside the shared word "I"; the space after the colon is the answer's
    assert (first.prompt, first.chosen, first.rejected) == (
        "\n\nHuman: Do you like tea?\n\nAssistant:", " I like tea a lot.", " I hate it.")
    assert (second.prompt, second.chosen, second.rejected) == (history + "\n\nAssistant:", " An apple.", " A chair.")
    assert (first.implicit_prompt, second.implicit_prompt, third.implicit_prompt) == (True, True, False)
    assert report.implicit_prompts == 2
    assert "3 rows, 2 prompts taken from the shared start of chosen and rejected" in report.summary()


def test_hh_rlhf_rows_without_a_shared_turn_name_the_row(tmp_path):
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hey\n\nAssistant: Go away"},
            {"chosen": "Hello there", "rejected": "Goodbye"},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant:  "}]
    for line in (1, 2):
        path = write_jsonl(tmp_path / "hh.jsonl", [rows[line - 1]])
        with pytest.raises(DataError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}:1: field 'prompt': missing (the row has chosen, rejected), and chosen and "
                                  "rejected share no dialogue up to an \\n\\nAssistant: turn to take it from. Fix: add a "
                                  "prompt column")
        assert "\n" not in message
    path = write_jsonl(tmp_path / "hh.jsonl", [rows[2]])
    with pytest.raises(DataError, match=r":1: field 'rejected': has no text after the last 'Assistant:' turn"):
        load(path)
    path = write_jsonl(tmp_path / "hh.jsonl", rows + [{"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}])
    examples, report = load(path, on_bad_row="skip")
    assert (len(examples), report.skipped, report.implicit_prompts) == (1, 3, 1)


def test_implicit_prompts_are_counted_in_each_split(tmp_path, tokenizer):
    user = {"role": "user", "content": "Hi"}
    rows = [{"chosen": [user, {"role": "assistant", "content": f"Hello {i}"}],
             "rejected": [user, {"role": "assistant", "content": f"Go {i}"}]} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_preference_data(DataConfig(train_file=str(path), eval_fraction=0.2), tokenizer, seed=0)
    train_report, eval_report = data.reports
    assert (train_report.rows, train_report.implicit_prompts) == (8, 8)
    assert (eval_report.rows, eval_report.implicit_prompts) == (2, 2)


def test_prompt_files_get_the_same_text_checks(tmp_path):
    """Prompt files for generation and collection are read with check_text_field."""
    from lora_dpo.generate import read_prompts

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": "cut emoji \ud83d"}])
    with pytest.raises(DataError) as info:
        read_prompts([], str(path), "prompt")
    assert str(info.value).startswith(f"{path}:2: field 'prompt': holds a lone surrogate escape \\ud83d at character 10")


def test_local_dataset_folders_go_to_datasets(tmp_path, monkeypatch):
    """A folder is read by the datasets package (faked here; the real package reads one below)."""
    import sys
    import types

    class DatasetDict(dict):
        pass

    calls = []

    def load_dataset(name, split):
        calls.append(("load_dataset", name, split))
        return [GOOD]

    def load_from_disk(name):
        calls.append(("load_from_disk", name))
        return DatasetDict(train=[GOOD, GOOD])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=load_dataset, load_from_disk=load_from_disk, DatasetDict=DatasetDict))
    folder, saved = tmp_path / "prefs", tmp_path / "saved"
    folder.mkdir()
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    examples = load_examples(str(folder), "train", COLUMNS, "error", DataReport("x"))
    assert calls == [("load_dataset", str(folder), "train")] and examples[0].where == f"{folder}[train]:row 0"
    assert len(load_examples(str(saved), "train", COLUMNS, "error", DataReport("x"))) == 2
    assert calls[-1] == ("load_from_disk", str(saved))
    with pytest.raises(DataError, match=rf"^{saved}: no split 'test' \(it has train\)\. Fix: set data.train_split"):
        load_examples(str(saved), "test", COLUMNS, "error", DataReport("x"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=rf"^{folder} is a folder: reading it as a dataset needs the datasets package\. "
                                        r"Fix: pip install 'lora-dpo\[hub\]', or point at one"):
        load_examples(str(folder), "train", COLUMNS, "error", DataReport("x"))


def test_local_dataset_folders_with_the_datasets_package(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the hub extra; not part of the test extra
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "prefs"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "chosen": "Hello!"}]), folder / "train.parquet")
    examples = load_examples(str(folder), "train", COLUMNS, "error", DataReport(str(folder)))
    assert [e.chosen for e in examples] == ["Hi there!", "Hello!"] and examples[1].where == f"{folder}[train]:row 1"
    with pytest.raises(DataError) as info:
        load_examples(str(folder), "test", COLUMNS, "error", DataReport("x"))
    assert str(info.value).startswith(f"{folder} (split test): cannot read this dataset folder (ValueError: ")
    assert "Fix: name the files by split" in str(info.value) and "\n" not in str(info.value)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(saved))
    assert len(load_examples(str(saved), "train", COLUMNS, "error", DataReport("x"))) == 1
