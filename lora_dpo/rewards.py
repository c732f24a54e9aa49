"""Scoring answers: a reward model or a Python function, behind one small interface.

Every backend has ``score(prompts, answers) -> list[float]`` (one number per (prompt, answer),
higher is better, batched inside), a ``name`` for logs and audit columns, and ``close()`` to free
its memory (one GPU: generate with the policy, free it, then load the reward model)::

    from lora_dpo.rewards import load_reward

    reward = load_reward("OpenAssistant/reward-model-deberta-v3-large-v2", device="cuda", batch_size=16)
    reward = load_reward("my_rewards.py:brevity")        # or "package.module:function"
    scores = reward.score([prompt.text] * 4, answers)    # prompts: strings or chat message lists
    reward.close()

``load_reward(spec, ...)`` picks the backend from the spec: ``module:function`` or
``path/to/file.py:function`` is a function, anything else a reward-model directory or hub id.

The reward model (``RewardModel``) is any ``AutoModelForSequenceClassification`` checkpoint with
one output (``num_labels`` 1; others are refused, as is a model without a trained classification
head, whose scores would be random). It is scored with its own tokenizer and chat template: the
prompt as the user turn (or the prompt's own messages), the answer as the assistant turn,
rendered as text and tokenized without adding special tokens when the rendered text already
starts with BOS, so BOS is never doubled. A tokenizer without a chat template gets the plain
(prompt, answer) text pair, the convention of text-pair reward models. Batches are sorted by
length and right-padded with an id that no row of the batch contains: transformers' classifier
reads the rightmost token that is not the pad id, and with the usual pad = EOS a row ending in
EOS would otherwise be read one token early; right padding also keeps every row's positions as
when scored alone, so scores do not depend on the batch. Inputs longer than ``max_length`` keep
their last tokens (the classifier reads the end) and are counted in ``truncated``. 4-bit
(bitsandbytes NF4, imported only then) is optional; the head stays unquantized.

The function backend (``FunctionReward``) calls ``function(prompt, answer) -> float`` once per
answer, with the prompt as the prompt file holds it (a string or a list of chat messages). A
missing module, file or function, something that is not callable, an exception, and a return
value that is not a finite number each stop with one line naming the spec and what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from .data import Text
from .errors import LoraDpoError, one_line

log = logging.getLogger(__name__)

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"


class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[float]:
        """One score per (prompt, answer), in order."""

    def close(self) -> None:
        """Free the memory the backend holds (a no-op for functions)."""


def is_function_spec(spec: str) -> bool:
    """``module.path:function`` or ``file.py:function`` (not a model directory or hub id)."""
    match = re.fullmatch(rf"(.+):({_IDENTIFIER})", spec)
    if not match:
        return False
    target = match.group(1)
    return target.endswith(".py") or re.fullmatch(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*", target) is not None


def load_reward(spec: str, *, device: Any = "auto", four_bit: bool = False, batch_size: int = 8,
                flag: str = "--reward") -> Reward:
    """A function for ``module:function`` / ``file.py:function``, else a reward model loaded from
    the directory or hub id ``spec``. ``flag`` names the option in error messages."""
    if is_function_spec(spec):
        if four_bit:
            raise LoraDpoError(f"{flag} {spec} is a Python function, so 4-bit loading does not apply. "
                               "Fix: drop the 4-bit option, or give a reward model")
        return load_function(spec, flag)
    return load_reward_model(spec, device=device, four_bit=four_bit, batch_size=batch_size, flag=flag)


# ---------------------------------------------------------------------------------------------
# Python functions


class FunctionReward:
    """Scores with ``function(prompt, answer) -> float``."""

    def __init__(self, function: Callable[[Text, str], Any], name: str, flag: str = "--reward"):
        self.function = function
        self.name = name
        self.flag = flag

    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        return [self._one(prompt, answer) for prompt, answer in zip(prompts, answers)]

    def _one(self, prompt: Text, answer: str) -> float:
        where = f"for the prompt {_preview(prompt)}"
        try:
            value = self.function(prompt, answer)
        except Exception as exc:  # the user's code: report it as one line, --debug shows the traceback
            raise LoraDpoError(f"{self.flag} {self.name} raised {type(exc).__name__}: {one_line(exc)} {where}. "
                               "Fix: correct the function (--debug shows the traceback)") from exc
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise LoraDpoError(f"{self.flag} {self.name} returned {shown} ({type(value).__name__}) {where}. "
                               "Fix: return a finite number (int or float)")
        return number

    def close(self) -> None:
        pass


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None  # True is an int to Python, but almost certainly a mistake as a reward
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return _as_number(value.item())
    return None


def _preview(prompt: Text, limit: int = 40) -> str:
    if isinstance(prompt, list):
        prompt = prompt[-1]["content"] if prompt else ""
    text = " ".join(prompt.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def load_function(spec: str, flag: str = "--reward") -> FunctionReward:
    """Import ``module:function`` (the current directory first on the import path, as
    ``python -m`` has it) or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise LoraDpoError(f"{flag} {spec}: {path} not found (looked in {Path.cwd()}). Fix: check the path")
        module_spec = importlib.util.spec_from_file_location(f"_lora_dpo_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            raise LoraDpoError(f"{flag} {spec}: running {path} failed ({type(exc).__name__}: {one_line(exc)}). "
                               f"Fix: run python {path} to see the whole error") from exc
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                raise LoraDpoError(f"{flag} {spec}: no module named '{exc.name}' (looked in {Path.cwd()} and the "
                                   f"installed packages). Fix: check the name, run from the directory that holds "
                                   f"it, or give a file: path/to/file.py:{name}") from None
            raise LoraDpoError(f"{flag} {spec}: importing {target} failed ({one_line(exc)}). "
                               "Fix: install what it names") from exc
        except Exception as exc:
            raise LoraDpoError(f"{flag} {spec}: importing {target} failed ({type(exc).__name__}: {one_line(exc)}). "
                               f"Fix: run python -c 'import {target}' to see the whole error") from exc
        finally:
            if added:
                sys.path.remove(os.getcwd())
    if not hasattr(module, name):
        defined = sorted(key for key, value in vars(module).items()
                         if callable(value) and not key.startswith("_") and getattr(value, "__module__", None) == module.__name__)
        has = f" (it defines {', '.join(defined)})" if defined else ""
        raise LoraDpoError(f"{flag} {spec}: {target} has no '{name}'{has}. Fix: name a function defined there")
    function = getattr(module, name)
    if not callable(function):
        raise LoraDpoError(f"{flag} {spec}: {target}.{name} is a {type(function).__name__}, not a function. "
                           "Fix: point at a function taking (prompt, answer) and returning a number")
    return FunctionReward(function, spec, flag)


