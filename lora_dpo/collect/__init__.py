"""``lora-dpo collect``: preference pairs made without annotators (docs/collect.md).

- ``collect rank``: n sampled answers per prompt, ranked by a reward model or a function (rank.py);
- ``collect revise``: the model critiques and rewrites its own answer under a principle (revise.py);
- ``collect judge``: the model picks the better of two answers under a principle, asked in both
  orders (judge.py). Principles: principles.py and the shipped principles.yaml.

Each command writes a JSONL file that ``lora-dpo train`` takes as it is, resumable and
deterministic with a seed; what they share lives in common.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from .judge import add_judge_parser, run_judge
from .rank import add_rank_parser, run_rank
from .revise import add_revise_parser, run_revise

COMMANDS = {"rank": run_rank, "revise": run_revise, "judge": run_judge}
# The demo's collect step: the first prompts of its training file, 4 answers each. Enough pairs
# for its 60 training steps, and a few seconds of CPU generation with the tiny model.
DEMO_COLLECT_PROMPTS = 120
DEMO_COLLECT_TOKENS = 48


def add_collect_parser(commands: Any, formatter: Any) -> None:
    """The ``collect`` command and its subcommands, on the CLI's subparsers."""
    collect = commands.add_parser("collect", help="make preference pairs without annotators (docs/collect.md)")
    methods = collect.add_subparsers(dest="method", required=True, metavar="METHOD")
    add_rank_parser(methods, formatter)
    add_revise_parser(methods, formatter)
    add_judge_parser(methods, formatter)


def run_collect_command(args: Any) -> int:
    return COMMANDS[args.method](args)


def collect_demo_pairs(config: Any, overwrite: bool = False, progress: bool = True) -> Any:
    """The demo's collect step: the demo base answers the prompts of its training file, the
    rule-based judge ``lora_dpo.demo:kindness`` ranks the answers, and the returned config trains
    on the pairs (``runs/demo/collected.jsonl`` beside the adapter directory) instead of the
    bundled ones. A rerun continues or reuses the file, as any ``collect rank``."""
    out = Path(config.output.dir).parent / "collected.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    words = ["collect", "rank", "--prompts", config.data.train_file, "--generator", config.model.name_or_path,
             "--reward-model", "lora_dpo.demo:kindness", "--out", str(out), "-n", "4",
             "--limit", str(DEMO_COLLECT_PROMPTS), "--max-new-tokens", str(DEMO_COLLECT_TOKENS),
             "--temperature", "1.0", "--top-p", "1.0", "--batch-size", "32", "--device", config.model.device]
    words += ["--overwrite"] if overwrite else []
    words += [] if progress else ["--no-progress"]
    parser = argparse.ArgumentParser(prog="lora-dpo")
    add_collect_parser(parser.add_subparsers(dest="command"), argparse.HelpFormatter)
    logging.info("collecting the demo's pairs: the base answers %d prompts 4 times, lora_dpo.demo:kindness ranks "
                 "the answers", DEMO_COLLECT_PROMPTS)
    run_collect_command(parser.parse_args(words))
    return dataclasses.replace(config, data=dataclasses.replace(config.data, train_file=str(out)))
