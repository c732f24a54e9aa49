"""The offline demo: a tokenizer and a tiny Llama-style model built here, and a bundled
preference set with a preference a tiny model can learn (kind, helpful answers over rude ones).

Everything is built from code and the bundled files, so the demo and the tests never need the
network. The same builders make the tiny models of the test suite.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]

TRAIN_TOPICS = [
    "bread", "bicycles", "the moon", "tea", "gardening", "chess", "rivers", "volcanoes", "music",
    "painting", "birds", "the ocean", "maps", "clocks", "bees", "trains", "cheese", "knitting",
    "photography", "mountains", "rain", "kites", "soup", "libraries", "bridges", "stars", "dogs",
    "cats", "forests", "deserts", "poetry", "running", "swimming", "coffee", "robots", "boats",
]
EVAL_TOPICS = ["castles", "apples", "snow", "guitars", "owls", "islands", "pottery", "lighthouses"]

PROMPTS = [
    "Can you tell me about {t}?",
    "I want to learn about {t}. Where should I start?",
    "What is interesting about {t}?",
    "Could you explain {t} simply?",
    "Give me a tip about {t}.",
    "Why do people like {t}?",
]
KIND_OPENERS = ["Of course!", "Happy to help!", "Great question!", "Sure thing!", "I would love to help."]
KIND_BODIES = [
    "{T} is a wonderful subject, and it is easy to start.",
    "Many people enjoy {t}, and you can too.",
    "There is a lot to discover about {t}.",
    "{T} has a long and friendly history.",
]
KIND_STEPS = [
    "A good first step is to read a short book about {t}.",
    "Try watching a gentle video about {t}.",
    "Practise a little every day and be patient with yourself.",
    "Ask a friend who knows about {t} to show you.",
]
KIND_CLOSERS = ["I hope this helps!", "Good luck, and have fun!", "Feel free to ask more.", "Enjoy learning!"]
RUDE_OPENERS = ["Ugh.", "No.", "Whatever.", "Seriously?", "Not this again."]
RUDE_BODIES = [
    "{T} is boring and I do not care.",
    "Nobody wants to hear about {t}.",
    "Figure out {t} yourself.",
    "Why would I waste time on {t}?",
]
RUDE_CLOSERS = ["Stop asking me.", "Go away.", "Leave me alone.", "Do not bother me again."]


def _fragments(pools: Iterable[list[str]]) -> list[str]:
    """The fixed parts of the demo's phrases (topic slots cut out), longest first."""
    parts = set()
    for pool in pools:
        for template in pool:
            for piece in template.replace("{T}", "{t}").split("{t}"):
                piece = piece.strip(" .,!?")
                if len(piece) >= 4:
                    parts.add(piece.lower())
    return sorted(parts, key=len, reverse=True)


KIND_FRAGMENTS = _fragments([KIND_OPENERS, KIND_BODIES, KIND_STEPS, KIND_CLOSERS])
RUDE_FRAGMENTS = _fragments([RUDE_OPENERS, RUDE_BODIES, RUDE_CLOSERS])


def kindness(prompt: Any, answer: str) -> float:
    """The demo's rule-based judge: phrases of the kind answers found in ``answer`` minus phrases of
    the rude ones. A reward for ``collect rank`` and a judge for ``eval`` (``lora_dpo.demo:kindness``);
    it knows only the demo's phrases, so it says nothing about real models. The prompt is unused."""
    text, score = answer.lower(), 0
    # Longest phrases first, each match cut out, so "yourself" inside a kind phrase is not also rude.
    for part, sign in sorted([(p, 1) for p in KIND_FRAGMENTS] + [(p, -1) for p in RUDE_FRAGMENTS],
                             key=lambda item: len(item[0]), reverse=True):
        score += sign * text.count(part)
        text = text.replace(part, "|")
    return float(score)


def _fill(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[0].upper() + topic[1:])


