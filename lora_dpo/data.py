"""Preference files -> validated rows -> token ids.

Reads .jsonl/.json/.parquet files (or a Hugging Face dataset, by name or as a local folder), checks
every row, renders chat rows with the tokenizer's chat template and tokenizes prompt and responses
separately, so the boundary between them is exact and prompt tokens can never leak into the loss.

A response is the assistant's text plus the token that ends its turn; everything the template
writes before the answer's text is prompt (see ``ChatRenderer``), and ``encode_prompt`` gives
generation exactly the prompt ids training uses. Runs with torch alone.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

from .errors import DataError, one_line

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
Text = Union[str, Messages]
CHAT_ROLES = ("system", "user", "assistant", "tool")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Where an assistant turn starts in a dialogue given as one text (Anthropic's HH-RLHF format:
# "\n\nHuman: ...\n\nAssistant: ..."); rows without a prompt are cut just after the last one.
ASSISTANT_TURN = "\n\nAssistant:"


@dataclass
class PreferenceExample:
    """One validated row: all three parts plain text, or all three message lists."""

    prompt: Text
    chosen: Text
    rejected: Text
    where: str
    implicit_prompt: bool = False
    """The row had no prompt: it was split off chosen/rejected (their shared start)."""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class TokenizedPair:
    """Token ids of one pair; the loss counts chosen_ids and rejected_ids, never prompt_ids."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens an unshared implementation processes: the prompt twice, each response once."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class DataReport:
    """Counts shown at the start of a run, so silent data loss cannot happen."""

    source: str
    rows: int = 0
    skipped: int = 0
    implicit_prompts: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped: int = 0
    problems: Counter = field(default_factory=Counter)
    """Skipped rows by problem (e.g. "field 'rejected': is identical to chosen"), as prompts.PromptReport counts them."""

    def summary(self) -> str:
        parts = [f"{self.source}: {self.rows} rows"]
        if self.skipped:
            parts.append(f"{self.skipped} bad rows skipped")
        if self.implicit_prompts:
            parts.append(f"{self.implicit_prompts} prompts taken from the shared start of chosen and rejected")
        parts.append(f"{self.truncated_prompts} prompts and {self.truncated_responses} responses truncated")
        if self.dropped:
            parts.append(f"{self.dropped} pairs dropped (chosen and rejected identical after truncation)")
        return ", ".join(parts)


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    reports: list[DataReport] = field(default_factory=list)


class RowError(Exception):
    """A bad row: the field it concerns and what to do."""

    def __init__(self, field_name: str | None, problem: str, fix: str):
        super().__init__(problem)
        self.field_name = field_name
        self.problem = problem
        self.fix = fix

    def message(self, where: str) -> str:
        field_part = f" field '{self.field_name}':" if self.field_name else ""
        return f"{where}:{field_part} {self.problem}. Fix: {self.fix}"

    def reason(self) -> str:
        """The problem without its row: what skipped rows are counted by."""
        return (f"field '{self.field_name}': " if self.field_name else "") + self.problem


# ---------------------------------------------------------------------------------------------
# Reading


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield (location, row) from a local file, a local dataset folder or a Hugging Face dataset;
    location is file:line (file:row N for .json/.parquet, name[split]:row N for datasets)."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _read_dataset_folder(path, split)
        return
    if suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"{source}: file not found. Fix: check data.train_file / data.eval_file")
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            raise DataError(f"{source}: unsupported file type '{suffix}'. Fix: use .jsonl, .json or .parquet, "
                            "or a folder the datasets package reads")
        return
    yield from _read_hub(source, split)


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "not UTF-8 text (it starts with a UTF-16 byte-order mark)"
    return f"not UTF-8 text (byte {exc.start})"


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Unreadable lines are yielded as RowError, so on_bad_row decides between stopping and skipping."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark some editors write; harmless
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, RowError(None, _not_utf8(raw, exc), "re-save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                fix = "the last line looks cut off: complete or delete it" if not raw.endswith(b"\n") else "each line must be one JSON object"
                yield where, RowError(None, f"invalid JSON ({exc.msg} at column {exc.colno})", fix)
            except RecursionError:  # json gives up on a few hundred levels of nesting
                yield where, RowError(None, "JSON nested too deeply to read", "each line must be one flat JSON object")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {_not_utf8(raw, exc)}. Fix: re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}). Fix: correct the JSON syntax") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read. Fix: write a flat array of row objects") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}. "
                        "Fix: write [{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}, ...] or use .jsonl")
    for index, row in enumerate(data):
        yield f"{path}:row {index}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow. Fix: pip install 'lora-dpo[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({exc}). Fix: check the file") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}:row {index}", row


