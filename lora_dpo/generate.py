"""Trying a model out: sample answers from a model (a base or a merged model) or from a base +
adapter, for one prompt or a file of prompts, optionally base and adapter side by side.

An adapter directory is run the way it was trained: the base loaded as the run's config.yaml says
(4-bit NF4 when training was 4-bit) with the adapter on top, unmerged. ``--compare`` answers each
prompt twice with that one model, once with the adapter switched off, so the comparison costs no
second copy of the base; both answers use the same random streams, so their difference is the
adapter's.

This module holds the command: loading, flags and printing. Prompts are read by ``prompts``,
rendered by ``data.encode_prompt`` and answered by ``generation.sample`` (batched, with answers
that do not depend on the batching).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import textwrap
from itertools import zip_longest
from pathlib import Path
from typing import Any, Optional


from .data import Text, encode_prompt
from .distributed import processes as launched_processes
from .errors import DataError, LoraDpoError
from .generation import SamplingSettings, sample
from .modeling import InferenceModel as Generator
from .modeling import check_finished_run, load_inference_model, resolve_device
from .prompts import Prompt, PromptReport
from .prompts import read_prompts as read_prompts_file

SIDE_BY_SIDE_MIN_WIDTH = 80
# Prompts are answered in chunks of this many batches, each printed and written when it is done:
# enough rows for length sorting to pay, soon enough that answers appear and Ctrl-C loses little.
CHUNK_BATCHES = 4


def load_generator(path: str, base: Optional[str], device_name: str, dtype_name: str) -> Generator:
    """``generate MODEL [--base BASE]``: an adapter directory on its base (or BASE), else a plain model."""
    if base and not (Path(path) / "adapter_config.json").is_file():
        check_finished_run(Path(path))  # an interrupted training run: name its checkpoint, not the flag
        raise LoraDpoError(f"--base applies to adapter directories, and {path} holds no adapter_config.json. "
                           "Fix: drop --base, or point at an adapter directory")
    return load_inference_model(base or path, path if base else None, device=device_name, dtype=dtype_name)


def prompt_text(prompt: Text) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def format_answers(answers: dict[str, str], width: int) -> str:
    """Answers under their labels; two answers go side by side when ``width`` columns allow it."""
    if len(answers) == 2 and width >= SIDE_BY_SIDE_MIN_WIDTH:
        column = (width - 3) // 2
        wrapped = [[label] + ["-" * min(column, len(label))] + _wrap(text, column) for label, text in answers.items()]
        return "\n".join(f"{left:<{column}} | {right}".rstrip() for left, right in zip_longest(*wrapped, fillvalue=""))
    return "\n".join(f"--- {label}\n{text}" for label, text in answers.items())


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width) or [""]
    return lines


def check_output_file(path: Path) -> None:
    """--output is opened only after the model has loaded (minutes for a large one): check it first."""
    if path.is_dir():
        raise LoraDpoError(f"--output {path} is a directory. Fix: give a file path, e.g. {path / 'answers.jsonl'}")
    if not path.parent.is_dir():
        raise LoraDpoError(f"--output {path}: the directory {path.parent} does not exist. Fix: create it")


def read_prompts(texts: list[str], prompts_file: Optional[str], column: str, on_bad_row: str = "error") -> list[Prompt]:
    """--prompt texts (indices 0..k-1), then the prompts of --prompts (indices k + their index in
    the file): each prompt's index names its random streams."""
    if any(not text.strip() for text in texts):
        raise LoraDpoError("--prompt: a prompt is empty. Fix: give it text")
    found = [Prompt(index, text, f"--prompt {index + 1}") for index, text in enumerate(texts)]
    if prompts_file:
        report = PromptReport()
        for prompt in read_prompts_file(prompts_file, column=column, on_bad_row=on_bad_row, report=report):
            found.append(Prompt(len(texts) + prompt.index, prompt.text, prompt.where))
        if report.skipped:
            print(f"# {report.summary()}", file=sys.stderr)
    if not found:
        raise LoraDpoError("no prompts. Fix: pass --prompt TEXT or --prompts FILE")
    return found


