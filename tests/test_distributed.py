"""Data-parallel training (lora_dpo/distributed.py): two processes on the CPU (gloo), started the
way torchrun and accelerate launch start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

One spawn of two processes runs every scenario, because starting them is most of the cost:
a DDP run (the reference pass under the wrapper checked against the plain base), generation from
its adapter, a run that one process is SIGTERMed in and both resume, and the sharded reference
precompute. The parent compares them with one process running the same work.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.distributed import Processes

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
            "logps/rejected", "grad_norm", "lr", "epoch", "step", "split")


def config_for(model_dir, train_file, out, *overrides):
    # 28 training pairs (4 held out), 0.33 epochs: steps of 4, 4 and 1 pairs, then the evaluation.
    # With two processes the last step has one pair, so one process runs the pass of weight zero.
    return make_config(model_dir, train_file, out, "data.eval_fraction=0.125", "train.micro_batch_size=2",
                       "train.max_steps=null", "train.epochs=0.33", "train.save_every=1", "train.keep_last=5",
                       *overrides)


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k in COMPARED} for line in (out / "metrics.jsonl").open()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in b:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], a["split"], key)


def join_launch(rank: int, port: int, **variables: str) -> None:
    """Become process ``rank`` of a two-process launch: the variables torchrun sets, and ``variables``
    (what accelerate launch adds from its config file)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **variables)
    torch.set_num_threads(1)


def launch_two(worker, root: Path, *args: str) -> list[dict]:
    """Run ``worker(rank, port, *args, root)`` in two spawned processes; their reports (root/rank-R.json)."""
    torch.multiprocessing.start_processes(worker, args=(free_port(), *args, str(root)), nprocs=2, join=True,
                                          start_method="spawn")
    return [json.loads((root / f"rank-{rank}.json").read_text()) for rank in range(2)]


@contextlib.contextmanager
def signal_after_step_one(train_module, rank: int):
    """Within the block, process 1 sends itself SIGTERM once its step 1 is done."""
    real_step = train_module.train_step

    def step_then_signal(run, step):
        row = real_step(run, step)
        if step == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    train_module.train_step = step_then_signal
    try:
        yield
    finally:
        train_module.train_step = real_step


def exit_of(train_module, config) -> int | None:
    """The exit status a run stopped by a signal ends with (None: it finished)."""
    from lora_dpo.errors import Interrupted

    try:
        train_module.train(config, progress=False)
    except Interrupted as exc:
        return exc.exit_code
    return None


def reference_against_base(run) -> dict:
    """The reference pass as a step runs it (through the run's wrapper, adapter off) against the
    plain base, and the policy pass through the same wrapper, which must differ once trained."""
    from lora_dpo.batching import collate, pair_logps
    from lora_dpo.modeling import load_base, reference_model

    batch = collate(run.data.train[:4], run.tokenizer.pad_token_id)
    with torch.no_grad():
        run.model.eval()
        with reference_model(run.model):
            reference = run.step_runner.scorer(batch, 512)
        policy = run.step_runner.scorer(batch, 512)
        base = load_base(run.config.model, torch.device("cpu"), torch.float32, attn_implementation=None)
        plain = pair_logps(base, batch)
    return {"wrapped": type(run.step_runner.scorer).__name__,
            "reference_vs_base": float((reference.chosen - plain.chosen).abs().max()
                                       + (reference.rejected - plain.rejected).abs().max()),
            "policy_vs_base": float((policy.chosen - plain.chosen).abs().max())}


