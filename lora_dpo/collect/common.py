"""What the collect commands share: flags, prompts, the model behind them, resumable outputs,
the progress bar and the candidates stage.

Every command reads its prompts with ``prompts.read_prompts`` (the same checks and messages as
training data), loads models with ``modeling.load_inference_model``, samples with
``generation.sample`` (per-answer seeds from (seed, prompt index, sample index), so a resumed run
draws what an uninterrupted one draws) and writes with ``records.open_records`` under a
fingerprint of every argument that decides the contents: a rerun of the same command continues,
different arguments against an existing output stop with a message naming what changed.

``ChatModel`` is the one thing the commands ask of a model: sampled replies to chat turns, and
the log-probs of fixed option texts after a conversation (the judge's letters). Tests put a
scripted stand-in with the same two methods in its place.

The candidates stage (``collect_candidates``) samples n answers per prompt into a resumable file
beside the output (``OUT.candidates``) before anything scores them, so that on one GPU the
generator can be freed before the reward model or judge loads; the file is removed once the
output is complete.

Several processes (torchrun or accelerate launch, each holding the whole model on its own
device): ``launch`` gives the command's processes. The main process alone opens, writes and
closes the outputs; the others learn from it which prompts are done (``records.open_shared``).
Each chunk of prompts is shared out (``records.in_chunks``: every process works on every
``count``-th prompt of the chunk, the results are gathered in prompt order, the main process
writes them), so a kill loses at most a chunk, and every process makes the same collective
calls. The rows equal one process's: every random draw is named by its prompt.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..data import RowError, Text, check_text_field, encode_prompt, parse_row
from ..errors import DataError, LoraDpoError
from ..generation import Sample, SamplingSettings, sample
from ..prompts import Prompt, PromptReport, read_prompts
from ..records import CHUNK_BATCHES, Followed, Records, content_hash, in_chunks, open_shared, progress_path

log = logging.getLogger("lora_dpo.collect")

SAMPLING_KEYS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                 "repetition_penalty": float, "stop": list}
CANDIDATES_SUFFIX = ".candidates"


# ---------------------------------------------------------------------------------------------
# Flags


def add_input_arguments(parser: Any) -> None:
    parser.add_argument("--prompts", required=True,
                        help="prompt file: .txt (one per line), .jsonl/.json/.parquet or a hub dataset with a prompt column")
    parser.add_argument("--prompt-column", default="prompt", help="column of the prompt (text or chat messages)")
    parser.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                        help="a bad prompt row stops the command, or is skipped and counted")
    parser.add_argument("--limit", type=int, help="use only the first N prompts (try a few before a long run)")
    parser.add_argument("--out", required=True, help="output JSONL of pairs; a rerun of the same command continues it")
    parser.add_argument("--overwrite", action="store_true", help="start --out again instead of continuing it")


def add_model_arguments(parser: Any, flag: str, what: str) -> None:
    """``flag`` (--generator, --model), its --adapter and its 4-bit switch."""
    parser.add_argument(flag, required=True, help=f"{what}: a model directory or hub id (or an adapter directory)")
    parser.add_argument("--adapter", help="LoRA adapter on top (a training run's output.dir): round k's model "
                        "generates round k+1's data")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="load a plain model in 4-bit NF4 (an adapter's base loads as its run trained it)")


def add_sampling_arguments(parser: Any, num_samples: Optional[int]) -> None:
    defaults = SamplingSettings()
    if num_samples is not None:
        parser.add_argument("-n", "--num-samples", type=int, default=num_samples, help="answers sampled per prompt")
    for name, kind in SAMPLING_KEYS.items():
        flag = "--" + name.replace("_", "-")
        if name == "stop":
            parser.add_argument(flag, action="append", default=None, metavar="TEXT",
                                help="also end an answer where this text appears (repeatable)")
        else:
            parser.add_argument(flag, type=kind, default=None,
                                help=f"default {getattr(defaults, name)}, or the --config file's sampling section")
    parser.add_argument("--config", help="YAML file whose 'sampling:' section sets the sampling flags (flags win)")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same command writes the same file")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences generated together; more is faster and needs more memory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="compute dtype (auto: as trained for an adapter, as saved for a model)")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where to run the models")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def sampling_settings(args: Any, num_samples: int = 1) -> SamplingSettings:
    """Flags first, then the --config file's sampling section, then SamplingSettings' defaults."""
    section = read_sampling_section(args.config) if args.config else {}
    values = {}
    for name in SAMPLING_KEYS:
        flag = getattr(args, name)
        values[name] = flag if flag is not None else section.get(name, getattr(SamplingSettings, name))
    values["stop"] = tuple(values["stop"])
    settings = SamplingSettings(**values, seed=args.seed, num_samples=num_samples)
    settings.check()
    if args.batch_size < 1:
        raise LoraDpoError(f"--batch-size {args.batch_size}: must be at least 1")
    return settings


def read_sampling_section(path: str) -> dict[str, Any]:
    """The ``sampling:`` section of a YAML file, every key and type checked."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise LoraDpoError(f"--config {path}: file not found. Fix: check the path")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LoraDpoError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())[:120]}). Fix: correct it") from None
    if not isinstance(raw, dict) or set(raw) - {"sampling"}:
        extra = sorted(map(str, set(raw) - {"sampling"})) if isinstance(raw, dict) else ["(not a mapping)"]
        raise LoraDpoError(f"--config {path}: unknown top-level key {extra[0]}; a collect config holds a 'sampling:' "
                           "section only. Fix: remove it")
    section = raw.get("sampling") or {}
    if not isinstance(section, dict):
        raise LoraDpoError(f"--config {path}: sampling must be a mapping of settings. Fix: e.g. sampling: {{temperature: 0.8}}")
    checked = {}
    for key, value in section.items():
        if key not in SAMPLING_KEYS:
            close = difflib.get_close_matches(str(key), list(SAMPLING_KEYS), n=1)
            hint = f"did you mean sampling.{close[0]}?" if close else "known: " + ", ".join(SAMPLING_KEYS)
            raise LoraDpoError(f"--config {path}: unknown key sampling.{key} ({hint}). Fix: correct or remove it")
        kind = SAMPLING_KEYS[key]
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(item, str) and item for item in value)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            wanted = "a list of non-empty strings" if key == "stop" else f"a{'n integer' if kind is int else ' number'}"
            raise LoraDpoError(f"--config {path}: sampling.{key} is {value!r}, must be {wanted}. Fix: correct it")
        checked[key] = value
    return checked


