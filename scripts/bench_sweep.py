#!/usr/bin/env python
"""Wall time of a k-trial ``lora-dpo sweep`` against k separate ``lora-dpo train`` runs of the same settings.

Every run is a process of its own, timed from its start to its exit, as a user pays for it
(Python and torch imports, reading and tokenizing the data, loading the base, the reference,
training, evaluation, saving). Three ways to train the same k settings (``dpo.beta`` = the
first k of --betas, everything else as --config says):

- ``train, reference every step``: k ``lora-dpo train`` runs with the config's own settings
  (the demo computes the reference in every step, the project default);
- ``train, reference precomputed``: k ``lora-dpo train`` runs with
  ``dpo.precompute_reference=true``, each with an empty cache of its own (each pays the pass);
- ``sweep``: one ``lora-dpo sweep`` of the k values, with an empty cache.

Then the sweep's trials are checked against the precomputed runs (the same settings): their
held-out loss must be equal. Prints a Markdown table; --json writes the numbers.

    python scripts/bench_sweep.py                      # the demo, 3 trials, on this machine
    python scripts/bench_sweep.py --steps 2 --device cpu   # a smoke run (scripts/gpu_suite.sh SMOKE=1)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(words: list[str], log: Path) -> float:
    """Seconds from the start of ``python -m lora_dpo WORDS`` to its exit (which must be 0)."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        status = subprocess.run([sys.executable, "-m", "lora_dpo", *words], cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"bench_sweep: {' '.join(words[:2])} failed with exit {status}; see {log}")
    return seconds


def final_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["final_eval"]["loss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--base", help="base model directory (default: the demo base, built in --work when missing)")
    parser.add_argument("--betas", default="0.05,0.1,0.3,0.5,1.0")
    parser.add_argument("--trials", type=int, default=3, help="k: the first k of --betas")
    parser.add_argument("--steps", type=int, help="train.max_steps of every run (default: the config's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--work", help="directory for the runs (default: a new temporary directory)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    import torch

    from lora_dpo.demo import build_demo_base

    work = Path(args.work or tempfile.mkdtemp(prefix="lora-dpo-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else work / "base-model"
    if not (base / "config.json").is_file():
        build_demo_base(base, pretrain_steps=300)  # as `lora-dpo demo` builds it
    betas = args.betas.split(",")[: args.trials]
    common = [f"model.name_or_path={base}", f"model.device={args.device}"]
    common += [f"train.max_steps={args.steps}"] if args.steps else []
    if args.steps:  # evaluate at the end only: eval_every may exceed a short run
        common.append("train.eval_every=0")

    modes: dict[str, dict[str, object]] = {}
    runs = {}
    for mode, extra in (("train, reference every step", []), ("train, reference precomputed", ["dpo.precompute_reference=true"])):
        times = []
        for beta in betas:
            tag = f"{'pre' if extra else 'every'}-{beta}"
            out = work / "train" / tag
            words = ["train", args.config, *common, *extra, f"dpo.beta={beta}", f"output.dir={out}",
                     f"dpo.reference_cache_dir={work / 'cache' / tag}", "--no-progress", "--overwrite"]
            times.append(run(words, work / f"train-{tag}.log"))
            runs[tag] = out
        modes[mode] = {"seconds": sum(times), "runs": times}
    sweep_out = work / "sweep"
    words = ["sweep", args.config, *common, f"dpo.beta={','.join(betas)}", f"output.dir={sweep_out}",
             f"dpo.reference_cache_dir={work / 'cache' / 'sweep'}", "--no-progress", "--overwrite"]
    modes["sweep"] = {"seconds": run(words, work / "sweep.log"), "runs": []}

    same = all(final_loss(sweep_out / f"trial-{i:03d}") == final_loss(runs[f"pre-{beta}"])
               for i, beta in enumerate(betas))
    sweep_seconds = modes["sweep"]["seconds"]
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    import peft
    import transformers

    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": where, "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "python": platform.python_version(), "config": args.config,
              "steps": args.steps, "betas": betas, "modes": modes, "same_numbers": same, "work": str(work)}
    print(f"{len(betas)} trials (dpo.beta={','.join(betas)}) of {Path(args.config).name}"
          f"{f', {args.steps} steps each' if args.steps else ''}, on {where}; {report['date']}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}\n")
    print("| how | wall s | per trial s | vs the sweep |")
    print("|---|---|---|---|")
    for mode, numbers in modes.items():
        seconds = numbers["seconds"]
        print(f"| {mode} | {seconds:.1f} | {seconds / len(betas):.1f} | {seconds / sweep_seconds:.2f}x |")
    print(f"\nThe sweep's trials {'equal' if same else 'DIFFER FROM'} the precomputed train runs (held-out loss).")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
