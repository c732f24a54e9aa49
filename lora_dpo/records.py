"""Append-only, resumable JSONL outputs for long jobs (collection, evaluation answers).

A job writes its results prompt by prompt; killed at any moment and started again with the same
settings, it continues where it stopped and ends with the same file an uninterrupted run writes::

    from lora_dpo.records import content_hash, open_records

    fingerprint = {"command": "collect rank", "model": "runs/a", "reward": "rm", "num_samples": 4,
                   "prompts": content_hash([p.text for p in prompts])}
    with open_records("pairs.jsonl", fingerprint, overwrite=args.overwrite) as out:
        print(out.status())                       # "resuming pairs.jsonl: 340 of the prompts done ..."
        todo = [p for p in prompts if not out.is_done(p.index)]
        for prompt in todo:                       # or chunk by chunk
            ...
            out.write(prompt.index, [{"prompt": ..., "chosen": ..., "rejected": ...}])
            # or: out.skip(prompt.index, "all answers scored the same")
        print(out.summary())

Two files. ``pairs.jsonl`` is a plain JSONL file (no header, one row per line, each row with
its ``prompt_index`` added), so ``lora-dpo train`` and any JSONL reader take it as it is; the
rows of a prompt are consecutive, prompts in the order written. Beside it ``pairs.jsonl.progress``
(JSON lines) holds the run's fingerprint on its first line, then one line per finished prompt:
``{"prompt_index": 7, "rows": 2, "end": 18234}`` (``end``: the output's size in bytes after the
prompt's rows) or ``{"prompt_index": 8, "skipped": "reason"}``. A prompt counts as done only once
its progress line is written, and that line is written after its rows.

Opening an existing output:

- the fingerprint (the settings that decide the contents; JSON values) must equal the one the
  output was started with, else a one-line error names the settings that differ and says how to
  start again (``overwrite_option``); ``overwrite=True`` empties both files and starts again;
- a cut-off last progress line is dropped, and the output is cut back to the end of the last
  finished prompt, which removes a torn last line and the rows of a prompt whose progress line
  was never written; those prompts are done again. ``repairs`` says what was removed;
- skipped prompts stay done with their reasons, so ``skip_counts`` survive a restart and skipped
  prompts are not redone;
- an output that does not match its progress file (edited by hand, or an output with no
  progress file) is refused with a one-line error rather than mixed into.

Durability: each prompt's rows go out in one write and both files are flushed after every
prompt, so a killed process loses nothing it finished. ``fsync`` (the cost of surviving a power
cut) runs at most every ``sync_every_s`` seconds (default 5) and on close; after a power cut the
progress file may run ahead of the output, and the prompts it lists beyond the output's end are
done again. The output is locked while open (``flock``, where the OS has it), so two jobs cannot
write one file. Standard library only (and tqdm for the bar of ``in_chunks``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import LoraDpoError

FORMAT = "lora-dpo-progress/1"
PROGRESS_SUFFIX = ".progress"

# Prompts go through the model in chunks of this many batches, each chunk written when it is
# done: enough rows for length sorting to pay, few enough that a kill loses little.
CHUNK_BATCHES = 4


def progress_path(path: str | Path) -> Path:
    """The progress file beside an output: ``pairs.jsonl`` -> ``pairs.jsonl.progress``."""
    path = Path(path)
    return path.with_name(path.name + PROGRESS_SUFFIX)


def content_hash(value: Any) -> str:
    """A short stable hash of JSON-able ``value`` (e.g. the prompt texts), for fingerprints."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Records:
    """An open resumable output; use ``open_records`` to get one."""

    def __init__(self, path: Path, fingerprint: dict[str, Any], sync_every_s: float):
        self.path = path
        self.progress_path = progress_path(path)
        self.fingerprint = fingerprint
        self.sync_every_s = sync_every_s
        self.written: dict[int, int] = {}
        """prompt index -> rows written, for every finished prompt (this run and earlier ones)."""
        self.skipped: dict[int, str] = {}
        """prompt index -> reason, for every skipped prompt (this run and earlier ones)."""
        self.resumed = False
        """True when the output held finished prompts from an earlier run."""
        self.repairs: list[str] = []
        """What opening removed (a cut-off line, an unfinished prompt's rows), for the log."""
        self._main: Any = None
        self._progress: Any = None
        self._end = 0
        self._last_sync = time.monotonic()

    # -- reading the state ---------------------------------------------------------------------

    def is_done(self, prompt_index: int) -> bool:
        """Written or skipped, in this run or an earlier one."""
        return prompt_index in self.written or prompt_index in self.skipped

    @property
    def done(self) -> set[int]:
        return set(self.written) | set(self.skipped)

    @property
    def rows_written(self) -> int:
        return sum(self.written.values())

    def skip_counts(self) -> Counter:
        """Skipped prompts by reason."""
        return Counter(self.skipped.values())

    def status(self) -> str:
        """One line for the start of a job: new, or resumed with what was done and repaired."""
        if not self.resumed and not self.skipped:
            return f"writing {self.path}"
        text = (f"resuming {self.path}: {len(self.done)} prompts done ({len(self.written)} written, "
                f"{len(self.skipped)} skipped)")
        return text + ("; " + "; ".join(self.repairs) if self.repairs else "")

    def summary(self) -> str:
        text = f"{self.path}: {self.rows_written} rows from {len(self.written)} prompts"
        if self.skipped:
            text += f", {len(self.skipped)} prompts skipped (" + ", ".join(
                f"{count} {reason}" for reason, count in self.skip_counts().most_common()) + ")"
        return text

    # -- writing -------------------------------------------------------------------------------

    def write(self, prompt_index: int, rows: list[dict[str, Any]]) -> None:
        """All rows of one prompt, as one write; ``prompt_index`` is added to each row."""
        self._check_new(prompt_index)
        if not rows:
            raise ValueError(f"prompt {prompt_index}: no rows to write (use skip() with a reason)")
        lines = []
        for row in rows:
            if row.get("prompt_index", prompt_index) != prompt_index:
                raise ValueError(f"a row of prompt {prompt_index} says prompt_index {row['prompt_index']}")
            bad = _non_finite(row)
            if bad is not None:
                raise LoraDpoError(f"{self.path}: prompt {prompt_index}'s {bad[0]} is {bad[1]}, not a finite number, so "
                                   "it is not saved (the prompts before it are). Fix: check the model or scorer that "
                                   "gave it (float16 overflows: use bfloat16), then run the same command again")
            lines.append(json.dumps({**row, "prompt_index": prompt_index}, ensure_ascii=False, allow_nan=False) + "\n")
        data = "".join(lines).encode("utf-8")  # encoded before anything is written: a bad row writes nothing
        self._main.write(data)
        self._main.flush()
        self._end += len(data)
        self._log({"prompt_index": prompt_index, "rows": len(rows), "end": self._end})
        self.written[prompt_index] = len(rows)

    def skip(self, prompt_index: int, reason: str) -> None:
        """Mark a prompt done without rows; the reason is kept and counted across restarts."""
        self._check_new(prompt_index)
        if not isinstance(reason, str) or not reason:
            raise ValueError("a skip needs a reason")
        self._log({"prompt_index": prompt_index, "skipped": reason})
        self.skipped[prompt_index] = reason

    def sync(self) -> None:
        """fsync both files: output first, so the progress file never lists rows a power cut lost."""
        for handle in (self._main, self._progress):
            handle.flush()
            os.fsync(handle.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._main is None:
            return
        try:
            self.sync()
        finally:
            self._progress.close()
            self._main.close()  # releases the lock
            self._main = self._progress = None

    def __enter__(self) -> "Records":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_new(self, prompt_index: int) -> None:
        if self._main is None:
            raise ValueError(f"{self.path} is closed")
        if not isinstance(prompt_index, int) or isinstance(prompt_index, bool):
            raise ValueError(f"prompt_index must be an int, got {prompt_index!r}")
        if self.is_done(prompt_index):
            raise ValueError(f"prompt {prompt_index} is already done in {self.path}")

    def _log(self, entry: dict[str, Any]) -> None:
        self._progress.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._progress.flush()
        if time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()


def _non_finite(value: Any, name: str = "row") -> tuple[str, float] | None:
    """(the field's name, the value) of the first NaN or infinity in a row, however nested; None if none."""
    if isinstance(value, float):
        return None if value == value and abs(value) != float("inf") else (name, value)
    if isinstance(value, dict):
        items = ((key if name == "row" else f"{name}.{key}", item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{name}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for item_name, item in items:
        found = _non_finite(item, item_name)
        if found is not None:
            return found
    return None


def open_records(path: str | Path, fingerprint: dict[str, Any], *, overwrite: bool = False,
                 overwrite_option: str = "--overwrite", sync_every_s: float = 5.0) -> Records:
    """Open ``path`` for appending, new or resumed (see the module docstring). ``fingerprint``:
    the settings that decide the contents, JSON values; ``overwrite_option`` is how the command
    spells "start again" in messages."""
    path = Path(path)
    if path.is_dir():
        raise LoraDpoError(f"{path} is a directory. Fix: give a file path, e.g. {path / 'pairs.jsonl'}")
    if not path.parent.is_dir():
        raise LoraDpoError(f"{path}: the directory {path.parent} does not exist. Fix: create it")
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples as lists: compared as they will be read back
    records = Records(path, fingerprint, sync_every_s)
    progress = records.progress_path
    existed = path.exists()
    if not existed and progress.is_file() and not overwrite and progress.stat().st_size > 0:
        raise LoraDpoError(f"{path} is missing but {progress.name} records a job writing it. Fix: restore {path.name}, "
                           f"or pass {overwrite_option} to start again")
    records._main = path.open("ab")
    try:
        _lock(records._main, path)
        if overwrite or not progress.exists():
            if not overwrite and path.stat().st_size > 0:
                raise LoraDpoError(f"{path} exists and was not written by a resumable job (no {progress.name} beside "
                                   f"it). Fix: choose another output, or pass {overwrite_option} to replace it")
            _start(records, existed)
        else:
            _resume(records, overwrite_option)
        records._progress = progress.open("a", encoding="utf-8")
    except BaseException:
        records._main.close()
        records._main = None
        raise
    return records


def _start(records: Records, existed: bool) -> None:
    records._main.truncate(0)
    _replace_progress(records.progress_path, [{"format": FORMAT, "fingerprint": records.fingerprint}])
    os.fsync(records._main.fileno())
    if not existed:
        _fsync_directory(records.path.parent)


def _resume(records: Records, overwrite_option: str) -> None:
    path, progress = records.path, records.progress_path
    raw = progress.read_bytes()
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline; else a line cut off mid-write
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _mismatch(path, f"{progress.name} line {number} is not valid JSON", overwrite_option) from None
    if not entries:  # killed while the header was written: nothing else can have been
        if path.stat().st_size > 0:
            raise _mismatch(path, f"{progress.name} has no header but the output holds rows", overwrite_option)
        _start(records, existed=True)
        return
    header, entries = entries[0], entries[1:]
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("fingerprint"), dict):
        raise _mismatch(path, f"{progress.name} is not a lora-dpo progress file ({FORMAT})", overwrite_option)
    differences = _differences(header["fingerprint"], records.fingerprint)
    if differences:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise LoraDpoError(f"{path} was started with other settings ({shown}). Fix: rerun with the earlier settings "
                           f"to continue it, or pass {overwrite_option} to start again (or choose another output)")
    if torn:
        records.repairs.append(f"dropped a cut-off last line of {progress.name}")

    size = path.stat().st_size
    kept, end, lost = [header], 0, 0
    for entry in entries:
        index = entry.get("prompt_index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or records.is_done(index):
            raise _mismatch(path, f"{progress.name} holds a bad or repeated entry {json.dumps(entry)[:60]}",
                            overwrite_option)
        if "skipped" in entry:
            records.skipped[index] = str(entry["skipped"])
        elif isinstance(entry.get("rows"), int) and isinstance(entry.get("end"), int) and entry["end"] > end:
            if entry["end"] > size:  # after a power cut: listed, but its rows never reached the disk
                lost += 1
                continue
            records.written[index] = entry["rows"]
            end = entry["end"]
        else:
            raise _mismatch(path, f"{progress.name} holds a bad entry {json.dumps(entry)[:60]}", overwrite_option)
        kept.append(entry)
    if lost:
        records.repairs.append(f"{lost} prompts listed as written were not in {path.name} and are done again")

    with path.open("rb") as handle:
        written = handle.read(end)
    if written.count(b"\n") != records.rows_written or (end and not written.endswith(b"\n")):
        raise _mismatch(path, f"{path.name} does not hold the {records.rows_written} rows {progress.name} lists "
                        "(was it edited?)", overwrite_option)
    if size > end:
        tail = size - end
        records._main.truncate(end)
        os.fsync(records._main.fileno())
        records.repairs.append(f"removed {tail} bytes after the last finished prompt (an unfinished prompt or a "
                               "cut-off line)")
    if torn or lost:
        _replace_progress(progress, kept)
    records._end = end
    records.resumed = bool(records.written or records.skipped)


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    unset = object()
    found = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, unset), now.get(key, unset)
        if old != new:
            found.append(f"{key}: {_shown(old, unset)} before, {_shown(new, unset)} now")
    return found


def _shown(value: Any, unset: object) -> str:
    if value is unset:
        return "unset"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _mismatch(path: Path, problem: str, overwrite_option: str) -> LoraDpoError:
    return LoraDpoError(f"{path}: cannot resume, {problem}. Fix: restore both files, or pass {overwrite_option} to "
                        "start again (or choose another output)")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a
    part: through a ``.tmp-`` sibling (what ``checkpoint.remove_partial_writes`` clears after a crash),
    flushed to disk, then renamed over ``path``."""
    temporary = path.with_name(f".tmp-{path.name}")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _replace_progress(progress: Path, entries: list[dict[str, Any]]) -> None:
    """Write the whole progress file atomically (temporary file, fsync, rename)."""
    temporary = progress.with_name(f".{progress.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, progress)
    _fsync_directory(progress.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _lock(handle: Any, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one job per output is then the user's to keep
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise LoraDpoError(f"{path} is being written by another running job. Fix: wait for it to finish, or choose "
                           "another output") from None


# ---------------------------------------------------------------------------------------------
# Several processes, chunk by chunk (collect's commands and lora-dpo eval)
#
# Under torchrun or accelerate launch the main process alone opens, writes and closes an output;
# the others learn from it which prompts are done (``open_shared``). Each chunk of prompts is
# shared out (``in_chunks``: every process works on every ``count``-th prompt of the chunk, the
# results are gathered in prompt order, the main process writes them), so a kill loses at most a
# chunk and every process makes the same collective calls. ``processes`` is a
# ``distributed.Processes`` (alone: ``Processes()``, for which all of this costs nothing).


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextlib.contextmanager
def prompt_bar(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A bar counting finished prompts (written or skipped), with prompts/s and the time left;
    shown on a terminal only."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, leave=False,
              disable=not enabled or not sys.stderr.isatty()) as bar:
        yield bar


def in_chunks(todo: Sequence[Any], size: int, desc: str, done: str, bar_enabled: bool, work: Any, write: Any,
              processes: Any, *, logger: logging.Logger) -> None:
    """Each chunk of ``size`` prompts of ``todo``, shared out over the processes: ``work(share)``
    returns one result (plain, picklable data) per prompt of this process's share, every
    ``count``-th prompt of the chunk (alone: the whole chunk); the results are gathered in prompt
    order, and the main process calls ``write(prompt, result)`` for each prompt of the chunk, which
    advances the bar, before the next chunk starts. One gather per chunk on every process, so
    the processes stay in step. Logs the rate at the end to the command's ``logger`` as "DONE: N
    prompts in S s" (what scripts/bench_collect.py reads from lora_dpo.collect)."""
    started = time.monotonic()
    with prompt_bar(len(todo), desc, bar_enabled and processes.is_main) as bar:
        for part in chunks(todo, size):
            share = [part[k] for k in processes.shard(len(part))]
            # A chunk shorter than the processes leaves some without prompts; they still gather.
            results = processes.gather_items(list(work(share)) if share else [], len(part))
            if processes.is_main:
                for prompt, result in zip(part, results):
                    write(prompt, result)
                    bar.update(1)
    log_rate(logger, done, len(todo), started)


def log_rate(logger: logging.Logger, what: str, count: int, started: float) -> None:
    elapsed = time.monotonic() - started
    if count:
        logger.info("%s: %d prompts in %.1f s (%.2f prompts/s)", what, count, elapsed, count / max(elapsed, 1e-9))


def from_main(processes: Any, value: Any) -> Any:
    """``value`` as the main process has it, on every process (one all-gather of Python objects;
    alone, ``value`` itself)."""
    return processes.gather_items([value], processes.count)[0]


class Followed:
    """An output as a process other than the main one knows it: the prompts that were done when
    the main process opened it. It writes nothing; the main process writes every row."""

    def __init__(self, path: Path, done: set[int]):
        self.path = path
        self.done = done

    def is_done(self, prompt_index: int) -> bool:
        return prompt_index in self.done

    def close(self) -> None:
        pass

    def __enter__(self) -> "Followed":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def open_shared(path: str | Path, fingerprint: dict[str, Any], overwrite: bool, processes: Any) -> "Records | Followed":
    """``records.open_records`` on the main process; every other process gets a ``Followed``
    with the prompts the main one found done, and the main one's error when it refused the
    output (another command's settings), so that every process stops with the same line."""
    if processes.count == 1:
        return open_records(path, fingerprint, overwrite=overwrite)
    opened, problem = None, None
    if processes.is_main:
        try:
            opened = open_records(path, fingerprint, overwrite=overwrite)
        except LoraDpoError as exc:
            problem = str(exc)
    done, problem = from_main(processes, (sorted(opened.done) if opened is not None else [], problem))
    if problem is not None:
        raise LoraDpoError(problem)
    return opened if opened is not None else Followed(Path(path), set(done))