def demo_pairs(topics: list[str], count: int, seed: int) -> list[dict[str, Any]]:
    """Chat-format pairs: the chosen answer is kind and helpful, the rejected one rude."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic = rng.choice(topics)
        kind = " ".join(_fill(rng.choice(pool), topic) for pool in (KIND_OPENERS, KIND_BODIES, KIND_STEPS, KIND_CLOSERS))
        rude = " ".join(_fill(rng.choice(pool), topic) for pool in (RUDE_OPENERS, RUDE_BODIES, RUDE_CLOSERS))
        rows.append({
            "prompt": [{"role": "user", "content": _fill(rng.choice(PROMPTS), topic)}],
            "chosen": [{"role": "assistant", "content": kind}],
            "rejected": [{"role": "assistant", "content": rude}],
        })
    return rows


def write_demo_data(directory: str | Path) -> tuple[Path, Path]:
    """data/demo/train.jsonl (train topics) and eval.jsonl (unseen topics), deterministic."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, rows in zip(paths, (demo_pairs(TRAIN_TOPICS, 480, seed=1), demo_pairs(EVAL_TOPICS, 64, seed=2))):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def corpus_texts() -> list[str]:
    """Text the demo tokenizer is trained on: every string the demo data can contain, and more."""
    texts = []
    for topic in TRAIN_TOPICS + EVAL_TOPICS:
        for pool in (PROMPTS, KIND_OPENERS, KIND_BODIES, KIND_STEPS, KIND_CLOSERS, RUDE_OPENERS, RUDE_BODIES, RUDE_CLOSERS):
            texts.extend(_fill(template, topic) for template in pool)
    texts.append("The quick brown fox jumps over the lazy dog. 0123456789 user assistant system")
    return texts


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer with BOS, EOS (<|im_end|>), padding and a ChatML-style template.

    Byte-level, so any text (any language, any bytes) encodes; BOS is added to plain prompts by
    the post-processor, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def build_tiny_model(tokenizer: Any, arch: str = "llama", hidden_size: int = 128, layers: int = 4,
                     seed: int = 0) -> Any:
    """A random-init causal LM with a real architecture, sized for CPU seconds (every dimension a
    multiple of 64, as bitsandbytes' 4-bit blocks need)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = -(-len(tokenizer) // 64) * 64
    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def pretrain(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], steps: int, seed: int = 0,
             batch_size: int = 16, learning_rate: float = 3e-3) -> list[float]:
    """Teach the random model to talk like the demo data, kind and rude answers alike, so the base
    has both styles and DPO visibly moves it from one to the other. Plain next-token training of
    the full model in float32; a few hundred steps take seconds on a CPU. Returns the losses."""
    import torch

    texts = [tokenizer.apply_chat_template(conversation, tokenize=False) for conversation in conversations]
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20) * (1 - step / steps))
    losses = []
    model.train()
    for _ in range(steps):
        picked = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        length = max(len(rows[i]) for i in picked)
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)  # padding is not learnt
        for row, index in enumerate(picked):
            input_ids[row, : len(rows[index])] = torch.tensor(rows[index])
            labels[row, : len(rows[index])] = torch.tensor(rows[index])
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_demo_base(directory: str | Path, arch: str = "llama", hidden_size: int = 128, layers: int = 4,
                    seed: int = 0, pretrain_steps: int = 0) -> Path:
    """Save a tokenizer and tiny model to ``directory`` as a normal Hugging Face model folder,
    pre-trained for ``pretrain_steps`` on the demo conversations (0: random weights)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(corpus_texts())
    model = build_tiny_model(tokenizer, arch=arch, hidden_size=hidden_size, layers=layers, seed=seed)
    if pretrain_steps:
        rows = demo_pairs(TRAIN_TOPICS, 480, seed=1)
        conversations = [row["prompt"] + row[side] for row in rows for side in ("chosen", "rejected")]
        pretrain(model, tokenizer, conversations, pretrain_steps, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
