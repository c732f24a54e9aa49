"""records: a job killed at any byte and run again ends with the files of an uninterrupted run;
skips survive restarts; changed settings, edited outputs and a second writer are refused; the
output stays a preference file that training reads as it is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dpo.errors import LoraDpoError
from lora_dpo.records import content_hash, open_records, progress_path

FINGERPRINT = {"command": "collect rank", "num_samples": 4, "temperature": 0.8, "stop": ("\n\n",)}
PROMPTS = 40


def outcome(index: int):
    """What the stand-in job makes of prompt ``index``: 1-3 rows, or a skip with one of two reasons."""
    if index % 7 == 3:
        return "skip", "all answers scored the same" if index % 2 else "too long"
    rows = [{"prompt": f"Question {index}?", "chosen": f"Good answer {index}.{' ü' * k}",
             "rejected": f"Bad {index}/{k}", "margin": index + k / 10} for k in range(1 + index % 3)]
    return "rows", rows


def run_job(path: Path, processed: list[int] | None = None, opener=open_records) -> object:
    """A collection job in miniature: every prompt not done yet, in order."""
    with opener(path, FINGERPRINT) as records:
        for index in range(PROMPTS):
            if records.is_done(index):
                continue
            if processed is not None:
                processed.append(index)
            kind, value = outcome(index)
            if kind == "skip":
                records.skip(index, value)
            else:
                records.write(index, value)
        return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "pairs.jsonl"
    records = run_job(path)
    return path.read_bytes(), progress_path(path).read_bytes(), records


class Killed(Exception):
    pass


class DyingFile:
    """A file that writes only the first ``budget`` bytes it is given (shared with its twin), then
    "dies": the state a SIGKILL leaves at that byte."""

    def __init__(self, handle, budget: list[int]):
        self.handle, self.budget = handle, budget

    def write(self, data):
        allowed = max(0, min(len(data), self.budget[0]))
        self.handle.write(data[:allowed])
        self.handle.flush()
        self.budget[0] -= allowed
        if allowed < len(data):
            raise Killed
        return len(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def killed_run(path: Path, budget: int) -> None:
    def dying_open(*args, **kwargs):
        records = open_records(*args, **kwargs)
        shared = [budget]
        records._main, records._progress = DyingFile(records._main, shared), DyingFile(records._progress, shared)
        return records

    with pytest.raises(Killed):
        run_job(path, opener=dying_open)


def test_output_is_a_plain_preference_file(reference, tmp_path):
    from lora_dpo.data import DataReport, load_examples

    main, progress, records = reference
    lines = main.decode().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == records.rows_written and rows[0] == {**outcome(0)[1][0], "prompt_index": 0}
    assert [row["prompt_index"] for row in rows] == sorted(row["prompt_index"] for row in rows)
    path = tmp_path / "copy.jsonl"
    path.write_bytes(main)
    examples = load_examples(str(path), "train", ("prompt", "chosen", "rejected"), "error", DataReport(str(path)))
    assert len(examples) == len(rows)
    header = json.loads(progress.decode().splitlines()[0])
    assert header["fingerprint"] == json.loads(json.dumps(FINGERPRINT))
    assert records.skip_counts() == {"all answers scored the same": 3, "too long": 3}
    assert records.summary().startswith(f"{records.path}: {len(rows)} rows from 34 prompts, 6 prompts skipped")


def test_a_kill_at_any_byte_then_a_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    main, progress, _ = reference
    total = len(main) + len(progress) - len(progress.decode().splitlines()[0]) - 1  # bytes written after the header
    budgets = sorted(set(range(0, total, 73)) | {1, total - 1})
    first_prompt = len(main.splitlines(keepends=True)[0]) + len(progress.splitlines(keepends=True)[1])  # its row, its line
    for budget in budgets:
        path = tmp_path / f"run{budget}" / "pairs.jsonl"
        path.parent.mkdir()
        killed_run(path, budget)
        assert len(path.read_bytes()) + len(progress_path(path).read_bytes()) < len(main) + len(progress)
        resumed = run_job(path)
        assert path.read_bytes() == main, budget
        assert progress_path(path).read_bytes() == progress, budget
        assert resumed.resumed == (budget >= first_prompt)
    assert len(budgets) > 100


def test_torn_lines_are_removed_and_reported(reference, tmp_path):
    main, progress, _ = reference
    path = tmp_path / "pairs.jsonl"
    lines = main.splitlines(keepends=True)
    # Killed mid-line in the third prompt's rows: its progress line was never written.
    done_lines = progress.splitlines(keepends=True)[:3]  # header + prompts 0 and 1
    done_rows = sum(json.loads(line)["rows"] for line in done_lines[1:])
    path.write_bytes(b"".join(lines[:done_rows + 1]) + lines[done_rows + 1][:10])
    progress_path(path).write_bytes(b"".join(done_lines) + b'{"prompt_in')
    processed = []
    with open_records(path, FINGERPRINT) as records:
        assert records.done == {0, 1}
        status = records.status()
    assert "resuming" in status and "dropped a cut-off last line" in status and "removed" in status
    run_job(path, processed)
    assert processed == list(range(2, PROMPTS))
    assert path.read_bytes() == main and progress_path(path).read_bytes() == progress


def test_skips_survive_a_restart_and_are_not_redone(reference, tmp_path):
    main, progress, _ = reference
    path = tmp_path / "pairs.jsonl"
    killed_run(path, budget=len(main) // 2)
    with open_records(path, FINGERPRINT) as records:
        skipped_before = dict(records.skipped)
    assert skipped_before and set(skipped_before) <= {3, 10, 17, 24, 31, 38}
    processed = []
    records = run_job(path, processed)
    assert not set(processed) & set(skipped_before)
    assert records.skip_counts() == {"all answers scored the same": 3, "too long": 3}
    assert path.read_bytes() == main


def test_a_power_cut_that_lost_rows_the_progress_file_lists(reference, tmp_path):
    """The progress file may reach the disk before the rows it lists: those prompts are redone."""
    main, progress, _ = reference
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(main[: len(main) // 2])  # and whatever followed is gone
    progress_path(path).write_bytes(progress)
    with open_records(path, FINGERPRINT) as records:
        assert "were not in pairs.jsonl and are done again" in records.status()
    run_job(path)
    assert path.read_bytes() == main
    # The same entries; the skips that followed the lost prompts now come before them.
    assert sorted(progress_path(path).read_bytes().splitlines()) == sorted(progress.splitlines())


def test_a_real_sigkill(reference, tmp_path):
    main, progress, _ = reference
    path = tmp_path / "pairs.jsonl"
    script = (f"import sys, time; sys.path[:0] = [{str(Path(__file__).parent)!r}, {os.getcwd()!r}]\n"
              "import test_records as t\n"
              "from lora_dpo import records\n"
              "real = records.Records.write\n"
              "def slow(self, *a):\n    real(self, *a); time.sleep(0.01)\n"
              "records.Records.write = slow\n"
              f"t.run_job(t.Path({str(path)!r}))\n")
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < len(main) // 3) and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert path.stat().st_size < len(main)  # it died before finishing
    run_job(path)
    assert path.read_bytes() == main and progress_path(path).read_bytes() == progress


def test_other_settings_are_refused_and_overwrite_starts_again(reference, tmp_path):
    main, progress, _ = reference
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(main)
    progress_path(path).write_bytes(progress)
    changed = {**FINGERPRINT, "temperature": 1.0, "reward": "rm"}
    del changed["stop"]
    with pytest.raises(LoraDpoError) as error:
        open_records(path, changed, overwrite_option="--overwrite")
    assert str(error.value) == (f"{path} was started with other settings (reward: unset before, \"rm\" now; "
                                "stop: [\"\\n\\n\"] before, unset now; temperature: 0.8 before, 1.0 now). Fix: rerun "
                                "with the earlier settings to continue it, or pass --overwrite to start again (or "
                                "choose another output)")
    assert path.read_bytes() == main and progress_path(path).read_bytes() == progress  # untouched
    with open_records(path, changed, overwrite=True) as records:
        assert not records.done and path.stat().st_size == 0
    with open_records(path, changed) as records:
        assert records.status() == f"writing {path}"


def test_outputs_that_cannot_be_resumed(reference, tmp_path):
    main, progress, _ = reference
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(main)
    with pytest.raises(LoraDpoError, match="exists and was not written by a resumable job \\(no plain.jsonl.progress"):
        open_records(plain, FINGERPRINT)

    edited = tmp_path / "edited.jsonl"
    lines = main.splitlines(keepends=True)
    edited.write_bytes(b"".join(lines[:3] + lines[4:]))  # a row deleted by hand
    progress_path(edited).write_bytes(progress)
    with pytest.raises(LoraDpoError, match="cannot resume, edited.jsonl does not hold the .* rows .* \\(was it edited\\?\\)"):
        open_records(edited, FINGERPRINT)

    missing = tmp_path / "missing.jsonl"
    progress_path(missing).write_bytes(progress)
    with pytest.raises(LoraDpoError, match="missing.jsonl is missing but missing.jsonl.progress records a job"):
        open_records(missing, FINGERPRINT)
    assert not missing.exists()

    with pytest.raises(LoraDpoError, match="is a directory"):
        open_records(tmp_path, FINGERPRINT)
    with pytest.raises(LoraDpoError, match="does not exist. Fix: create it"):
        open_records(tmp_path / "no" / "x.jsonl", FINGERPRINT)


def test_one_writer_at_a_time_and_misuse(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open_records(path, FINGERPRINT) as records:
        with pytest.raises(LoraDpoError, match="is being written by another running job"):
            open_records(path, FINGERPRINT)
        records.write(0, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
        with pytest.raises(ValueError, match="prompt 0 is already done"):
            records.skip(0, "again")
        with pytest.raises(ValueError, match="no rows"):
            records.write(1, [])
        with pytest.raises(TypeError):
            records.write(1, [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"bad": object()}])
        # A model or scorer gone non-finite: one line naming the prompt and the field, not json's traceback.
        with pytest.raises(LoraDpoError, match=r"prompt 2's score is nan, not a finite number.*Fix: "):
            records.write(2, [{"prompt": "a", "score": float("nan")}])
        with pytest.raises(LoraDpoError, match=r"prompt 2's scores\[1\] is -inf"):
            records.write(2, [{"prompt": "a", "scores": [0.5, float("-inf")]}])
        assert not records.is_done(1) and not records.is_done(2)
    assert len(path.read_text().splitlines()) == 1  # the refused rows wrote nothing
    with open_records(path, FINGERPRINT) as records:  # the lock went with the first writer
        assert records.done == {0}


def test_content_hash_is_stable():
    assert content_hash(["a", {"b": 1, "c": [2]}]) == content_hash(["a", {"c": [2], "b": 1}])
    assert content_hash(["a"]) != content_hash(["b"]) and len(content_hash("x")) == 16
