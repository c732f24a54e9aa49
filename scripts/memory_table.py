#!/usr/bin/env python
"""The tables of docs/memory.md, from the planner alone: the longest pair length that trains for
common model shapes on 8/12/16/24 GB cards (and for 70B sharded over 2 and 4 such cards), and
the planner beside the measured anchors.

``python scripts/memory_table.py`` prints them; tests/test_memory.py checks that docs/memory.md
holds exactly this output, so the documentation follows the planner. Nothing is downloaded: the
shapes are the models' published config.json values.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_dpo.config import load_config  # noqa: E402
from lora_dpo.memory import (GIB, ModelShape, Sharding, fsdp_config, longest_max_length,  # noqa: E402
                             longest_micro_batch, plan_memory)


def _shape(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
           tied: bool, max_positions: int) -> ModelShape:
    return ModelShape(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, tied, model_type="",
                      max_positions=max_positions)


MODELS = {
    "Qwen2.5-0.5B": _shape(151936, 896, 4864, 24, 14, 2, 64, True, 32768),
    "Llama-3.2-1B": _shape(128256, 2048, 8192, 16, 32, 8, 64, True, 131072),
    "Qwen2.5-1.5B": _shape(151936, 1536, 8960, 28, 12, 2, 128, True, 32768),
    "Llama-3.2-3B": _shape(128256, 3072, 8192, 28, 24, 8, 128, True, 131072),
    "Mistral-7B-v0.3": _shape(32768, 4096, 14336, 32, 32, 8, 128, False, 32768),
    "Llama-3.1-8B": _shape(128256, 4096, 14336, 32, 32, 8, 128, False, 131072),
    "Qwen2.5-14B": _shape(152064, 5120, 13824, 48, 40, 8, 128, False, 32768),
    "Qwen2.5-32B": _shape(152064, 5120, 27648, 64, 40, 8, 128, False, 32768),
    "Llama-3.1-70B": _shape(128256, 8192, 28672, 80, 64, 8, 128, False, 131072),
}
CARDS = (8, 12, 16, 24)
SHARDED = (("Llama-3.1-70B", 2), ("Llama-3.1-70B", 4))
"""(model, GPUs) lines of the card table with the model sharded over that many cards (FSDP)."""
BENCH_1B, BENCH_8B = MODELS["Llama-3.2-1B"], MODELS["Llama-3.1-8B"]  # the bench's random-init shapes


def defaults(*overrides: str):
    return load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", *overrides])


def card_table() -> str:
    config = defaults()
    lines = ["| model | parameters | " + " | ".join(f"{card} GB" for card in CARDS) + " |",
             "|---|---|" + "---|" * len(CARDS)]
    rows = [(name, shape, Sharding()) for name, shape in MODELS.items()]
    rows += [(f"{name}, sharded over {count} cards (FSDP)", MODELS[name], Sharding(count, sharded=True))
             for name, count in SHARDED]
    for name, shape, sharding in rows:
        run = fsdp_config(config) if sharding.sharded else config
        cells = [_cell(shape, longest_max_length(shape, run, card * GIB, sharding=sharding)) for card in CARDS]
        size = (shape.quantized_params() + shape.unquantized_params()) / 1e9
        lines.append(f"| {name} | {size:.1f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(shape: ModelShape, length: int | None) -> str:
    if length is None:
        return "does not fit"
    if length >= (shape.max_positions or length + 1):
        return f"{length:,} (all its positions)"
    return f"{length:,}"


def calibration_table() -> str:
    """The measured H100 anchors of docs/bench-reference.md beside the planner's prediction."""
    lines = ["| what | measured (H100) | planner (predicted) | note |", "|---|---|---|---|"]
    loaded = sum(part.counted for part in plan_memory(BENCH_1B, defaults()).parts if part.kind == "weights")
    lines.append(f"| 1B shape loaded in 4-bit NF4, double quantization | 0.96 GiB allocated | {loaded / GIB:.2f} GiB "
                 "| weights only; the naive loop's reading before training |")
    rows = [("1B, micro-batch 4, rows of up to 896 tokens", BENCH_1B, 4, 1024, "2.44 GiB allocated"),
            ("8B, micro-batch 2, rows of up to 896 tokens", BENCH_8B, 2, 1024, "7.10 GiB allocated"),
            ("8B, micro-batch 1, rows of up to 2,048 tokens", BENCH_8B, 1, 2048, "7.43 GiB allocated, 8.14 reserved")]
    for what, shape, micro, length, measured in rows:
        config = defaults(f"data.max_length={length}")
        batch = longest_micro_batch(micro, 896 if length == 1024 else length, "padded")
        plan = plan_memory(shape, config, batch, micro_batch_size=micro, expandable_segments=False)
        lines.append(f"| {what}, reference every step | {measured} (TRL 1.16) | {plan.allocated / GIB:.2f} GiB allocated, "
                     f"{plan.reserved / GIB:.2f} reserved (lora-dpo, every row full) | TRL: bf16 LoRA weights, its "
                     "own log-prob code and real row lengths; not like for like |")
    return "\n".join(lines)


def main() -> int:
    print(card_table())
    print()
    print(calibration_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
