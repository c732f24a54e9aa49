"""Out of memory on one process of a launch (docs/distributed.md, "Stopping, errors, resuming"):
``torchrun --nproc_per_node 2`` on the CPU (gloo) runs ``lora-dpo train`` with process 1 out of
memory at step 2, and the test reads what a user would see.

Run as a script (``python -m torch.distributed.run ... tests/test_distributed_oom.py CONFIG``),
this file is the worker: it makes the scorer raise torch.OutOfMemoryError in process 1 at step 2,
then runs ``lora_dpo.cli.main`` and exits with its status. Process 0 is then waiting for it in a
collective (DDP's bucket rebuild at the start of step 2's forward; the gradient all-reduce at any
later step), which gloo ends when process 1's connection closes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_config, write_jsonl

OOM_RANK, OOM_STEP = 1, 2
LAUNCH_TIMEOUT_S = 120


def worker(words: list[str]) -> int:
    """One process of the launch: ``lora-dpo train`` with the scorer out of memory in process
    OOM_RANK at step OOM_STEP (the step's first pass, as a real one would be)."""
    import torch

    import lora_dpo.distributed as distributed
    import lora_dpo.train as train_module
    from lora_dpo.cli import main

    torch.set_num_threads(1)
    rank, current = int(os.environ["RANK"]), {"step": 0}
    real_step, real_logps = train_module.train_step, distributed.pair_logps

    def noting_the_step(run, step):
        current["step"] = step
        return real_step(run, step)

    def scoring(*args, **kwargs):
        if rank == OOM_RANK and current["step"] == OOM_STEP:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_logps(*args, **kwargs)

    train_module.train_step = noting_the_step
    distributed.pair_logps = scoring  # PairScorer's forward, which both passes of a step run through
    return main(["train", *words])


def launch(script: Path, words: list[str], log_dir: Path) -> tuple[int, str]:
    """torchrun with two processes on ``script``: (its exit status, everything it printed).
    --tee 3 prefixes each process's lines with [default<rank>]:; --standalone picks free ports, so
    tests running at once do not collide. On a timeout the whole launch is killed, not only torchrun."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
               "--log-dir", str(log_dir), str(script), *words]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the launch did not end within {LAUNCH_TIMEOUT_S} s:\n{output}")
    return process.returncode, output


def lines_of(output: str, rank: int) -> list[str]:
    prefix = f"[default{rank}]:"
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


def test_out_of_memory_on_one_process_stops_the_launch_with_its_one_line(llama_dir, demo_rows, tmp_path):
    from lora_dpo.checkpoint import complete_checkpoints, read_trainer_state
    from lora_dpo.config import save_config
    from lora_dpo.train import train

    out = tmp_path / "run"
    # micro-batch 4 x 2 processes per step, a checkpoint after every step; no held-out pairs.
    config = make_config(llama_dir, write_jsonl(tmp_path / "pairs.jsonl", demo_rows), out, "model.device=cpu",
                         "data.eval_fraction=0", "train.max_steps=4", "train.save_every=1")
    save_config(config, tmp_path / "config.yaml")
    code, output = launch(Path(__file__), [str(tmp_path / "config.yaml"), "--no-progress"], tmp_path / "logs")
    assert code != 0, output

    # The process that ran out of memory: lora-dpo's one line, exit status 2, as torchrun reports.
    oom = [line for line in output.splitlines() if "out of GPU memory" in line]
    assert len(oom) == 1, output
    assert oom[0].startswith(f"[default{OOM_RANK}]:lora-dpo: error: out of GPU memory at step {OOM_STEP} with "
                             "train.micro_batch_size=4"), output
    assert re.search(rf"rank\s*: {OOM_RANK} \(local_rank: {OOM_RANK}\)\s+exitcode\s*: 2\b", output), output
    # The other one: no traceback, one line of its own saying why it stopped.
    other = lines_of(output, 1 - OOM_RANK)
    assert not [line for line in other + lines_of(output, OOM_RANK) if "Traceback" in line], output
    errors = [line for line in other if line.startswith("lora-dpo: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "lora-dpo: error: another process of this launch stopped (its message is above), so this one stops too "
        "(Connection closed by peer"), output

    # Nothing half-written; the checkpoint of step 1 is complete and a resume continues from it.
    assert not list(out.glob(".tmp-*")), sorted(p.name for p in out.iterdir())
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert read_trainer_state(out / "checkpoint-1")["step"] == 1
    resumed = train(make_config(llama_dir, config.data.train_file, out, "model.device=cpu", "data.eval_fraction=0",
                                "train.max_steps=4", "train.save_every=1", "train.resume=always"), progress=False)
    assert (resumed.resumed_from_step, resumed.steps) == (1, 4)


def test_only_a_lost_connection_in_a_launch_becomes_the_one_line(monkeypatch):
    from lora_dpo.errors import lost_process

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:23956. This is typically caused by a remote worker crashing.")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lost_process(gloo) is None  # alone, there is no other process to blame
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert str(lost_process(gloo)).startswith("another process of this launch stopped (its message is above), so "
                                              "this one stops too (Connection closed by peer [127.0.0.1]:23956). Fix:")
    assert lost_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug keeps its traceback
    assert lost_process(ValueError("Connection closed by peer")) is None


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
