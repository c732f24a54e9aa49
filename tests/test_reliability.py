"""Interruptions, resume, atomic checkpoints, non-finite steps and out-of-memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, make_config, write_jsonl

import lora_dpo.train as train_module
from lora_dpo.checkpoint import complete_checkpoints, write_checkpoint
from lora_dpo.cli import main
from lora_dpo.errors import LoraDpoError

TIMING_KEYS = {"tokens_per_s", "seconds", "peak_memory_gib", "peak_reserved_gib"}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, llama_dir, demo_rows):
    """A config file for a subprocess run long enough to be killed in the middle."""
    folder = tmp_path_factory.mktemp("reliability")
    train_file = write_jsonl(folder / "train.jsonl", demo_rows)
    config = {
        "model": {"name_or_path": str(llama_dir)},
        "lora": {"r": 8, "dropout": 0.1},  # dropout draws random numbers: the RNG state must be restored too
        "data": {"train_file": str(train_file), "eval_fraction": 0.125, "max_length": 128, "max_prompt_length": 48},
        "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 40, "save_every": 3,
                  "keep_last": 2, "optim": "paged_adamw_8bit", "learning_rate": 1e-3, "eval_every": 10},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config_path, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lora_dpo", "train", str(config_path), f"output.dir={out}",
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metrics(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(run_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    code, _, err = finish(start(run_config, out))
    assert code == 0, err
    return out


def adapters_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigkill_then_resume_gives_the_same_run_to_the_bit(run_config, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = start(run_config, out)
    wait_for(lambda: (out / "checkpoint-6" / "trainer_state.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()
    assert [c.name for c in complete_checkpoints(out)][-1].startswith("checkpoint-")

    code, _, err = finish(start(run_config, out, "--resume"))
    assert code == 0, err
    assert "resuming from" in err
    assert metrics(out) == metrics(uninterrupted)  # every loss, reward, grad norm and lr, exactly
    assert adapters_equal(out, uninterrupted)
    assert len(complete_checkpoints(out)) == 2  # keep_last
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_says_how_to_resume(sent, run_config, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = start(run_config, out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2, process)
    process.send_signal(sent)
    code, _, err = finish(process)
    assert code == 128 + sent
    name = signal.Signals(sent).name
    assert f"stopped by {name} after step" in err and "--resume" in err and "Traceback" not in err
    step = int(err.split(f"stopped by {name} after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert not (out / "summary.json").exists()
    if sent == signal.SIGINT:
        return  # the same stop as SIGTERM's, whose resume below is the one that costs the time

    code, _, err = finish(start(run_config, out, "train.resume=auto"))
    assert code == 0, err
    assert metrics(out) == metrics(uninterrupted)
    assert adapters_equal(out, uninterrupted)


def test_output_dir_rules(run_config, uninterrupted, tmp_path, capsys):
    assert main(["train", str(run_config), f"output.dir={uninterrupted}", "--resume"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(["train", str(run_config), f"output.dir={tmp_path / 'new'}", "--resume"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", str(run_config), f"output.dir={tmp_path}", "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_a_checkpoint_write_that_dies_leaves_the_previous_ones(llama_dir, demo_rows, tmp_path, monkeypatch):
    config = make_config(llama_dir, write_jsonl(tmp_path / "t.jsonl", demo_rows), tmp_path / "run",
                         "train.max_steps=4", "train.save_every=1", "train.keep_last=2")
    train_module.train(config, progress=False)
    out = tmp_path / "run"
    before = [p.name for p in complete_checkpoints(out)]
    assert before == ["checkpoint-2", "checkpoint-3"]

    import lora_dpo.checkpoint as checkpoint_module
    import lora_dpo.modeling as modeling_module

    def half_an_adapter(model, directory, weights=None):
        (directory / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modeling_module, "save_adapter", half_an_adapter)
    monkeypatch.setattr(checkpoint_module, "save_state", dies)
    with pytest.raises(OSError):
        stateful = SimpleNamespace(state_dict=lambda: {})
        write_checkpoint(out, 9, None, stateful, None, {}, [out / "metrics.jsonl"], keep_last=2)
    assert [p.name for p in complete_checkpoints(out)] == before  # untouched, and no checkpoint-9
    assert not (out / "checkpoint-9").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(llama_dir, demo_rows, tmp_path, monkeypatch):
    real_loss = train_module.preference_loss
    calls = {"n": 0}
    poisoned_calls: set[int] = set()

    def sometimes_nan(settings, policy, reference):
        calls["n"] += 1
        result = real_loss(settings, policy, reference)
        if calls["n"] in poisoned_calls:
            return result._replace(losses=result.losses * float("nan"))
        return result

    monkeypatch.setattr(train_module, "preference_loss", sometimes_nan)
    train_file = write_jsonl(tmp_path / "t.jsonl", demo_rows)
    poisoned_calls.update({2})  # micro_batch 4, no accumulation, no eval split: call n is step n
    summary = train_module.train(make_config(llama_dir, train_file, tmp_path / "a", "train.max_steps=4",
                                             "data.eval_fraction=0"), progress=False)
    rows = metrics(tmp_path / "a")
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert summary.skipped_steps == 1 and "1 steps skipped" in " ".join(summary.lines())

    calls["n"] = 0
    poisoned_calls.clear()
    poisoned_calls.update({3, 4, 5, 6})
    with pytest.raises(LoraDpoError, match=r"stopped at step 4: 2 steps in a row had a non-finite loss"):
        train_module.train(make_config(llama_dir, train_file, tmp_path / "b", "train.max_steps=8",
                                       "data.eval_fraction=0", "train.max_bad_steps=2"), progress=False)


def test_out_of_memory_is_a_clear_message(llama_dir, demo_rows, tmp_path, monkeypatch, capsys):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import lora_dpo.distributed

    monkeypatch.setattr(lora_dpo.distributed, "pair_logps", no_memory)  # the training step scores through it
    train_file = write_jsonl(tmp_path / "t.jsonl", demo_rows)
    code = main(["train", str(REPO / "configs" / "demo.yaml"), f"model.name_or_path={llama_dir}",
                 f"data.train_file={train_file}", "data.eval_file=null", f"output.dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "out of GPU memory at step 1 with train.micro_batch_size=8" in err and "lower train.micro_batch_size" in err


def test_overwrite_and_resume_never_delete_what_lora_dpo_did_not_write(llama_dir, demo_rows, tmp_path, monkeypatch,
                                                                        capsys):
    mine = tmp_path / "exp"
    mine.mkdir()
    data = write_jsonl(mine / "pairs.jsonl", demo_rows)
    (mine / "notes.txt").write_text("keep me")
    args = ["train", str(REPO / "configs" / "demo.yaml"), f"model.name_or_path={llama_dir}", f"data.train_file={data}",
            "data.eval_file=null", "train.max_steps=1", "train.micro_batch_size=2"]
    for extra in (["--overwrite"], ["train.resume=auto"], ["--resume"]):
        assert main([*args, f"output.dir={mine}", *extra]) == 2
        assert "which a run must not touch" in capsys.readouterr().err  # the data lives there
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for extra in (["--overwrite"], ["train.resume=auto"]):
        assert main([*args, f"output.dir={other}", *extra]) == 2
        assert "holds files that lora-dpo did not write" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main([*args, "output.dir=.", "--overwrite"]) == 2
    assert "which a run must not touch" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and data.exists() and (other / "notes.txt").exists()

    run = tmp_path / "run"
    assert main([*args, f"output.dir={run}", "--no-progress"]) == 0
    (run / "my-notes.txt").write_text("mine")
    assert main([*args, f"output.dir={run}", "--overwrite", "--no-progress", "train.max_steps=2"]) == 0
    assert (run / "my-notes.txt").read_text() == "mine"  # a rerun replaces only what the run wrote
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_float16_loss_scaling_survives_a_non_finite_step(llama_dir, demo_rows, tmp_path, monkeypatch):
    """With float16 the GradScaler must see every step, skipped or not (else its next unscale_ fails)."""
    real_loss = train_module.preference_loss
    calls = {"n": 0}

    def nan_at_first(settings, policy, reference):
        calls["n"] += 1
        result = real_loss(settings, policy, reference)
        return result._replace(losses=result.losses * float("nan")) if calls["n"] == 1 else result

    monkeypatch.setattr(train_module, "preference_loss", nan_at_first)
    out = tmp_path / "fp16"
    summary = train_module.train(make_config(llama_dir, write_jsonl(tmp_path / "t.jsonl", demo_rows), out,
                                             "train.max_steps=3", "data.eval_fraction=0", "model.compute_dtype=float16",
                                             "model.load_in_4bit=false"), progress=False)
    rows = metrics(out)
    assert summary.steps == 3 and rows[0]["skipped"] is True
    assert all(r["loss"] == r["loss"] for r in rows[1:])  # finite after the bad step


def test_resuming_with_changed_adapter_or_optimizer_settings_is_a_clear_error(run_config, uninterrupted, tmp_path,
                                                                             capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()  # make it look interrupted after its last checkpoint
    for change in ("lora.r=4", "train.optim=adamw"):
        assert main(["train", str(run_config), f"output.dir={out}", "--resume", change]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot resume with changed" in err and "--overwrite" in err


def test_partial_writes_of_a_killed_run_are_cleared_files_and_directories(tmp_path):
    from lora_dpo.checkpoint import remove_partial_writes

    (tmp_path / ".tmp-checkpoint-3-123").mkdir()
    (tmp_path / ".tmp-checkpoint-3-123" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-summary.json").write_text("{", encoding="utf-8")  # records.write_text_atomic's part
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    remove_partial_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