# ---------------------------------------------------------------------------------------------
# Prompts, fingerprints, outputs


def read_collect_prompts(args: Any) -> list[Prompt]:
    report = PromptReport()
    prompts = read_prompts(args.prompts, column=args.prompt_column, on_bad_row=args.on_bad_row, report=report)
    if report.skipped:
        log.warning(report.summary())
    if args.limit is not None:
        if args.limit < 1:
            raise LoraDpoError(f"--limit {args.limit}: must be at least 1")
        prompts = prompts[:args.limit]
    return prompts


def prompts_fingerprint(prompts: Sequence[Prompt]) -> dict[str, Any]:
    return {"prompts": len(prompts), "prompts_hash": content_hash([[p.index, p.text] for p in prompts])}


def sampling_record(settings: SamplingSettings) -> dict[str, Any]:
    """The sampling settings as rows and fingerprints record them."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def open_output(path: str | Path, fingerprint: dict[str, Any], overwrite: bool, processes: Any) -> "Records | Followed":
    out = open_shared(path, fingerprint, overwrite, processes)
    if isinstance(out, Records):
        log.info(out.status())
    return out


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage of a command (critique round 2, ...): unrelated streams per stage,
    the same on every run."""
    return int(content_hash([seed, stage]), 16) >> 1


def pair_row(prompt: Text, chosen: str, rejected: str, **audit: Any) -> dict[str, Any]:
    """A row ``lora-dpo train`` takes as it is: text responses to a text prompt, assistant
    messages to a chat prompt, checked by the training data's own row check (empty text, lone
    surrogates, chosen identical to rejected). Raises RowError."""
    if isinstance(prompt, list):
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    parse_row(row, "prompt", "chosen", "rejected")
    return {**row, **audit}


