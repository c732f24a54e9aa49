"""prompts.read_prompts: .txt and data-file prompts with their locations and stable indices, bad
rows reported with training's own messages, skipped and counted on request."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, write_jsonl

from lora_dpo.data import DataReport, load_examples
from lora_dpo.errors import DataError
from lora_dpo.prompts import PromptReport, read_prompts

BAD = REPO / "tests" / "data" / "bad"
USER = [{"role": "user", "content": "Say hi."}]


def test_text_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffFirst prompt\n\n   \nSecond, with ünïcode\r\nThird".encode())
    prompts = read_prompts(str(path))
    assert [(p.index, p.text, p.where) for p in prompts] == [
        (0, "First prompt", f"{path}:1"), (1, "Second, with ünïcode", f"{path}:4"), (2, "Third", f"{path}:5")]
    path.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError, match="prompts.txt: not UTF-8 text \\(byte 6\\). Fix: re-save the file as UTF-8"):
        read_prompts(str(path))
    with pytest.raises(DataError, match="nope.txt: file not found. Fix: check --prompts"):
        read_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="nope.jsonl: file not found. Fix: check collect.prompts"):
        read_prompts(str(tmp_path / "nope.jsonl"), source_option="collect.prompts")


def test_data_files_text_and_chat_prompts(tmp_path, demo_rows):
    rows = [{"prompt": "Plain?"}, {"question": "other column"}, {"prompt": USER, "extra": 1}] + demo_rows[:2]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    report = PromptReport()
    prompts = read_prompts(str(path), on_bad_row="skip", report=report)
    assert [p.index for p in prompts] == [0, 2, 3, 4]  # row 1 was bad: the others keep their positions
    assert prompts[0].text == "Plain?" and prompts[1].text == USER and prompts[2].text == demo_rows[0]["prompt"]
    assert prompts[1].where == f"{path}:3"
    assert report.summary() == (f"{path}: 4 prompts, 1 bad rows skipped "
                                "(1 field 'prompt': missing (the row has question))")
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps([{"q": "A?"}, {"q": USER}]))
    assert [p.text for p in read_prompts(str(json_path), column="q")] == ["A?", USER]
    parquet = tmp_path / "rows.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "From parquet"}]), parquet)
    assert [(p.text, p.where) for p in read_prompts(str(parquet))] == [("From parquet", f"{parquet}:row 0")]


@pytest.mark.parametrize("name", ["invalid_json.jsonl", "truncated_last_line.jsonl", "non_utf8.jsonl",
                                  "list_of_strings.jsonl", "unknown_role.jsonl"])
def test_bad_rows_get_trainings_messages(name):
    """Where a row's problem lies in its prompt (or the line itself), prompt reading says what
    training says, word for word, when both name the option the same way."""
    with pytest.raises(DataError) as training:
        load_examples(str(BAD / name), "train", ("prompt", "chosen", "rejected"), "error", DataReport(name))
    with pytest.raises(DataError) as prompts:
        read_prompts(str(BAD / name), on_bad_row_option="data.on_bad_row")
    assert str(prompts.value) == str(training.value)
    report = PromptReport()
    assert len(read_prompts(str(BAD / name), on_bad_row="skip", report=report)) >= 1 and report.skipped == 1


def test_chat_prompt_ending_with_an_assistant_turn_is_refused_as_in_training(tmp_path):
    ends_with_answer = USER + [{"role": "assistant", "content": "Hi!"}]
    pair = {"prompt": ends_with_answer, "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "No"}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    with pytest.raises(DataError) as training:
        load_examples(str(path), "train", ("prompt", "chosen", "rejected"), "error", DataReport(str(path)))
    with pytest.raises(DataError) as prompts:
        read_prompts(str(path), on_bad_row_option="data.on_bad_row")
    assert str(prompts.value) == str(training.value)
    assert "field 'prompt': ends with an assistant message" in str(prompts.value)


def test_nothing_usable_and_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, {"prompt": None}])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'prompt': is empty or whitespace only. Fix: give it text, "
                                        "or remove the row \\(or pass --on-bad-row skip\\)"):
        read_prompts(str(path))
    with pytest.raises(DataError, match="no usable prompts \\(every row was bad and skipped\\)"):
        read_prompts(str(path), on_bad_row="skip")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no usable prompts \\(it holds no rows\\)"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="--on-bad-row maybe: must be error or skip"):
        read_prompts(str(path), on_bad_row="maybe")