def worker(rank: int, port: int, model_dir: str, train_file: str, root: str) -> None:
    """One of the two processes; writes what the parent checks to root/rank-R.json."""
    join_launch(rank, port)
    import lora_dpo.train as train_module

    root_path, report = Path(root), {}

    # A DDP run, by phases so that its model can be checked afterwards.
    run = train_module.setup_run(config_for(model_dir, train_file, root_path / "ddp"))
    train_module.run_loop(run, progress=False)
    train_module.finish_run(run)
    report["processes"] = [run.processes.rank, run.processes.count]
    report.update(reference_against_base(run))
    # generate shards its prompts: three prompts over two processes, the main one writes the file.
    from lora_dpo.cli import main
    report["generate"] = main(generate_words(root_path / "ddp", root_path / f"answers-ddp-{rank}.jsonl"))

    # SIGTERM to process 1 alone, after step 1: both stop there with one checkpoint, then resume.
    stopped = root_path / "stopped"
    with signal_after_step_one(train_module, rank):
        report["stop_exit"] = exit_of(train_module, config_for(model_dir, train_file, stopped, "train.save_every=0"))
    report["after_stop"] = sorted(p.name for p in stopped.iterdir())
    run.processes.wait()  # both have looked before either resumes
    train_module.train(config_for(model_dir, train_file, stopped, "train.save_every=0", "train.resume=always"),
                       progress=False)

    # The reference precomputed in shares and gathered into one file.
    train_module.setup_run(config_for(model_dir, train_file, root_path / "precompute", "dpo.precompute_reference=true",
                                      f"dpo.reference_cache_dir={root_path / 'cache-ddp'}"))
    (root_path / f"rank-{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def generate_words(run_dir: Path, output: Path) -> list[str]:
    words = ["generate", str(run_dir), "--compare", "--device", "cpu", "--max-new-tokens", "6", "--temperature", "1",
             "--no-progress", "--output", str(output)]
    for prompt in ("Tell me about bread.", "Why are owls quiet?", "A tip about snow?"):
        words += ["--prompt", prompt]
    return words


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_and_launched(worker, config_for, root: Path, model_dir: Path, demo_rows: list, accumulation: int):
    """(root, the pairs file, the one-process run with ``accumulation`` micro-batches a step: the
    launch's global batch, the two processes' reports): what a module's tests compare."""
    from lora_dpo.train import train

    train_file = write_jsonl(root / "pairs.jsonl", demo_rows)
    single = train(config_for(model_dir, train_file, root / "single", f"train.gradient_accumulation_steps={accumulation}"),
                   progress=False)
    return root, train_file, single, launch_two(worker, root, str(model_dir), str(train_file))


@pytest.fixture(scope="module")
def runs(llama_dir, demo_rows, tmp_path_factory):
    """The two-process runs, and the one-process run over the same global batch (2 x 2)."""
    return single_and_launched(worker, config_for, tmp_path_factory.mktemp("distributed"), llama_dir, demo_rows, 2)


def test_two_processes_train_what_one_trains_over_the_same_global_batch(runs):
    root, _, single, reports = runs
    assert [r["processes"] for r in reports] == [[0, 2], [1, 2]]
    assert reports[0]["wrapped"] == "DistributedDataParallel"
    want, got = rows(root / "single"), rows(root / "ddp")
    assert [r["split"] for r in got] == ["train", "train", "train", "eval"]
    assert_same_rows(got, want)
    a, b = adapter(root / "ddp"), adapter(root / "single")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    summary = json.loads((root / "ddp" / "summary.json").read_text())
    assert (summary["steps"], summary["pairs_trained"]) == (3, 9) == (single.steps, single.pairs_trained)


def test_one_process_writes_each_file_once(runs):
    root = runs[0]
    names = sorted(p.name for p in (root / "ddp").iterdir())
    assert [n for n in names if n.startswith(("checkpoint-", ".tmp-"))] == ["checkpoint-1", "checkpoint-2"]
    assert names.count("metrics.jsonl") == 1 and names.count("adapter_model.safetensors") == 1
    lines = (root / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one row per step and the evaluation: not one per process
    assert len((root / "ddp" / "checkpoint-2" / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_reference_pass_under_ddp_is_the_base_model(runs):
    for report in runs[3]:
        assert report["reference_vs_base"] < 1e-4
        assert report["policy_vs_base"] > 1e-3  # the adapter is on in the policy pass, and trained


def test_a_signal_to_one_process_stops_both_with_a_checkpoint_that_resumes(runs):
    root, reports = runs[0], runs[3]
    assert [r["stop_exit"] for r in reports] == [128 + signal.SIGTERM] * 2
    assert [n for n in reports[0]["after_stop"] if n.startswith(("checkpoint-", ".tmp-"))] == ["checkpoint-1"]
    assert_same_rows(rows(root / "stopped"), rows(root / "ddp"))  # resumed with two processes: the same numbers
    a, b = adapter(root / "stopped"), adapter(root / "ddp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_generate_shards_its_prompts_and_gives_the_answers_of_one_process(runs, capsys):
    from lora_dpo.cli import main

    root, reports = runs[0], runs[3]
    assert [r["generate"] for r in reports] == [0, 0]
    assert not (root / "answers-ddp-1.jsonl").exists()  # only the main process writes
    assert main(generate_words(root / "ddp", root / "answers-single.jsonl")) == 0
    want = (root / "answers-single.jsonl").read_text().splitlines()
    assert len(want) == 3 and (root / "answers-ddp-0.jsonl").read_text().splitlines() == want


def test_the_sharded_reference_precompute_is_the_single_process_table(runs, llama_dir):
    from safetensors.torch import load_file

    from lora_dpo.train import setup_run

    root, train_file = runs[0], runs[1]
    shared = list((root / "cache-ddp").glob("reference-logps-*.safetensors"))
    assert len(shared) == 2  # the training and the held-out pairs, one file each
    run = setup_run(config_for(llama_dir, train_file, root / "precompute-single", "dpo.precompute_reference=true",
                               f"dpo.reference_cache_dir={root / 'cache-single'}"))
    assert not run.reference_tables["train"].from_cache
    single = {p.name: load_file(str(p)) for p in (root / "cache-single").glob("reference-logps-*.safetensors")}
    assert sorted(single) == sorted(p.name for p in shared)  # the same keys
    for path in shared:
        got, want = load_file(str(path)), single[path.name]
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharded, micro_batches, want", [
    (False, [[0, 1], [2, 3], [4, 5]], [[[0, 1], [4, 5]], [[2, 3]]]),  # round-robin
    (False, [[0, 1, 2]], [[[0]], [[1, 2]]]),  # fewer micro-batches than processes: re-cut
    (False, [[7]], [[[]], [[7]]]),  # fewer pairs: the first process runs a pass of weight zero
    # Sharded, every process runs as many passes as the others: [] tops the shorter share up.
    (True, [[0, 1], [2, 3], [4, 5]], [[[0, 1], [4, 5]], [[2, 3], []]]),
    (True, [[7]], [[[]], [[7]]]),
])
def test_a_step_is_shared_out_without_repeating_a_pair(sharded, micro_batches, want):
    class Two:
        def __init__(self, rank):
            self.process_index, self.num_processes, self.device = rank, 2, torch.device("cpu")

    assert [Processes(Two(rank), fsdp=object() if sharded else None).share(micro_batches) for rank in (0, 1)] == want


def test_sharded_shares_of_items_are_topped_up_to_the_same_passes():
    class Two:
        def __init__(self, rank):
            self.process_index, self.num_processes, self.device = rank, 2, torch.device("cpu")

    sharded = [Processes(Two(rank), fsdp=object()) for rank in (0, 1)]
    assert [p.top_up(p.shard(5), 5) for p in sharded] == [[0, 2, 4], [1, 3, 0]]  # item 0 again, dropped later
    assert [p.top_up(p.shard(1), 1) for p in sharded] == [[0], [0]]
    assert [p.top_up(p.shard(0), 0) for p in sharded] == [[], []]
    ddp = Processes(Two(1))
    assert ddp.top_up(ddp.shard(5), 5) == [1, 3]  # DDP: no collective in a no-grad pass, nothing to top up


@pytest.mark.parametrize("variables, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed, which lora-dpo does not support.*configs/accelerate/fsdp.yaml"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1.*set fsdp_version: 2"),
])
def test_an_accelerate_config_lora_dpo_cannot_run_is_refused_in_one_line(monkeypatch, variables, message):
    from lora_dpo.distributed import processes
    from lora_dpo.errors import LoraDpoError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(LoraDpoError, match=message):
        processes(torch.device("cpu"))


def test_alone_every_helper_is_the_identity():
    alone = Processes(device=torch.device("cpu"))
    values = torch.arange(3.0)
    assert alone.sum(values) is values and alone.gather_rows(values, 3) is values
    assert alone.shard(3) == [0, 1, 2] and alone.stop_signal(15) == 15 and alone.rng_states({}) is None
    assert type(alone.wrap(torch.nn.Linear(2, 2))).__name__ == "PairScorer"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