def unusable(exc: RowError) -> str:
    """A skip reason for a pair the row check refused, without the details that differ from row
    to row (which escape, at which character), so that skips count by kind."""
    problem = re.split(r" \\u| at character| \(", exc.problem)[0]
    return f"unusable pair ({exc.field_name}: {problem})" if exc.field_name else f"unusable pair ({problem})"


def check_text(value: Any, what: str) -> str:
    """A text field of a principles file or a scripted model, through the training data's checks."""
    try:
        text = check_text_field(value, what)
    except RowError as exc:
        raise DataError(f"{what}: {exc.problem}. Fix: {exc.fix}") from None
    if not isinstance(text, str):
        raise DataError(f"{what}: must be a string. Fix: write it as text")
    return text


def show_bar(args: Any) -> bool:
    return not args.no_progress


# ---------------------------------------------------------------------------------------------
# The model


class ChatModel:
    """A loaded model (``modeling.InferenceModel``) that answers chat turns."""

    def __init__(self, loaded: Any, name: str, adapter: Optional[str], batch_size: int):
        self.loaded = loaded
        self.name = name
        self.adapter = adapter
        self.batch_size = batch_size
        self.description = loaded.description

    def reply(self, conversations: Sequence[Text], indices: Sequence[int], settings: SamplingSettings) -> list[list[Sample]]:
        """``settings.num_samples`` answers to each conversation (a text prompt or chat messages),
        rendered as training renders prompts; ``indices`` name the random streams."""
        tokenizer = self.loaded.tokenizer
        ids = [self._encode(conversation) for conversation in conversations]
        return sample(self.loaded.model, tokenizer, ids, settings, prompt_indices=list(indices),
                      batch_size=self.batch_size)

    def option_logps(self, conversations: Sequence[list[dict[str, Any]]], lead: str,
                     options: Sequence[str]) -> list[list[float]]:
        """log p(lead + option | conversation) minus log p(lead | conversation), per option: the
        conversation rendered with the generation prompt, the assistant's answer starting with
        ``lead``. Scored by ``batching.score_pairs`` (two options per pair: one forward per
        option, batched, no generation)."""
        import torch

        from ..batching import score_pairs
        from ..data import TokenizedPair

        if len(options) != 2:
            raise ValueError("option_logps scores two options")
        tokenizer = self.loaded.tokenizer
        pairs = []
        for conversation in conversations:
            prompt = self._encode(conversation)
            first, second = (tokenizer(lead + option, add_special_tokens=False)["input_ids"] for option in options)
            shared = 0
            while shared < min(len(first), len(second)) and first[shared] == second[shared]:
                shared += 1
            if shared == len(first) or shared == len(second):
                raise ValueError(f"the options {options} tokenize to one another's prefix")
            pairs.append(TokenizedPair(prompt + first[:shared], first[shared:], second[shared:]))
        model = self.loaded.model
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        logps = score_pairs(model, pairs, pad, micro_batch_size=self.batch_size, compute_dtype=dtype)
        return [list(row) for row in zip(logps.chosen.tolist(), logps.rejected.tolist())]

    def _encode(self, conversation: Text) -> list[int]:
        if isinstance(conversation, list) and not getattr(self.loaded.tokenizer, "chat_template", None):
            raise LoraDpoError(f"{self.name}: the tokenizer has no chat template, and this command speaks to the "
                               "model in chat turns. Fix: use a chat/instruct model")
        return encode_prompt(self.loaded.tokenizer, conversation)

    def close(self, before: str = "") -> None:
        """Free the model's memory (one GPU: before the next model loads), and log what it freed;
        ``before`` names what loads next."""
        import torch

        device = self.loaded.device
        allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self.loaded.model = None
        self.loaded = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            after = torch.cuda.memory_allocated(device)
            log.info("freed %s (%.2f GiB of GPU memory)%s", self.name, (allocated - after) / 2**30,
                     f" before loading {before}" if before else "")
        elif before:
            log.info("freed %s before loading %s", self.name, before)


def load_chat_model(name: str, adapter: Optional[str], args: Any, four_bit: bool, device: Any = None) -> ChatModel:
    """``device``: where to load it (a launched process's own device); None: --device."""
    from ..modeling import load_inference_model

    loaded = load_inference_model(name, adapter, device=args.device if device is None else device, dtype=args.dtype,
                                  four_bit=four_bit)
    log.info("loaded %s", loaded.description)
    return ChatModel(loaded, name, adapter, args.batch_size)


