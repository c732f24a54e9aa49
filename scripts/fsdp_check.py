#!/usr/bin/env python
"""FSDP-QLoRA on one GPU: what a single card can show of the sharded path (the `fsdp` stage of
scripts/gpu_suite.sh; docs/distributed.md and docs/benchmarks.md read its tables).

One process, a process group of world size 1 (NCCL on a GPU, gloo on the CPU), a bench shape
(scripts/bench.py: random-init Llama, 4-bit NF4, LoRA r=16 on all linear layers, gradient
checkpointing, AdamW). NCCL refuses two ranks on one GPU, so the shards of this one process are
the whole model; what it can show is that the sharded path runs on CUDA, what it costs, and that
it computes what the plain path computes:

1. Load and shard: ``load_model(config, device, sharded=True)`` (the base on the CPU, the 4-bit
   weights stored in the compute dtype), then ``distributed.shard_model`` under accelerate's FSDP2
   plugin settings, each unit's shards moved to the GPU as it is sharded. Peak GPU memory
   allocated and reserved over load + shard, beside the resident size once sharded: a peak near
   the resident size means the base never sat on the GPU in a second copy. The plain load
   (``load_model(config, device)``, uint8 storage, straight onto the GPU) follows, for comparison.
2. Agreement: per-pair log-probs of the same pairs, policy and reference
   (``modeling.reference_model``), through the sharded root against the plain model with the same
   adapter weights (non-zero LoRA B, so the policy differs from the reference). Same bits of the
   base, so they should agree to compute-dtype rounding.
3. Steps: ``train.DpoStep`` with ``train.optim=adamw`` over ``trainable_parameters``, a warm-up
   step and ``--steps`` timed ones each way, peaks reset before the optimizer is built. No LoRA
   dropout, so the step losses of the two ways agree too (the first is before any update; the
   later ones follow the sharded gradients and optimizer).

Tables on stdout (markdown), everything in ``--json``; SIGTERM prints what finished (PARTIAL).
``--shape tiny --device cpu`` is the CPU smoke run (gloo; no memory figures, no timing claims).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the repository on sys.path too)
import torch  # noqa: E402

from lora_dpo.batching import collate  # noqa: E402
from lora_dpo.config import load_config  # noqa: E402
from lora_dpo.distributed import PairScorer, shard_model  # noqa: E402
from lora_dpo.modeling import (autocast_for, load_model, reference_model, resolve_compute_dtype,  # noqa: E402
                               resolve_device, trainable_parameters)

GIB = 2**30
PAD = 2  # the bench tokenizer's EOS, which load_tokenizer makes the padding id (padding is masked anyway)


def check_config(model_dir: Path, shape: bench.Shape, device: str, work: Path) -> Any:
    """The bench's lora-dpo settings, with the optimizer a sharded run accepts (adamw) and no LoRA
    dropout: both ways then compute the same step losses, which checks training through the shards."""
    train_file = work / "pairs.jsonl"
    train_file.touch()
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"model.device={device}", f"data.train_file={train_file}",
        f"data.max_length={shape.max_length}", f"data.max_prompt_length={shape.max_prompt_length}",
        "lora.r=16", "lora.alpha=32", "lora.dropout=0", "lora.target_modules=all-linear",
        f"train.micro_batch_size={shape.micro_batch}", "train.gradient_accumulation_steps=1", "train.optim=adamw",
        "train.learning_rate=5e-6", "train.max_grad_norm=1.0", "train.lr_scheduler=constant",
        "train.warmup_steps=0", "dpo.beta=0.1"])


def start_process_group(device: torch.device) -> None:
    """A process group of one (what ``fully_shard``'s device mesh needs), on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def fsdp_settings() -> Any:
    """accelerate's FSDP2 plugin as `accelerate launch --config_file configs/accelerate/fsdp.yaml` makes it."""
    os.environ["FSDP_VERSION"] = "2"
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def adapter_weights(model: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-zero LoRA weights for every adapter matrix of ``model`` (on the CPU), the same for any
    model of the shape: with peft's B = 0 the policy would equal the reference, and the policy
    comparison would check nothing."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(param.shape, generator=generator) * 0.02
            for name, param in sorted(model.named_parameters()) if "lora_" in name}


def set_adapter(model: Any, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name].to(param.device, param.dtype))