# ---------------------------------------------------------------------------------------------
# Reward models


class RewardModel:
    """A loaded sequence-classification model with one output, and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, batch_size: int = 8, max_length: Optional[int] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length or _max_length(model, tokenizer)
        self.truncated = 0
        """How many scored inputs were longer than ``max_length`` and lost their first tokens."""
        bos = getattr(tokenizer, "bos_token", None)
        self._bos = bos if isinstance(bos, str) and bos else None

    def encode(self, prompt: Text, answer: str) -> list[int]:
        """Token ids the model scores for one (prompt, answer)."""
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
            # A template that writes BOS itself must not get a second one from the tokenizer.
            has_bos = self._bos is not None and text.startswith(self._bos)
            return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]
        if isinstance(prompt, list):
            raise LoraDpoError(f"{self.name}: the reward model's tokenizer has no chat template, and the prompts are "
                               "chat messages. Fix: use a reward model with a chat template, or plain-text prompts")
        return tokenizer(prompt, answer)["input_ids"]

    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[float]:
        import torch

        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        rows = []
        for prompt, answer in zip(prompts, answers):
            ids = self.encode(prompt, answer)
            if len(ids) > self.max_length:
                self.truncated += 1
                if self.truncated == 1:
                    log.warning("%s: an input of %d tokens is longer than the reward model's %d; its first tokens "
                                "are dropped (counted in truncated)", self.name, len(ids), self.max_length)
                ids = ids[-self.max_length:]
            rows.append(ids)
        scores = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda k: -len(rows[k]))
        device = _model_device(self.model)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                values = self._forward([rows[k] for k in batch], device)
                for k, value in zip(batch, values):
                    scores[k] = value
        return scores

    def _forward(self, rows: list[list[int]], device: Any) -> list[float]:
        import torch

        pad = _absent_id(rows, self.tokenizer, self.model)
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):  # right padding: positions as when the row is scored alone
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        configs = {id(c): c for c in (self.model.config, _text_config(self.model.config))}.values()
        saved = [(config, getattr(config, "pad_token_id", None)) for config in configs]
        for config, _ in saved:
            config.pad_token_id = pad
        try:
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        finally:
            for config, value in saved:
                config.pad_token_id = value
        return logits[:, 0].float().tolist()

    def close(self) -> None:
        import gc

        import torch

        device = _model_device(self.model)
        del self.model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _absent_id(rows: list[list[int]], tokenizer: Any, model: Any) -> int:
    """A padding id no row holds, so the classifier's "rightmost non-pad token" is each row's last."""
    present = {token for ids in rows for token in ids}
    preferred = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id]
    for candidate in [c for c in preferred if c is not None] + list(range(_text_config(model.config).vocab_size)):
        if candidate not in present:
            return candidate
    raise ValueError("every vocabulary id occurs in the batch")  # needs a batch longer than the vocabulary


def _max_length(model: Any, tokenizer: Any) -> int:
    limits = [getattr(tokenizer, "model_max_length", None), getattr(_text_config(model.config), "max_position_embeddings", None)]
    limits = [int(limit) for limit in limits if isinstance(limit, (int, float)) and 0 < limit < 1_000_000]
    return min(limits) if limits else 4096


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def load_reward_model(spec: str, *, device: Any = "auto", four_bit: bool = False, batch_size: int = 8,
                      flag: str = "--reward") -> RewardModel:
    """Load a reward model (directory or hub id) after checking its config: one output, a trained
    sequence-classification head. Computes in bfloat16/float16 on a GPU, float32 on CPU."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from .config import ModelConfig
    from .errors import ConfigError
    from .modeling import four_bit_config, resolve_compute_dtype, resolve_device

    if batch_size < 1:
        raise LoraDpoError(f"{flag} batch size {batch_size}: must be at least 1")
    fix = f"give {flag} a reward model (a sequence-classification model with one output) or module:function"
    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        where = "this directory" if Path(spec).exists() else "the hub (or it is not a local directory)"
        raise LoraDpoError(f"{flag} {spec}: cannot read a model config from {where} ({one_line(exc)}). Fix: {fix}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise LoraDpoError(f"{flag} {spec}: not a reward model (its architectures: {', '.join(architectures) or 'none named'}"
                           "), so its scoring head would be random. Fix: " + fix)
    if config.num_labels != 1:
        raise LoraDpoError(f"{flag} {spec}: the model has {config.num_labels} outputs (num_labels {config.num_labels}), "
                           "a reward model has one. Fix: " + fix)
    if isinstance(device, str):
        device = resolve_device(device, flag + " device")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise LoraDpoError(f"{flag} {spec}: cannot load its tokenizer ({one_line(exc)}). Fix: {fix}") from None
    dtype = resolve_compute_dtype(ModelConfig(name_or_path=spec), device)
    kwargs: dict[str, Any] = dict(dtype=dtype, device_map={"": str(device)}, output_loading_info=True)
    if four_bit:
        try:
            quantization = four_bit_config(ModelConfig(name_or_path=spec), dtype)
        except ConfigError:
            raise LoraDpoError(f"{flag} 4-bit needs the bitsandbytes package. Fix: pip install bitsandbytes, "
                               "or load the reward model in 16-bit") from None
        quantization.llm_int8_skip_modules = ["score", "classifier"]  # the head is tiny and decides the score
        kwargs["quantization_config"] = quantization
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoraDpoError(f"{flag} {spec}: cannot load the reward model ({one_line(exc)}). Fix: {fix}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise LoraDpoError(f"{flag} {spec}: the checkpoint lacks {len(missing)} weights (first: {missing[0]}), which "
                           "would start random. Fix: " + fix)
    return RewardModel(model, tokenizer, name=spec, batch_size=batch_size)