# ---------------------------------------------------------------------------------------------
# The candidates stage


@dataclass
class Candidates:
    texts: list[str]
    tokens: list[int]
    """Answer length in the generator's tokens, for the length penalty."""
    finish: list[str]


def candidates_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + CANDIDATES_SUFFIX)


def collect_candidates(out: "Records | Followed", prompts: Sequence[Prompt], settings: SamplingSettings,
                       fingerprint: dict[str, Any], load: Any, *, overwrite: bool, bar_enabled: bool,
                       desc: str, processes: Any) -> tuple[dict[int, Candidates], Optional[ChatModel]]:
    """n sampled answers for every prompt ``out`` has not done, through the resumable file
    ``OUT.candidates`` (fingerprint: what decides the answers). ``load()`` gives the generator,
    called only when some prompt still needs answers. Returns the candidates by prompt index and
    the generator when it was loaded (the caller frees or reuses it). Under a launcher the main
    process writes the file, and every process reads it back once it is closed: ``--out`` must be
    on a filesystem all of them see, as a training run's output.dir."""
    todo = [p for p in prompts if not out.is_done(p.index)]
    if not todo:
        return {}, None
    model = None
    path = candidates_path(out.path)
    # The output restarting means its candidates restart too; a finished output has none left.
    with open_shared(path, {"stage": "candidates", **fingerprint}, overwrite, processes) as store:
        missing = [p for p in todo if not store.is_done(p.index)]
        if missing:
            model = load()

            def generate(share: Sequence[Prompt]) -> list[dict[str, Any]]:
                answers = model.reply([p.text for p in share], [p.index for p in share], settings)
                return [{"candidates": [s.text for s in samples], "tokens": [s.num_tokens for s in samples],
                         "finish": [s.finish_reason for s in samples]} for samples in answers]

            def write(prompt: Prompt, row: dict[str, Any]) -> None:
                store.write(prompt.index, [row])

            # Each process's share of a chunk is the chunk one process alone would run.
            chunk = max(1, model.batch_size // settings.num_samples) * CHUNK_BATCHES * processes.count
            in_chunks(missing, chunk, f"{desc}: generate", "generated", bar_enabled, generate, write, processes, logger=log)
    processes.wait()  # the main process has closed the file: every process may read it
    if processes.count > 1 and not path.is_file():
        raise LoraDpoError(f"{path}: not found by process {processes.rank}, which reads the candidates the main process "
                           "wrote. Fix: put --out on a filesystem every process sees")
    wanted = {p.index for p in todo}
    found: dict[int, Candidates] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["prompt_index"] in wanted:
                found[row["prompt_index"]] = Candidates(row["candidates"], row["tokens"], row["finish"])
    return found, model


def finish_output(out: "Records | Followed", prompts: Sequence[Prompt]) -> None:
    """Close the output, print its summary, and remove the candidates once every prompt is done
    (the main process; the others hold no files)."""
    if not isinstance(out, Records):
        return
    complete = all(out.is_done(p.index) for p in prompts)
    out.close()
    if complete:
        for path in (candidates_path(out.path), progress_path(candidates_path(out.path))):
            path.unlink(missing_ok=True)
    print(out.summary())
    if out.rows_written:
        print(f"train on it: lora-dpo train CONFIG data.train_file={out.path}")


# ---------------------------------------------------------------------------------------------
# Several processes


def launch(args: Any) -> Any:
    """This command's processes on --device (``distributed.processes``): alone, this one; under
    torchrun or accelerate launch, one per GPU, each loading the models on its own device."""
    from ..distributed import processes
    from ..modeling import resolve_device

    return processes(resolve_device(args.device, "--device"))


@dataclass
class Outcome:
    """What one prompt gave an output: its rows, or why it was skipped. Plain data, so that the
    process that made it can hand it to the main one, which writes it (``record``)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skip: Optional[str] = None

    def record(self, out: Records, prompt_index: int) -> None:
        if self.skip is not None:
            out.skip(prompt_index, self.skip)
        else:
            out.write(prompt_index, self.rows)
