"""Prompts per second of `lora-dpo collect rank`, end to end as a user runs it.

    python scripts/bench_collect.py --model demo --prompts 48 -n 4 --max-new-tokens 48 --device cpu
    python scripts/bench_collect.py --shape 1b --reward model --prompts 64 -n 4 --max-new-tokens 128 --device cuda

``--model demo`` is the offline demo's tiny model (built here, pre-trained as `lora-dpo demo`
does) answering the demo's prompts, ranked by the rule-based ``lora_dpo.demo:kindness``; the
figure docs/benchmarks.md reports for CPUs. ``--shape tiny|1b`` is a random-init Llama of
scripts/bench.py's shapes (word-level tokenizer, plain-text prompts of random words), which
rarely stops before ``--max-new-tokens``, so every answer costs the same; ``--reward model``
scores with a small random sequence classifier on the same tokenizer (two layers: the reward
stage's cost, not a real reward model's quality), ``--reward function`` with a Python function.

The command runs in-process through the CLI (``lora_dpo.cli.main``) on a fresh output; the
table gives the whole command (model loading included), the generation stage and the scoring
stage, each as prompts/s, from the command's own log lines. Writes JSON with --json (after the
table, so a run killed early leaves none). Random weights say nothing about answer quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

RATE = re.compile(r"^(generated|scored): (\d+) prompts in ([\d.]+) s \(([\d.]+) prompts/s\)")


class Rates(logging.Handler):
    """The command's "generated: N prompts in X s" lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: dict[str, dict[str, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = RATE.match(record.getMessage())
        if match:
            self.stages[match[1]] = {"prompts": int(match[2]), "seconds": float(match[3]), "prompts_per_s": float(match[4])}


def build_demo(root: Path, pretrain_steps: int) -> tuple[Path, Path, str]:
    from lora_dpo.demo import TRAIN_TOPICS, build_demo_base, demo_pairs

    model = root / "demo-base"
    if not (model / "config.json").is_file():  # built once per --work directory
        build_demo_base(model, pretrain_steps=pretrain_steps)
    prompts = root / "prompts.jsonl"
    rows = demo_pairs(TRAIN_TOPICS, 480, seed=1)
    prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows), encoding="utf-8")
    return model, prompts, "lora_dpo.demo:kindness"


def build_shape(root: Path, shape_name: str, count: int, reward: str) -> tuple[Path, Path, str]:
    import torch
    from bench import SHAPES, build_model_dir, default_model_root
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    shape = SHAPES[shape_name]
    model = build_model_dir(shape_name, shape, default_model_root(shape_name, shape))  # shared with scripts/bench.py
    rng = random.Random(0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(f"w{rng.randrange(3, shape.words)}"
                                                             for _ in range(rng.randint(*shape.prompt)))}) + "\n"
                               for _ in range(count)), encoding="utf-8")
    if reward == "function":
        return model, prompts, "lora_dpo.demo:kindness"
    scorer = root / f"reward-{shape_name}"
    if not (scorer / "config.json").is_file():
        config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, max_position_embeddings=4096)
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(scorer)
        AutoTokenizer.from_pretrained(model).save_pretrained(scorer)
    return model, prompts, str(scorer)


def environment(device: str) -> dict[str, object]:
    import torch
    import transformers

    found = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
             "torch": torch.__version__, "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
             "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device != "cpu" and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def run(args: argparse.Namespace) -> dict[str, object]:
    from lora_dpo.cli import main

    work = Path(args.work or tempfile.mkdtemp(prefix="lora-dpo-bench-collect-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "demo":
        model, prompts, reward = build_demo(work, args.pretrain_steps)
    else:
        model, prompts, reward = build_shape(work, args.shape, args.prompts, args.reward)
    out = work / "pairs.jsonl"
    rates = Rates()
    logger = logging.getLogger("lora_dpo.collect")
    logger.addHandler(rates)
    logger.setLevel(logging.INFO)
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # the command's own summary lines: stdout is the table
        status = main(["collect", "rank", "--prompts", str(prompts), "--limit", str(args.prompts), "--generator", str(model),
                       "--reward-model", reward, "--out", str(out), "-n", str(args.num_samples), "--max-new-tokens",
                       str(args.max_new_tokens), "--temperature", "1.0", "--batch-size", str(args.batch_size),
                       "--device", args.device, "--overwrite", "--no-progress"])
    seconds = time.monotonic() - started
    logger.removeHandler(rates)
    if status != 0:
        raise SystemExit(f"bench_collect: lora-dpo collect rank exited {status}")
    pairs = sum(1 for _ in out.open(encoding="utf-8"))
    return {"settings": {"model": args.model if args.model == "demo" else f"random {args.shape}", "reward": reward,
                         "prompts": args.prompts, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                         "batch_size": args.batch_size, "device": args.device},
            "environment": environment(args.device),
            "results": {"command": {"prompts": args.prompts, "seconds": seconds, "prompts_per_s": args.prompts / seconds},
                        **rates.stages, "pairs": pairs}}


def table(report: dict) -> str:
    settings, results = report["settings"], report["results"]
    lines = [f"`collect rank`: {settings['model']} generator, {settings['num_samples']} answers of up to "
             f"{settings['max_new_tokens']} tokens per prompt, batch {settings['batch_size']}, reward "
             f"{settings['reward']}, {settings['device']}; {results['pairs']} pairs from {settings['prompts']} prompts.",
             "", "| impl | stage | prompts | seconds | prompts/s |", "|---|---|---:|---:|---:|"]
    for stage in ("command", "generated", "scored"):
        if stage in results:
            row = results[stage]
            name = {"command": "whole command (load included)", "generated": "generation", "scored": "scoring"}[stage]
            lines.append(f"| lora-dpo collect rank | {name} | {row['prompts']} | {row['seconds']:.1f} | "
                         f"{row['prompts_per_s']:.2f} |")
    env = report["environment"]
    lines += ["", f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, python {env['python']}; "
              f"{env.get('gpu') or str(env['cpus']) + ' CPUs'} ({env['torch_threads']} torch threads), "
              f"load average {env['load_average'][0]}"]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "shape"], default="shape",
                        help="the demo model (CPU figure) or a random-init shape")
    parser.add_argument("--shape", choices=["tiny", "1b"], default="1b")
    parser.add_argument("--reward", choices=["model", "function"], default="model", help="for --model shape")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("-n", "--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=300, help="the demo model's pre-training")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--work", help="directory for the models and the output (default: a new temporary one)")
    parser.add_argument("--json", help="also write the report here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    result = run(arguments)
    print(table(result))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2))