def _import_datasets(what: str, fix: str = "pip install 'lora-dpo[hub]'") -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets package. Fix: {fix}") from None
    return datasets


def _read_dataset_folder(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """A folder ``datasets`` reads: data files named by split (train.parquet, data/test-*.jsonl, ...)
    as ``load_dataset`` finds them, or the output of ``save_to_disk``."""
    datasets = _import_datasets(f"{path} is a folder: reading it as a dataset",
                                "pip install 'lora-dpo[hub]', or point at one .jsonl/.json/.parquet file in the folder")
    fix = ("name the files by split (train.parquet, test.jsonl, ...) as the datasets package expects, "
           "or point at one .jsonl/.json/.parquet file in the folder")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dataset = datasets.load_from_disk(str(path))  # written by save_to_disk: arrow files, no data files
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"{path}: no split '{split}' (it has {', '.join(dataset)}). "
                                    "Fix: set data.train_split / data.eval_split")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(str(path), split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (ValueError for a missing split, FileNotFoundError, ...)
        raise DataError(f"{path} (split {split}): cannot read this dataset folder ({type(exc).__name__}: "
                        f"{one_line(exc)}). Fix: {fix}") from None
    for index, row in enumerate(dataset):
        yield f"{path}[{split}]:row {index}", row


def _read_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    datasets = _import_datasets(f"{name}: no such local file or folder, and reading Hugging Face datasets",
                                "check the path, or pip install 'lora-dpo[hub]'")
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"{name} (split {split}): cannot load this dataset ({type(exc).__name__}: {one_line(exc)}). "
                        "Fix: check the name and split, or download it and point to a local file") from None
    for index, row in enumerate(dataset):
        yield f"{name}[{split}]:row {index}", row


# ---------------------------------------------------------------------------------------------
# Validation


