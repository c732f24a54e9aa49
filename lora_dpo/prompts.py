"""Reading prompt files for generation, collection and evaluation.

A prompt file is a ``.txt`` file (one prompt per line, blank lines ignored) or anything training
data can be: ``.jsonl``, ``.json``, ``.parquet`` or a Hugging Face dataset id, whose rows hold
the prompt in a column (``column``, default ``prompt``) as a string or a list of chat messages.
A preference file therefore works as a prompt file as it is. Rows are read and checked by the
same code as training data (``data.read_rows``, ``data.check_text_field``) and a bad row gets
the same one-line message (file:line, field, problem, fix); a chat prompt that ends with an
assistant turn is refused as in training::

    from lora_dpo.prompts import PromptReport, read_prompts

    report = PromptReport()
    prompts = read_prompts("prompts.jsonl", on_bad_row="skip", report=report)
    print(report.summary())          # prompts.jsonl: 120 prompts, 2 bad rows skipped
    prompts[0].index, prompts[0].text, prompts[0].where   # 0, "Can you ...", "prompts.jsonl:1"

``Prompt.index`` is the row's position in the source counting every row read, bad ones
included (blank lines and the empty lines of a .txt file are not rows), so it stays the same when
``on_bad_row`` changes: it is the key for seeds (``generation.sample(prompt_indices=...)``) and
for resumable outputs (``records``). Options are named in messages as the calling command spells
them (``column_option``, ``on_bad_row_option``: a flag or a config key).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .data import LOCAL_SUFFIXES, RowError, Text, check_text_field, read_rows
from .errors import DataError

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")


@dataclass(frozen=True)
class Prompt:
    index: int
    """Position of the row in its source (bad rows count), stable across runs."""
    text: Text
    """A string, or a list of chat messages ending with a non-assistant turn."""
    where: str
    """file:line (or file:row N, dataset[split]:row N), for messages."""


@dataclass
class PromptReport:
    """Counts of one read, so that skipped rows are never silent."""

    source: str = ""
    rows: int = 0
    skipped: int = 0
    problems: Counter = field(default_factory=Counter)
    """Skipped rows by problem (e.g. "field 'prompt': is empty or whitespace only")."""

    def summary(self) -> str:
        text = f"{self.source}: {self.rows - self.skipped} prompts"
        if self.skipped:
            text += f", {self.skipped} bad rows skipped (" + "; ".join(
                f"{count} {problem}" for problem, count in self.problems.most_common()) + ")"
        return text


def read_prompts(source: str, *, column: str = "prompt", split: str = "train", on_bad_row: str = "error",
                 report: Optional[PromptReport] = None, column_option: str = "--prompt-column",
                 on_bad_row_option: str = "--on-bad-row", source_option: str = "--prompts") -> list[Prompt]:
    """The prompts of ``source``, in order. ``on_bad_row``: ``error`` stops at the first bad row
    with its message; ``skip`` logs it, counts it in ``report`` and goes on. No usable prompt at
    all is an error either way."""
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"{on_bad_row_option} {on_bad_row}: must be error or skip. Fix: {_setting(on_bad_row_option, 'error')} "
                        f"or {_setting(on_bad_row_option, 'skip')}")
    report = report if report is not None else PromptReport()
    report.source = source
    prompts: list[Prompt] = []
    for index, (where, row) in enumerate(_rows(source, split, column, source_option)):
        try:
            prompts.append(Prompt(index, parse_prompt(row, column, column_option), where))
        except RowError as exc:
            if on_bad_row == "error":
                raise DataError(exc.message(where) + f" (or {_setting(on_bad_row_option, 'skip')})") from None
            log.warning("skipped %s", exc.message(where))
            report.skipped += 1
            report.problems[exc.reason()] += 1
        report.rows = index + 1
    if not prompts:
        what = "every row was bad and skipped" if report.skipped else "it holds no rows"
        raise DataError(f"{source}: no usable prompts ({what}). Fix: check the file")
    return prompts


def parse_prompt(row: Any, column: str, column_option: str = "--prompt-column") -> Text:
    """The checked prompt of one row, or raise RowError."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(None, f"a row must be a JSON object, got {type(row).__name__}",
                       f"write each row as {{\"{column}\": ...}}")
    if column not in row:
        raise RowError(column, f"missing (the row has {', '.join(map(str, row)) or 'no fields'})",
                       f"add it, or set {column_option} to the prompt's column")
    prompt = check_text_field(row[column], column)
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        # as data.parse_row: the answer to generate is the turn after the prompt
        raise RowError(column, "ends with an assistant message", "the prompt must end with the turn the response answers")
    return prompt


def _setting(option: str, value: str) -> str:
    """How the user sets an option: a flag (``pass --on-bad-row skip``) or a config key
    (``set data.on_bad_row=skip``, as training's messages say)."""
    return f"pass {option} {value}" if option.startswith("-") else f"set {option}={value}"


def _rows(source: str, split: str, column: str, source_option: str) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    suffix = path.suffix.lower()
    if (suffix == ".txt" or suffix in LOCAL_SUFFIXES or path.exists()) and not path.is_file():
        raise DataError(f"{source}: file not found. Fix: check {source_option}")
    if suffix != ".txt":
        yield from read_rows(source, split)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark some editors write; harmless
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}). Fix: re-save the file as UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield f"{path}:{number}", {column: line}