def run_generate_command(args: Any) -> int:
    """``lora-dpo generate``: answers printed to stdout, and written to --output as JSON lines.

    Under ``accelerate launch`` each process loads the model on its own device and answers every
    ``count``-th prompt of each chunk; the main process prints and writes them all, in order. An
    answer's random stream is named by its prompt's index, so the answers are those of one process."""
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                args.repetition_penalty, args.seed, args.num_samples, tuple(args.stop))
    settings.check()
    if args.batch_size < 1:
        raise LoraDpoError(f"--batch-size {args.batch_size}: must be at least 1")
    prompts = read_prompts(args.prompt, args.prompts, args.prompt_column, args.on_bad_row)
    chat = [prompt for prompt in prompts if isinstance(prompt.text, list)]
    if args.no_chat_template and chat:
        raise LoraDpoError(f"{chat[0].where}: the prompt is a list of chat messages but --no-chat-template was given. "
                           "Fix: give plain-text prompts, or drop --no-chat-template")
    if args.output:
        check_output_file(Path(args.output))
    processes = launched_processes(resolve_device(args.device, "--device"))
    generator = load_generator(args.model, args.base, processes.device, args.dtype)
    if args.compare and not generator.has_adapter:
        raise LoraDpoError(f"--compare needs an adapter directory, and {args.model} holds no adapter_config.json. "
                           "Fix: point at the adapter (the training run's output.dir), or drop --compare")
    ids = []
    for prompt in prompts:
        try:
            ids.append(encode_prompt(generator.tokenizer, prompt.text, chat_template=not args.no_chat_template))
        except DataError as exc:  # a chat prompt for a tokenizer without a chat template
            raise DataError(f"{prompt.where}: {exc}") from None
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    labels = ("base", "adapter") if args.compare else ("response",)
    main = processes.is_main
    if main:
        print(f"# {generator.description}")

    from tqdm.auto import tqdm

    n = settings.num_samples
    chunk = max(1, args.batch_size // n) * CHUNK_BATCHES
    show_bar = not args.no_progress and sys.stderr.isatty() and main
    output = Path(args.output).open("w", encoding="utf-8") if args.output and main else None
    try:
        with tqdm(total=len(prompts) * len(labels), desc="generate", unit="prompt", dynamic_ncols=True,
                  leave=False, disable=not show_bar) as bar:
            for start in range(0, len(prompts), chunk):
                part = prompts[start:start + chunk]
                mine = processes.shard(len(part))  # every prompt of the chunk, alone
                answers = {}
                for label in labels:
                    # The base's answers: the same model with the adapter switched off, same streams.
                    off = generator.model.disable_adapter() if label == "base" else contextlib.nullcontext()
                    with off:
                        found = sample(generator.model, generator.tokenizer, [ids[start + k] for k in mine],
                                       settings, prompt_indices=[part[k].index for k in mine],
                                       batch_size=args.batch_size, progress=bar)
                    answers[label] = processes.gather_items([[answer.text for answer in got] for got in found],
                                                            len(part))
                if not main:
                    continue
                for k, prompt in enumerate(part):
                    texts = {label: answers[label][k] for label in labels}
                    tqdm.write(format_prompt(start + k, len(prompts), prompt.text, texts, width))
                    if output is not None:
                        values = {label: texts[label][0] if n == 1 else texts[label] for label in labels}
                        output.write(json.dumps({"prompt": prompt.text, **values}, ensure_ascii=False) + "\n")
                if output is not None:
                    output.flush()
    finally:
        if output is not None:
            output.close()
    return 0


def format_prompt(position: int, total: int, prompt: Text, texts: dict[str, list[str]], width: int) -> str:
    """A prompt and its answers as printed: one answer under the prompt, --compare's two side by
    side, several samples numbered."""
    lines = [f"\n### prompt {position + 1}/{total}\n{prompt_text(prompt)}\n"]
    n = len(next(iter(texts.values())))
    for j in range(n):
        numbered = {f"{label} {j + 1}/{n}" if n > 1 else label: answers[j] for label, answers in texts.items()}
        if len(numbered) == 2:
            lines.append(format_answers(numbered, width))
        elif n > 1:
            lines.append(format_answers(numbered, 0))
        else:
            lines.append(next(iter(numbered.values())))
    return "\n".join(lines)