def parse_row(row: Any, prompt_column: str, chosen_column: str, rejected_column: str) -> tuple[Text, Text, Text]:
    """Check one row and return (prompt, chosen, rejected) in one consistent shape, or raise RowError.
    A row without a prompt takes the shared start of chosen and rejected as its prompt."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(None, f"a row must be a JSON object, got {type(row).__name__}",
                       f"write each row as {{\"{prompt_column}\": ..., \"{chosen_column}\": ..., \"{rejected_column}\": ...}}")
    for column in (chosen_column, rejected_column):
        if column not in row:
            raise RowError(column, f"missing (the row has {_names(row)})",
                           f"add it, or set data.{'chosen' if column == chosen_column else 'rejected'}_column to the right column")
    chosen = check_text_field(row[chosen_column], chosen_column)
    rejected = check_text_field(row[rejected_column], rejected_column)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowError(rejected_column, "chosen and rejected mix plain text and chat messages",
                       "give both as strings or both as message lists")
    prompt = row.get(prompt_column)
    if isinstance(chosen, list):
        if prompt is None:
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected, chosen_column)
        else:
            prompt = check_text_field(prompt, prompt_column)
            if not isinstance(prompt, list):
                raise RowError(prompt_column, "is plain text but the responses are chat messages",
                               "give the prompt as a list of messages, e.g. [{\"role\": \"user\", \"content\": ...}]")
            chosen = _strip_prompt(prompt, chosen)
            rejected = _strip_prompt(prompt, rejected)
        for column, messages in ((chosen_column, chosen), (rejected_column, rejected)):
            if not messages:
                raise RowError(column, "has no response after the prompt", "add the assistant's answer")
            if messages[0]["role"] != "assistant":
                raise RowError(column, f"the response starts with a '{messages[0]['role']}' message",
                               "responses must start with an assistant message")
            if messages[-1]["role"] != "assistant":
                raise RowError(column, f"the response ends with a '{messages[-1]['role']}' message",
                               "end it with the assistant's answer: a response is scored up to the end of the assistant's turn")
        if prompt and prompt[-1]["role"] == "assistant":
            raise RowError(prompt_column, "ends with an assistant message", "the prompt must end with the turn the response answers")
    else:
        if prompt is None:
            prompt, chosen, rejected = _split_text_dialogue(chosen, rejected, row, prompt_column, chosen_column,
                                                            rejected_column)
        else:
            prompt = check_text_field(prompt, prompt_column)
            if isinstance(prompt, list):
                raise RowError(prompt_column, "is a chat message list but the responses are plain text",
                               "give all three as strings or all three as message lists")
    if chosen == rejected:
        raise RowError(rejected_column, "is identical to chosen", "a pair needs two different responses; remove the row")
    return prompt, chosen, rejected


def check_text_field(value: Any, column: str) -> Text:
    """A text field (a string, or a list of chat messages) checked for what would stop training
    later: emptiness, wrong types, and lone surrogate escapes, which no tokenizer can encode."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(column, "is empty or whitespace only", "give it text, or remove the row")
        _check_encodable(value, column)
        return value
    if isinstance(value, list):
        if not value:
            raise RowError(column, "is an empty message list", "give at least one message")
        return [_check_message(message, column, index) for index, message in enumerate(value)]
    kind = "null" if value is None else type(value).__name__
    raise RowError(column, f"must be a string or a list of chat messages, got {kind}",
                   "store text as a JSON string")


def _check_encodable(text: str, column: str, what: str = "") -> None:
    """JSON can spell half of a UTF-16 pair ("\\ud83d", a truncated emoji in scraped text); Python
    reads it as a lone surrogate, which has no UTF-8 form, and tokenizers then fail deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(column, f"{what}holds a lone surrogate escape {ascii(text[exc.start])[1:-1]} at character "
                               f"{exc.start} (half of a character such as an emoji, cut off where the text was truncated)",
                       "delete the escape or complete the character in the file, or remove the row") from None


def _check_nested_text(value: Any, column: str, what: str) -> None:
    """Every string (keys included) inside a JSON value; iterative, as JSON nesting can be deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_encodable(item, column, what)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _check_message(message: Any, column: str, index: int) -> dict[str, Any]:
    """role and content checked; other keys (tool_calls, tool_call_id, name, reasoning_content, ...)
    kept for the chat template, except null ones (Arrow-backed files give every message every key)."""
    if not isinstance(message, dict) or "role" not in message:
        raise RowError(column, f"message {index} is not an object with 'role' and 'content'",
                       "write messages as {\"role\": \"user\", \"content\": \"...\"}")
    role = message["role"]
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise RowError(column, f"message {index} has unknown role {_short_repr(role)}", f"use one of {', '.join(CHAT_ROLES)}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not (isinstance(tool_calls, list) and all(isinstance(call, dict) for call in tool_calls)):
        raise RowError(column, f"message {index} tool_calls must be a list of objects, got {type(tool_calls).__name__}",
                       "write tool_calls as [{\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": {...}}}]")
    content = message.get("content")
    if content is None and role == "assistant" and tool_calls:
        content = ""  # a turn that only calls tools; templates expect a string
    elif "content" not in message:
        raise RowError(column, f"message {index} is not an object with 'role' and 'content'",
                       "write messages as {\"role\": \"user\", \"content\": \"...\"}")
    if not isinstance(content, str):
        raise RowError(column, f"message {index} content must be a string, got {type(content).__name__}",
                       "store message text as a JSON string")
    _check_encodable(content, column, f"message {index} content ")
    if role == "assistant" and not tool_calls and not content.strip():
        raise RowError(column, f"message {index} (assistant) is empty", "give the response text, or remove the row")
    checked: dict[str, Any] = {"role": role, "content": content}
    for key, value in message.items():
        if key not in checked and value is not None:
            _check_nested_text([key, value], column, f"message {index} {_short_repr(key)} ")
            checked[key] = value
    return checked


