"""Command line: ``lora-dpo <command> config.yaml key=value ...``.

User mistakes (LoraDpoError) print as one line and exit with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from pathlib import Path

from .errors import Interrupted, LoraDpoError, joined, lost_process

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_PRETRAIN_STEPS = 300
DEMO_PROMPTS = ("Can you tell me about bread?", "Why do people like owls?", "Give me a tip about snow.")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends with "(default: X)" where a default says something: not for on/off flags,
    options unset by default, or repeatable options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if "%(default)" in text or not action.option_strings or unset:
            return text
        return text + " (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-dpo", description="DPO training of 4-bit LoRA adapters on one GPU.")
    # Every command's help shows its defaults: they differ between commands (--device is cpu for
    # merge, auto for generate), so a user should not have to read the docs to know them.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=functools.partial(argparse.ArgumentParser,
                                                                    formatter_class=DefaultsHelpFormatter))

    def add_run_args(sub: argparse.ArgumentParser, config_required: bool = True) -> None:
        sub.add_argument("config", nargs=None if config_required else "?", help="YAML config file")
        # default=[]: without it argparse lists key=value among the required arguments
        sub.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides, e.g. train.learning_rate=1e-4")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
        sub.add_argument("--resume", action="store_true",
                         help="continue from the newest complete checkpoint in output.dir (same as train.resume=always)")
        sub.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
        sub.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    add_run_args(commands.add_parser("train", help="train a LoRA adapter with DPO"))
    add_run_args(commands.add_parser("demo", help="build the tiny offline demo model if missing, then train it"),
                 config_required=False)
    sweep = commands.add_parser("sweep", help="train several settings in one process and rank them (docs/sweep.md)",
                                formatter_class=DefaultsHelpFormatter)
    sweep.add_argument("config", help="YAML config file")
    sweep.add_argument("overrides", nargs="*", metavar="key=value",
                       help="fixed overrides (key=value), grid axes (key=a,b,c) or, with --search optuna, ranges "
                       "(key=lo:hi or key=lo:hi:log)")
    sweep.add_argument("--search", choices=["grid", "optuna"], default="grid",
                       help="every combination of the comma lists, or Optuna's TPE sampler with median pruning")
    sweep.add_argument("--trials", type=int, help="trials to run with --search optuna (default 20)")
    sweep.add_argument("--metric", choices=["win_rate", "loss", "margin", "accuracy"],
                       help="what ranks the trials (default: win_rate when the eval has a judge, else held-out loss)")
    sweep.add_argument("--overwrite", action="store_true", help="replace the sweep (and trials) in output.dir")
    sweep.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    sweep.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    show = commands.add_parser("config", help="print the resolved config, or the reference of all keys")
    show.add_argument("config", nargs="?", help="YAML config file")
    show.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides")
    show.add_argument("--reference", action="store_true", help="print every key with its type, default and meaning (Markdown)")
    show.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    plan = commands.add_parser("plan", help="predict the GPU memory of a run from config.json alone, and what fits a card "
                               "(docs/memory.md)")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_length=2048")
    plan.add_argument("--gpu-memory", metavar="SIZE",
                      help="memory of the card to plan for, e.g. 12GiB (default: the visible GPU's free memory)")
    plan.add_argument("--processes", type=int, default=1, metavar="N",
                      help="plan each GPU of a launch of N processes (data-parallel: each holds the whole model)")
    plan.add_argument("--sharded", action="store_true",
                      help="with --processes N: the model sharded over the N GPUs (FSDP, docs/distributed.md)")
    plan.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    merge = commands.add_parser("merge", help="merge an adapter into its base and save a standalone model (docs/merge.md)")
    merge.add_argument("adapter", help="adapter directory (a training run's output.dir)")
    merge.add_argument("--out", required=True, help="directory for the merged model")
    merge.add_argument("--base", help="base model directory or hub id (default: the one adapter_config.json names)")
    merge.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype of the merged weights (auto: the dtype the base was saved in)")
    merge.add_argument("--base-weights", default="original", choices=["original", "dequantized"],
                       help="merge into the original weights, or into the NF4-dequantized ones the adapter was trained on")
    merge.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to merge and verify")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    merge.add_argument("--no-verify", action="store_true", help="skip comparing the merged model with base + adapter")
    merge.add_argument("--verify-data", help="preference file for the verification (default: the run's held-out pairs)")
    merge.add_argument("--verify-pairs", type=int, default=16, help="held-out pairs to verify on")
    merge.add_argument("--max-logp-diff", type=float, default=0.01,
                       help="warn above this mean log-prob difference per response token (nats)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    merge.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    report = commands.add_parser("report", help="rebuild a run's report.md, report.html and plots (docs/report.md)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output.dir, finished or not")
    report.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    generate = commands.add_parser("generate", help="sample from a model, or from base + adapter (docs/merge.md)")
    generate.add_argument("model", help="adapter directory (runs base + adapter), merged model directory, or any model")
    generate.add_argument("--base", help="base model for an adapter directory (default: the one it names)")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--prompts", help="file of prompts: .txt (one per line) or .jsonl/.json/.parquet rows")
    generate.add_argument("--prompt-column", default="prompt", help="column of the prompt in a --prompts data file")
    generate.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                          help="a bad --prompts row stops the command, or is skipped and counted")
    generate.add_argument("--compare", action="store_true", help="answer with the base and with base + adapter, side by side")
    generate.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    generate.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    generate.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 decodes greedily")
    generate.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling; 1 disables it")
    generate.add_argument("--top-k", type=int, default=50, help="top-k sampling; 0 disables it")
    generate.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty; 1 disables it")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="also end an answer where this text appears (repeatable)")
    generate.add_argument("--num-samples", type=int, default=1, help="answers per prompt (needs --temperature above 0)")
    generate.add_argument("--seed", type=int, default=0,
                          help="sampling seed; each answer has its own stream from (seed, prompt, sample), so "
                          "reruns repeat their answers whatever --batch-size")
    generate.add_argument("--batch-size", type=int, default=8,
                          help="sequences (prompts x samples) generated together; more is faster and needs more memory")
    generate.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                          help="compute dtype (auto: as trained for an adapter, as saved for a model)")
    generate.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where to run the model")
    generate.add_argument("--output", help="also write the answers to this .jsonl file")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    evaluate = commands.add_parser("eval", help="reference vs policy of a finished run: preference metrics, KL, "
                                   "lengths, win rate (docs/evaluate.md)", formatter_class=DefaultsHelpFormatter)
    evaluate.add_argument("run_dir", help="a finished training run (its output.dir)")
    evaluate.add_argument("--data", help="preference pairs to evaluate on (default: the run's held-out pairs)")
    evaluate.add_argument("--judge", help="reward model directory or hub id, or module:function / file.py:function "
                          "scoring (prompt, answer) (default: the run's eval.judge; none: no win rate)")
    evaluate.add_argument("--judge-4bit", action="store_true", help="load a reward-model judge in 4-bit")
    evaluate.add_argument("--prompts", type=int, help="held-out prompts to answer (default: the run's eval.prompts)")
    evaluate.add_argument("--samples", type=int, help="answers per prompt from each model (default: eval.samples)")
    evaluate.add_argument("--max-new-tokens", type=int, help="longest answer (default: eval.max_new_tokens)")
    evaluate.add_argument("--temperature", type=float, help="sampling temperature (default: eval.temperature)")
    evaluate.add_argument("--top-p", type=float, help="nucleus sampling; 1 disables it (default: eval.top_p)")
    evaluate.add_argument("--top-k", type=int, help="top-k sampling; 0 disables it (default: eval.top_k)")
    evaluate.add_argument("--seed", type=int, help="sampling seed (default: eval.seed)")
    evaluate.add_argument("--batch-size", type=int, help="sequences generated and judged together (default: eval.batch_size)")
    evaluate.add_argument("--out", help="directory for eval.json and samples.jsonl (default: RUN_DIR/eval)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="start an interrupted evaluation in --out again instead of continuing it")
    evaluate.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where to run the models")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    from .collect import add_collect_parser

    add_collect_parser(commands, DefaultsHelpFormatter)
    return parser


def set_cuda_allocator_defaults() -> None:
    """Expandable segments, unless the user set PYTORCH_CUDA_ALLOC_CONF: the caching allocator then
    grows a segment in place instead of reserving a new block for each odd-sized request, so peak
    reserved memory stays close to peak allocated, and reserved is what must fit on an 8 GB card.
    Read when CUDA first allocates, so it must be set before any command touches the GPU."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    # argparse stops collecting key=value words at the first option; take the ones after it too
    unknown = [word for word in extras if word.startswith("-") or "=" not in word]
    if unknown or (extras and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extras)}")
    if extras:
        args.overrides.extend(extras)
    set_cuda_allocator_defaults()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "peft", "bitsandbytes", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _run(args)
    except Interrupted as exc:
        print(f"lora-dpo: {exc}", file=sys.stderr)
        return exc.exit_code
    except LoraDpoError as exc:
        if args.debug:
            raise
        # Messages built around a library's multi-line text still print as the one promised line.
        print(f"lora-dpo: error: {joined(str(exc))}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Another process of a launch stopped (its one line is above) while this one waited for it.
        lost = None if args.debug else lost_process(exc)
        if lost is None:
            raise
        print(f"lora-dpo: error: {lost}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-dpo: interrupted", file=sys.stderr)
        return 130


# Commands that take their argparse namespace whole: (module, function), imported only when run,
# so `lora-dpo config` never pays for torch.
COMMAND_RUNNERS = {
    "merge": (".merge", "run_merge_command"),
    "sweep": (".sweep", "run_sweep_command"),
    "generate": (".generate", "run_generate_command"),
    "collect": (".collect", "run_collect_command"),
    "eval": (".evaluation", "run_eval_command"),
}


def _run(args: argparse.Namespace) -> int:
    from .config import config_reference_markdown, load_config

    if args.command == "config":
        if args.reference:
            print(config_reference_markdown())
            return 0
        import yaml

        print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
        return 0

    if args.command == "plan":
        from .memory import plan_command

        _quiet_libraries()
        return plan_command(load_config(args.config, args.overrides), args.gpu_memory, args.processes, args.sharded)
    if args.command in COMMAND_RUNNERS:
        module, function = COMMAND_RUNNERS[args.command]
        _quiet_libraries()
        return getattr(importlib.import_module(module, __package__), function)(args)
    if args.command == "report":
        from .report import write_report

        written = write_report(args.run_dir)
        for warning in written.warnings:
            print(f"warning: {warning}")
        print(f"report: {written.html} (and {written.markdown.name}, {len(written.plots)} plots in "
              f"{written.markdown.parent / 'plots'})")
        return 0

    shipped_demo = args.command == "demo" and (args.config is None or ("=" in args.config and not Path(args.config).exists()))
    if shipped_demo:
        if args.config is not None:  # `lora-dpo demo key=value`: the first word is an override
            args.overrides.insert(0, args.config)
        args.config = str(REPO_CONFIGS / "demo.yaml")
    config = load_config(args.config, args.overrides)
    _quiet_libraries()
    if args.command == "demo":
        replacing = _prepare_demo(config, shipped_demo)
        from .collect import collect_demo_pairs

        # the user's --overwrite collects again; replacing the demo's earlier run reuses its pairs
        config = collect_demo_pairs(config, overwrite=args.overwrite, progress=not args.no_progress)
        args.overwrite = replacing or args.overwrite
    from .distributed import launched_as_main
    from .train import train

    if args.resume:
        config.train.resume = "always"
    summary = train(config, overwrite=args.overwrite, progress=False if args.no_progress else None)
    if not launched_as_main():
        return 0  # under accelerate launch, the main process reports (and runs the demo's comparison)
    for line in summary.lines():
        print(line)
    if args.command == "demo":
        _print_demo_win_rate(Path(config.output.dir))
        print("\nThe base model, pre-trained on kind and rude answers alike, picks either at random; the tuned "
              "one should answer kindly (owls and snow are topics absent from training):")
        words = ["generate", config.output.dir, "--compare", "--max-new-tokens", "60", "--seed", "2"]
        for prompt in DEMO_PROMPTS:
            words += ["--prompt", prompt]
        return _run(_parser().parse_args(words))
    return 0


def _prepare_demo(config, shipped: bool) -> bool:
    """Everything the demo does before training, cheapest check first: find its data (the
    repository's copy when run from another directory), read it, build the tiny base model when
    missing. Returns True when output.dir holds the demo's own earlier run, which it replaces."""
    import time

    from .data import read_preference_examples
    from .demo import build_demo_base
    from .train import RUN_MARKER

    if shipped:
        for name in ("train_file", "eval_file"):
            value = getattr(config.data, name)
            if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO_CONFIGS.parent / value).exists():
                setattr(config.data, name, str(REPO_CONFIGS.parent / value))
    read_preference_examples(config.data, config.train.seed)  # a missing or bad file fails before pre-training
    base = Path(config.model.name_or_path)
    if not (base / "config.json").is_file():
        logging.info("building the tiny demo model in %s: %d steps of pre-training, about 20-45 s on two CPU cores "
                     "(once: later demos reuse it)", base, DEMO_PRETRAIN_STEPS)
        started = time.perf_counter()
        build_demo_base(base, pretrain_steps=DEMO_PRETRAIN_STEPS)
        logging.info("pre-trained the demo model in %.0f s", time.perf_counter() - started)
    out = Path(config.output.dir)
    if not (out / RUN_MARKER).is_file() or not (out / "config.yaml").is_file():
        return False
    from .config import load_config

    try:
        earlier = load_config(out / "config.yaml").model.name_or_path
    except LoraDpoError:
        return False
    if Path(earlier).resolve() != base.resolve():
        return False  # a run of something else: train's own check refuses to touch it
    logging.info("replacing the demo's earlier run in %s (only the files that run wrote)", out)
    return True


def _print_demo_win_rate(out: Path) -> None:
    import json

    path = out / "eval" / "eval.json"
    if not path.is_file():
        return  # eval.after_training switched off
    result = json.loads(path.read_text(encoding="utf-8"))
    wins = result["win_rate"]
    if wins is not None:
        print(f"\nwin rate of the tuned demo model over its base on {result['prompts']} unseen prompts x "
              f"{result['samples_per_prompt']} answers, judged by {result['judge']}: {wins['win_rate']:.2f} "
              f"(95% CI {wins['ci95'][0]:.2f}-{wins['ci95'][1]:.2f}); details in {path}")


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
