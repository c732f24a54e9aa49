#!/usr/bin/env python
"""Throughput and peak memory of lora-dpo's training step, and of TRL's DPOTrainer on the same inputs.

Builds everything itself, offline: a random-init Llama of the 1B or 8B shape of
docs/bench-reference.md (or a tiny one for a CPU smoke run), saved once with save_pretrained
(under /dev/shm when it has room, else the temp directory), a word-level tokenizer in which
every word is one token, and synthetic pairs of the reference lengths. Then, in this order:

1. lora-dpo: ``lora_dpo.train.DpoStep``, the training loop's own step (collate with the chosen
   layout, the eval-mode reference pass or a precomputed ``ReferenceTable``, the policy pass, the
   loss, backward, gradient clipping, the optimizer and scheduler steps, the per-step metrics), on
   the model ``load_model`` builds, timed for every (layout, reference mode) asked for;
2. TRL (when ``from trl import DPOTrainer`` and a tiny ``datasets`` map work, the ``bench``
   extra): ``DPOTrainer`` with peft LoRA on the same 4-bit base, the same pairs in the same order,
   reference computed every step or precomputed;
3. lora-dpo's diagnostics: the layouts' agreement (--check-layouts), the per-part breakdown steps
   and one profiled configuration (--profile). Last, so that a time limit cuts these, not TRL.

Step time is the interval between consecutive step ends, each read after synchronising the GPU,
over the steps after warm-up. Tokens/s counts 2 x prompt + chosen + rejected tokens per pair.
Peak memory is reset after the model is loaded. A configuration that fails (out of memory under
--memory-cap-gib, a TRL error) is reported as such and the others still run; the JSON report is
rewritten after every configuration. Usage: ``python scripts/bench.py --help``; results and the
exact commands are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from lora_dpo.batching import LAYOUTS, collate, pair_logps  # noqa: E402
from lora_dpo.config import load_config  # noqa: E402
from lora_dpo.data import DataReport, PreferenceExample, TokenizedPair, tokenize_examples  # noqa: E402
from lora_dpo.errors import LoraDpoError  # noqa: E402
from lora_dpo.modeling import (  # noqa: E402
    autocast_for, load_model, load_tokenizer, resolve_compute_dtype, resolve_device, trainable_parameters,
)
from lora_dpo.reference_cache import reference_logps_for  # noqa: E402

REFERENCE_MODES = ("every_step", "precomputed")


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    words: int
    """Tokenizer words w3..w{words-1}; ids 0-2 are <unk>, <s>, </s>."""
    micro_batch: int
    prompt: tuple[int, int]
    """Prompt tokens (BOS included), uniform in this range."""
    response: tuple[int, int]
    """Tokens of each response (EOS included), uniform in this range."""
    max_length: int
    max_prompt_length: int


SHAPES = {
    # CPU smoke: seconds, and no timing claims.
    "tiny": Shape(512, 64, 256, 2, 4, 2, True, 512, 2, (8, 24), (8, 40), 64, 32),
    # Llama-3.2-1B and Llama-3-8B shapes (docs/bench-reference.md).
    "1b": Shape(128256, 2048, 8192, 16, 32, 8, True, 32000, 4, (64, 384), (64, 512), 1024, 512),
    "8b": Shape(128256, 4096, 14336, 32, 32, 8, False, 32000, 2, (64, 384), (64, 512), 1024, 512),
}


def long_rows(shape: Shape) -> Shape:
    """The long-row variant: micro-batch 1, max_length doubled, prompt and responses ~U(3/4, 1) of
    the old max_length; for the 1B and 8B shapes: ~U(768, 1024) each, max_length 2048. (The tiny
    shape gets its own small analogue, which keeps the CPU smoke run in seconds.)"""
    length = shape.max_length
    return dataclasses.replace(shape, micro_batch=1, prompt=(length * 3 // 4, length), response=(length * 3 // 4, length),
                               max_length=2 * length, max_prompt_length=length)


# ---------------------------------------------------------------------------------------------
# Model, tokenizer and pairs


def default_model_root(shape_name: str, shape: Shape) -> Path:
    """Where an earlier run built this shape already; else /dev/shm when it can hold the model
    (containers often give it 64 MB), else the temp directory."""
    shm, temp = Path("/dev/shm"), Path(tempfile.gettempdir())
    for root in (shm, temp):
        if is_built(root / f"lora-dpo-bench-{shape_name}", shape):
            return root
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.2 * model_bytes(shape):
        return shm
    return temp


def model_bytes(shape: Shape) -> int:
    """Size of the bf16 checkpoint of ``shape``."""
    h, i = shape.hidden_size, shape.intermediate_size
    attention = 2 * h * h + 2 * h * (h // shape.heads) * shape.kv_heads
    embeddings = shape.vocab_size * h * (1 if shape.tied else 2)
    return 2 * (shape.layers * (attention + 3 * h * i) + embeddings)


def build_tokenizer(words: int) -> Any:
    """Word-level: one token per word ``w3`` .. ``w{words-1}``, so every length is exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    # Registered as special tokens, "</s>" splits off a word it is glued to ("w7</s>"), which is how
    # TRL appends EOS to a response text.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 20)


STAMP = "bench-shape.json"


def model_spec(shape: Shape) -> dict[str, Any]:
    """What decides the saved model (pair lengths and micro-batch do not)."""
    return {k: v for k, v in dataclasses.asdict(shape).items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "tied", "words")}


def is_built(directory: Path, shape: Shape) -> bool:
    stamp = directory / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == model_spec(shape)