def _names(row: dict) -> str:
    return ", ".join(name if name.isprintable() else ascii(name) for name in map(str, row)) or "no fields"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = ascii(value)  # one line and printable whatever the value holds
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strip_prompt(prompt: Messages, messages: Messages) -> Messages:
    """Accept chosen/rejected given either as responses only or as full conversations."""
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        return messages[len(prompt):]
    return messages


def _split_shared_prefix(chosen: Messages, rejected: Messages, chosen_column: str) -> tuple[Messages, Messages, Messages]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1  # the prompt ends on the turn the responses answer
    if shared == 0:
        raise RowError(chosen_column, "there is no prompt column and chosen/rejected share no leading user turn",
                       "add a prompt column, or give full conversations that start with the same user message")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_text_dialogue(chosen: str, rejected: str, row: dict, prompt_column: str, chosen_column: str,
                         rejected_column: str) -> tuple[str, str, str]:
    """HH-RLHF rows: two whole dialogues as text. The prompt is their shared start up to and including
    the last "\\n\\nAssistant:" inside it, so the cut is at a turn boundary, never inside a word, and
    the responses keep the space after the colon (the model generates it)."""
    search_end = len(chosen)
    while True:  # from the last assistant turn back to the first one both texts reach alike
        cut = chosen.rfind(ASSISTANT_TURN, 0, search_end)
        if cut < 0:
            raise RowError(prompt_column, f"missing (the row has {_names(row)}), and chosen and rejected share no "
                                          f"dialogue up to an {ascii(ASSISTANT_TURN)[1:-1]} turn to take it from",
                           f"add a {prompt_column} column (or set data.prompt_column), or give both texts as the same "
                           "dialogue '\\n\\nHuman: ...\\n\\nAssistant: ...' that differs only in the last assistant turn")
        if rejected.startswith(chosen[: cut + len(ASSISTANT_TURN)]):
            break
        search_end = cut + len(ASSISTANT_TURN) - 1
    end = cut + len(ASSISTANT_TURN)
    prompt, chosen, rejected = chosen[:end], chosen[end:], rejected[end:]
    for column, text in ((chosen_column, chosen), (rejected_column, rejected)):
        if not text.strip():
            raise RowError(column, "has no text after the last 'Assistant:' turn", "give the answer, or remove the row")
    return prompt, chosen, rejected


def load_examples(source: str, split: str, columns: tuple[str, str, str], on_bad_row: str,
                  report: DataReport) -> list[PreferenceExample]:
    examples: list[PreferenceExample] = []
    chat_format: bool | None = None
    for where, row in read_rows(source, split):
        try:
            prompt, chosen, rejected = parse_row(row, *columns)
            is_chat = isinstance(chosen, list)
            if chat_format is None:
                chat_format = is_chat
            elif chat_format != is_chat:
                first = "chat messages" if chat_format else "plain text"
                raise RowError(columns[1], f"this row is {'chat messages' if is_chat else 'plain text'} but earlier rows are {first}",
                               "use one format for the whole file")
        except RowError as exc:
            if on_bad_row == "error":
                raise DataError(exc.message(where) + " (or set data.on_bad_row=skip)") from None
            log.warning("skipped %s", exc.message(where))
            report.skipped += 1
            report.problems[exc.reason()] += 1
            continue
        examples.append(PreferenceExample(prompt, chosen, rejected, where, implicit_prompt=row.get(columns[0]) is None))
    report.rows = len(examples) + report.skipped
    report.implicit_prompts = sum(example.implicit_prompt for example in examples)
    if not examples:
        what = "every row was bad and skipped" if report.skipped else "it holds no rows"
        raise DataError(f"{source}: no usable preference pairs ({what}). Fix: check the file")
    return examples


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization
#
# A response is the assistant's text as the chat template writes it, plus the token that ends the
# turn (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>). Everything the template writes before the
# answer's text is prompt: the generation prompt, and fixed text it puts before every answer
# (Qwen3's empty think block). What it writes after the end-of-turn token (a newline before the
# next turn) is neither: the model never generates it. Scored, such tokens cancel in sigmoid DPO but
# count in the response lengths of IPO, SimPO and ORPO and in the NLL terms of RPO and ORPO.

