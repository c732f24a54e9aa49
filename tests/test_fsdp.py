"""FSDP-QLoRA (lora_dpo/distributed.py, sharded): two CPU processes (gloo) with the variables
torchrun and `accelerate launch --config_file configs/accelerate/fsdp.yaml` set, the 4-bit base
sharded over them with torch's fully_shard.

One spawn runs every scenario, as starting the processes is most of the cost: a sharded run
whose steps and held-out set split unevenly over the processes (every process must still run the
same passes), the reference pass under the wrapper against the plain base, a SIGTERM to one
process and the resume (the adapter and optimizer state gathered into a checkpoint and cut back
into shards), and the sharded reference precompute. The parent compares them with one process
running the same global batch.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from test_distributed import (adapter, assert_same_rows, exit_of, join_launch, reference_against_base, rows,
                              signal_after_step_one, single_and_launched)

REPO = Path(__file__).resolve().parent.parent


def launch_environment(config_file: Path) -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file CONFIG_FILE` sets for its processes,
    by accelerate's own launch code (the processes are not started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "lora_dpo", "train", "x.yaml"])
    args = _validate_launch_command(args)[0]  # (args, defaults, mixed precision from the file)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_"))}


SHARDED = launch_environment(REPO / "configs" / "accelerate" / "fsdp.yaml")  # what the workers run under


def config_for(model_dir, train_file, out, *overrides):
    # 27 training pairs and 5 held out; 0.52 epochs = 14 pairs: a step of 8 (four micro-batches of 2,
    # two per process), then one of 6 (three micro-batches: one process tops up with a pass of
    # weight zero). The 5 held-out pairs are shared 3 and 2 (the second process scores one again).
    return make_config(model_dir, train_file, out, "data.eval_fraction=0.15625", "train.micro_batch_size=2",
                       "train.max_steps=null", "train.epochs=0.52", "train.save_every=1", "train.keep_last=5",
                       "train.optim=adamw", *overrides)


def worker(rank: int, port: int, model_dir: str, train_file: str, root: str) -> None:
    """One of the two processes; writes what the parent checks to root/rank-R.json."""
    join_launch(rank, port, **SHARDED)
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    import lora_dpo.train as train_module

    root_path, report = Path(root), {}
    run = train_module.setup_run(config_for(model_dir, train_file, root_path / "fsdp", "train.gradient_accumulation_steps=2"))
    four_bit = next(m.weight for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    report["four_bit_weight"] = [type(four_bit).__name__, str(four_bit.dtype), four_bit.to_local().numel(),
                                 four_bit.numel()]
    report["lora_sharded"] = all(isinstance(p, DTensor) for p in run.model.parameters() if p.requires_grad)
    report["held_out"] = len(run.data.eval)
    train_module.run_loop(run, progress=False)
    train_module.finish_run(run)
    report.update(reference_against_base(run))  # through the root of the sharded model

    # SIGTERM to process 1 alone, after step 1: both stop there with one checkpoint, then resume.
    stopped = root_path / "stopped"
    overrides = ("train.gradient_accumulation_steps=2", "train.save_every=0")
    with signal_after_step_one(train_module, rank):
        report["stop_exit"] = exit_of(train_module, config_for(model_dir, train_file, stopped, *overrides))
    run.processes.wait()  # both have stopped before either resumes
    train_module.train(config_for(model_dir, train_file, stopped, *overrides, "train.resume=always"), progress=False)

    # DPO from an SFT adapter: the frozen copy of model.init_adapter is the reference, switched on
    # inside the sharded model (peft's set_adapter) for the reference pass.
    # Stopped after step 1 and resumed: the checkpoint holds the reference adapter, gathered whole.
    from_sft_run = config_for(model_dir, train_file, root_path / "from-sft", *from_sft(root_path))
    with signal_after_step_one(train_module, rank):
        report["from_sft_stop"] = exit_of(train_module, from_sft_run)
    run.processes.wait()
    train_module.train(config_for(model_dir, train_file, root_path / "from-sft", *from_sft(root_path),
                                  "train.resume=always"), progress=False)

    # The reference precomputed in shares through the sharded model and gathered into one file.
    train_module.setup_run(config_for(model_dir, train_file, root_path / "precompute", "dpo.precompute_reference=true",
                                      f"dpo.reference_cache_dir={root_path / 'cache-fsdp'}"))
    (root_path / f"rank-{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def from_sft(root: Path) -> tuple[str, ...]:
    return ("train.gradient_accumulation_steps=2", f"model.init_adapter={root / 'single'}", "train.max_steps=2",
            "train.save_every=0")


@pytest.fixture(scope="module")
def runs(llama_dir, demo_rows, tmp_path_factory):
    """The two sharded processes' runs, and one process over the same global batch (2 x 4)."""
    return single_and_launched(worker, config_for, tmp_path_factory.mktemp("fsdp"), llama_dir, demo_rows, 4)


