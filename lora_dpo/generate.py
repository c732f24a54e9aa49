"""Trying a model out: sample answers from a model (a base or a merged model) or from a base +
adapter, for one prompt or a file of prompts, optionally base and adapter side by side.

An adapter directory is run the way it was trained: the base loaded as the run's config.yaml says
(4-bit NF4 when training was 4-bit) with the adapter on top, unmerged. ``--compare`` answers each
prompt twice with that one model, once with the adapter switched off, so the comparison costs no
second copy of the base; both answers use the same seed, so their difference is the adapter's.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, Optional

import torch

from .data import RowError, Text, check_text_field, read_rows
from .errors import DataError, LoraDpoError
from .modeling import InferenceModel as Generator
from .modeling import check_finished_run, load_inference_model

SIDE_BY_SIDE_MIN_WIDTH = 80


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    """0 decodes greedily."""
    top_p: float = 0.9
    top_k: int = 50
    """0 disables top-k."""
    repetition_penalty: float = 1.0
    seed: int = 0

    def check(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "--max-new-tokens", "must be at least 1"),
            (self.temperature >= 0, "--temperature", "must be >= 0 (0 decodes greedily)"),
            (0 < self.top_p <= 1, "--top-p", "must be in (0, 1]"),
            (self.top_k >= 0, "--top-k", "must be >= 0 (0 disables it)"),
            (self.repetition_penalty > 0, "--repetition-penalty", "must be positive (1 disables it)"),
        ]
        for ok, flag, message in checks:
            if not ok:
                raise LoraDpoError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))}: {message}")

    def generation_config(self, tokenizer: Any, model: Any) -> Any:
        from transformers import GenerationConfig

        # Stop at the tokenizer's EOS and at every EOS the model's own generation config names (chat
        # models often end turns with a token other than the tokenizer's eos_token).
        eos = [tokenizer.eos_token_id]
        named = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += named if isinstance(named, list) else [named] if named is not None else []
        settings: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                                        eos_token_id=sorted(set(eos)), pad_token_id=tokenizer.pad_token_id)
        if self.temperature > 0:
            settings.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            settings.update(do_sample=False)
        return GenerationConfig(**settings)


def load_generator(path: str, base: Optional[str], device_name: str, dtype_name: str) -> Generator:
    """``generate MODEL [--base BASE]``: an adapter directory on its base (or BASE), else a plain model."""
    if base and not (Path(path) / "adapter_config.json").is_file():
        check_finished_run(Path(path))  # an interrupted training run: name its checkpoint, not the flag
        raise LoraDpoError(f"--base applies to adapter directories, and {path} holds no adapter_config.json. "
                           "Fix: drop --base, or point at an adapter directory")
    return load_inference_model(base or path, path if base else None, device=device_name, dtype=dtype_name)


def read_prompts(prompts: list[str], prompts_file: Optional[str], column: str) -> list[Text]:
    """--prompt texts, then the prompts of --prompts: a .txt file (one per line) or data file rows."""
    found: list[Text] = [p for p in prompts if p.strip()]
    if len(found) != len(prompts):
        raise LoraDpoError("--prompt: a prompt is empty. Fix: give it text")
    if prompts_file:
        path = Path(prompts_file)
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise LoraDpoError(f"{path}: file not found. Fix: check --prompts")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise LoraDpoError(f"{path}: not UTF-8 text (byte {exc.start}). Fix: re-save the file as UTF-8") from None
            found += [line for line in text.splitlines() if line.strip()]
        else:
            for where, row in read_rows(prompts_file):
                if not isinstance(row, dict) or column not in row:
                    raise DataError(f"{where}: no '{column}' field. Fix: set --prompt-column to the prompt's column")
                try:
                    found.append(check_text_field(row[column], column))
                except RowError as exc:
                    raise DataError(exc.message(where)) from None
    if not found:
        raise LoraDpoError("no prompts. Fix: pass --prompt TEXT or --prompts FILE")
    return found


def prompt_ids(tokenizer: Any, prompt: Text, chat_template: bool) -> list[int]:
    """Token ids of a prompt as training rendered it: through the chat template when there is one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not (chat_template and has_template):
        why = "--no-chat-template was given" if has_template else "the tokenizer has no chat template"
        raise LoraDpoError(f"a prompt is a list of chat messages but {why}. Fix: give plain-text prompts"
                           + (", or drop --no-chat-template" if has_template else ""))
    if chat_template and has_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds BOS itself
    return tokenizer(prompt)["input_ids"]


def generate_answer(generator: Generator, ids: list[int], settings: SamplingSettings, seed: int) -> str:
    torch.manual_seed(seed)
    input_ids = torch.tensor([ids], device=generator.device)
    with torch.no_grad():
        output = generator.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          generation_config=settings.generation_config(generator.tokenizer, generator.model))
    return generator.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


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


def run_generate_command(args: Any) -> int:
    """``lora-dpo generate``: answers printed to stdout, and written to --output as JSON lines."""
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                args.repetition_penalty, args.seed)
    settings.check()
    prompts = read_prompts(args.prompt, args.prompts, args.prompt_column)
    output = None
    if args.output:
        check_output_file(Path(args.output))
    generator = load_generator(args.model, args.base, args.device, args.dtype)
    if args.compare and not generator.has_adapter:
        raise LoraDpoError(f"--compare needs an adapter directory, and {args.model} holds no adapter_config.json. "
                           "Fix: point at the adapter (the training run's output.dir), or drop --compare")
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    print(f"# {generator.description}")
    if args.output:
        output = Path(args.output).open("w", encoding="utf-8")
    try:
        for index, prompt in enumerate(prompts):
            ids = prompt_ids(generator.tokenizer, prompt, chat_template=not args.no_chat_template)
            seed = settings.seed + index
            if args.compare:
                with generator.model.disable_adapter():
                    base_answer = generate_answer(generator, ids, settings, seed)
                answers = {"base": base_answer, "adapter": generate_answer(generator, ids, settings, seed)}
            else:
                answers = {"response": generate_answer(generator, ids, settings, seed)}
            print(f"\n### prompt {index + 1}/{len(prompts)}\n{prompt_text(prompt)}\n")
            print(format_answers(answers, width) if args.compare else answers["response"])
            if output is not None:
                output.write(json.dumps({"prompt": prompt, **answers}, ensure_ascii=False) + "\n")
                output.flush()
    finally:
        if output is not None:
            output.close()
    return 0