def build_model_dir(shape_name: str, shape: Shape, root: Path) -> Path:
    """Save a random-init Llama of ``shape`` and its tokenizer once; later runs reuse the directory."""
    directory = root / f"lora-dpo-bench-{shape_name}"
    if is_built(directory, shape):
        return directory
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied, max_position_embeddings=4096, rope_theta=500000.0,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    # Random weights are right for speed and memory and say nothing about quality. Initialised on
    # the GPU when there is one (an 8B model takes minutes to initialise on a CPU).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    build_tokenizer(shape.words).save_pretrained(directory)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    (directory / STAMP).write_text(json.dumps(model_spec(shape)))  # last: a half-written directory is never reused
    return directory


def make_rows(shape: Shape, count: int, seed: int) -> list[dict[str, str]]:
    """Random word pairs with exact token lengths; responses start with a space so that TRL's
    prompt + response concatenation splits into the same words."""
    rng = random.Random(seed)

    def words(tokens: int) -> str:  # one token of the range is BOS (prompt) or EOS (response)
        return " ".join(f"w{rng.randrange(3, shape.words)}" for _ in range(tokens - 1))

    rows = []
    for _ in range(count):
        prompt = words(rng.randint(*shape.prompt))
        chosen, rejected = words(rng.randint(*shape.response)), words(rng.randint(*shape.response))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def tokenize_rows(rows: list[dict[str, str]], tokenizer: Any, shape: Shape) -> list[TokenizedPair]:
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"pair {i}") for i, r in enumerate(rows)]
    pairs = tokenize_examples(examples, tokenizer, shape.max_length, shape.max_prompt_length, DataReport("bench"))
    if len(pairs) != len(rows):
        raise RuntimeError("synthetic pairs were dropped in tokenization")
    return pairs


# ---------------------------------------------------------------------------------------------
# Measurement helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def steady_state(ends: list[float], step_tokens: list[int], warmup: int) -> dict[str, float]:
    """Mean step time and tokens/s over the steps after warm-up, from synchronised step-end times."""
    seconds = ends[-1] - ends[warmup - 1]
    timed = len(ends) - warmup
    return {"s_per_step": seconds / timed, "tokens_per_s": sum(step_tokens[warmup:]) / seconds}


class DeviceMemory:
    """What the CUDA caching allocator does not see, sampled at step ends: the CUDA context (with
    the kernels loaded lazily since), bitsandbytes' paged optimizer state (managed memory) and
    anything else on the card. One cudaMemGetInfo per step, after the step's own synchronise."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.outside = device, None

    def sample(self) -> None:
        if self.device.type != "cuda":
            return
        free, total = torch.cuda.mem_get_info(self.device)
        outside = (total - free - torch.cuda.memory_reserved(self.device)) / 2**30
        self.outside = outside if self.outside is None else max(self.outside, outside)


def optimizer_state_gib(optimizer: Any) -> dict[str, float]:
    """Bytes of optimizer state, and how much of it bitsandbytes keeps in paged (managed) memory,
    which torch's peak counters never include."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps TRL's
    total = paged = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                size = value.numel() * value.element_size()
                total += size
                paged += size if getattr(value, "is_paged", False) else 0
    return {"optimizer_state_gib": total / 2**30, "paged_optimizer_gib": paged / 2**30}


