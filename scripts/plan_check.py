#!/usr/bin/env python
"""The memory planner against measured peaks, and small cards emulated (the `plan` stage of
scripts/gpu_suite.sh; docs/memory.md reads its tables).

For each bench shape (scripts/bench.py: random-init Llama 1B / 8B, 4-bit NF4 with double
quantization, LoRA r=16 on all linear layers, gradient checkpointing, paged 8-bit AdamW, padded
layout), at each pair length (prompt a quarter of it, both responses the rest: every row as long
as max_length allows) and both reference modes: ``lora_dpo.memory.plan_memory``'s prediction for
exactly that micro-batch beside the measured ``max_memory_allocated`` / ``max_memory_reserved``
over a fresh optimizer's first steps (peaks reset with the model loaded, so they include it).

Then, on a GPU, each cap of ``--caps`` (GiB) is emulated with
``torch.cuda.set_per_process_memory_fraction`` (cap minus the CUDA context, as
``bench.py --memory-cap-gib`` does): the planner's micro-batch for ``--pairs-per-step`` pairs,
what ``train.micro_batch_size: auto`` picks (plan, trial step, back-off), and whether two real
optimizer steps with that choice train under the cap.

SIGTERM prints the rows finished so far. ``--shapes tiny --device cpu`` is the CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the repository on sys.path too)
import torch  # noqa: E402

from lora_dpo.batching import score_pairs  # noqa: E402
from lora_dpo.config import load_config  # noqa: E402
from lora_dpo.data import TokenizedPair  # noqa: E402
from lora_dpo.memory import (GIB, ModelShape, choose_batch, expandable_segments_on, micro_batch_of,  # noqa: E402
                             plan_memory, resolve_auto_batch, visible_gpu_budget)
from lora_dpo.modeling import load_model, resolve_compute_dtype, resolve_device, trainable_parameters  # noqa: E402
from lora_dpo.reference_cache import ReferenceTable  # noqa: E402


def full_pairs(count: int, length: int, words: int, seed: int) -> list[TokenizedPair]:
    """Pairs whose every row is ``length`` tokens: prompt a quarter (BOS first), responses the rest (EOS last)."""
    rng = random.Random(seed)
    prompt, response = max(1, length // 4), length - max(1, length // 4)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, words) for _ in range(n)]

    return [TokenizedPair([1] + ids(prompt - 1), ids(response - 1) + [2], ids(response - 1) + [2]) for _ in range(count)]


def run_config(model_dir: Path, shape: bench.Shape, length: int, device: str, work: Path, *extra: str) -> Any:
    train_file = work / "pairs.jsonl"
    train_file.touch()
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"model.device={device}", f"data.train_file={train_file}",
        f"data.max_length={length}", f"data.max_prompt_length={length // 2}", "lora.r=16", "lora.alpha=32",
        "lora.dropout=0.05", f"train.micro_batch_size={shape.micro_batch}", "train.gradient_accumulation_steps=1",
        "train.optim=paged_adamw_8bit", "train.learning_rate=5e-6", "train.lr_scheduler=constant",
        "train.warmup_steps=0", "dpo.beta=0.1", *extra])


def train_steps(model: Any, config: Any, pairs: list[TokenizedPair], micro: int, steps: int, precomputed: bool,
                device: torch.device) -> dict[str, Any]:
    """``steps`` optimizer steps over ``pairs`` in micro-batches of ``micro`` with a fresh
    optimizer, peaks reset first (after the model loaded); a precomputed reference is computed
    after the reset, as training does it."""
    from lora_dpo.train import DpoStep, build_optimizer, build_scheduler

    bench.reset_memory(device)
    try:
        optimizer = build_optimizer(config, trainable_parameters(model), device)
        scheduler = build_scheduler(config, optimizer, 0, steps + 1)
        table = None
        dtype = resolve_compute_dtype(config.model, device)
        if precomputed:
            logps = score_pairs(model, pairs, 0, micro_batch_size=micro, chunk_size=config.dpo.logps_chunk_size,
                                compute_dtype=dtype, reference=True)
            table = ReferenceTable(logps.chosen.cpu(), logps.rejected.cpu(), logps.chosen_tokens.cpu(),
                                   logps.rejected_tokens.cpu())
        step = DpoStep(config, model, optimizer, scheduler, None, device, 0)
        batches = [list(range(start, min(start + micro, len(pairs)))) for start in range(0, len(pairs), micro)]
        model.train()
        for _ in range(steps):
            step(pairs, batches, table)
        result = {"status": "ok", **bench.peak_memory(device)}
    except torch.OutOfMemoryError:
        result = {"status": "out of memory", **bench.peak_memory(device)}
    finally:
        model.zero_grad(set_to_none=True)
        bench.reset_memory(device)
    return result


def number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | length | reference | micro-batch | rows x tokens | predicted alloc GiB | measured alloc GiB "
             "| predicted reserved GiB | measured reserved GiB | reserved error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = "n/a" if r["peak_reserved_gib"] is None else f"{r['predicted_reserved_gib'] / r['peak_reserved_gib'] - 1:+.1%}"
        lines.append(f"| {r['shape']} | {r['length']} | {r['reference']} | {r['micro_batch']} | {r['rows']} x {r['row_length']} "
                     f"| {number(r['predicted_allocated_gib'])} | {number(r['peak_allocated_gib'])} "
                     f"| {number(r['predicted_reserved_gib'])} | {number(r['peak_reserved_gib'])} | {error} |")
    return "\n".join(lines)


def cap_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| card GiB | shape | length | planner micro-batch | auto micro-batch x accumulation | trains | peak reserved GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cap_gib']:g} | {r['shape']} | {r['length']} | {r['planned'] or 'none'} | {r['auto']} "
                     f"| {r['status']} | {number(r.get('peak_reserved_gib'))} |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = [f"Memory planner against measurement: {s['device']}, {s['date']}; torch {s['torch']}; steps {s['steps']}; "
           f"expandable segments {'on' if s['expandable_segments'] else 'off'}" + (" (PARTIAL)" if report.get("partial") else ""),
           "", accuracy_table(report["accuracy"])]
    if report["caps"]:
        out += ["", f"Emulated cards (set_per_process_memory_fraction), {s['pairs_per_step']} pairs per step:", "",
                cap_table(report["caps"])]
    elif s["device"] == "cpu":
        out += ["", "Emulated cards: not run (no CUDA device)."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1b,8b", help="bench shapes, comma-separated (tiny, 1b, 8b)")
    parser.add_argument("--lengths", default="512,1024,2048", help="pair lengths (data.max_length), comma-separated")
    parser.add_argument("--caps", default="8,12,16,24", help="card sizes to emulate, GiB (GPU only)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per measurement (the second has the optimizer state)")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per step of the emulated cards' auto runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--model-root", type=Path, help="where the bench models are (built if missing)")
    parser.add_argument("--json", type=Path, help="write the rows here (rewritten after each)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    caps = [float(x) for x in args.caps.split(",")] if device.type == "cuda" else []
    import datetime

    report: dict[str, Any] = {"settings": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
        "steps": args.steps, "pairs_per_step": args.pairs_per_step, "expandable_segments": expandable_segments_on(),
        "shapes": args.shapes, "lengths": lengths, "caps": caps}, "accuracy": [], "caps": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    previous = signal.signal(signal.SIGTERM, bench.stop_on_sigterm)
    bench.quiet_libraries()
    work = Path(bench.tempfile.mkdtemp(prefix="lora-dpo-plan-check-"))
    try:
        for name in args.shapes.split(","):
            shape = bench.SHAPES[name]
            model_dir = bench.build_model_dir(name, shape, args.model_root or bench.default_model_root(name, shape))
            base = run_config(model_dir, shape, max(lengths), args.device, work)
            model = load_model(base, device)
            planner = ModelShape.from_config(model.get_base_model().config)
            for length in lengths:
                pairs = full_pairs(shape.micro_batch * args.steps, length, shape.words, seed=length)
                for reference in ("every_step", "precomputed"):
                    config = run_config(model_dir, shape, length, args.device, work,
                                        f"dpo.precompute_reference={str(reference == 'precomputed').lower()}")
                    mb = shape.micro_batch
                    batch = micro_batch_of(pairs[:mb], config.data.layout)
                    plan = plan_memory(planner, config, batch, expandable_segments=expandable_segments_on())
                    measured = train_steps(model, config, pairs[:mb], mb, args.steps, reference == "precomputed", device)
                    report["accuracy"].append({
                        "shape": name, "length": length, "reference": reference, "micro_batch": mb, "rows": batch.rows,
                        "row_length": batch.length, "predicted_allocated_gib": plan.allocated / GIB,
                        "predicted_reserved_gib": plan.reserved / GIB, **measured})
                    print(f"  {name} {length} {reference}: predicted {plan.reserved / GIB:.2f} GiB reserved, "
                          f"measured {number(measured['peak_reserved_gib'])} ({measured['status']})",
                          file=sys.stderr, flush=True)
                    save()
            for cap in caps:
                bench.apply_memory_cap(cap, device)
                for length in lengths:
                    pairs = full_pairs(args.pairs_per_step, length, shape.words, seed=length + 1)
                    config = run_config(model_dir, shape, length, args.device, work, "train.micro_batch_size=auto",
                                        f"train.pairs_per_step={args.pairs_per_step}",
                                        "train.gradient_accumulation_steps=1")
                    budget = visible_gpu_budget()
                    planned = choose_batch(planner, config, budget, expandable_segments=expandable_segments_on(),
                                           batch_of=lambda size: micro_batch_of(pairs[:size], "padded")).micro_batch_size
                    row = {"cap_gib": cap, "shape": name, "length": length, "planned": planned}
                    try:
                        resolved = resolve_auto_batch(config, model, pairs, device, 0)
                    except bench.LoraDpoError:
                        row.update(auto="none fits", status="no (nothing fits)")
                    else:
                        micro, steps = resolved.train.micro_batch_size, resolved.train.gradient_accumulation_steps
                        row["auto"] = f"{micro} x {steps}"
                        row.update(train_steps(model, resolved, pairs, micro, 2, False, device))
                        row["status"] = "yes" if row["status"] == "ok" else row["status"]
                    report["caps"].append(row)
                    print(f"  {cap:g} GiB {name} {length}: planner {planned}, auto {row['auto']}, {row['status']}",
                          file=sys.stderr, flush=True)
                    save()
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            del model
            bench.reset_memory(device)
    except bench.TimeUp:
        report["partial"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)  # called in-process (the tests), the caller's handler comes back
        shutil.rmtree(work, ignore_errors=True)
    save()
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
