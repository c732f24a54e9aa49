"""The bad-file corpus (tests/data/bad/): each file gives a one-line error naming file:line:field
and the fix through the CLI, a counted skip under on_bad_row=skip, or loads as it should."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, write_jsonl

from lora_dpo.cli import main
from lora_dpo.config import DataConfig
from lora_dpo.data import load_preference_data, read_preference_examples

BAD = REPO / "tests" / "data" / "bad"

# file -> (line, field or None, words the message must hold); every one of these is skippable
ROW_ERRORS = {
    "invalid_json.jsonl": (2, None, "invalid JSON"),
    "truncated_last_line.jsonl": (3, None, "the last line looks cut off"),
    "non_utf8.jsonl": (2, None, "not UTF-8 text"),
    "missing_column.jsonl": (2, "rejected", "missing (the row has prompt, chosen)"),
    "null_text.jsonl": (2, "chosen", "got null"),
    "number_text.jsonl": (2, "rejected", "got int"),
    "list_of_strings.jsonl": (2, "prompt", "message 0 is not an object with 'role' and 'content'"),
    "empty_string.jsonl": (2, "chosen", "is empty or whitespace only"),
    "whitespace_response.jsonl": (2, "rejected", "is empty or whitespace only"),
    "identical.jsonl": (2, "rejected", "is identical to chosen"),
    "mixed_rows.jsonl": (2, "chosen", "chat messages but earlier rows are plain text"),
    "unknown_role.jsonl": (2, "prompt", "unknown role 'human'"),
    "lone_surrogate.jsonl": (2, "prompt", "holds a lone surrogate escape \\ud83d at character 8"),
}


def run_cli(tmp_path, model_dir, data_file, *extra):
    return main(["train", str(REPO / "configs" / "demo.yaml"), f"model.name_or_path={model_dir}",
                 f"data.train_file={data_file}", "data.eval_file=null", "data.eval_fraction=0",
                 f"output.dir={tmp_path / 'out'}", "train.max_steps=1", "train.micro_batch_size=1", *extra])


@pytest.mark.parametrize("name", sorted(ROW_ERRORS))
def test_bad_row_is_one_line_with_file_line_field_and_fix(name, tmp_path, llama_dir, capsys):
    line, field, words = ROW_ERRORS[name]
    path = BAD / name
    assert run_cli(tmp_path, llama_dir, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    prefix = f"lora-dpo: error: {path}:{line}:" + (f" field '{field}':" if field else "")
    assert err.startswith(prefix), err
    assert words in err and "Fix:" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(ROW_ERRORS))
def test_bad_row_is_a_counted_skip(name, caplog):
    line, _, _ = ROW_ERRORS[name]
    splits = read_preference_examples(DataConfig(train_file=str(BAD / name), eval_fraction=0, on_bad_row="skip"), seed=0)
    assert splits.reports[0].skipped == 1
    assert len(splits.train) >= 1
    assert any(r.getMessage().startswith(f"skipped {BAD / name}:{line}:") for r in caplog.records)


def test_empty_file(tmp_path, llama_dir, capsys):
    assert run_cli(tmp_path, llama_dir, BAD / "empty.jsonl") == 2
    assert "empty.jsonl: no usable preference pairs (it holds no rows)" in capsys.readouterr().err


@pytest.mark.parametrize("name,rows", [("bom.jsonl", 2), ("extra_columns.jsonl", 2), ("long_prompt.jsonl", 2)])
def test_files_that_are_fine(name, rows, tokenizer):
    config = DataConfig(train_file=str(BAD / name), eval_fraction=0, max_length=64, max_prompt_length=32)
    data = load_preference_data(config, tokenizer, seed=0)
    assert len(data.train) == rows
    assert all(len(p.prompt_ids) <= 32 and len(p.prompt_ids) + len(p.chosen_ids) <= 64 for p in data.train)
    if name == "long_prompt.jsonl":
        assert data.reports[0].truncated_prompts == 1


def test_chat_rows_without_chat_template(tmp_path, llama_dir, capsys):
    import shutil

    model_dir = tmp_path / "no-template"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert run_cli(tmp_path, model_dir, BAD / "chat_rows.jsonl") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{BAD / 'chat_rows.jsonl'}:1: rows are chat messages but the tokenizer has no chat template" in err


def test_a_10mb_row_is_truncated_not_fatal(tmp_path, tokenizer):
    huge = " and so on" * 1_000_000  # 10 MB in one JSONL line
    path = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "Tell me a story.", "chosen": huge, "rejected": " No."},
                                                 {"prompt": "Hi", "chosen": " Hello!", "rejected": " Go."}])
    assert path.stat().st_size > 10_000_000
    data = load_preference_data(DataConfig(train_file=str(path), eval_fraction=0, max_length=128, max_prompt_length=32),
                                tokenizer, seed=0)
    assert len(data.train) == 2 and data.reports[0].truncated_responses == 1
    assert len(data.train[0].prompt_ids) + len(data.train[0].chosen_ids) == 128


@pytest.mark.parametrize("overrides,words", [
    (["train.lerning_rate=1"], "unknown key train.lerning_rate (did you mean train.learning_rate?)"),
    (["train.max_steps=ten"], "train.max_steps: expected an integer or null, got 'ten'"),
    (["model.name_or_path="], "model.name_or_path is required"),
])
def test_config_mistakes_are_one_line(tmp_path, llama_dir, capsys, overrides, words):
    assert run_cli(tmp_path, llama_dir, BAD / "bom.jsonl", *overrides) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_hh_rlhf_text_rows_train_and_the_run_reports_implicit_prompts(tmp_path, llama_dir, caplog):
    """Rows with only chosen and rejected as whole dialogues (HH-RLHF) train; the count is shown."""
    rows = [{"chosen": f"\n\nHuman: Tell me about {topic}.\n\nAssistant: Happy to help! {topic} is lovely.",
             "rejected": f"\n\nHuman: Tell me about {topic}.\n\nAssistant: No."} for topic in ("tea", "bread", "rain")]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with caplog.at_level("INFO"):
        assert run_cli(tmp_path, llama_dir, path) == 0
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data ")]
    assert shown == [f"data {path}: 3 rows, 3 prompts taken from the shared start of chosen and rejected, "
                     "0 prompts and 0 responses truncated"]
