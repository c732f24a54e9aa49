"""`lora-dpo collect` and `lora-dpo eval` under a launcher: two processes on the CPU (gloo), started
the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each working on its
share of the prompts.

One spawn of two processes runs every command, because starting them is most of the cost:
collect rank, collect rank continuing an output a killed one-process run left, collect revise
(with --sft-out), collect judge, eval of a tiny trained run, and eval continuing an evaluation a
killed one-process run left. The parent runs the same
commands in one process and compares the files: the same bytes (the judge's probabilities and
eval.json's numbers to float rounding: their pairs are scored in other micro-batches), written
by the main process alone; the other process opened no file for writing under the test's
directory and printed nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.cli import main
from lora_dpo.records import Records

PROMPTS = ["Can you tell me about bread?", "Why do people like owls?", "Give me a tip about snow.",
           "What is interesting about tea?", "Could you explain chess simply?", "I want to learn about bees."]
SCORER = "def varied(prompt, answer):\n    return float(sum(map(ord, answer)) % 97)\n"
WRITING_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate")


def rank_words(root: Path, model: Path, out: Path) -> list[str]:
    return ["collect", "rank", "--prompts", str(root / "prompts.jsonl"), "--generator", str(model),
            "--reward-model", f"{root / 'scorer.py'}:varied", "--out", str(out), "-n", "4", "--max-new-tokens", "8",
            "--temperature", "1.0", "--batch-size", "4", "--device", "cpu", "--seed", "5", "--no-progress"]


def chat_words(root: Path, model: Path, command: str, out: Path) -> list[str]:
    words = ["collect", command, "--prompts", str(root / "prompts.jsonl"), "--limit", "3", "--model", str(model),
             "--out", str(out), "--max-new-tokens", "6", "--temperature", "1.0", "--batch-size", "2",
             "--device", "cpu", "--no-progress"]
    if command == "revise":
        return words + ["--few-shot", "1", "--sft-out", str(out.with_suffix(".sft.jsonl"))]
    return words + ["--min-confidence", "0.5"]


def eval_words(run_dir: Path, out: Path) -> list[str]:
    return ["eval", str(run_dir), "--judge", "lora_dpo.demo:kindness", "--prompts", "3", "--samples", "2",
            "--max-new-tokens", "6", "--batch-size", "4", "--out", str(out), "--no-progress", "--device", "cpu"]


def commands(root: Path, model: Path, run_dir: Path, name: str) -> dict[str, list[str]]:
    """The commands both runs make, writing under files named for the run (``name``)."""
    return {"rank": rank_words(root, model, root / f"rank-{name}.jsonl"),
            "revise": chat_words(root, model, "revise", root / f"revise-{name}.jsonl"),
            "judge": chat_words(root, model, "judge", root / f"judge-{name}.jsonl"),
            "eval": eval_words(run_dir, root / f"eval-{name}")}


def without_position_bias_skips() -> None:
    """The tiny random judge prefers a position, so every prompt would be skipped as "the two
    orderings disagree" and no probability would reach the rows; both runs take the mean
    preference instead, so the rows carry the judge's real numbers to compare."""
    from lora_dpo.collect import judge

    judge.preference = lambda first_as_a, first_as_b, _: (0 if first_as_a + first_as_b > 1 else 1, None)