# Assistant text put in a probe message to find where the template writes an answer: letters only,
# so the filters templates apply to content (trim, lstrip) leave it whole.
ANSWER_PROBE = "LoraDpoAnswerProbe"


@dataclass(frozen=True)
class AnswerFrame:
    """Where a chat template puts the answer to one prompt."""

    prompt: str
    """Text before the answer's first token: the prompt training and generation both use."""
    generation_prompt: str
    """The template's own generation prompt (add_generation_prompt=True)."""
    turn_end: str
    """Text after the answer that is scored with it: up to and including the end-of-turn token."""
    after_turn: str
    """Text after the end-of-turn token (a newline before the next turn): not scored."""
    append_eos: bool
    """The template ends the turn with no token of its own, so the tokenizer's EOS closes it."""


@dataclass(frozen=True)
class RenderedPair:
    """A pair as the texts that are tokenized: prompt, and each response up to its end of turn."""

    prompt: str
    chosen: str
    rejected: str
    append_eos: bool
    """Append the tokenizer's EOS to each response (plain rows, templates without a turn-end token)."""
    prompt_special_tokens: bool
    """Tokenize the prompt with the tokenizer's special tokens (BOS): plain rows; a rendered chat holds them."""


class ChatRenderer:
    """Renders chat rows with a tokenizer's chat template and cuts them where the model's answer
    starts and ends. One per tokenizer: it remembers how the template ends a turn."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._added_tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._turn_ends: dict[str, tuple[str, str, bool]] = {}

    def render_text(self, messages: Messages, field_name: str | None = None, **options: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)
        except Exception as exc:  # a template is code shipped with the model: whatever it raises is about this row
            raise RowError(field_name, f"the chat template cannot render this conversation ({one_line(exc)})",
                           "give the turns in an order the model's template accepts (many want user and assistant "
                           "to alternate, some allow no system message), or remove the row") from None

    def frame(self, prompt: Messages) -> AnswerFrame:
        """Where the answer to ``prompt`` starts and how its turn ends, from the template's rendering
        of the prompt followed by a probe answer."""
        generation_prompt = self.render_text(prompt, add_generation_prompt=True)
        probed = self.render_text(prompt + [{"role": "assistant", "content": ANSWER_PROBE}])
        if probed.count(ANSWER_PROBE) != 1:
            raise RowError(None, "the chat template does not write an assistant's text as given, so where a response "
                                 "starts cannot be found", "give the rows as plain text")
        before, after = probed.split(ANSWER_PROBE)
        if before.startswith(generation_prompt) and not before[len(generation_prompt):].strip():
            # Only whitespace between the generation prompt and the answer (Mistral's " " after
            # [/INST]): it belongs to the answer, as the model generates it with its first word.
            prompt_text = generation_prompt
        else:
            # Fixed text before every answer (Qwen3's "<think>\n\n</think>\n\n", which its template
            # writes for enable_thinking=False), or a generation prompt unlike the start of a written
            # answer (one that opens a think block): the prompt is what precedes a written answer.
            prompt_text = before
        return AnswerFrame(prompt_text, generation_prompt, *self._turn_end(after))

    def _turn_end(self, after: str) -> tuple[str, str, bool]:
        """Split what follows an answer's text at the end of the first added token in it; without
        one, the turn ends at its last non-space character and the tokenizer's EOS closes it."""
        if after not in self._turn_ends:
            first: tuple[int, str] | None = None
            for token in self._added_tokens:  # longest first, so at one position the longest token wins
                at = after.find(token)
                if at >= 0 and (first is None or at < first[0]):
                    first = (at, token)
            if first is not None:
                end = first[0] + len(first[1])
                self._turn_ends[after] = (after[:end], after[end:], False)
            else:
                closing = after.rstrip()
                self._turn_ends[after] = (closing, after[len(closing):], True)
        return self._turn_ends[after]

    def render_pair(self, example: PreferenceExample) -> RenderedPair:
        frame = self.frame(example.prompt)
        fulls = {column: self.render_text(example.prompt + response, column)
                 for column, response in (("chosen", example.chosen), ("rejected", example.rejected))}
        # Responses that write the template's fixed text themselves (their own think block) start
        # right after the generation prompt.
        for prompt_text in dict.fromkeys((frame.prompt, frame.generation_prompt)):
            if all(full.startswith(prompt_text) for full in fulls.values()):
                break
        else:
            raise RowError(None, "the chat template renders the prompt differently once a response follows, so the "
                                 "response cannot be separated", "give the rows as plain text")
        ending = frame.turn_end + frame.after_turn
        responses = []
        for column, full in fulls.items():
            rest = full[len(prompt_text):]
            if not rest.endswith(ending):
                raise RowError(column, "the chat template ends this response unlike a plain answer, so its end of turn "
                                       "cannot be found", "end the response with a plain assistant message, or give the "
                                                          "rows as plain text")
            responses.append(rest[: len(rest) - len(frame.after_turn)])
        return RenderedPair(prompt_text, responses[0], responses[1], frame.append_eos, prompt_special_tokens=False)


