"""Offline tokenizers that carry the chat templates of real model families.

The vocabulary is the demo's byte-level BPE tokenizer (lora_dpo/demo.py) with each family's
special tokens added; the templates are the families' own Jinja text, stored in
tests/data/chat_templates/ as their tokenizers ship them (tokenizer_config.json / chat_template.jinja):

    llama3_1.jinja      meta-llama/Llama-3.1-8B-Instruct
    qwen2_5.jinja       Qwen/Qwen2.5-7B-Instruct
    qwen3.jinja         Qwen/Qwen3-8B
    gemma2.jinja        google/gemma-2-9b-it (the same text as Gemma 1)
    gemma3.jinja        google/gemma-3-*-it
    mistral_v0_3.jinja  mistralai/Mistral-7B-Instruct-v0.3
    chatml.jinja        the generic ChatML template (OpenHermes and many fine-tunes)

Token ids differ from the real models'; where text is cut, and what each template renders, do not.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Style:
    template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    turn_end: str
    """The token that ends an assistant turn."""
    after_turn: str
    """What the template writes after it."""
    answer_lead: str = ""
    """Text the template writes between the generation prompt and the answer (the model generates it)."""
    added_tokens: tuple[str, ...] = ()
    """Added tokens that are not special (Qwen3's think tags)."""
    generation_options: dict[str, Any] = field(default_factory=dict)
    """What a generation call passes to the template to ask for a plain answer."""


QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")

STYLES = {
    "llama3": Style("llama3_1", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                 "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                    bos="<|begin_of_text|>", eos="<|eot_id|>", turn_end="<|eot_id|>", after_turn=""),
    "qwen2.5": Style("qwen2_5", QWEN_TOKENS, bos=None, eos="<|im_end|>", turn_end="<|im_end|>", after_turn="\n"),
    "qwen3": Style("qwen3", QWEN_TOKENS, bos=None, eos="<|im_end|>", turn_end="<|im_end|>", after_turn="\n",
                   added_tokens=("<think>", "</think>"), generation_options={"enable_thinking": False}),
    "gemma2": Style("gemma2", GEMMA_TOKENS, bos="<bos>", eos="<eos>", turn_end="<end_of_turn>", after_turn="\n"),
    "gemma3": Style("gemma3", GEMMA_TOKENS, bos="<bos>", eos="<eos>", turn_end="<end_of_turn>", after_turn="\n"),
    "mistral": Style("mistral_v0_3", ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                      "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
                     bos="<s>", eos="</s>", turn_end="</s>", after_turn="", answer_lead=" "),
    "chatml": Style("chatml", ("<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>", turn_end="<|im_end|>",
                    after_turn="\n"),
}


@functools.lru_cache(maxsize=None)
def _vocabulary() -> Any:
    from lora_dpo.demo import build_tokenizer, corpus_texts

    return build_tokenizer(corpus_texts())  # about a second: trained once, copied per style


def demo_tokenizer() -> Any:
    """The demo tokenizer itself (ChatML-like template, BOS on plain text), a fresh copy."""
    return copy.deepcopy(_vocabulary())


def style_tokenizer(name: str) -> Any:
    """A fresh tokenizer of the named style (a copy: tests may change it)."""
    style = STYLES[name]
    tokenizer = copy.deepcopy(_vocabulary())
    tokenizer.add_special_tokens({"additional_special_tokens": list(style.special_tokens)})
    if style.added_tokens:
        tokenizer.add_tokens(list(style.added_tokens))
    tokenizer.bos_token = style.bos
    tokenizer.eos_token = style.eos
    tokenizer.chat_template = (TEMPLATES / f"{style.template}.jinja").read_text(encoding="utf-8")
    return tokenizer


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}