def memory(device: torch.device) -> dict[str, float | None]:
    """Peaks since the last reset and what is allocated now, GiB (None on the CPU)."""
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "resident_gib": None}
    return {**bench.peak_memory(device), "resident_gib": torch.cuda.memory_allocated(device) / GIB}


def allocated_now(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def load(config: Any, device: torch.device, sharded: bool, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """One way of loading, timed, with its peak: the model, the module both passes run through,
    and the row of the load table. ``weights`` (None: draw them from this model) go in before
    sharding, as a sharded run's fresh adapter does."""
    bench.reset_memory(device)
    before = allocated_now(device)
    bench.synchronize(device)
    started = time.perf_counter()
    model = load_model(config, device, sharded=sharded)
    weights = weights if weights is not None else adapter_weights(model)
    set_adapter(model, weights)
    scorer = shard_model(PairScorer(model), model, fsdp_settings(), device, 1) if sharded else PairScorer(model)
    bench.synchronize(device)
    row = {"impl": "sharded (FSDP2, 1 process)" if sharded else "plain", "load_s": time.perf_counter() - started,
           "before_gib": before, **memory(device)}
    return {"model": model, "scorer": scorer, "weights": weights, "row": row}


def pair_logps_of(loaded: dict[str, Any], config: Any, pairs: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-pair log-probs (chosen, rejected) of ``pairs``, policy and reference, on the CPU in float32."""
    model, scorer = loaded["model"], loaded["scorer"]
    batch = collate(pairs, PAD, layout=config.data.layout).to(device)
    autocast = autocast_for(device, resolve_compute_dtype(config.model, device))
    model.eval()
    out = {}
    with torch.no_grad(), autocast:
        policy = scorer(batch, config.dpo.logps_chunk_size)
        with reference_model(model):
            reference = scorer(batch, config.dpo.logps_chunk_size)
    for name, logps in (("policy", policy), ("reference", reference)):
        out[name] = torch.stack([logps.chosen, logps.rejected]).float().cpu()
    return out


def agreement(sharded: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for name in ("policy", "reference"):
        difference = (sharded[name] - plain[name]).abs()
        rows.append({"pass": name, "pairs": sharded[name].shape[1], "max_abs_diff": float(difference.max()),
                     "mean_abs_diff": float(difference.mean()), "max_abs_logp": float(plain[name].abs().max())})
    # The adapter is on in the policy pass: the two passes must differ, or the policy row checked nothing.
    rows[0]["policy_vs_reference"] = float((plain["policy"] - plain["reference"]).abs().max())
    return rows


def time_steps(loaded: dict[str, Any], config: Any, pairs: list[Any], steps: int, device: torch.device) -> dict[str, Any]:
    """A warm-up step and ``steps`` timed optimizer steps of the training loop's own ``DpoStep``
    (reference every step), a fresh AdamW over the trainable (sharded: their shards) parameters;
    peaks reset first, with the model loaded."""
    from lora_dpo.train import DpoStep, build_optimizer, build_scheduler

    model = loaded["model"]  # with the adapter it loaded with: both ways train from the same weights
    bench.reset_memory(device)
    optimizer = build_optimizer(config, trainable_parameters(model), device)
    scheduler = build_scheduler(config, optimizer, 0, steps + 1)
    step = DpoStep(config, model, optimizer, scheduler, None, device, PAD, scorer=loaded["scorer"])
    micro = config.train.micro_batch_size
    model.train()
    ends, losses = [], []
    for index in range(steps + 1):
        batch = [(index * micro + k) % len(pairs) for k in range(micro)]
        metrics, _, _ = step(pairs, [batch], None)
        bench.synchronize(device)
        ends.append(time.perf_counter())
        losses.append(metrics["loss"])
    optimizer.zero_grad(set_to_none=True)
    return {"impl": loaded["row"]["impl"], "steps": steps, "pairs_per_step": micro,
            "s_per_step": (ends[-1] - ends[0]) / steps, "losses": losses, **bench.peak_memory(device)}


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = [f"FSDP-QLoRA on one device: {s['device']}, {s['date']}; torch {s['torch']}; shape {s['shape']}, "
           f"{s['pairs']} pairs compared, {s['steps']} timed steps of {s['pairs_per_step']} pairs; process group "
           f"{s['backend']}, world size 1" + (" (PARTIAL: stopped by SIGTERM; the rows below finished)"
                                            if report.get("partial") else ""), ""]
    out += ["| impl | load + shard s | allocated before GiB | peak allocated GiB | peak reserved GiB "
            "| resident GiB | peak / resident |", "|---|---|---|---|---|---|---|"]
    for r in report["load"]:
        ratio = (f"{r['peak_allocated_gib'] / r['resident_gib']:.2f}x"
                 if r["resident_gib"] else "n/a")
        out.append(f"| {r['impl']} | {r['load_s']:.1f} | {gib(r['before_gib'])} | {gib(r['peak_allocated_gib'])} "
                   f"| {gib(r['peak_reserved_gib'])} | {gib(r['resident_gib'])} | {ratio} |")
    if report["agreement"]:
        out += ["", "Per-pair log-probs, sharded against plain (the same base bits and adapter; "
                f"compute dtype {s['compute_dtype']}):", "",
                "| pass | pairs | max abs diff | mean abs diff | max abs log-prob |", "|---|---|---|---|---|"]
        for r in report["agreement"]:
            out.append(f"| {r['pass']} | {r['pairs']} | {r['max_abs_diff']:.3g} | {r['mean_abs_diff']:.3g} "
                       f"| {r['max_abs_logp']:.1f} |")
        out.append(f"\nPolicy against reference (plain): max abs diff {report['agreement'][0]['policy_vs_reference']:.3g} "
                   "(the adapter is on in the policy pass).")
    if report["steps"]:
        out += ["", "| impl | timed steps | s/step | peak allocated GiB | peak reserved GiB | losses |",
                "|---|---|---|---|---|---|"]
        for r in report["steps"]:
            losses = ", ".join(f"{loss:.4f}" for loss in r["losses"])
            out.append(f"| {r['impl']} | {r['steps']} | {r['s_per_step']:.3f} | {gib(r['peak_allocated_gib'])} "
                       f"| {gib(r['peak_reserved_gib'])} | {losses} |")
        if len(report["steps"]) == 2:
            out.append(f"\nStep losses, sharded against plain: max abs diff {report['loss_diff']:.3g}.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="1b", help="bench shape (tiny for the CPU)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs whose log-probs are compared")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps each way (after one warm-up)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--model-root", type=Path, help="where the bench model is (built if missing)")
    parser.add_argument("--json", type=Path, help="write the report here (rewritten after each part)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape = bench.SHAPES[args.shape]
    report: dict[str, Any] = {"settings": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
        "shape": args.shape, "pairs": args.pairs, "steps": args.steps, "pairs_per_step": shape.micro_batch,
        "backend": "nccl" if device.type == "cuda" else "gloo"}, "load": [], "agreement": [], "steps": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    previous = signal.signal(signal.SIGTERM, bench.stop_on_sigterm)
    bench.quiet_libraries()
    try:
        with tempfile.TemporaryDirectory(prefix="lora-dpo-fsdp-check-") as scratch:
            model_dir = bench.build_model_dir(args.shape, shape, args.model_root or bench.default_model_root(args.shape, shape))
            config = check_config(model_dir, shape, args.device, Path(scratch))
            report["settings"]["compute_dtype"] = str(resolve_compute_dtype(config.model, device)).removeprefix("torch.")
            count = max(args.pairs, shape.micro_batch * (args.steps + 1))
            pairs = bench.tokenize_rows(bench.make_rows(shape, count, seed=0), bench.build_tokenizer(shape.words), shape)
            start_process_group(device)
            # Sharded first, on a GPU nothing else has touched: its load peak is the figure that matters.
            loaded = load(config, device, True, None)
            report["load"].append(loaded["row"])
            save()
            print(f"  sharded: loaded in {loaded['row']['load_s']:.1f} s", file=sys.stderr, flush=True)
            sharded_logps = pair_logps_of(loaded, config, pairs[:args.pairs], device)
            report["steps"].append(time_steps(loaded, config, pairs, args.steps, device))
            save()
            weights = loaded["weights"]
            del loaded
            plain = load(config, device, False, weights)
            report["load"].append(plain["row"])
            report["agreement"] = agreement(sharded_logps, pair_logps_of(plain, config, pairs[:args.pairs], device))
            save()
            report["steps"].append(time_steps(plain, config, pairs, args.steps, device))
            report["loss_diff"] = max(abs(a - b) for a, b in zip(*(r["losses"] for r in report["steps"])))
    except bench.TimeUp:
        report["partial"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)  # called in-process (the tests), the caller's handler comes back
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    save()
    print(render(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