def _render_row(example: PreferenceExample, tokenizer: Any, renderer: ChatRenderer | None) -> RenderedPair:
    """Raises DataError for the whole file (no chat template), RowError for this row."""
    if not example.is_chat:
        return RenderedPair(example.prompt, example.chosen, example.rejected, append_eos=True, prompt_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{example.where}: rows are chat messages but the tokenizer has no chat template. "
                        "Fix: use a chat/instruct model, or give prompt/chosen/rejected as plain text")
    return (renderer or ChatRenderer(tokenizer)).render_pair(example)


def render(example: PreferenceExample, tokenizer: Any) -> RenderedPair:
    """The texts one pair is tokenized from; chat rows go through the tokenizer's chat template."""
    try:
        return _render_row(example, tokenizer, None)
    except RowError as exc:
        raise DataError(exc.message(example.where)) from None


def encode_prompt(tokenizer: Any, prompt: Text, chat_template: bool = True) -> list[int]:
    """The token ids training puts before the responses to ``prompt``: generation that starts from
    them continues exactly the context training scored answers in.

    - chat messages: the template's rendering up to where the answer's text starts (its generation
      prompt, plus fixed text it writes before every answer, e.g. Qwen3's empty think block);
    - text, with ``chat_template`` and a tokenizer that has one: the same for one user message (a
      chat row whose prompt is ``[{"role": "user", "content": text}]``);
    - text otherwise: the text with the tokenizer's special tokens (BOS), as plain rows train.

    Not truncated: training keeps the last ``data.max_prompt_length`` ids of a longer prompt.
    Chat rows whose responses write their own think block train after the bare generation prompt
    instead (docs/data.md). Raises DataError for a prompt that cannot be used.
    """
    try:
        prompt = check_text_field(prompt, "prompt")
    except RowError as exc:
        raise DataError(exc.message("prompt")) from None
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_template = chat_template and has_template
    if isinstance(prompt, list) and not use_template:
        why = "chat templates are switched off" if has_template else "the tokenizer has no chat template"
        raise DataError(f"prompt: a list of chat messages but {why}. Fix: give a plain-text prompt"
                        + (", or switch the chat template on" if has_template else ", or use a chat/instruct model"))
    if not use_template:
        return tokenizer(prompt)["input_ids"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if messages[-1]["role"] == "assistant":
        raise DataError("prompt: ends with an assistant message. Fix: end it with the turn the answer replies to")
    try:
        text = ChatRenderer(tokenizer).frame(messages).prompt
    except RowError as exc:
        raise DataError(exc.message("prompt")) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_examples(examples: list[PreferenceExample], tokenizer: Any, max_length: int,
                      max_prompt_length: int, report: DataReport, on_bad_row: str = "error") -> list[TokenizedPair]:
    """Render and tokenize, end each response with its turn's end (EOS where nothing else ends it),
    truncate, and count every skip, truncation and drop. A row the chat template cannot render or
    cut stops here, or is skipped and counted under on_bad_row=skip."""
    if not examples:
        return []
    renderer = ChatRenderer(tokenizer) if examples[0].is_chat and getattr(tokenizer, "chat_template", None) else None
    texts = []
    for example in examples:
        try:
            texts.append(_render_row(example, tokenizer, renderer))
        except RowError as exc:
            if on_bad_row == "error":
                raise DataError(exc.message(example.where) + " (or set data.on_bad_row=skip)") from None
            log.warning("skipped %s", exc.message(example.where))
            report.skipped += 1
            report.problems[exc.reason()] += 1
            report.implicit_prompts -= example.implicit_prompt
    if not texts:
        return []
    prompts = tokenizer([t.prompt for t in texts], add_special_tokens=texts[0].prompt_special_tokens)["input_ids"]
    chosen = tokenizer([t.chosen for t in texts], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([t.rejected for t in texts], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pairs = []
    for text, prompt_ids, chosen_ids, rejected_ids in zip(texts, prompts, chosen, rejected):
        ending = [eos] if text.append_eos and eos is not None else []
        chosen_ids, rejected_ids = list(chosen_ids) + ending, list(rejected_ids) + ending
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: it is what the response answers
            report.truncated_prompts += 1
        room = max_length - len(prompt_ids)
        for ids in (chosen_ids, rejected_ids):
            if len(ids) > room:
                report.truncated_responses += 1
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            report.dropped += 1
            continue
        pairs.append(TokenizedPair(list(prompt_ids), chosen_ids, rejected_ids))
    return pairs


@dataclass
class ExampleSplits:
    """Validated rows, before tokenization: reading them needs no tokenizer, so bad data is
    reported before a model (a minute of loading for 8B) is touched."""

    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    reports: list[DataReport]
    has_eval: bool


def read_preference_examples(data_config: Any, seed: int) -> ExampleSplits:
    """Read and validate the train (and eval) rows described by DataConfig, and split off eval."""
    columns = (data_config.prompt_column, data_config.chosen_column, data_config.rejected_column)
    train_report = DataReport(data_config.train_file)
    train_examples = load_examples(data_config.train_file, data_config.train_split, columns,
                                   data_config.on_bad_row, train_report)
    reports = [train_report]
    eval_examples: list[PreferenceExample] = []
    if data_config.eval_file:
        eval_report = DataReport(data_config.eval_file)
        eval_examples = load_examples(data_config.eval_file, data_config.eval_split, columns,
                                      data_config.on_bad_row, eval_report)
        reports.append(eval_report)
    elif data_config.eval_fraction > 0 and len(train_examples) > 1:
        order = list(range(len(train_examples)))
        random.Random(seed).shuffle(order)
        n_eval = min(len(order) - 1, max(1, round(data_config.eval_fraction * len(order))))
        held_out = set(order[:n_eval])
        eval_examples = [e for i, e in enumerate(train_examples) if i in held_out]
        train_examples = [e for i, e in enumerate(train_examples) if i not in held_out]
        eval_report = DataReport(f"{data_config.train_file} (held out {data_config.eval_fraction:g})")
        eval_report.rows = len(eval_examples)
        eval_report.implicit_prompts = sum(example.implicit_prompt for example in eval_examples)
        train_report.rows -= len(eval_examples)
        train_report.implicit_prompts -= eval_report.implicit_prompts
        reports.append(eval_report)
    return ExampleSplits(train_examples, eval_examples, reports, has_eval=len(reports) > 1)


def tokenize_preference_data(splits: ExampleSplits, data_config: Any, tokenizer: Any) -> PreferenceData:
    """Tokenize both splits, counting skips, truncations and drops into each split's report."""
    train = tokenize_examples(splits.train, tokenizer, data_config.max_length, data_config.max_prompt_length,
                              splits.reports[0], data_config.on_bad_row)
    if not train:
        if splits.reports[0].dropped:
            raise DataError(f"{data_config.train_file}: no pairs left after truncation (all chosen/rejected became "
                            "identical). Fix: raise data.max_length or lower data.max_prompt_length")
        raise DataError(f"{data_config.train_file}: no usable preference pairs (the chat template rejected every row "
                        "and each was skipped). Fix: check the rows against the model's chat template")
    evaluation = []
    if splits.has_eval:
        evaluation = tokenize_examples(splits.eval, tokenizer, data_config.max_length,
                                       data_config.max_prompt_length, splits.reports[1], data_config.on_bad_row)
    return PreferenceData(train, evaluation, splits.reports)


def load_preference_data(data_config: Any, tokenizer: Any, seed: int) -> PreferenceData:
    """Read, validate, split and tokenize the train (and eval) pairs described by DataConfig."""
    return tokenize_preference_data(read_preference_examples(data_config, seed), data_config, tokenizer)



# ---------------------------------------------------------------------------------------------
# The audit a run keeps of its data (data_audit.json, shown by the report)

AUDIT_FORMAT = 1
HISTOGRAM_BINS = 20


def data_audit(data: PreferenceData) -> dict[str, Any]:
    """What was read and what became of it, per split: the counts of its DataReport (rows, skipped
    by problem, truncations, pairs whose chosen and rejected are the same) and token-length
    histograms of the prompts and responses as trained (after truncation). JSON-able."""
    splits = []
    for name, pairs, report in zip(("train", "held-out"), (data.train, data.eval), data.reports):
        identical_skipped = sum(count for problem, count in report.problems.items() if "identical to" in problem)
        splits.append({
            "name": name, "source": report.source, "rows": report.rows, "skipped": report.skipped,
            "skipped_by_reason": dict(report.problems.most_common()), "implicit_prompts": report.implicit_prompts,
            "truncated_prompts": report.truncated_prompts, "truncated_responses": report.truncated_responses,
            # Skipped as bad rows (identical as read) or dropped (identical once truncated).
            "chosen_equals_rejected": {"rows_skipped": identical_skipped, "dropped_after_truncation": report.dropped},
            "pairs": len(pairs),
            "lengths": {part: length_histogram([len(getattr(pair, f"{part}_ids")) for pair in pairs])
                        for part in ("prompt", "chosen", "rejected")},
        })
    return {"format": AUDIT_FORMAT, "splits": splits}


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Equal-width bins from 0 to the longest length: ``edges`` (bins + 1 values) and ``counts``;
    the last bin includes its right edge. Also the mean, median and maximum."""
    if not lengths:
        return {"edges": [], "counts": [], "mean": 0.0, "median": 0, "max": 0}
    top = max(lengths)
    width = max(1, -(-top // bins))  # whole tokens per bin, enough bins to reach the longest
    count = max(1, -(-top // width))
    counts = [0] * count
    for length in lengths:
        counts[min(count - 1, length // width)] += 1
    return {"edges": [i * width for i in range(count + 1)], "counts": counts, "mean": sum(lengths) / len(lengths),
            "median": sorted(lengths)[len(lengths) // 2], "max": top}


def write_data_audit(data: PreferenceData, path: Path) -> None:
    """``data_audit`` as JSON at ``path``, atomically."""
    from .records import write_text_atomic

    write_text_atomic(path, json.dumps(data_audit(data), indent=1) + "\n")