def test_the_shipped_accelerate_configs_ask_for_what_lora_dpo_runs(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from lora_dpo.distributed import sharding_requested

    assert SHARDED["ACCELERATE_USE_FSDP"] == "true" and SHARDED["FSDP_VERSION"] == "2"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in SHARDED.items():
        monkeypatch.setenv(name, value)
    settings = FullyShardedDataParallelPlugin()
    assert sharding_requested() and settings.fsdp_version == 2 and settings.reshard_after_forward is True
    for name in SHARDED:
        monkeypatch.delenv(name)
    for name, value in launch_environment(REPO / "configs" / "accelerate" / "ddp.yaml").items():
        monkeypatch.setenv(name, value)
    assert not sharding_requested()  # data-parallel: every process holds the whole base


def test_the_4bit_base_and_the_adapter_are_sharded_over_the_processes(runs):
    reports = runs[3]
    for report in reports:
        kind, dtype, local, total = report["four_bit_weight"]
        # Packed 4-bit weights stored as float32 (bnb_4bit_quant_storage): FSDP shards them in halves.
        assert (kind, dtype) == ("DTensor", "torch.float32") and local * 2 == total
        assert report["lora_sharded"] and report["wrapped"] == "FSDPPairScorer"
    assert reports[0]["held_out"] == 5


def test_a_sharded_run_trains_what_one_process_trains_over_the_same_global_batch(runs):
    root, _, single, _ = runs
    want, got = rows(root / "single"), rows(root / "fsdp")
    assert [r["split"] for r in got] == ["train", "train", "eval"]
    assert_same_rows(got, want)
    a, b = adapter(root / "fsdp"), adapter(root / "single")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    summary = json.loads((root / "fsdp" / "summary.json").read_text())
    assert (summary["steps"], summary["pairs_trained"]) == (2, 14) == (single.steps, single.pairs_trained)
    names = sorted(p.name for p in (root / "fsdp").iterdir())
    assert [n for n in names if n.startswith(("checkpoint-", ".tmp-"))] == ["checkpoint-1"]  # the last step saves the adapter instead
    assert len((root / "fsdp" / "metrics.jsonl").read_text().splitlines()) == 3  # written once, not per process


def test_the_saved_adapter_is_a_plain_peft_adapter(runs, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(runs[0] / "fsdp"))
    loaded = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert loaded and all(p.abs().sum() > 0 for p in loaded.values())  # trained, and read back whole


def test_the_reference_pass_under_fsdp_is_the_base_model(runs):
    for report in runs[3]:
        assert report["reference_vs_base"] < 1e-4
        assert report["policy_vs_base"] > 1e-3  # the adapter is on in the policy pass, and trained


def test_a_signal_to_one_sharded_process_stops_both_with_a_checkpoint_that_resumes(runs):
    root, reports = runs[0], runs[3]
    assert [r["stop_exit"] for r in reports] == [128 + signal.SIGTERM] * 2
    assert_same_rows(rows(root / "stopped"), rows(root / "fsdp"))  # the optimizer state came back into shards
    a, b = adapter(root / "stopped"), adapter(root / "fsdp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_dpo_from_an_sft_adapter_under_fsdp_uses_its_frozen_copy_as_the_reference(runs, llama_dir):
    from safetensors.torch import load_file

    from lora_dpo.train import train

    root, train_file = runs[0], runs[1]
    overrides = [o.replace("accumulation_steps=2", "accumulation_steps=4") for o in from_sft(root)]
    train(config_for(llama_dir, train_file, root / "from-sft-single", *overrides), progress=False)
    got, want = rows(root / "from-sft"), rows(root / "from-sft-single")
    assert got[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert_same_rows(got, want)  # stopped after step 1 and resumed from checkpoint-1 on the way
    assert [r["from_sft_stop"] for r in runs[3]] == [128 + signal.SIGTERM] * 2
    saved = load_file(str(root / "from-sft" / "checkpoint-1" / "reference_adapter.safetensors"))
    assert saved.keys() == adapter(root / "single").keys()
    for name, value in adapter(root / "single").items():
        torch.testing.assert_close(saved[name], value)  # the frozen copy of the SFT adapter, whole


def test_the_sharded_reference_precompute_is_the_single_process_table(runs, llama_dir):
    from safetensors.torch import load_file

    from lora_dpo.train import setup_run

    root, train_file = runs[0], runs[1]
    shared = sorted((root / "cache-fsdp").glob("reference-logps-*.safetensors"))
    setup_run(config_for(llama_dir, train_file, root / "precompute-single", "dpo.precompute_reference=true",
                         f"dpo.reference_cache_dir={root / 'cache-single'}"))
    single = sorted((root / "cache-single").glob("reference-logps-*.safetensors"))
    assert len(shared) == 2 and [p.name for p in shared] == [p.name for p in single]
    for got, want in zip(shared, single):
        got, want = load_file(str(got)), load_file(str(want))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_settings_a_sharded_run_cannot_honour_are_refused_in_one_line(llama_dir, tmp_path):
    from lora_dpo.distributed import check_sharded_config
    from lora_dpo.errors import ConfigError

    config = make_config(llama_dir, tmp_path / "pairs.jsonl", tmp_path / "out")
    check_sharded_config(config)  # adamw, no generation: fine
    for override, key in (("train.optim=paged_adamw_8bit", "train.optim"), ("train.sample_every=5", "train.sample_every"),
                          ("eval.after_training=true", "eval.after_training"), ("dpo.ref_sync_every=2", "dpo.ref_sync_every"),
                          ("train.micro_batch_size=auto", "train.micro_batch_size")):
        with pytest.raises(ConfigError, match=f"^{key}: .*Fix: .*docs/distributed.md"):
            check_sharded_config(make_config(llama_dir, tmp_path / "pairs.jsonl", tmp_path / "out", override))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
