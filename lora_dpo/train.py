"""The DPO training loop: one explicit loop, no Trainer.

``train`` runs a training run in phases, each a function of this module:

- ``finished_run``: with train.resume=auto, a run that already finished with these settings is done.
- ``setup_run`` checks the output directory and the settings, reads and tokenizes the data,
  checks them against the checkpoint when resuming, loads the model (or takes pre-built pieces),
  builds the optimizer, the data stream and the schedule, precomputes the reference and restores
  the checkpoint. Everything the user can get wrong is checked before the output directory is
  touched, so a mistake never leaves a half-written run behind.
- ``run_loop`` runs the optimizer steps (``train_step``); after each, ``record`` logs the metrics
  row, ``evaluation_row`` evaluates and ``save_checkpoint`` saves on schedule.
- ``finish_run`` saves the adapter and tokenizer, and summary.json last; ``train`` then writes the
  report (report.md, report.html, plots/).

Per optimizer step, for each micro-batch: reference log-probs (no grad, adapters off), policy
log-probs (adapters on), the loss, backward. Then clip, step, schedule (``DpoStep``).

Where other work attaches: settings found by trying the model go in ``setup_run`` after the model
loads and before the stream counts micro-batches; work due every N steps goes in ``run_loop``
beside the evaluation; every metrics row passes through ``record``; ``PairStream.next_step``
hands out each step's pairs; the output directory is written only by ``_open_output`` (then the
data audit, and the trackers' files), ``record``, ``write_samples`` (train.sample_every),
``save_checkpoint`` and ``finish_run``; work on the finished run follows ``finish_run``, and the
report (``report.write_report``) comes last.

Under ``accelerate launch`` every process runs this same loop; ``run.processes``
(lora_dpo/distributed.py) shares out each step's micro-batches, wraps the model in DDP, adds up
the metrics over the processes, and leaves every write to the main process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .batching import PairLogps, collate, length_grouped_batches, score_pairs
from .checkpoint import (CHECKPOINT_PREFIX, complete_checkpoints, read_trainer_state, remove_partial_writes,
                         restore_checkpoint, rng_state, write_checkpoint)
from .config import Config, load_config, save_config
from .data import PreferenceData, TokenizedPair, read_preference_examples, tokenize_preference_data, write_data_audit
from .distributed import Processes, check_sharded_config, processes as launched_processes, whole
from .errors import Interrupted, LoraDpoError, one_line
from .losses import PreferenceLoss, needs_reference, preference_loss, reward_definition
from .memory import auto_batch_as_saved, planner_hint, resolve_auto_batch
from .modeling import (REFERENCE_ADAPTER, TRAINED_ADAPTER, autocast_for, load_model, load_tokenizer, reference_model,
                       resolve_compute_dtype, resolve_device, save_adapter, trainable_parameters)
from .records import write_text_atomic
from .reference_cache import ReferenceTable, pairs_digest, reference_logps_for
from .report import AUDIT_FILE, REPORT_FILES, SAMPLES_FILE, write_report
from .run_samples import SamplePrompts, keep_until, sample_prompts, write_samples
from .tracking import Trackers, check_trackers, open_trackers

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"  # written last, atomically: its presence means the run finished
RUN_MARKER = ".lora-dpo-run"  # lists the files a run wrote: only those are ever deleted by a later run


@dataclass
class RunSummary:
    output_dir: str
    steps: int
    train_pairs: int
    """Pairs in the training set."""
    eval_pairs: int
    seconds: float
    final_train: dict[str, float]
    final_eval: dict[str, float] | None
    skipped_steps: int = 0
    resumed_from_step: int = 0
    rewards: str = ""
    """What rewards/* in the metrics measure for the loss used."""
    pairs_trained: int = 0
    """Pairs the steps trained on, over the whole run (a pair counts once per epoch)."""
    epochs: float = 0.0
    """pairs_trained over train_pairs."""
    resumes: list[dict[str, Any]] = field(default_factory=list)
    """One entry per resume: the step it continued from and the settings changed then ({key: [old, new]})."""
    data_files: dict[str, str | None] = field(default_factory=dict)
    """sha256 of the local data files the run read (None for a hub dataset)."""
    already_finished: bool = False
    """True when train.resume=auto found this run finished and trained nothing (not saved)."""

    def lines(self) -> list[str]:
        out = [f"already finished: {self.output_dir} holds this run, with these settings and data; nothing to do"
               ] if self.already_finished else []
        out.append(f"trained {self.steps} steps on {self.pairs_trained} pairs ({self.epochs:.3g} epochs of the "
                   f"{self.train_pairs} training pairs) in {self.seconds:.0f} s"
                   + (f" (resumed at step {self.resumed_from_step})" if self.resumed_from_step else ""))
        if self.skipped_steps:
            out.append(f"{self.skipped_steps} steps skipped for a non-finite loss or gradient")
        if self.final_eval:
            e = self.final_eval
            out.append(f"held-out ({self.eval_pairs} pairs): preference accuracy {e['rewards/accuracy']:.3f}, "
                       f"reward margin {e['rewards/margins']:.3f}, loss {e['loss']:.4f}")
        out.append(f"adapter, tokenizer, config, metrics and report in {self.output_dir} (open report.html)")
        return out

    def write(self, path: Path) -> None:
        """summary.json, atomically (its presence means the run finished)."""
        fields = {k: v for k, v in self.__dict__.items() if k != "already_finished"}
        write_text_atomic(path, json.dumps(fields, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "RunSummary":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k in known})


# ---------------------------------------------------------------------------------------------
# The output directory


def check_output_dir(path: Path, overwrite: bool, resume: str, protected: list[Path]) -> Path | None:
    """Refuse to clobber earlier work; return the checkpoint to resume from, if any.

    Only a directory that lora-dpo made (it holds RUN_MARKER) is ever cleared, and then only of the
    files the run wrote; a directory holding the data or the working directory never is.
    """
    for ancestor in [path, *path.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            raise LoraDpoError(f"output.dir {path}: {ancestor} is a file. Fix: choose a directory path")
    resolved = path.resolve()
    for precious in [Path.cwd(), *protected]:
        if resolved == precious.resolve() or resolved in precious.resolve().parents:
            raise LoraDpoError(f"output.dir {path} holds {precious}, which a run must not touch. "
                               "Fix: give the run a directory of its own, e.g. runs/NAME")
    if overwrite and resume == "always":
        raise LoraDpoError("--overwrite and --resume contradict each other. Fix: pass one of them")
    entries = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    if entries and not (path / RUN_MARKER).is_file():
        # Whatever the flags: --overwrite and --resume only ever act on a directory lora-dpo made.
        raise LoraDpoError(f"output.dir {path} holds files that lora-dpo did not write (such as {entries[0]}); a run "
                           "writes only into an empty directory or one of its own. Fix: choose another output.dir")
    if not entries or overwrite:
        if resume == "always":
            raise LoraDpoError(f"output.dir {path} holds no checkpoint to resume from. Fix: drop --resume "
                               "(or train.resume), or point output.dir at the interrupted run")
        return None
    if (path / SUMMARY_FILE).exists():
        nothing = ", so there is nothing to resume" if resume == "always" else ""
        raise LoraDpoError(f"output.dir {path} already holds a finished run{nothing}. Fix: choose another output.dir, "
                           "or pass --overwrite to replace it")
    checkpoints = complete_checkpoints(path)
    if resume != "never" and checkpoints:
        return checkpoints[-1]
    if resume == "always":
        raise LoraDpoError(f"output.dir {path} holds no complete checkpoint to resume from (the run stopped before "
                           "its first save). Fix: pass --overwrite to start again")
    if resume == "auto":
        return None  # a run of ours that stopped before its first checkpoint: start it again
    hint = ", or --resume to continue it" if checkpoints else ""
    raise LoraDpoError(f"output.dir {path} already holds a run. Fix: choose another output.dir, "
                       f"pass --overwrite to replace it{hint}")


def finished_run(config: Config, overwrite: bool = False) -> RunSummary | None:
    """With train.resume=auto, the summary of the run output.dir holds when it already finished
    with these settings and data files; None when there is no such run.

    A job that is started again after it finished (a cluster requeue, a sweep going over its
    trials) then has nothing to do. A finished run made with other settings is an error: it
    cannot be continued (no checkpoint is kept at the last step), only replaced.
    """
    out = Path(config.output.dir)
    if (overwrite or config.train.resume != "auto" or not (out / SUMMARY_FILE).is_file()
            or not (out / RUN_MARKER).is_file()):
        return None
    summary = RunSummary.read(out / SUMMARY_FILE)
    changed = {key: change for key, change in _changed_settings(out / "config.yaml", config).items()
               if resume_rule(key)[0] in ("refused", "checked", "applied")}
    for key, digest in _data_file_digests(config).items():
        before = summary.data_files.get(key)
        if before is None or digest is None:
            continue  # a hub dataset, or a summary that predates the digests: the name decides
        if before == digest:
            changed.pop(f"data.{key}", None)  # the same bytes, perhaps moved
        else:
            changed[f"data.{key}"] = "its contents changed"
    if changed:
        raise LoraDpoError(f"output.dir {out} holds a finished run made with other settings or data "
                           f"({_describe_changes(changed)}). Fix: choose another output.dir, or pass --overwrite "
                           "to replace it")
    summary.already_finished = True
    log.info("%s already holds this run, finished: nothing to do", out)
    return summary


def _clear_run(path: Path) -> None:
    """Delete what an earlier run wrote (listed in RUN_MARKER), its checkpoints and partial writes;
    anything else the user put there stays."""
    written = set(json.loads((path / RUN_MARKER).read_text(encoding="utf-8")).get("files", []))
    for entry in path.iterdir():
        if entry.name in written or entry.name.startswith((CHECKPOINT_PREFIX, ".tmp-")):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (path / RUN_MARKER).unlink(missing_ok=True)


def record_written(path: Path, names: set[str]) -> None:
    """Add ``names`` (entries of the run directory ``path``) to what the run wrote (RUN_MARKER):
    what ``--overwrite`` clears, and nothing else."""
    marker = path / RUN_MARKER
    known = set(json.loads(marker.read_text(encoding="utf-8")).get("files", [])) if marker.exists() else set()
    marker.write_text(json.dumps({"files": sorted(known | names | {SUMMARY_FILE})}) + "\n", encoding="utf-8")


def _data_file_digests(config: Config) -> dict[str, str | None]:
    """sha256 of the local data files (None for a hub dataset): how a later launch recognises the
    same data without tokenizing it."""
    digests: dict[str, str | None] = {}
    for key in ("train_file", "eval_file"):
        name = getattr(config.data, key)
        if not name:
            continue
        path, digest = Path(name), hashlib.sha256()
        if not path.is_file():
            digests[key] = None
            continue
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[key] = digest.hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------
# Resuming: which settings may change (docs/reliability.md, "Resuming", holds the same table; a
# test compares the two)

_BASE_WEIGHTS = "the base weights the adapter was trained against"
_PAIRS = "the training and held-out pairs"


def _rules(rule: str, why: str, *keys: str) -> dict[str, tuple[str, str]]:
    return {key: (rule, why) for key in keys}


RESUME_RULES: dict[str, tuple[str, str]] = {
    # refused: the checkpoint cannot carry over.
    **_rules("refused", _BASE_WEIGHTS, "model.name_or_path", "model.revision", "model.load_in_4bit", "model.double_quant"),
    **_rules("refused", "the starting adapter and the reference", "model.init_adapter"),
    **_rules("refused", "the adapter's shape and scaling", "lora.*"),
    **_rules("refused", "the layout of the optimizer state", "train.optim"),
    **_rules("refused", "whether the reference follows the trained adapter (TR-DPO)", "dpo.ref_sync_every"),
    **_rules("refused", "the held-out split and the order of the pairs", "train.seed"),
    # checked: refused when the tokenized pairs differ from the checkpoint's fingerprint of them.
    **_rules("checked", _PAIRS, "data.train_file", "data.train_split", "data.eval_file", "data.eval_split",
             "data.eval_fraction", "data.prompt_column", "data.chosen_column", "data.rejected_column",
             "data.max_length", "data.max_prompt_length", "data.on_bad_row"),
    # applied from the checkpoint's step on.
    **_rules("applied", "how many steps, and their size", "train.micro_batch_size",
             "train.gradient_accumulation_steps", "train.pairs_per_step", "train.epochs", "train.max_steps"),
    **_rules("applied", "the learning-rate schedule, rebuilt at the checkpoint's step", "train.learning_rate",
             "train.lr_scheduler", "train.warmup_ratio", "train.warmup_steps"),
    **_rules("applied", "the update", "train.weight_decay", "train.max_grad_norm"),
    **_rules("applied", "the loss", "dpo.loss", "dpo.losses", "dpo.beta", "dpo.label_smoothing", "dpo.robust_epsilon",
             "dpo.rpo_alpha", "dpo.simpo_gamma", "dpo.orpo_lambda", "dpo.discopop_tau", "dpo.f_divergence",
             "dpo.f_divergence_alpha", "dpo.wpo_weighting", "dpo.ld_alpha", "dpo.ref_sync_alpha"),
    **_rules("applied", "the rounding of every computation", "model.compute_dtype"),
    **_rules("applied", "the batches of the next epochs", "data.group_by_length"),
    **_rules("applied", "what the run writes and when it stops", "train.eval_every", "train.save_every",
             "train.log_every", "train.keep_last", "train.max_bad_steps", "train.sample_every", "train.sample_prompts",
             "train.sample_file", "train.sample_max_new_tokens", "train.sample_temperature"),
    **_rules("applied", "the evaluation after training", "eval.*"),
    # speed: applied, and the numbers stay the same up to rounding.
    **_rules("speed", "speed and memory only", "model.gradient_checkpointing", "model.checkpoint_layers",
             "model.compile", "model.attn_implementation", "model.device", "data.layout", "data.pack_length",
             "dpo.logps_chunk_size", "dpo.precompute_reference", "dpo.reference_cache_dir"),
    # irrelevant: nothing the run computes depends on them.
    **_rules("irrelevant", "nothing the run computes", "model.trust_remote_code", "train.resume", "output.dir",
             "output.report", "output.report_to"),
}


def resume_rule(key: str) -> tuple[str, str]:
    """(rule, what the setting decides) for a dotted config key: rule is refused, checked, applied,
    speed or irrelevant. A key missing from the table is applied."""
    section = key.split(".")[0] + ".*"
    return RESUME_RULES.get(key) or RESUME_RULES.get(section) or ("applied", "the run from the checkpoint on")


def check_resume_settings(checkpoint: Path, out: Path, config: Config) -> dict[str, list[Any]]:
    """Refuse settings that cannot change since ``checkpoint`` was made; return the others that
    changed ({key: [old, new]}), which apply from the checkpoint's step on."""
    saved = checkpoint / "config.yaml"
    changed = _changed_settings(saved if saved.is_file() else out / "config.yaml", config)
    refused = {key: change for key, change in changed.items() if resume_rule(key)[0] == "refused"}
    if refused:
        decides = " and ".join(dict.fromkeys(resume_rule(key)[1] for key in refused))
        raise LoraDpoError(f"cannot resume with changed {', '.join(refused)}: {checkpoint.name} was made with "
                           f"{', '.join(f'{key}={old!r}' for key, (old, _) in refused.items())}, and "
                           f"{'these decide' if len(refused) > 1 else 'it decides'} {decides}. Fix: restore "
                           f"{'those settings' if len(refused) > 1 else 'it'}, or pass --overwrite to start again")
    changed = {key: change for key, change in changed.items() if resume_rule(key)[0] != "irrelevant"}
    if changed:
        log.warning("resuming with changed settings, applied from the checkpoint on: %s", _describe_changes(changed))
    return changed


def _changed_settings(saved: Path, config: Config) -> dict[str, list[Any]]:
    if not saved.is_file():
        return {}
    before, after = _flatten(load_config(saved).to_dict()), _flatten(config.to_dict())
    after = auto_batch_as_saved(before, after)  # micro_batch_size auto: the split the run saved
    return {key: [before.get(key), value] for key, value in after.items() if before.get(key) != value}


def _describe_changes(changed: dict[str, Any]) -> str:
    """``key: old -> new`` for [old, new] pairs, ``key: note`` for a note."""
    return ", ".join(f"{key}: {change}" if isinstance(change, str) else f"{key}: {change[0]!r} -> {change[1]!r}"
                     for key, change in changed.items())


def data_fingerprint(data: PreferenceData) -> dict[str, Any]:
    """sha256 over the token ids of each split (reference_cache.pairs_digest) and the pair counts:
    kept in every checkpoint, so a resume on other data is refused."""
    return {"train": pairs_digest(data.train), "eval": pairs_digest(data.eval),
            "train_pairs": len(data.train), "eval_pairs": len(data.eval)}


def _check_resume_data(checkpoint: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    if saved is None:
        log.warning("%s holds no fingerprint of its data (an older checkpoint): the data cannot be checked", checkpoint)
        return
    for split, what in (("train", "training"), ("eval", "held-out")):
        if saved[split] != now[split]:
            raise LoraDpoError(
                f"cannot resume from {checkpoint}: the {what} pairs differ from those it was trained with "
                f"({saved[f'{split}_pairs']} pairs then, {now[f'{split}_pairs']} now: the data, or how it is read or "
                "tokenized, changed). Fix: restore the data the run started with, or pass --overwrite to start again")


def _check_resume_progress(checkpoint: Path, saved: dict[str, Any], config: Config, size: int) -> None:
    """Refuse a resume that would train nothing: the checkpoint already reached the new end."""
    step, consumed = saved["step"], saved.get("pairs_consumed", 0)
    if config.train.max_steps is not None:
        if config.train.max_steps <= step:
            raise LoraDpoError(f"cannot resume from {checkpoint}: it is at step {step}, and train.max_steps="
                               f"{config.train.max_steps} leaves nothing to train. Fix: set train.max_steps above "
                               f"{step}, or pass --overwrite to start again")
        return
    target = target_pairs(config, size)
    if target is not None and consumed >= target:
        raise LoraDpoError(f"cannot resume from {checkpoint}: it has trained {consumed} pairs ({consumed / size:.3g} "
                           f"epochs), and train.epochs={config.train.epochs:g} asks for {target}, so nothing is left. "
                           f"Fix: raise train.epochs above {consumed / size:.3g}, or pass --overwrite to start again")


def _apply_current_settings(optimizer: torch.optim.Optimizer, config: Config) -> None:
    """A restored optimizer keeps the hyper-parameters it was saved with; the current ones win.
    initial_lr is the schedule's peak: build_scheduler sets each step's rate from it."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.train.learning_rate
        group["weight_decay"] = config.train.weight_decay


# ---------------------------------------------------------------------------------------------
# The data stream and the number of steps


def target_pairs(config: Config, size: int) -> int | None:
    """Pairs a run counted in epochs trains on: round(epochs x training pairs), so each pair once
    per epoch; None when train.max_steps counts the steps instead."""
    return None if config.train.max_steps else max(1, round(config.train.epochs * size))


def draw_epoch(pairs: Sequence[TokenizedPair], seed: int, micro_batch_size: int, group_by_length: bool,
               layout: str) -> list[list[int]]:
    """One epoch of micro-batches (lists of pair indices): shuffled with ``seed``, or length-grouped."""
    if group_by_length:
        return length_grouped_batches(pairs, micro_batch_size, seed, layout)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


class PairStream:
    """The training pairs as optimizer steps of micro-batches, epoch after epoch.

    Epoch e visits every pair once, in an order drawn with seed + e (``draw_epoch``). A step takes
    up to gradient_accumulation_steps micro-batches and never spans two epochs, so the last step
    of an epoch takes what is left and may be short.

    The position is a count of pairs, not of micro-batches, so a run resumed with another
    micro-batch size goes on with exactly the pairs it has not seen. The epoch in progress keeps
    the order it was drawn in (``epoch_draw``: length grouping depends on the micro-batch size
    and the layout too), re-cut when the micro-batch size changed; the next epochs are drawn with
    the current settings.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], micro_batch_size: int, accumulation: int, seed: int,
                 group_by_length: bool = False, layout: str = "padded", position: dict[str, Any] | None = None):
        self.pairs, self.micro_batch_size, self.accumulation, self.seed = pairs, micro_batch_size, accumulation, seed
        self.draw = {"micro_batch_size": micro_batch_size, "group_by_length": group_by_length, "layout": layout}
        position = position or {}
        self.consumed: int = position.get("pairs_consumed", 0)
        """Pairs handed out since the start of the run."""
        self.epoch_draw: dict[str, Any] | None = position.get("epoch_draw")
        """The settings the epoch in progress was drawn with; None between epochs."""
        self._queue: deque[list[int]] | None = None

    def position(self) -> dict[str, Any]:
        """What a checkpoint stores to continue exactly here."""
        return {"pairs_consumed": self.consumed, "epoch_draw": self.epoch_draw}

    def next_step(self, limit: int | None = None) -> list[list[int]]:
        """The micro-batches of the next step; at most ``limit`` pairs in all (the run's last step)."""
        queue = self._epoch_queue()
        step = _take_step(queue, self.accumulation, limit)
        self.consumed += sum(len(batch) for batch in step)
        if not queue:  # the epoch is done; the next one is drawn with the current settings
            self._queue, self.epoch_draw = None, None
        return step

    def steps_until(self, target: int) -> int:
        """Steps from here until ``target`` pairs (counted from the start of the run) are handed out."""
        size, consumed, steps = len(self.pairs), self.consumed, 0
        queue = deque(self._epoch_queue()) if consumed < target else deque()
        whole_epoch = math.ceil(math.ceil(size / self.micro_batch_size) / self.accumulation)
        while consumed < target:
            if not queue:
                if consumed + size <= target:  # a whole epoch: ceil(pairs / micro-batch) micro-batches, however drawn
                    consumed, steps = consumed + size, steps + whole_epoch
                    continue
                queue = deque(draw_epoch(self.pairs, self.seed + consumed // size, **self.draw))
            consumed += sum(len(batch) for batch in _take_step(queue, self.accumulation, target - consumed))
            steps += 1
        return steps

    def _epoch_queue(self) -> deque[list[int]]:
        if self._queue is None:
            size = len(self.pairs)
            if self.epoch_draw is None:
                self.epoch_draw = dict(self.draw)
            batches = draw_epoch(self.pairs, self.seed + self.consumed // size, **self.epoch_draw)
            self._queue = deque(_rest_of_epoch(batches, self.consumed % size, self.epoch_draw["micro_batch_size"],
                                               self.micro_batch_size))
        return self._queue


def _take_step(queue: deque[list[int]], accumulation: int, limit: int | None) -> list[list[int]]:
    step: list[list[int]] = []
    taken = 0
    while queue and len(step) < accumulation and (limit is None or taken < limit):
        batch = queue.popleft()
        if limit is not None and taken + len(batch) > limit:
            queue.appendleft(batch[limit - taken :])
            batch = batch[: limit - taken]
        step.append(batch)
        taken += len(batch)
    return step


def _rest_of_epoch(batches: list[list[int]], offset: int, drawn_size: int, size: int) -> list[list[int]]:
    """The epoch's micro-batches after its first ``offset`` pairs, re-cut to ``size`` pairs each
    when the epoch was drawn with another micro-batch size."""
    rest: list[list[int]] = []
    seen = 0
    for batch in batches:
        if seen + len(batch) > offset:
            rest.append(batch[max(0, offset - seen) :])
        seen += len(batch)
    if drawn_size != size:
        flat = [index for batch in rest for index in batch]
        rest = [flat[i : i + size] for i in range(0, len(flat), size)]
    return rest


# ---------------------------------------------------------------------------------------------
# The run: setup, loop, finish


@dataclass
class Run:
    """One training run between its phases: what ``setup_run`` built and what ``run_loop`` advances."""

    config: Config
    out: Path
    device: torch.device
    tokenizer: Any
    data: PreferenceData
    data_fingerprint: dict[str, Any]
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    """float16 loss scaler; None for bfloat16 and float32, which need none."""
    reference_tables: dict[str, ReferenceTable | None]
    """Precomputed reference log-probs per split ("train", "eval"), or None to run the reference per step."""
    step_runner: "DpoStep"
    stream: PairStream
    state: dict[str, Any]
    """What every checkpoint saves besides the weights: step, skipped steps, last evaluation, resumes."""
    total_steps: int
    target_pairs: int | None
    """Pairs the run trains on when it counts epochs; None when train.max_steps counts steps."""
    start_step: int
    started: float = field(default_factory=time.perf_counter)
    last_train: dict[str, Any] = field(default_factory=dict)
    """The newest train metrics row."""
    samples: SamplePrompts | None = None
    """The prompts train.sample_every answers; None when it is 0."""
    tracker: Trackers = field(default_factory=lambda: Trackers([]))
    """The experiment trackers of output.report_to."""
    processes: Processes = field(default_factory=Processes)
    """The processes of an ``accelerate launch`` (lora_dpo/distributed.py); alone by default."""

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def train(config: Config, overwrite: bool = False, progress: bool | None = None, *, model: Any = None,
          tokenizer: Any = None, data: PreferenceData | None = None,
          on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
    """Train a LoRA adapter with DPO as ``config`` says; returns what the run achieved.

    ``model``, ``tokenizer`` and ``data`` are pieces a caller already built (see ``setup_run``);
    ``on_evaluation`` sees every held-out metrics row (a sweep's pruning, see ``run_loop``).
    With train.resume=auto, a run that already finished with these settings is not trained again:
    its summary comes back with ``already_finished`` set.
    """
    done = finished_run(config, overwrite)
    if done is not None:
        return done
    with _compile_errors_as_one_line(config):
        run = setup_run(config, overwrite, model=model, tokenizer=tokenizer, data=data)
        try:
            run_loop(run, progress, on_evaluation)
            summary = finish_run(run)
        finally:
            run.tracker.close()
    if not run.processes.is_main:
        return summary  # under a launcher the main process evaluates and reports
    out = run.out
    if config.eval.after_training:
        del run  # the training copy of the model: the evaluation loads the finished run as inference does
        evaluate_finished_run(summary, config, progress)
    if config.output.report:  # last: the report shows the evaluation when there is one
        for warning in write_report(out).warnings:
            log.warning("warning: %s", warning)
    return summary


def evaluate_finished_run(summary: RunSummary, config: Config, progress: bool | None) -> None:
    """``lora-dpo eval`` on the run just finished (eval.after_training); the table goes to the log.
    A failure here leaves the finished run as it is, and says how to evaluate it again."""
    from .evaluation import evaluate_run

    if not config.data.eval_file and config.data.eval_fraction == 0:
        log.warning("eval.after_training: the run held out no pairs (data.eval_fraction=0, no data.eval_file), so "
                    "there is nothing to evaluate on; run lora-dpo eval %s --data FILE", summary.output_dir)
        return
    try:
        evaluate_run(summary.output_dir, config.eval, device=config.model.device, progress=progress, show=log.info)
    except LoraDpoError as exc:
        raise LoraDpoError(f"the run finished and is saved in {summary.output_dir}, but its evaluation failed: {exc} "
                           f"(then: lora-dpo eval {summary.output_dir})") from exc


@contextlib.contextmanager
def _compile_errors_as_one_line(config: Config) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:
        # torch.compile fails at the first forward pass, not where it is asked for, and with a
        # page-long message; a missing compiler or triton is a setup problem with a one-line fix.
        if config.model.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise LoraDpoError(f"model.compile: torch.compile failed ({type(exc).__name__}: {one_line(exc)}). "
                               "Fix: set model.compile=false, or install what the message names (a C++ compiler "
                               "for the CPU, triton for a GPU)") from exc
        raise


def setup_run(config: Config, overwrite: bool = False, *, model: Any = None, tokenizer: Any = None,
              data: PreferenceData | None = None) -> Run:
    """Everything before the first step, in the order that keeps mistakes cheap: the output
    directory and the settings are checked, then the data is read, tokenized and (on a resume)
    checked against the checkpoint, and only then is the model loaded; nothing is written to the
    output directory before all of that passed.

    A caller that trains several times in one process (a sweep) passes what it already built:
    ``tokenizer`` with ``data`` (``data.tokenize_preference_data`` under this config's data
    settings) skip reading and tokenizing; ``model`` (``modeling.load_model`` under this config's
    model and lora settings) skips loading the base and gets fresh adapter weights.
    """
    out = Path(config.output.dir)
    data_files = [Path(f) for f in (config.data.train_file, config.data.eval_file) if f and Path(f).exists()]
    resume_from = check_output_dir(out, overwrite, config.train.resume, data_files)
    check_trackers(config)
    saved_state, changes = None, {}
    if resume_from is not None:
        changes = check_resume_settings(resume_from, out, config)
        saved_state = read_trainer_state(resume_from)
    processes = launched_processes(resolve_device(config.model.device))
    device = processes.device
    if processes.sharded:
        check_sharded_config(config)
        if model is not None:
            raise LoraDpoError("a model passed in (a sweep) cannot be sharded again. Fix: run a sweep without "
                               "an FSDP accelerate config")
    # Every process starts from the same LoRA weights (DDP broadcasts the main one's anyway);
    # after loading, each process reseeds, so that their dropout masks differ.
    _seed_everything(config.train.seed)
    if data is None:
        with processes.main_first():
            examples = read_preference_examples(config.data, config.train.seed)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        data = tokenize_preference_data(examples, config.data, tokenizer)
        for report in data.reports:
            log.info("data %s", report.summary())
    elif tokenizer is None:
        raise ValueError("setup_run: data= needs the tokenizer= it was tokenized with")
    fingerprint = data_fingerprint(data)
    samples = sample_prompts(config, data, tokenizer)
    if saved_state is not None:
        _check_resume_data(resume_from, saved_state.get("data"), fingerprint)
        _check_resume_progress(resume_from, saved_state, config, len(data.train))
    if model is None:
        model = load_model(config, device, sharded=processes.sharded)
    # Also on a model just loaded: loading draws from the RNG, so only adapter weights drawn after a
    # reseed make a sweep's trial on a loaded base start exactly where a lone run of it starts.
    fresh_adapter(model, config)
    if processes.count > 1:
        _seed_everything(config.train.seed + processes.rank)
    # Anything that picks settings by trying the model (a micro-batch size that fits) runs here:
    # the model and data exist, and nothing below has counted in micro-batches yet.
    if config.train.micro_batch_size == "auto":
        config = resolve_auto_batch(config, model, data.train, device, tokenizer.pad_token_id)
    compute_dtype = resolve_compute_dtype(config.model, device)
    # float16 gradients of small LoRA updates underflow without loss scaling; bfloat16 needs none.
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
    # Every pass runs through the scorer (the DDP or FSDP wrapper); sharding replaces the LoRA
    # weights by their shards, so the optimizer is built on what it leaves.
    scorer = processes.wrap(model)
    optimizer = build_optimizer(config, trainable_parameters(model), device)
    reference_tables = _reference_tables(config, model, scorer, data, compute_dtype, tokenizer.pad_token_id,
                                         processes)
    processes.wait()  # every process has checked the output directory before the main one writes to it
    state = _open_output(out, resume_from, model, optimizer, scaler, changes, processes)
    if resume_from is not None:
        _apply_current_settings(optimizer, config)
        if state.get("processes", 1) != processes.count:
            log.warning("resuming a run of %d processes with %d: it goes on from the same pair, with steps %g times "
                        "as large as before (docs/distributed.md)", state.get("processes", 1), processes.count,
                        processes.count / state.get("processes", 1))
    state["processes"] = processes.count

    train_config = config.train
    # One stream on every process: each step holds the global batch, shared out by DpoStep.
    stream = PairStream(data.train, train_config.micro_batch_size,
                        train_config.gradient_accumulation_steps * processes.count, train_config.seed,
                        config.data.group_by_length, config.data.layout, position=state)
    target = target_pairs(config, len(data.train))
    total_steps = train_config.max_steps or state["step"] + stream.steps_until(target)
    warmup = (train_config.warmup_steps if train_config.warmup_steps is not None
              else round(train_config.warmup_ratio * total_steps))
    scheduler = build_scheduler(config, optimizer, warmup, total_steps, start_step=state["step"])
    if processes.is_main:
        save_config(config, out / "config.yaml")
        write_data_audit(data, out / AUDIT_FILE)
        keep_until(out, state["step"])  # a resume: the samples written after the checkpoint go
    tracker = open_trackers(config, out) if processes.is_main else Trackers([])
    pairs_per_step = train_config.micro_batch_size * train_config.gradient_accumulation_steps * processes.count
    log.info("training %d steps of up to %d pairs (micro-batch %d x accumulation %d%s; %d train, %d held-out pairs) "
             "on %s, %s", total_steps, pairs_per_step, train_config.micro_batch_size,
             train_config.gradient_accumulation_steps, processes.describe(), len(data.train), len(data.eval),
             device, str(compute_dtype).removeprefix("torch."))
    log.info("loss %s; rewards/* are %s", config.dpo.loss, reward_definition(config.dpo))
    step_runner = DpoStep(config, model, optimizer, scheduler, scaler, device, tokenizer.pad_token_id,
                          processes=processes, scorer=scorer)
    return Run(config, out, device, tokenizer, data, fingerprint, model, optimizer, scheduler, scaler,
               reference_tables, step_runner, stream, state, total_steps, target, state["step"], samples=samples,
               tracker=tracker, processes=processes)


def fresh_adapter(model: Any, config: Config) -> None:
    """Give a loaded model new adapter weights: LoRA's own initialisation (A drawn from the RNG
    reseeded with train.seed, B zero), or the weights of ``model.init_adapter``. This is what lets
    one loaded 4-bit base serve many trials, each as a run of its own would start."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from .reference_sync import add_reference_adapter, copy_adapter

    settings = model.peft_config[TRAINED_ADAPTER]
    has_reference = REFERENCE_ADAPTER in model.peft_config
    # A reference adapter without model.init_adapter is TR-DPO's, which starts as the base (B = 0).
    tr_dpo_reference = not config.model.init_adapter and (config.dpo.ref_sync_every or has_reference)
    if bool(config.model.init_adapter) != has_reference and not tr_dpo_reference:
        raise LoraDpoError("the model passed in was loaded with another model.init_adapter than the config names. "
                           "Fix: load it with modeling.load_model under this config")
    if config.model.init_adapter:
        set_peft_model_state_dict(model, load_peft_weights(config.model.init_adapter), adapter_name=TRAINED_ADAPTER)
        copy_adapter(model, TRAINED_ADAPTER, REFERENCE_ADAPTER)  # TR-DPO may have moved it in the last run
        return
    wanted = {"lora.r": config.lora.r, "lora.alpha": config.lora.alpha, "lora.dropout": config.lora.dropout}
    loaded = {"lora.r": settings.r, "lora.alpha": settings.lora_alpha, "lora.dropout": settings.lora_dropout}
    if wanted != loaded:
        raise LoraDpoError(f"the model passed in has an adapter with {loaded}, the config asks for {wanted}. "
                           "Fix: load it with modeling.load_model under this config")
    torch.manual_seed(config.train.seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters(TRAINED_ADAPTER, settings.init_lora_weights)
    if tr_dpo_reference:
        add_reference_adapter(model)
        copy_adapter(model, TRAINED_ADAPTER, REFERENCE_ADAPTER)


def _reference_tables(config: Config, model: Any, scorer: torch.nn.Module, data: PreferenceData,
                      compute_dtype: torch.dtype, pad_id: int, processes: Processes) -> dict[str, ReferenceTable | None]:
    """Reference log-probs of both splits, precomputed (or read from the cache) when asked for."""
    tables: dict[str, ReferenceTable | None] = {"train": None, "eval": None}
    if not (config.dpo.precompute_reference and needs_reference(config.dpo)):
        return tables
    cache_dir = Path(config.dpo.reference_cache_dir).expanduser()
    for split, pairs in (("train", data.train), ("eval", data.eval)):
        if not pairs:
            continue
        try:
            tables[split] = reference_logps_for(model, pairs, config.model, compute_dtype, pad_id, cache_dir,
                                                config.train.micro_batch_size, config.data.layout,
                                                config.dpo.logps_chunk_size, config.data.pack_length,
                                                processes=processes, scorer=scorer, ld_alpha=config.dpo.ld_alpha)
        except torch.OutOfMemoryError as exc:
            raise _out_of_memory(config, f"precomputing the {split} reference log-probs", pairs) from exc
    return tables


def _open_output(out: Path, resume_from: Path | None, model: Any, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, changes: dict[str, list[Any]],
                 processes: Processes) -> dict[str, Any]:
    """The first write to the output directory: restore the checkpoint, or clear what an earlier
    run wrote and start afresh. Returns the trainer state to continue from. Every process
    restores the checkpoint; only the main one writes."""
    metrics_path = out / "metrics.jsonl"
    writes = processes.is_main
    if resume_from is not None:
        if writes:
            remove_partial_writes(out)
        state = restore_checkpoint(resume_from, model, optimizer, scaler, metrics_path if writes else None,
                                   processes=processes)
        state.pop("batches_consumed", None)  # older checkpoints: the position is pairs_consumed
        state.setdefault("resumes", []).append({"step": state["step"], "changed": changes})
        log.info("resuming from %s (step %d)", resume_from, state["step"])
        return state
    if writes:
        if (out / RUN_MARKER).is_file():
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        record_written(out, {"config.yaml", "metrics.jsonl", AUDIT_FILE, SAMPLES_FILE, "tensorboard", "wandb",
                             *REPORT_FILES})
        metrics_path.write_text("", encoding="utf-8")
    return {"step": 0, "pairs_consumed": 0, "epoch_draw": None, "skipped_steps": 0, "consecutive_bad_steps": 0,
            "last_eval": None, "resumes": []}


def run_loop(run: Run, progress: bool | None = None,
             on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> None:
    """The optimizer steps from ``run.start_step`` to ``run.total_steps``; after each: log, check
    for runs of bad steps, evaluate and save on schedule. SIGINT/SIGTERM end it with a checkpoint.
    Work due every N steps (evaluation, and anything else periodic) goes beside the evaluation.
    ``on_evaluation`` gets each evaluation's row once it is logged; an exception it raises (a
    sweep pruning the trial) ends the run there, without a checkpoint."""
    config, total = run.config, run.total_steps
    main = run.processes.is_main
    bar = _progress_bar(total, progress if main else False, initial=run.start_step)
    stop = _StopRequest()
    run.model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        stop.install()
        if run.samples is not None and run.start_step == 0:
            write_samples(run.model, run.tokenizer, run.samples, config, 0, run.out)  # the reference's answers
        for step in range(run.start_step + 1, total + 1):
            last = step == total
            row = train_step(run, step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % config.train.log_every == 0 or last:
                record(run, row)
                if bar.disable and main and (step % max(1, total // 10) == 0 or last):
                    log.info("step %d/%d loss %.4f accuracy %.2f margin %.3f %.0f tokens/s", step, total,
                             row["loss"], row["rewards/accuracy"], row["rewards/margins"], row["tokens_per_s"])
            _stop_after_bad_steps(run, step)
            if run.data.eval and ((config.train.eval_every and step % config.train.eval_every == 0) or last):
                row = evaluation_row(run, step)
                if main:
                    bar.write(f"eval step {step}: loss {row['loss']:.4f} accuracy {row['rewards/accuracy']:.3f} "
                              f"margin {row['rewards/margins']:.3f}")
                if on_evaluation is not None:
                    on_evaluation(row)
            if main and run.samples is not None and (step % config.train.sample_every == 0 or last):
                write_samples(run.model, run.tokenizer, run.samples, config, step, run.out)
            # every process: each holds its own copy of the reference adapter
            if config.dpo.ref_sync_every and step % config.dpo.ref_sync_every == 0 and not last:
                update_reference(run, step)
            save_now = config.train.save_every and step % config.train.save_every == 0
            stopping = run.processes.stop_signal(stop.signal_number)  # a signal to any process stops all
            if (save_now or stopping) and not last:
                saved = save_checkpoint(run, step)
                if stopping:
                    raise Interrupted(f"stopped by {signal.Signals(stopping).name} after step {step}; checkpoint "
                                      f"saved to {saved}. Resume with: lora-dpo train CONFIG --resume "
                                      f"(output.dir={run.out})", exit_code=128 + stopping)
    finally:
        stop.uninstall()
        bar.close()


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step on the next pairs of the stream; returns its metrics row."""
    started = time.perf_counter()
    state, pairs = run.state, run.data.train
    limit = None if run.target_pairs is None else run.target_pairs - run.stream.consumed
    micro_batches = run.stream.next_step(limit)
    try:
        metrics, applied, bad = run.step_runner(pairs, micro_batches, run.reference_tables["train"])
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(run.config, f"at step {step}", [pairs[i] for b in micro_batches for i in b]) from exc
    state["step"] = step
    if not applied:
        state["skipped_steps"] += 1
    if bad:
        state["consecutive_bad_steps"] += 1
        log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped",
                    step, metrics["loss"], metrics["grad_norm"])
    else:
        state["consecutive_bad_steps"] = 0
    seconds = time.perf_counter() - started
    tokens = metrics.pop("tokens")
    run.last_train = {"step": step, "split": "train", "epoch": run.stream.consumed / len(pairs), **metrics,
                      "tokens_per_s": tokens / seconds, "seconds": seconds, "skipped": not applied,
                      **_memory(run.device)}
    return run.last_train


def update_reference(run: Run, step: int) -> None:
    """TR-DPO: move the reference adapter towards the trained one (``reference_sync.sync_reference``).
    After the step's evaluation, which still measures against the reference the step trained with,
    and before its checkpoint, which then holds the new reference."""
    from .reference_sync import DEFAULT_SYNC_ALPHA, sync_reference

    alpha = DEFAULT_SYNC_ALPHA if run.config.dpo.ref_sync_alpha is None else run.config.dpo.ref_sync_alpha
    error = sync_reference(run.model, alpha)
    log.info("step %d: reference moved towards the trained adapter (alpha %g; worst layer's rank truncation error "
             "%.2g)", step, alpha, error)


def _stop_after_bad_steps(run: Run, step: int) -> None:
    limit = run.config.train.max_bad_steps
    if run.state["consecutive_bad_steps"] < limit:
        return
    checkpoints = complete_checkpoints(run.out)
    kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
    raise LoraDpoError(
        f"stopped at step {step}: {limit} steps in a row had a non-finite loss or gradient "
        f"({run.state['skipped_steps']} skipped in all; none was applied, {kept}). "
        "Fix: lower train.learning_rate, check the data, or use model.compute_dtype=bfloat16 instead of float16")


def evaluate(run: Run) -> dict[str, float]:
    """Mean metrics over every held-out pair: the policy's and the reference's log-probs from
    ``batching.score_pairs`` (no gradients, dropout off), then the loss as a step computes it."""
    config, pairs = run.config, run.data.eval
    scoring = dict(micro_batch_size=config.train.micro_batch_size, layout=config.data.layout,
                   chunk_size=config.dpo.logps_chunk_size, pack_length=config.data.pack_length,
                   compute_dtype=resolve_compute_dtype(config.model, run.device))
    pad_id = run.tokenizer.pad_token_id
    scoring["ld_alpha"] = config.dpo.ld_alpha
    # Each process scores its share of the pairs (sharded: topped up to the same passes, the
    # extra rows dropped); the sums are added up over the processes.
    mine = run.processes.shard(len(pairs))
    pairs = [pairs[i] for i in run.processes.top_up(mine, len(pairs))]
    scoring["scorer"] = run.step_runner.scorer
    policy = score_pairs(run.model, pairs, pad_id, wpo=config.dpo.wpo_weighting, **scoring).first(len(mine))
    reference = None
    if run.reference_tables["eval"] is not None:
        reference = run.reference_tables["eval"].lookup(mine, run.device)
    elif needs_reference(config.dpo):
        reference = score_pairs(run.model, pairs, pad_id, reference=True, **scoring).first(len(mine))
    totals = _MetricSums()
    totals.add(preference_loss(config.dpo, policy, reference), policy)
    return totals.means(run.processes.sum)


def evaluation_row(run: Run, step: int) -> dict[str, Any]:
    """Evaluate at ``step``, log the row and keep it as the run's last evaluation."""
    try:
        row = {"step": step, "split": "eval", **evaluate(run)}
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(run.config, f"evaluating at step {step}", run.data.eval) from exc
    run.state["last_eval"] = row
    record(run, row)
    return row


def record(run: Run, row: dict[str, Any]) -> None:
    """Append one metrics row to metrics.jsonl; every train and eval row of the run passes here.
    Rows are over all processes; the main one writes them."""
    if not run.processes.is_main:
        return
    with run.metrics_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    run.tracker.log(row)


def save_checkpoint(run: Run, step: int) -> Path:
    """checkpoint-STEP: the weights, the trainer state with the data position and fingerprint, and
    copies of the metrics so far and of the config it was made with."""
    run.state.update(run.stream.position(), data=run.data_fingerprint)
    rank_rngs = run.processes.rng_states(rng_state())
    # Sharded (FSDP), every process takes part in gathering the weights and optimizer state whole.
    adapter, optimizer_state = run.processes.whole_adapter(run.model), run.processes.whole_optimizer_state(run.optimizer)
    saved = run.out / f"{CHECKPOINT_PREFIX}{step}"
    if run.processes.is_main:
        saved = write_checkpoint(run.out, step, run.model, run.optimizer, run.scaler, run.state,
                                 [run.metrics_path, run.out / "config.yaml"], run.config.train.keep_last,
                                 rank_rngs=rank_rngs, adapter_weights=adapter, optimizer_state=optimizer_state)
    run.processes.wait()  # no process leaves (or is stopped) while the main one still writes
    return saved


def finish_run(run: Run) -> RunSummary:
    """Save the adapter and tokenizer, then summary.json (last and atomically: its presence means
    the run finished). Steps that read the finished run (a final report) come after this."""
    out = run.out
    weights = run.processes.whole_adapter(run.model)  # sharded: gathered by every process
    if run.processes.is_main:
        before = {entry.name for entry in out.iterdir()}
        save_adapter(run.model, out, weights)
        run.tokenizer.save_pretrained(out)
        record_written(out, {entry.name for entry in out.iterdir()} - before)
    size = len(run.data.train)
    summary = RunSummary(str(out), run.total_steps, size, len(run.data.eval), time.perf_counter() - run.started,
                         run.last_train, run.state["last_eval"], run.state["skipped_steps"], run.start_step,
                         reward_definition(run.config.dpo), pairs_trained=run.stream.consumed,
                         epochs=run.stream.consumed / size, resumes=run.state.get("resumes", []),
                         data_files=_data_file_digests(run.config))
    if run.processes.is_main:
        summary.write(out / SUMMARY_FILE)
    run.processes.wait()
    return summary


class DpoStep:
    """The work of one optimizer step: collate each micro-batch, the reference pass (or a lookup in
    a precomputed table), the policy pass, the loss, backward; then clip, update, schedule.

    The loop, its evaluation and scripts/bench.py all run this object, so the benchmark times
    exactly what training does. ``phase`` (the bench's profiler) is called with the name of each
    part as it ends: "reference", "policy", "backward" per micro-batch, "update" per step.
    Under ``accelerate launch`` (``processes``), each process runs its share of a step's
    micro-batches through the DDP wrapper (``scorer``) and the metrics are over all processes.
    """

    def __init__(self, config: Config, model: Any, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                 scaler: torch.amp.GradScaler | None, device: torch.device, pad_id: int,
                 phase: Callable[[str], None] | None = None, processes: Processes | None = None,
                 scorer: torch.nn.Module | None = None) -> None:
        self.config, self.model, self.optimizer, self.scheduler, self.scaler = config, model, optimizer, scheduler, scaler
        self.device, self.pad_id = device, pad_id
        self.processes = processes or Processes(device=device)
        # Both passes run through it (DDP's forward arms the all-reduce; FSDP's gathers the
        # weights). ``scorer``: ``processes.wrap(model)`` already made (setup_run, which must
        # shard before building the optimizer).
        self.scorer = scorer if scorer is not None else self.processes.wrap(model)
        self.autocast = autocast_for(device, resolve_compute_dtype(config.model, device))
        self.use_reference = needs_reference(config.dpo)  # SimPO/ORPO: no reference pass at all
        self.phase = phase or (lambda name: None)

    def forward(self, pairs: Sequence[TokenizedPair], indices: list[int],
                reference_table: ReferenceTable | None) -> tuple[PreferenceLoss, PairLogps, int]:
        """Loss terms and policy log-probs of the pairs at ``indices``, and their throughput token count."""
        config, model = self.config, self.model
        chunk, ld_alpha = config.dpo.logps_chunk_size, config.dpo.ld_alpha
        batch = collate([pairs[i] for i in indices], self.pad_id, layout=config.data.layout,
                        pack_length=config.data.pack_length).to(self.device)
        self.phase("collate")
        reference = None
        if reference_table is not None:
            reference = reference_table.lookup(indices, self.device)
            self.phase("reference")
        elif self.use_reference:
            was_training = model.training
            # Eval mode: no dropout on a reference adapter, and no checkpointing wrappers around a
            # pass that keeps no activations anyway.
            model.eval()
            with torch.no_grad(), reference_model(model), self.autocast:
                reference = self.scorer(batch, chunk, ld_alpha=ld_alpha)
            model.train(was_training)
            self.phase("reference")
        with self.autocast:
            policy = self.scorer(batch, chunk, ld_alpha=ld_alpha, wpo=config.dpo.wpo_weighting)
        result = preference_loss(config.dpo, policy, reference)
        self.phase("policy")
        return result, policy, batch.num_tokens

    def __call__(self, pairs: Sequence[TokenizedPair], micro_batches: list[list[int]],
                 reference_table: ReferenceTable | None) -> tuple[dict[str, float], bool, bool]:
        """Accumulate gradients over the micro-batches and apply them unless something is non-finite;
        returns the metrics, whether the update was applied, and whether the step was bad."""
        optimizer, scaler, processes = self.optimizer, self.scaler, self.processes
        assert optimizer is not None, "DpoStep built without an optimizer only evaluates"
        totals = _MetricSums()
        tokens = 0
        step_pair_count = sum(len(indices) for indices in micro_batches)  # on all processes
        mine = processes.share(micro_batches)
        for position, indices in enumerate(mine):
            # An empty share is a pass of weight zero over one pair, which adds nothing to the
            # gradients or the metrics: a process without pairs in a (last, short) step still
            # joins DDP's all-reduce, and sharded, every process runs as many passes as the others.
            weight = processes.count if indices else 0
            indices = indices or micro_batches[0][:1]
            with processes.accumulating(self.scorer, last=position == len(mine) - 1):
                result, policy, num_tokens = self.forward(pairs, indices, reference_table)
                # A mean over the step's pairs, however they were split (x processes: DDP averages).
                loss = result.losses.sum() * weight / step_pair_count
                (scaler.scale(loss) if scaler else loss).backward()
            self.phase("backward")
            totals.add(result, policy, weight=min(weight, 1))
            tokens += num_tokens if weight else 0
        if scaler:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm or float("inf"))))
        metrics = {**totals.means(processes.sum), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}
        if scaler:
            # float16: the scaler owns non-finite gradients — it skips the update and lowers its
            # scale, which is routine while it calibrates — and must see every step, skipped or not,
            # or its next unscale_ fails. Only a non-finite loss counts as bad here.
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            bad = not math.isfinite(metrics["loss"])
            applied = not bad and scaler.get_scale() >= scale
        else:
            bad = not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm))
            applied = not bad
            if applied:
                optimizer.step()
        self.scheduler.step()  # also on skipped steps, so the schedule stays tied to the step number
        optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.phase("update")
        metrics["tokens"] = int(processes.sum(torch.tensor(tokens)).item()) if processes.count > 1 else tokens
        return metrics, applied, bad


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current step, save a checkpoint and exit; a second
    Ctrl-C stops at once. Handlers can only be installed from the main thread."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_number = signal.Signals(number).name, number
        log.warning("%s received: finishing this step and saving a checkpoint (press Ctrl-C again to stop now)",
                    self.requested)


def _out_of_memory(config: Config, when: str, pairs: list[TokenizedPair]) -> LoraDpoError:
    longest = max((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return LoraDpoError(
        f"out of GPU memory {when} with train.micro_batch_size={config.train.micro_batch_size} "
        f"(longest sequence {longest} tokens, data.max_length={config.data.max_length}). Fix: lower "
        "train.micro_batch_size (raise train.gradient_accumulation_steps to keep the pairs per step), lower "
        "data.max_length or dpo.logps_chunk_size, keep model.gradient_checkpointing on with model.checkpoint_layers "
        f"null (every layer){planner_hint(config)}; --debug shows the traceback")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _MetricSums:
    """Per-pair metric sums over micro-batches; means are over pairs, not micro-batches."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.pairs = 0

    def add(self, result: Any, policy: PairLogps, weight: int = 1) -> None:
        """Add the pairs of one micro-batch (``weight`` 0: count nothing, a pass DDP needed)."""
        margins = result.chosen_rewards - result.rejected_rewards
        values = {
            "loss": result.losses.detach(),
            "rewards/chosen": result.chosen_rewards,
            "rewards/rejected": result.rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracy": (margins > 0).float(),
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        }
        # Sums stay on the device: reading them back per micro-batch would stall the GPU while the
        # CPU builds the next batch. means() reads them once per step.
        for name, value in values.items():
            total = value.detach().float().sum() * weight
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.pairs += result.losses.shape[0] * weight

    def means(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Means over the pairs; ``reduce`` (``Processes.sum``) first adds up the sums and the pair
        counts of every process, in one all-reduce."""
        if not self.sums:
            return {}
        names = list(self.sums)
        stacked = torch.stack([self.sums[name] for name in names])
        stacked = torch.cat([stacked, stacked.new_tensor([float(self.pairs)])])
        *totals, pairs = (reduce(stacked) if reduce else stacked).tolist()
        return {name: total / max(1, pairs) for name, total in zip(names, totals)}


def build_optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    settings = dict(lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    if config.train.optim == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LoraDpoError("train.optim=paged_adamw_8bit needs bitsandbytes. Fix: pip install bitsandbytes, "
                               "or set train.optim=adamw") from None
        return bnb.optim.PagedAdamW8bit(params, **settings)
    return torch.optim.AdamW(params, **settings)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    start_step: int = 0) -> Any:
    """The learning-rate schedule of ``total`` steps, placed at ``start_step`` (a resume): the rate
    of each step is a function of the current settings and the step number alone, so a resumed run
    continues the uninterrupted one exactly, and changed settings take effect at once."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    # last_epoch=start-1: the scheduler's own first step moves it to start, as start steps would have.
    last_epoch = start_step - 1
    if config.train.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup, last_epoch=last_epoch)
    build = get_linear_schedule_with_warmup if config.train.lr_scheduler == "linear" else get_cosine_schedule_with_warmup
    return build(optimizer, warmup, total, last_epoch=last_epoch)


def _progress_bar(total: int, progress: bool | None, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    # progress=None: a bar on a terminal, periodic log lines otherwise (CI logs, files).
    return tqdm(total=total, initial=initial, desc="dpo", unit="step", dynamic_ncols=True,
                disable=(not sys.stderr.isatty()) if progress is None else not progress)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # CPU: peak resident set of the process (Linux reports KiB).
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed)
