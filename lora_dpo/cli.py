"""Command line: ``lora-dpo <command> config.yaml key=value ...``.

User mistakes (LoraDpoError) print as one line and exit with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import LoraDpoError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-dpo", description="DPO training of 4-bit LoRA adapters on one GPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_run_args(sub: argparse.ArgumentParser, config_required: bool = True) -> None:
        sub.add_argument("config", nargs=None if config_required else "?", help="YAML config file")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.learning_rate=1e-4")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
        sub.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
        sub.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    add_run_args(commands.add_parser("train", help="train a LoRA adapter with DPO"))
    add_run_args(commands.add_parser("demo", help="build the tiny offline demo model if missing, then train it"),
                 config_required=False)
    show = commands.add_parser("config", help="print the resolved config, or the reference of all keys")
    show.add_argument("config", nargs="?", help="YAML config file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument("--reference", action="store_true", help="print every key with its type, default and meaning (Markdown)")
    show.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "peft", "bitsandbytes", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _run(args)
    except LoraDpoError as exc:
        if args.debug:
            raise
        print(f"lora-dpo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-dpo: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from .config import config_reference_markdown, load_config

    if args.command == "config":
        if args.reference:
            print(config_reference_markdown())
            return 0
        import yaml

        print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
        return 0

    if args.command == "demo" and args.config is None:
        args.config = str(REPO_CONFIGS / "demo.yaml")
    config = load_config(args.config, args.overrides)
    _quiet_libraries()
    if args.command == "demo":
        from .demo import build_demo_base

        base = Path(config.model.name_or_path)
        if not (base / "config.json").is_file():
            logging.info("building the tiny demo model in %s", base)
            build_demo_base(base)
    from .train import train

    summary = train(config, overwrite=args.overwrite, progress=False if args.no_progress else None)
    for line in summary.lines():
        print(line)
    return 0


def _quiet_libraries() -> None:
    """Library warnings a user cannot act on drown the lines they can."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