def lora_settings(model: Any) -> dict[str, Any]:
    """The adapter as it trains: its weights' dtype and the LoRA dropout probability (0 when the
    dropout module is an Identity or was switched off)."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    dropout = 0.0
    for name, module in model.named_modules():
        if ".lora_dropout." in name and isinstance(module, torch.nn.Dropout):
            dropout = max(dropout, module.p)
    return {"adapter_dtype": "+".join(dtypes), "lora_dropout": dropout}


def apply_memory_cap(cap_gib: float, device: torch.device) -> dict[str, Any]:
    """Limit the caching allocator so that it and the CUDA context together fit ``cap_gib`` (the
    memory of a smaller card): ``set_per_process_memory_fraction((cap - context) / total)``. The
    context is measured first, after a bf16 matmul has loaded cuBLAS: device memory in use minus
    what the allocator holds (so it includes anything else on the card). Paged optimizer state is
    managed memory outside the cap; the memory table reports it with the context."""
    if device.type != "cuda":
        return {"memory_cap_gib": cap_gib, "memory_cap_applied": False}
    probe = torch.ones(256, 256, device=device, dtype=torch.bfloat16)
    (probe @ probe).sum().item()
    del probe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    cap = memory_cap(cap_gib, free, total, torch.cuda.memory_reserved(device))
    torch.cuda.set_per_process_memory_fraction(cap["fraction"], device)
    return cap


def memory_cap(cap_gib: float, free: int, total: int, reserved: int) -> dict[str, Any]:
    """The allocator fraction that leaves room for the CUDA context within ``cap_gib``, from one
    cudaMemGetInfo reading (bytes) and what the allocator holds at that moment."""
    context = total - free - reserved
    allowed = cap_gib * 2**30 - context
    if allowed <= 0:
        raise LoraDpoError(f"--memory-cap-gib {cap_gib:g}: the CUDA context alone takes {context / 2**30:.2f} GiB. "
                           "Fix: raise --memory-cap-gib")
    if allowed > total:
        raise LoraDpoError(f"--memory-cap-gib {cap_gib:g} is more than the card's {total / 2**30:.1f} GiB. "
                           "Fix: lower --memory-cap-gib or leave it out")
    return {"memory_cap_gib": cap_gib, "memory_cap_applied": True, "cuda_context_gib": context / 2**30,
            "allocator_limit_gib": allowed / 2**30, "card_gib": total / 2**30, "fraction": allowed / total}


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# lora-dpo


def lora_dpo_config(args: argparse.Namespace, shape: Shape, model_dir: Path, work: Path) -> Any:
    train_file = work / "pairs.jsonl"
    if not train_file.is_file():
        train_file.write_text("", encoding="utf-8")  # the config needs a data file; the pairs are built here
    return load_config(None, [
        f"model.name_or_path={model_dir}",
        f"model.device={args.device}",
        f"model.gradient_checkpointing={str(not args.no_gradient_checkpointing).lower()}",
        f"model.attn_implementation={args.attn}",
        f"model.checkpoint_layers={'null' if args.checkpoint_layers is None else args.checkpoint_layers}",
        f"model.compile={str(args.compile).lower()}",
        f"data.train_file={train_file}",
        f"data.max_length={shape.max_length}",
        f"data.max_prompt_length={shape.max_prompt_length}",
        "lora.r=16", "lora.alpha=32", "lora.dropout=0.05", "lora.target_modules=all-linear",
        f"train.micro_batch_size={shape.micro_batch}",
        "train.gradient_accumulation_steps=1",
        f"train.optim={args.optim}",
        "train.learning_rate=5e-6",
        "train.max_grad_norm=1.0",
        "train.lr_scheduler=constant",
        "train.warmup_steps=0",
        "dpo.beta=0.1",
    ])


def layout_agreement(model: Any, pairs: list[TokenizedPair], layouts: list[str], autocast: Any, pad_id: int,
                     chunk_size: int, pack_length: int | None, seed: int) -> list[dict[str, Any]]:
    """How far each layout's per-pair log-probs and LoRA gradients are from the padded layout's, on
    one micro-batch in the compute dtype: the tolerance the fast paths have on this device.

    The adapter gets small random B matrices first (B starts at zero, which would leave every A
    gradient zero and the comparison half empty) and its weights are put back afterwards. Eval
    mode, so LoRA dropout draws no different masks per layout; the gradient is that of a weighted
    sum of the log-probs with a random weight per pair and side, so a token scored into the wrong
    pair or side shows.
    """
    generator = torch.Generator().manual_seed(seed)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, param in params.items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    weights = torch.randn(2, len(pairs), generator=generator)
    was_training = model.training
    model.eval()
    measured = {}
    try:
        for layout in ["padded", *[name for name in layouts if name != "padded"]]:
            model.zero_grad(set_to_none=True)
            batch = collate(pairs, pad_id, layout=layout, pack_length=pack_length).to(next(iter(params.values())).device)
            with autocast:
                logps = pair_logps(model, batch, chunk_size)
            values = torch.cat([logps.chosen, logps.rejected]).float()
            (values * weights.flatten().to(values.device)).sum().backward()
            grads = torch.cat([params[name].grad.float().flatten() for name in sorted(params)])
            measured[layout] = (values.detach().cpu(), grads.cpu())
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    want_values, want_grads = measured["padded"]
    rows = []
    for layout, (values, grads) in measured.items():
        if layout == "padded":
            continue
        difference = (values - want_values).abs()
        rows.append({"layout": layout, "max_abs_logp_diff": float(difference.max()),
                     "max_rel_logp_diff": float((difference / want_values.abs().clamp_min(1e-6)).max()),
                     "grad_rel_diff": float((grads - want_grads).norm() / want_grads.norm().clamp_min(1e-12)),
                     "mean_abs_logp": float(want_values.abs().mean())})
    return rows


def agreement_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| layout | max abs logp diff | max rel logp diff | grad rel diff (L2) | mean abs logp (padded) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['max_abs_logp_diff']:.2e} | {r['max_rel_logp_diff']:.2e} | "
                     f"{r['grad_rel_diff']:.2e} | {r['mean_abs_logp']:,.1f} |")
    return "\n".join(lines)


class PhaseClock:
    """Handed to DpoStep as its ``phase`` callback: synchronises the GPU at the end of each part of a
    step and adds up the seconds per part. The syncs cost a little overlap, so phase times come
    from extra steps after the timed ones, never from the timed steps themselves."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.enabled, self.last = device, False, 0.0
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        synchronize(self.device)
        self.enabled, self.last, self.seconds = True, time.perf_counter(), {}

    def __call__(self, name: str) -> None:
        if self.enabled:
            synchronize(self.device)
            now = time.perf_counter()
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
            self.last = now