def watch_writes(root: str, seen: list[str], recording: list[bool]) -> None:
    """Record every file this process opens for writing (or renames, removes, makes) under ``root``."""
    def hook(event: str, args: tuple) -> None:
        if not recording[0] or not args or not isinstance(args[0], str) or not args[0].startswith(root):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
            if writing:
                seen.append(f"open {args[0]}")
        elif event in WRITING_EVENTS:
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def worker(rank: int, port: int, root: str, jobs: dict[str, list[str]]) -> None:
    """One of the two processes: runs every job, and writes what the parent checks to root/rank-R.json."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from lora_dpo.cli import main

    without_position_bias_skips()
    from lora_dpo import evaluation

    evaluation.CHUNK_BATCHES = 1  # as killed_eval ran: chunks of 2 prompts at --batch-size 2 over two processes
    report, seen, recording = {"codes": {}, "printed": {}}, [], [rank != 0]
    watch_writes(root, seen, recording)
    for name, words in jobs.items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            report["codes"][name] = main(words)
        report["printed"][name] = printed.getvalue()
    recording[0] = False
    report["writes"] = seen
    (Path(root) / f"rank-{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def killed_twice(words: list[str]) -> None:
    """collect rank killed after 2 of 6 prompts' candidates, then again at its second pair: an
    output with some pairs and candidates, for the two processes to continue."""
    real = Records.write
    calls = {"n": 0, "at": 3}

    def dying(self, prompt_index, rows):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise KeyboardInterrupt
        real(self, prompt_index, rows)

    Records.write = dying
    try:
        assert main(words) == 130
        calls.update(n=0, at=6)
        assert main(words) == 130
    finally:
        Records.write = real


def resumed_eval_words(run_dir: Path, out: Path) -> list[str]:
    """eval_words at --batch-size 2: with CHUNK_BATCHES 1, chunks of one prompt alone, of two over two processes."""
    words = eval_words(run_dir, out)
    words[words.index("--batch-size") + 1] = "2"
    return words


def killed_eval(words: list[str]) -> None:
    """eval killed (Ctrl-C) in the second chunk's generation: prompt 0's answers saved, for the
    two processes to continue (their first chunk, prompts 0 and 1, is half done)."""
    from lora_dpo import evaluation

    real, chunk_batches, calls = evaluation.sample, evaluation.CHUNK_BATCHES, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    evaluation.sample, evaluation.CHUNK_BATCHES = dying, 1
    try:
        assert main(words) == 130
    finally:
        evaluation.sample, evaluation.CHUNK_BATCHES = real, chunk_batches


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir, demo_rows):
    """(root, the two processes' reports): the one-process runs are in root under *-single."""
    from lora_dpo.demo import EVAL_TOPICS, demo_pairs
    from lora_dpo.train import train

    root = tmp_path_factory.mktemp("prompts")
    (root / "scorer.py").write_text(SCORER)
    write_jsonl(root / "prompts.jsonl", [{"prompt": text} for text in PROMPTS])
    eval_file = write_jsonl(root / "held-out.jsonl", demo_pairs(EVAL_TOPICS, 4, seed=4))
    run_dir = root / "run"
    train(make_config(llama_dir, write_jsonl(root / "train.jsonl", demo_rows[:8]), run_dir, f"data.eval_file={eval_file}",
                      "train.max_steps=1", "model.load_in_4bit=false"), progress=False)
    from lora_dpo.collect import judge

    preference = judge.preference
    without_position_bias_skips()
    try:
        for words in commands(root, llama_dir, run_dir, "single").values():
            assert main(words) == 0
    finally:
        judge.preference = preference
    killed = rank_words(root, llama_dir, root / "killed.jsonl")
    killed_twice(killed)
    assert 0 < len((root / "killed.jsonl").read_text().splitlines()) < len((root / "rank-single.jsonl").read_text().splitlines())

    eval_killed = resumed_eval_words(run_dir, root / "eval-killed")
    killed_eval(eval_killed)
    assert len((root / "eval-killed" / "answers.jsonl").read_text().splitlines()) == 2  # prompt 0's two answers

    jobs = {**commands(root, llama_dir, run_dir, "ddp"), "resumed": killed, "eval-resumed": eval_killed}
    torch.multiprocessing.start_processes(worker, args=(free_port(), str(root), jobs), nprocs=2, join=True,
                                          start_method="spawn")
    return root, [json.loads((root / f"rank-{rank}.json").read_text()) for rank in range(2)]


def same_numbers(got, want) -> None:
    """Equal, floats to 1e-5 (relative) or 1e-6."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            same_numbers(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            same_numbers(a, b)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    else:
        assert got == want


def test_every_command_succeeds_and_only_the_main_process_writes_and_prints(runs):
    root, reports = runs
    for report in reports:
        assert report["codes"] == {"rank": 0, "revise": 0, "judge": 0, "eval": 0, "resumed": 0, "eval-resumed": 0}
    assert reports[1]["writes"] == []
    assert all(printed == "" for printed in reports[1]["printed"].values())
    assert "rows from" in reports[0]["printed"]["rank"] and "held-out accuracy" in reports[0]["printed"]["eval"]


@pytest.mark.parametrize("command", ["rank", "revise"])
def test_collect_over_two_processes_writes_the_rows_of_one(runs, command):
    root = runs[0]
    files = [f"{command}-{{}}.jsonl", f"{command}-{{}}.jsonl.progress"]
    if command == "revise":
        files += ["revise-{}.sft.jsonl", "revise-{}.sft.jsonl.progress"]
    for name in files:
        want = (root / name.format("single")).read_bytes()
        assert (root / name.format("ddp")).read_bytes() == want, name
    assert len((root / f"{command}-ddp.jsonl").read_text().splitlines()) >= 3  # pairs, not two empty files
    assert not list(root.glob("*.candidates*"))  # removed once complete, by the main process


def test_collect_judge_over_two_processes_judges_as_one(runs):
    """The judge's probabilities come from batched scoring in other micro-batches: equal to float rounding."""
    root = runs[0]
    for name in ("judge-{}.jsonl", "judge-{}.jsonl.progress"):
        want = [json.loads(line) for line in (root / name.format("single")).read_text().splitlines()]
        same_numbers([json.loads(line) for line in (root / name.format("ddp")).read_text().splitlines()], want)
    rows = [json.loads(line) for line in (root / "judge-ddp.jsonl").read_text().splitlines()]
    assert [row["prompt_index"] for row in rows] == [0, 1, 2]
    assert all(0 < row["first_as_a"] < 1 and row["first_as_a"] != row["first_as_b"] for row in rows)


def test_two_processes_continue_a_killed_run_to_the_uninterrupted_file(runs):
    root = runs[0]
    assert (root / "killed.jsonl").read_bytes() == (root / "rank-single.jsonl").read_bytes()
    single = (root / "rank-single.jsonl.progress").read_text().splitlines()
    killed = (root / "killed.jsonl.progress").read_text().splitlines()
    assert sorted(killed[1:]) == sorted(single[1:])  # the same prompts done, with the same ends


def test_eval_over_two_processes_gives_the_answers_and_numbers_of_one(runs):
    root = runs[0]
    want = (root / "eval-single" / "samples.jsonl").read_text()
    assert len(want.splitlines()) == 6 and (root / "eval-ddp" / "samples.jsonl").read_text() == want
    same_numbers(json.loads((root / "eval-ddp" / "eval.json").read_text()),
                 json.loads((root / "eval-single" / "eval.json").read_text()))


def test_two_processes_continue_a_killed_evaluation_to_the_answers_and_numbers_of_one(runs):
    root = runs[0]
    assert (root / "eval-killed" / "samples.jsonl").read_text() == (root / "eval-single" / "samples.jsonl").read_text()
    same_numbers(json.loads((root / "eval-killed" / "eval.json").read_text()),
                 json.loads((root / "eval-single" / "eval.json").read_text()))
    assert sorted(path.name for path in (root / "eval-killed").iterdir()) == ["eval.json", "samples.jsonl"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
