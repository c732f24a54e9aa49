"""Property: whatever a data file holds — random JSON per field, chat structures, HH-style dialogues,
lone surrogate escapes, corrupted bytes, other encodings — reading it and tokenizing what loads ends
in loaded pairs or in lora-dpo's own one-line error, never in another exception.

Bounded to run in seconds: a fixed number of examples, derandomized so every run checks the same
cases (no example database is written)."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta

import pytest
from chat_templates import STYLES, demo_tokenizer, style_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_dpo.data import CHAT_ROLES, DataReport, check_text_field, load_examples, tokenize_examples
from lora_dpo.errors import DataError

COLUMNS = ("prompt", "chosen", "rejected")
BOUNDED = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text: any character, lone surrogates now and then (st.text leaves them out), and strings that mean
# something to the readers and templates.
with_surrogates = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
texts = st.one_of(
    st.text(max_size=12),
    st.text(with_surrogates, max_size=4),
    st.sampled_from(["", " ", "\n", "Hi", "tell me \ud83d", "<|im_end|>", "<|im_start|>", "LoraDpoAnswerProbe",
                     "\n\nAssistant:", "<think>\n</think>", "{{ bos_token }}", "\x00", "\ufeff"]),
)
# Mostly usable text where rows are built to load, so rendering and tokenization are reached often.
usable_texts = st.text(min_size=1, max_size=12).filter(str.strip)
row_texts = st.one_of(usable_texts, usable_texts, usable_texts, texts)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=6,
)
messages = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(CHAT_ROLES), json_values), "content": st.one_of(texts, json_values)},
    optional={"tool_calls": st.one_of(json_values, st.just([{"type": "function", "function": {"name": "f", "arguments": {}}}])),
              "name": texts},
)
message_lists = st.lists(st.one_of(messages, json_values), max_size=4)


@st.composite
def chat_rows(draw):
    """Rows close to valid, so that rendering and tokenization are reached often."""
    def turn(role):
        return {"role": role, "content": draw(row_texts)}
    prompt = [turn(draw(st.sampled_from(("system", "user", "tool")))) for _ in range(draw(st.integers(0, 2)))]
    prompt.append(turn("user"))
    row = {"chosen": [turn("assistant")], "rejected": [turn("assistant")]}
    if draw(st.booleans()):
        row["prompt"] = prompt
    else:  # whole conversations; the prompt is their shared start
        row = {key: prompt + value for key, value in row.items()}
    return row


@st.composite
def dialogue_rows(draw):
    """HH-RLHF rows: the whole dialogue as text, no prompt."""
    history = "".join(f"\n\nHuman: {draw(row_texts)}\n\nAssistant: {draw(row_texts)}" for _ in range(draw(st.integers(0, 2))))
    history += f"\n\nHuman: {draw(row_texts)}"
    return {"chosen": history + "\n\nAssistant:" + draw(row_texts), "rejected": history + "\n\nAssistant:" + draw(row_texts)}


field_values = st.one_of(texts, json_values, message_lists)
rows = st.one_of(
    st.fixed_dictionaries({}, optional={"prompt": field_values, "chosen": field_values, "rejected": field_values,
                                        "extra": json_values}),
    st.fixed_dictionaries({"prompt": row_texts, "chosen": row_texts, "rejected": row_texts}),
    chat_rows(),
    chat_rows(),
    dialogue_rows(),
    json_values,
)


@st.composite
def files(draw):
    """(suffix, bytes): JSON lines or a JSON array, written as JSON does (escapes) or raw (lone
    surrogates as CESU-8 bytes), in UTF-8 or another encoding, maybe with bytes overwritten."""
    drawn = draw(st.lists(rows, min_size=1, max_size=3))
    ascii_only = draw(st.booleans())
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    if suffix == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=ascii_only) + "\n" for row in drawn)
    else:
        text = json.dumps(drawn, ensure_ascii=ascii_only)
    encoding = draw(st.sampled_from(["utf-8"] * 8 + ["utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    data = bytearray(text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace"))
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "cut"]))
    if damage == "bytes" and data:
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=3)):
            data[position] = value
    elif damage == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]  # cut off, as an interrupted download is
    return suffix, bytes(data)


@pytest.fixture(scope="module")
def tokenizers():
    return [demo_tokenizer()] + [style_tokenizer(name) for name in sorted(STYLES)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


counter = itertools.count()


def assert_own_one_line_error(exc: DataError, path) -> None:
    message = str(exc)
    assert message.startswith(str(path)), message
    assert "\n" not in message and "\r" not in message, message
    message.encode("utf-8")  # printable on a UTF-8 terminal: no lone surrogate reached the message
    assert "Fix:" in message, message


@BOUNDED
@given(file=files(), on_bad_row=st.sampled_from(["error", "skip"]), style=st.integers(0, len(STYLES)))
def test_reading_and_tokenizing_any_file_loads_or_gives_one_line_error(file, on_bad_row, style, tokenizers, folder):
    suffix, data = file
    path = folder / f"rows{next(counter)}{suffix}"
    path.write_bytes(data)
    report = DataReport(str(path))
    try:
        examples = load_examples(str(path), "train", COLUMNS, on_bad_row, report)
    except DataError as exc:
        assert_own_one_line_error(exc, path)
        return
    assert report.rows == len(examples) + report.skipped and 0 <= report.implicit_prompts <= len(examples)
    skipped_before = report.skipped
    try:
        pairs = tokenize_examples(examples, tokenizers[style], 64, 32, report, on_bad_row)
    except DataError as exc:
        assert_own_one_line_error(exc, path)
        return
    assert len(pairs) + report.dropped + (report.skipped - skipped_before) == len(examples)
    for pair in pairs:
        assert len(pair.prompt_ids) <= 32 and len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 64
        assert pair.chosen_ids != pair.rejected_ids and pair.chosen_ids and pair.rejected_ids


@BOUNDED
@given(value=st.one_of(field_values, chat_rows().map(lambda row: row["chosen"])))
def test_any_prompt_value_is_text_or_a_row_error(value):
    """What prompt files for generation and collection go through."""
    from lora_dpo.data import RowError

    try:
        checked = check_text_field(value, "prompt")
    except RowError as exc:
        message = exc.message("prompts.jsonl:1")
        assert "\n" not in message
        message.encode("utf-8")
        return
    if isinstance(checked, str):
        checked.encode("utf-8")
    else:
        assert all(isinstance(m["content"], str) and m["role"] in CHAT_ROLES for m in checked)