class Report:
    """Everything measured so far, as the JSON report holds it; ``save`` rewrites the file
    (atomically) after every configuration, so a run that is killed keeps what finished."""

    def __init__(self, path: Path | None, **fields: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {**fields, "results": [], "failures": [], "layout_agreement": []}
        self.phase = "lora-dpo timing"

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.data["results"]

    def add(self, row: dict[str, Any]) -> None:
        self.results.append(row)
        self.save()

    def fail(self, impl: str, layout: str, reference: str, exc: BaseException, note: str = "") -> None:
        """Record a configuration that did not finish; the traceback goes to stderr (the log)."""
        oom = is_out_of_memory(exc)
        if not oom:
            traceback.print_exception(exc, file=sys.stderr)
        self.data["failures"].append({"impl": impl, "layout": layout, "reference": reference,
                                      "kind": "out of memory" if oom else "error", "error": one_line(exc) + note})
        print(f"  {impl} {layout} {reference}: {'out of memory' if oom else 'failed'}: {one_line(exc)}",
              file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        add_ratios(self.results)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(partial, self.path)


class LoraDpoBench:
    """lora-dpo's side of the comparison. Its configurations share one loaded model (unloaded
    while TRL runs, loaded again for the diagnostics); each starts from the same adapter weights
    with a fresh optimizer, scheduler, scaler and peak-memory count."""

    def __init__(self, args: argparse.Namespace, shape: Shape, model_dir: Path, pairs: list[TokenizedPair],
                 work: Path, device: torch.device) -> None:
        self.args, self.shape, self.pairs, self.work, self.device = args, shape, pairs, work, device
        self.config = lora_dpo_config(args, shape, model_dir, work)
        self.compute_dtype = resolve_compute_dtype(self.config.model, device)
        self.tokenizer = load_tokenizer(self.config.model)
        self.model: Any = None
        self.initial: dict[str, torch.Tensor] | None = None
        mb = shape.micro_batch
        self.timed_steps = args.warmup + args.steps
        self.batches = [list(range(index * mb, (index + 1) * mb)) for index in range(self.timed_steps)]
        # After the timed pairs: the pairs of the breakdown steps (at least two batches, for the profile).
        first = self.timed_steps * mb
        self.diagnostic_pairs = pairs[first:]
        self.diagnostic_batches = [list(range(index * mb, (index + 1) * mb))
                                   for index in range(len(self.diagnostic_pairs) // mb)]

    def load(self) -> None:
        if self.model is not None:
            return
        self.model = load_model(self.config, self.device)
        self.model.train()
        if self.initial is None:
            # Every configuration starts from this adapter; the copy waits on the CPU so that it
            # does not count towards GPU memory.
            self.initial = {name: p.detach().to("cpu", copy=True)
                            for name, p in self.model.named_parameters() if p.requires_grad}

    def unload(self) -> None:
        self.model = None
        reset_memory(self.device)

    def fresh_step(self, layout: str, phase: Any = None) -> Any:
        from lora_dpo.train import DpoStep, build_optimizer, build_scheduler  # the training loop's own parts

        config, model = self.config, self.model
        config.data.layout, config.data.pack_length = layout, self.args.pack_length
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.initial:
                    param.copy_(self.initial[name])
        optimizer = build_optimizer(config, trainable_parameters(model), self.device)
        scheduler = build_scheduler(config, optimizer, 0, self.timed_steps + len(self.diagnostic_batches) + 1)
        scaler = torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None
        return DpoStep(config, model, optimizer, scheduler, scaler, self.device, self.tokenizer.pad_token_id, phase=phase)

    def reference_table(self, pairs: list[TokenizedPair], layout: str, reference_mode: str, name: str) -> Any:
        if reference_mode != "precomputed":
            return None
        # A fresh cache directory per configuration: this times the pass, not a file read.
        return reference_logps_for(self.model, pairs, self.config.model, self.compute_dtype, self.tokenizer.pad_token_id,
                                   self.work / name, micro_batch_size=self.shape.micro_batch, layout=layout,
                                   chunk_size=self.config.dpo.logps_chunk_size, pack_length=self.args.pack_length)

    def timed(self, report: Report) -> None:
        """Every (reference mode, layout) asked for; a row per configuration as soon as it is measured."""
        self.load()
        for reference_mode in self.args.reference:
            for layout in self.args.layouts:
                try:
                    row = self.timed_configuration(layout, reference_mode)
                    report.add(row)
                    print(f"  lora-dpo {layout:<21} {reference_mode:<11} {row['s_per_step']:.3f} s/step",
                          file=sys.stderr, flush=True)
                except TimeUp:
                    raise
                except Exception as exc:  # out of memory under a cap, a non-finite loss: the others still run
                    report.fail("lora-dpo", layout, reference_mode, exc)
                reset_memory(self.device)

    def timed_configuration(self, layout: str, reference_mode: str) -> dict[str, Any]:
        args, pairs, mb = self.args, self.pairs, self.shape.micro_batch
        # Counted before the clock runs: the loop never collates a batch twice.
        row_tokens = [collate([pairs[i] for i in batch], self.tokenizer.pad_token_id, layout=layout,
                              pack_length=args.pack_length).input_ids.numel() for batch in self.batches[args.warmup:]]
        step = self.fresh_step(layout)
        reset_memory(self.device)
        outside = DeviceMemory(self.device)
        prep_started = time.perf_counter()
        table = self.reference_table(pairs[: self.timed_steps * mb], layout, reference_mode, f"reference-{layout}")
        synchronize(self.device)
        prep_s = time.perf_counter() - prep_started
        ends, step_tokens = [], []
        for index, batch in enumerate(self.batches):
            metrics, _, bad = step(pairs, [batch], table)
            ends.append(time.perf_counter())  # DpoStep synchronises the GPU before it returns
            outside.sample()
            step_tokens.append(metrics["tokens"])
            if bad:
                raise RuntimeError(f"lora-dpo {layout}/{reference_mode}: non-finite loss at step {index}")
        row = {"impl": "lora-dpo", "layout": layout, "reference": reference_mode, "micro_batch": mb,
               **steady_state(ends, step_tokens, args.warmup), **peak_memory(self.device),
               "outside_allocator_gib": outside.outside, **optimizer_state_gib(step.optimizer),
               "row_tokens_per_step": sum(row_tokens) / args.steps, "prep_s": prep_s,
               "final_loss": metrics["loss"], **lora_settings(self.model), "phase_s": None}
        return row

    def diagnostics(self, report: Report) -> None:
        """After TRL: the layouts' agreement, the breakdown steps of every configuration that has a
        row, and the profile of one configuration."""
        args = self.args
        rows = [r for r in report.results if r["impl"] == "lora-dpo"]
        if not (args.check_layouts or (args.breakdown_steps and rows) or args.profile):
            return
        self.load()
        if args.check_layouts:
            report.phase = "the layouts' agreement check"
            mb = self.shape.micro_batch
            agreement = layout_agreement(self.model, self.pairs[:mb], LAYOUTS, autocast_for(self.device, self.compute_dtype),
                                         self.tokenizer.pad_token_id, self.config.dpo.logps_chunk_size,
                                         args.pack_length, args.seed)
            dtype = str(self.compute_dtype).removeprefix("torch.")
            report.data["layout_agreement"] = [{**row, "dtype": dtype} for row in agreement]
            report.save()
            reset_memory(self.device)
        profile_key = tuple(args.profile_config)
        for row in rows:
            key = (row["layout"], row["reference"])
            if not args.breakdown_steps and not (args.profile and key == profile_key):
                continue
            report.phase = f"the diagnostics of lora-dpo {key[0]}/{key[1]}"
            print(f"  diagnostics of lora-dpo {key[0]}/{key[1]}", file=sys.stderr, flush=True)
            try:
                self.diagnose(row, profile=args.profile if key == profile_key else None)
            except TimeUp:
                raise
            except Exception as exc:
                report.fail("lora-dpo", key[0], key[1], exc, note=" (in the breakdown or profile steps; its timed row stands)")
            report.save()
            reset_memory(self.device)

    def diagnose(self, row: dict[str, Any], profile: Path | None) -> None:
        args, layout, reference_mode = self.args, row["layout"], row["reference"]
        pairs, batches = self.diagnostic_pairs, self.diagnostic_batches
        clock = PhaseClock(self.device)
        step = self.fresh_step(layout, phase=clock)
        table = self.reference_table(pairs, layout, reference_mode, f"reference-diagnostics-{layout}")
        step(pairs, [batches[0]], table)  # untimed: the fresh optimizer allocates its state here
        if args.breakdown_steps:
            clock.start()
            for batch in batches[: args.breakdown_steps]:
                step(pairs, [batch], table)
            clock.enabled = False  # the profile below is of the step as timed, without the clock's syncs
            row["phase_s"] = {name: seconds / args.breakdown_steps for name, seconds in clock.seconds.items()} or None
            print(f"  breakdown {layout:<20} {reference_mode:<11} done", file=sys.stderr, flush=True)
        if profile:
            profile_steps(step, pairs, batches[:2], table, self.device, profile / f"lora-dpo-{layout}-{reference_mode}.txt")
            row["profile"] = f"lora-dpo-{layout}-{reference_mode}.txt"
            print(f"  profile   {layout:<20} {reference_mode:<11} done", file=sys.stderr, flush=True)


def profile_steps(step: Any, pairs: list[TokenizedPair], batches: list[list[int]], table: Any, device: torch.device,
                  path: Path) -> None:
    """Two more steps under torch.profiler; the operators that took the most time go to ``path``.
    No record_shapes: on the 8B shape that alone makes ~250k events and tens of seconds to export."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for batch in batches:
            step(pairs, [batch], table)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60) + "\n")


# ---------------------------------------------------------------------------------------------
# TRL (optional; imported only here)


def trl_problem() -> str | None:
    """None when TRL's DPOTrainer can run here; else why not, in one line. TRL imports lazily, so
    ``import trl`` succeeds without ``datasets``, ``dill``, ``multiprocess`` or ``pyarrow``: this
    imports the trainer itself and maps a one-row dataset (which fingerprints with dill)."""
    try:
        import datasets
        from trl import DPOConfig, DPOTrainer  # noqa: F401

        datasets.disable_progress_bars()
        mapped = datasets.Dataset.from_list([{"prompt": "w3", "chosen": " w4", "rejected": " w5"}]).map(
            lambda row: {"length": len(row["prompt"])})
        if mapped[0]["length"] != 2:
            return "datasets.Dataset.map returned a wrong row"
    except Exception as exc:  # any import or runtime failure means: no TRL rows, say why
        return one_line(exc)
    return None


@contextlib.contextmanager
def quiet_trl() -> Any:
    """TRL and transformers' Trainer print to stdout (metrics dicts, notices) and draw progress bars:
    send the prints to stderr, with the run's log, and turn the bars off, so stdout holds tables only."""
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def run_trl(args: argparse.Namespace, shape: Shape, model_dir: Path, rows: list[dict[str, str]],
            pairs: list[TokenizedPair], work: Path, device: torch.device, report: Report) -> None:
    """TRL's DPOTrainer with peft LoRA (r=16, alpha 32, dropout 0.05, all-linear) on the same 4-bit
    base and pairs; the reference is the base with adapters disabled, every step or precomputed at
    trainer creation. Each reference mode's row goes to ``report`` as soon as it is measured; a mode
    that fails is recorded and the next one still runs."""
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from lora_dpo.modeling import keep_cpu_4bit_trainable

    datasets.disable_progress_bars()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    config_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    # With sequential sampling TRL takes the pairs in the order lora-dpo does, so both count the
    # same tokens per step; without it (older transformers) the mean pair stands in.
    sequential = "train_sampling_strategy" in config_fields
    mb = shape.micro_batch

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.outside = DeviceMemory(device)

        def on_step_end(self, *unused: Any, **unused_kwargs: Any) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())
            self.outside.sample()

    for reference_mode in args.reference:
        report.phase = f"TRL {reference_mode}"
        model = trainer = None
        try:
            with quiet_trl():
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
                # TRL gets its own model per mode, loaded from the same files (the 8B load is most of
                # the mode's preparation, outside its timed steps).
                model = AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=compute_dtype, device_map={"": str(device)}, attn_implementation=args.attn,
                    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=compute_dtype),
                )
                if device.type == "cpu":
                    keep_cpu_4bit_trainable(model)
                reset_memory(device)
                settings = dict(
                    output_dir=str(work / f"trl-{reference_mode}"), per_device_train_batch_size=mb,
                    gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=5e-6,
                    beta=0.1, max_length=shape.max_length, bf16=bf16, fp16=False,
                    gradient_checkpointing=not args.no_gradient_checkpointing,
                    optim="paged_adamw_8bit" if args.optim == "paged_adamw_8bit" else "adamw_torch",
                    max_grad_norm=1.0, precompute_ref_log_probs=reference_mode == "precomputed",
                    precompute_ref_batch_size=mb, report_to="none", save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, use_cpu=device.type == "cpu",
                )
                # TRL's default (disable_dropout=True) zeroes every dropout, LoRA's too: keep the
                # reference settings' 0.05, as lora-dpo trains.
                if "disable_dropout" in config_fields:
                    settings["disable_dropout"] = False
                if sequential:
                    settings["train_sampling_strategy"] = "sequential"
                clock = StepClock()
                prep_started = time.perf_counter()
                # Precomputing, TRL hashes the whole reference state dict on the CPU (10-20 s on the 8B
                # shape); that counts in prep_s, never in the timed steps.
                trainer = DPOTrainer(
                    model=model, args=DPOConfig(**settings), processing_class=tokenizer,
                    train_dataset=datasets.Dataset.from_list(rows[: mb * (args.warmup + args.steps)]),
                    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                           task_type="CAUSAL_LM"),
                    callbacks=[clock],
                )
                trainer.remove_callback(PrinterCallback)  # it prints a metrics dict
                synchronize(device)
                prep_s = time.perf_counter() - prep_started  # tokenization, peft wrapping and any reference pass
                adapter = lora_settings(trainer.model)  # after TRL's casts and dropout settings
                trainer.train()
            if sequential:
                step_tokens = [sum(p.num_tokens for p in pairs[s * mb : (s + 1) * mb]) for s in range(len(clock.ends))]
            else:
                mean = sum(p.num_tokens for p in pairs) / len(pairs)
                step_tokens = [round(mean * mb)] * len(clock.ends)
            report.add({
                "impl": f"trl {trl.__version__}", "layout": "trl", "reference": reference_mode, "micro_batch": mb,
                **steady_state(clock.ends, step_tokens, args.warmup), **peak_memory(device),
                "outside_allocator_gib": clock.outside.outside, **optimizer_state_gib(trainer.optimizer),
                "row_tokens_per_step": None, "prep_s": prep_s, "tokens_exact": sequential, **adapter,
            })
            print(f"  trl {reference_mode:<11} {report.results[-1]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
        except TimeUp:
            raise
        except Exception as exc:  # TRL's failure never costs lora-dpo's rows
            report.fail(f"trl {trl.__version__}", "trl", reference_mode, exc)
        finally:
            del trainer, model
            reset_memory(device)


# ---------------------------------------------------------------------------------------------
# Report


def add_ratios(results: list[dict[str, Any]]) -> None:
    """vs_trl: lora-dpo's tokens/s over TRL's with the same reference mode and micro-batch (None
    where TRL has no such row)."""
    trl = {(r["reference"], r.get("micro_batch")): r["tokens_per_s"] for r in results if r["impl"].startswith("trl")}
    for r in results:
        key = (r["reference"], r.get("micro_batch"))
        mine = not r["impl"].startswith("trl")
        r["vs_trl"] = r["tokens_per_s"] / trl[key] if mine and key in trl else None


def number(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    head = ["impl", "layout", "reference", "s/step", "tokens/s", "peak alloc GiB", "peak reserved GiB",
            "row tokens/step", "prep s", "vs TRL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ratio = "n/a" if r.get("vs_trl") is None else f"{r['vs_trl']:.2f}x"
        lines.append("| " + " | ".join([
            r["impl"], r["layout"], r["reference"], number(r["s_per_step"], 3), number(r["tokens_per_s"], 0),
            number(r["peak_allocated_gib"], 2), number(r["peak_reserved_gib"], 2),
            number(r["row_tokens_per_step"], 0), number(r["prep_s"], 2), ratio,
        ]) + " |")
    return "\n".join(lines)


def memory_table(results: list[dict[str, Any]], cap: dict[str, Any]) -> str:
    """On a GPU: peak reserved memory beside what the allocator does not see, and whether the sum
    fits the card the cap stands for."""
    limit = cap.get("memory_cap_gib")
    head = ["impl", "layout", "reference", "peak reserved GiB", "outside allocator GiB", "of which paged optimizer GiB",
            "total GiB"] + ([f"fits {limit:g} GiB"] if limit else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        reserved, outside = r.get("peak_reserved_gib"), r.get("outside_allocator_gib")
        total = None if reserved is None or outside is None else reserved + outside
        cells = [r["impl"], r["layout"], r["reference"], number(reserved, 2), number(outside, 2),
                 number(r.get("paged_optimizer_gib"), 3), number(total, 2)]
        if limit:
            cells.append("n/a" if total is None else ("yes" if total <= limit else "no"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_table(results: list[dict[str, Any]]) -> str:
    """Milliseconds per part of a lora-dpo step (from the breakdown steps), and each part's share."""
    rows = [r for r in results if r.get("phase_s")]
    if not rows:
        return ""
    names = [n for n in ("collate", "reference", "policy", "backward", "update") if any(n in r["phase_s"] for r in rows)]
    lines = ["| layout | reference | " + " | ".join(f"{n} ms" for n in names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        total = sum(r["phase_s"].values())
        cells = [f"{r['phase_s'][n] * 1e3:,.0f} ({r['phase_s'][n] / total:.0%})" if n in r["phase_s"] else "-"
                 for n in names]
        lines.append(f"| {r['layout']} | {r['reference']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The tables and their header lines, from a report as --json writes it (also for --show)."""
    s = report["settings"]
    results = report["results"]
    add_ratios(results)
    lines = [f"{s['shape']}{' (long rows)' if s['long_rows'] else ''}, {report['device']}, {report['date']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"{s['micro_batch']} pairs/step, mean {s['mean_tokens_per_pair']:.0f} tokens/pair (2 x prompt + chosen + "
             f"rejected), gradient checkpointing {s['checkpointing']}, {s['optim']}, {s['attn']}"
             + (", lora-dpo layers compiled" if s["compile"] else "")
             + (f", PYTORCH_CUDA_ALLOC_CONF={s['cuda_alloc_conf']}" if s["cuda_alloc_conf"] else "")]
    adapters = {}
    for r in results:
        if "adapter_dtype" in r:
            adapters.setdefault(r["impl"], f"{r['impl']} {r['adapter_dtype']} with dropout {r['lora_dropout']:g}")
    if adapters:
        lines.append("LoRA r=16, alpha 32, all linear layers; adapter weights: " + "; ".join(adapters.values()))
    lines.append(f"TRL: {s['trl']}")
    cap = s.get("memory_cap") or {}
    if cap.get("memory_cap_applied"):
        lines.append(f"Memory cap {cap['memory_cap_gib']:g} GiB: CUDA context {cap['cuda_context_gib']:.2f} GiB, so the "
                     f"allocator is limited to {cap['allocator_limit_gib']:.2f} GiB of the {cap['card_gib']:.0f} GiB card "
                     "(set_per_process_memory_fraction); paged optimizer state is managed memory outside that limit.")
    elif cap:
        lines.append(f"Memory cap {cap['memory_cap_gib']:g} GiB: not applied (no CUDA device).")
    if report["device"].startswith("CPU"):
        lines.append("CPU run: a smoke test of the code paths; these timings say nothing about GPU throughput.")
    if s.get("partial"):
        lines.append(f"PARTIAL: {s['partial']}.")
    for f in report["failures"]:
        lines.append(f"FAILED: {f['impl']} {f['layout']} {f['reference']}: {f['kind']}: {f['error']}")
    lines += ["", table(results)]
    if any(r.get("peak_reserved_gib") is not None for r in results):
        lines += ["", "Device memory: peak reserved, and the most seen outside the allocator at a step end "
                      "(CUDA context, lazily loaded kernels, paged optimizer state):", "", memory_table(results, cap)]
    agreement = report["layout_agreement"]
    if agreement:
        lines += ["", f"Each layout against padded on the first micro-batch, {agreement[0]['dtype']}:", "",
                  agreement_table(agreement)]
    phases = phase_table(results)
    if phases:
        lines += ["", f"lora-dpo step parts, mean of {s['breakdown_steps']} steps synchronised after each part "
                      "(run after TRL, each after one untimed step):", "", phases]
    return "\n".join(lines)


def environment(device: torch.device, trl_status: str | None) -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    if trl_status is None:
        import datasets
        import trl

        versions["trl"], versions["datasets"] = trl.__version__, datasets.__version__
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} logical cores)"
    return {"date": datetime.date.today().isoformat(), "device": card, "versions": versions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b",
                        help="model shape (tiny: CPU smoke, no timing claims)")
    parser.add_argument("--long-rows", action="store_true",
                        help="prompt and responses ~U(768,1024), max_length 2048, micro-batch 1 (tiny: ~U(48,64), 128)")
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=at_least(1), default=3,
                        help="untimed steps first (at least 1: the first timed interval starts at the end of warm-up)")
    parser.add_argument("--breakdown-steps", type=at_least(0), default=2,
                        help="lora-dpo steps after TRL, with the GPU synchronised after each part of the step, for the "
                             "per-part times (collate, reference, policy, backward, update); 0 skips them")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also profile two lora-dpo steps of one configuration (--profile-config) with torch.profiler "
                             "and write the top operators to DIR/lora-dpo-LAYOUT-REFERENCE.txt")
    parser.add_argument("--profile-config", default=None, metavar="LAYOUT:REFERENCE",
                        help="the configuration --profile profiles (default: the last of --layouts, the first of --reference)")
    parser.add_argument("--check-layouts", action="store_true",
                        help="also measure how far every layout's log-probs and gradients are from padded's")
    parser.add_argument("--micro-batch", type=at_least(1), default=None,
                        help="pairs per step (default: 4 for 1b, 2 for 8b)")
    parser.add_argument("--layouts", default="padded,prefix_shared,packed_prefix_shared",
                        help=f"comma-separated lora-dpo batch layouts ({', '.join(LAYOUTS)})")
    parser.add_argument("--pack-length", type=at_least(1), default=None,
                        help="row width of the packed layouts (default: the longest sequence of each micro-batch)")
    parser.add_argument("--reference", default="every_step,precomputed",
                        help="comma-separated reference modes: every_step, precomputed")
    parser.add_argument("--skip-trl", action="store_true", help="do not run TRL even when it is installed")
    parser.add_argument("--skip-lora-dpo", action="store_true", help="run only TRL")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="limit the CUDA caching allocator to this many GiB minus the CUDA context, as on a card of "
                             "that size (set_per_process_memory_fraction), for lora-dpo and TRL alike")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel for both")
    parser.add_argument("--optim", choices=["paged_adamw_8bit", "adamw"], default="paged_adamw_8bit")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="turn checkpointing off for both")
    parser.add_argument("--compile", action="store_true",
                        help="lora-dpo only: torch.compile each decoder layer (model.compile); raise --warmup so the "
                             "compiles stay out of the timed steps")
    parser.add_argument("--checkpoint-layers", type=at_least(0), default=None,
                        help="lora-dpo only: checkpoint just the first N decoder layers (model.checkpoint_layers); "
                             "TRL keeps checkpointing every layer")
    parser.add_argument("--model-root", type=Path, default=None, help="where the random model is saved (default: where this shape was built before, else "
                             "/dev/shm when it has room for it, else the temp directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here as JSON (rewritten after every configuration)")
    parser.add_argument("--show", type=Path, default=None, metavar="JSON",
                        help="print the tables of a report written by --json, and exit")
    args = parser.parse_args(argv)
    if args.no_gradient_checkpointing and args.checkpoint_layers is not None:
        parser.error("--checkpoint-layers needs gradient checkpointing; drop --no-gradient-checkpointing")
    if args.memory_cap_gib is not None and args.memory_cap_gib <= 0:
        parser.error(f"--memory-cap-gib must be positive, got {args.memory_cap_gib:g}")
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    args.reference = [name.strip() for name in args.reference.split(",") if name.strip()]
    for name in args.layouts:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    for name in args.reference:
        if name not in REFERENCE_MODES:
            parser.error(f"--reference: unknown mode {name!r}; choose from {', '.join(REFERENCE_MODES)}")
    if args.profile_config is None:
        args.profile_config = [args.layouts[-1] if args.layouts else "", args.reference[0] if args.reference else ""]
    else:
        layout, _, mode = args.profile_config.partition(":")
        if layout not in args.layouts or mode not in args.reference:
            parser.error(f"--profile-config {args.profile_config}: give LAYOUT:REFERENCE from --layouts "
                         f"({','.join(args.layouts)}) and --reference ({','.join(args.reference)})")
        args.profile_config = [layout, mode]
    return args


def checkpointing(args: argparse.Namespace) -> str:
    if args.no_gradient_checkpointing:
        return "off"
    if args.checkpoint_layers is not None:
        return f"on (lora-dpo: first {args.checkpoint_layers} layers only)"
    return "on"


def at_least(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum``, refused at parsing (exit 2) rather than after the
    model is built."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def quiet_libraries() -> None:
    """Keep stderr to the bench's own progress lines: no loading bars or deprecation notices."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        print(render(json.loads(args.show.read_text())))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    shape = long_rows(SHAPES[args.shape]) if args.long_rows else SHAPES[args.shape]
    if args.micro_batch is not None:
        shape = dataclasses.replace(shape, micro_batch=args.micro_batch)
    try:
        device = resolve_device(args.device, "--device")
    except LoraDpoError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    # Checked before anything is built: a TRL that cannot run is known (and said) at once.
    trl_status = "skipped (--skip-trl)" if args.skip_trl else trl_problem()
    run_trl_too = trl_status is None
    model_dir = build_model_dir(args.shape, shape, args.model_root or default_model_root(args.shape, shape))
    # Pairs: warm-up and timed steps, then at least two micro-batches for the breakdown and profile steps.
    count = shape.micro_batch * (args.warmup + args.steps + max(args.breakdown_steps, 2))
    rows = make_rows(shape, count, args.seed)
    pairs = tokenize_rows(rows, build_tokenizer(shape.words), shape)
    info = environment(device, trl_status)
    mean_tokens = sum(p.num_tokens for p in pairs) / len(pairs)
    settings = {"shape": args.shape, "long_rows": args.long_rows, **dataclasses.asdict(shape),
                "steps": args.steps, "warmup": args.warmup, "gradient_checkpointing": not args.no_gradient_checkpointing,
                "checkpointing": checkpointing(args), "optim": args.optim, "attn": args.attn,
                "pack_length": args.pack_length, "checkpoint_layers": args.checkpoint_layers, "compile": args.compile,
                "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                "breakdown_steps": args.breakdown_steps, "profile_config": ":".join(args.profile_config),
                "mean_tokens_per_pair": mean_tokens, "seed": args.seed, "memory_cap": None,
                "trl": "ran" if run_trl_too else f"not run: {trl_status}", "partial": None}
    report = Report(args.json, **info, settings=settings)
    if trl_status and not args.skip_trl:
        print(f"bench: TRL cannot run here ({trl_status}); lora-dpo only", file=sys.stderr, flush=True)
    print(f"bench: {args.shape}{' long rows' if args.long_rows else ''} on {info['device']}, "
          f"{shape.micro_batch} pairs/step, {args.warmup} warm-up + {args.steps} timed steps, model in {model_dir}",
          file=sys.stderr, flush=True)
    status = 0
    previous_handler = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        if args.memory_cap_gib is not None:
            settings["memory_cap"] = apply_memory_cap(args.memory_cap_gib, device)
        with tempfile.TemporaryDirectory(prefix="lora-dpo-bench-") as scratch:
            work = Path(scratch)
            mine = None if args.skip_lora_dpo else LoraDpoBench(args, shape, model_dir, pairs, work, device)
            if mine:
                mine.timed(report)
            if run_trl_too:
                if mine:
                    mine.unload()  # TRL's peaks must not include lora-dpo's model
                run_trl(args, shape, model_dir, rows, pairs, work, device, report)
            if mine:
                mine.diagnostics(report)
    except LoraDpoError as exc:  # e.g. --checkpoint-layers above the shape's layer count
        status = 2
        if report.results:
            print(render(report.data))
        print(f"bench: {exc}", file=sys.stderr)
        return status
    except TimeUp:
        # `timeout` (scripts/gpu_suite.sh) ended the run: report what was measured so far.
        settings["partial"] = f"stopped by SIGTERM during {report.phase}; the rows below are those that finished"
        print(f"bench: {settings['partial']}", file=sys.stderr, flush=True)
        status = 124
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    report.save()
    print(render(report.data), flush=True)
    if status == 0 and any(f["kind"] != "out of memory" for f in report.data["failures"]):
        status = 1  # an error, not a finding: the log has its traceback
    return status


class TimeUp(Exception):
    """SIGTERM arrived (a time limit): stop measuring and report what is done."""


def stop_on_sigterm(number: int, frame: Any) -> None:
    """The SIGTERM handler of the GPU suite's scripts (this one, plan_check.py, fsdp_check.py):
    raise TimeUp where the measuring is, so the script prints and writes what finished."""
    raise TimeUp


if __name__ == "__main__":
    sys.exit(main())
