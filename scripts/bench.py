#!/usr/bin/env python
"""Throughput and peak memory of lora-dpo's training step, and of TRL's DPOTrainer on the same inputs.

Builds everything itself, offline: a random-init Llama of the 1B or 8B shape of
shared/bench/REFERENCE.md (or a tiny one for a CPU smoke run), saved once with save_pretrained
(under /dev/shm when it has room, else the temp directory), a word-level tokenizer in which
every word is one token, and synthetic pairs of the reference lengths. Then, for every configuration asked for, it times
steady-state optimizer steps:

- lora-dpo: ``lora_dpo.train.DpoStep``, the training loop's own step (collate with the chosen
  layout, the eval-mode reference pass or a precomputed ``ReferenceTable``, the policy pass, the
  loss, backward, gradient clipping, the optimizer and scheduler steps, the per-step metrics), on
  the model ``load_model`` builds;
- TRL (when ``import trl`` works, the ``bench`` extra): ``DPOTrainer`` with peft LoRA on the same
  4-bit base, the same pairs in the same order, reference computed every step or precomputed.

Step time is the interval between consecutive step ends, each read after synchronising the GPU,
over the steps after warm-up. Tokens/s counts 2 x prompt + chosen + rejected tokens per pair.
Peak memory is reset after the model is loaded. Usage: ``python scripts/bench.py --help``;
results and the exact commands are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
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
    # Llama-3.2-1B and Llama-3-8B shapes (shared/bench/REFERENCE.md).
    "1b": Shape(128256, 2048, 8192, 16, 32, 8, True, 32000, 4, (64, 384), (64, 512), 1024, 512),
    "8b": Shape(128256, 4096, 14336, 32, 32, 8, False, 32000, 2, (64, 384), (64, 512), 1024, 512),
}


def long_rows(shape: Shape) -> Shape:
    """The long-row variant: prompt and responses ~U(768, 1024), max_length 2048, micro-batch 1."""
    return dataclasses.replace(shape, micro_batch=1, prompt=(768, 1024), response=(768, 1024), max_length=2048,
                               max_prompt_length=1024)


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


def run_lora_dpo(args: argparse.Namespace, shape: Shape, model_dir: Path, pairs: list[TokenizedPair],
                 work: Path, device: torch.device, results: list[dict[str, Any]],
                 agreement: list[dict[str, Any]]) -> None:
    """Every (layout, reference mode) asked for, on one loaded model; each configuration gets a
    fresh optimizer, scaler and peak-memory count, and its row is appended to ``results`` as soon
    as it is measured. With --check-layouts, the layouts' agreement with padded is measured first
    and appended to ``agreement``."""
    from lora_dpo.train import DpoStep, build_optimizer, build_scheduler  # the training loop's own parts

    config = lora_dpo_config(args, shape, model_dir, work)
    compute_dtype = resolve_compute_dtype(config.model, device)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config, device)
    model.train()
    mb = shape.micro_batch
    # Every configuration starts from the same adapter; the copy waits on the CPU so that it does
    # not count towards GPU memory.
    initial = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}
    if args.check_layouts:
        rows = layout_agreement(model, pairs[:mb], LAYOUTS, autocast_for(device, compute_dtype), tokenizer.pad_token_id,
                                config.dpo.logps_chunk_size, args.pack_length, args.seed)
        agreement.extend({**row, "dtype": str(compute_dtype).removeprefix("torch.")} for row in rows)
        reset_memory(device)
    timed = args.warmup + args.steps
    batches = [list(range(index * mb, (index + 1) * mb)) for index in range(timed + args.breakdown_steps)]
    for reference_mode in args.reference:
        for layout in args.layouts:
            config.data.layout, config.data.pack_length = layout, args.pack_length
            # Counted before the clock runs: the loop never collates a batch twice.
            row_tokens = [collate([pairs[i] for i in batch], tokenizer.pad_token_id, layout=layout,
                                  pack_length=args.pack_length).input_ids.numel() for batch in batches[args.warmup : timed]]
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in initial:
                        param.copy_(initial[name])
            optimizer = build_optimizer(config, trainable_parameters(model), device)
            scheduler = build_scheduler(config, optimizer, 0, len(batches))
            scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
            clock = PhaseClock(device)
            step = DpoStep(config, model, optimizer, scheduler, scaler, device, tokenizer.pad_token_id, phase=clock)
            reset_memory(device)
            prep_started = time.perf_counter()
            table = None
            if reference_mode == "precomputed":
                # A fresh cache directory per configuration: this times the pass, not a file read.
                table = reference_logps_for(model, pairs, config.model, compute_dtype, tokenizer.pad_token_id,
                                            work / f"reference-{layout}", micro_batch_size=mb, layout=layout,
                                            chunk_size=config.dpo.logps_chunk_size, pack_length=args.pack_length)
            synchronize(device)
            prep_s = time.perf_counter() - prep_started
            ends, step_tokens = [], []
            for index, batch in enumerate(batches[:timed]):
                metrics, _, bad = step(pairs, [batch], table)
                ends.append(time.perf_counter())  # DpoStep synchronises the GPU before it returns
                step_tokens.append(metrics["tokens"])
                if bad:
                    raise RuntimeError(f"lora-dpo {layout}/{reference_mode}: non-finite loss at step {index}")
            # Read before the breakdown steps, whose pairs TRL never sees.
            row = {"impl": "lora-dpo", "layout": layout, "reference": reference_mode,
                   **steady_state(ends, step_tokens, args.warmup), **peak_memory(device),
                   "row_tokens_per_step": sum(row_tokens) / args.steps, "prep_s": prep_s,
                   "final_loss": metrics["loss"]}
            clock.start()
            for batch in batches[timed:]:
                step(pairs, [batch], table)
            clock.enabled = False  # the profile below is of the step as timed, without the clock's syncs
            row["phase_s"] = {name: seconds / args.breakdown_steps for name, seconds in clock.seconds.items()} or None
            results.append(row)
            print(f"  lora-dpo {layout:<21} {reference_mode:<11} {row['s_per_step']:.3f} s/step",
                  file=sys.stderr, flush=True)
            if args.profile:
                profile_steps(step, pairs, table, mb, args, device, args.profile / f"lora-dpo-{layout}-{reference_mode}.txt")
            del optimizer, table, step
    del model, initial
    reset_memory(device)


def profile_steps(step: Any, pairs: list[TokenizedPair], table: Any, mb: int, args: argparse.Namespace,
                  device: torch.device, path: Path) -> None:
    """Two more steps under torch.profiler; the operators that took the most time go to ``path``.
    They reuse the first pairs: the profile is about where time goes, not about the data."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        for index in range(2):
            step(pairs, [list(range(index * mb, (index + 1) * mb))], table)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60) + "\n")


# ---------------------------------------------------------------------------------------------
# TRL (optional; imported only here)


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def run_trl(args: argparse.Namespace, shape: Shape, model_dir: Path, rows: list[dict[str, str]],
            pairs: list[TokenizedPair], work: Path, device: torch.device, results: list[dict[str, Any]]) -> None:
    """TRL's DPOTrainer with peft LoRA (r=16, all-linear) on the same 4-bit base and pairs; the
    reference is the base with adapters disabled, every step or precomputed at trainer creation.
    Each reference mode's row is appended to ``results`` as soon as it is measured."""
    import datasets
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

        def on_step_end(self, *unused: Any, **unused_kwargs: Any) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())

    results = []
    for reference_mode in args.reference:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=compute_dtype, device_map={"": str(device)}, attn_implementation=args.attn,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype),
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
        if sequential:
            settings["train_sampling_strategy"] = "sequential"
        clock = StepClock()
        prep_started = time.perf_counter()
        trainer = DPOTrainer(
            model=model, args=DPOConfig(**settings), processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(rows[: mb * (args.warmup + args.steps)]),
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # it prints a metrics dict into the table's stdout
        synchronize(device)
        prep_s = time.perf_counter() - prep_started  # tokenization, peft wrapping and any reference pass
        trainer.train()
        if sequential:
            step_tokens = [sum(p.num_tokens for p in pairs[s * mb : (s + 1) * mb]) for s in range(len(clock.ends))]
        else:
            mean = sum(p.num_tokens for p in pairs) / len(pairs)
            step_tokens = [round(mean * mb)] * len(clock.ends)
        results.append({
            "impl": f"trl {__import__('trl').__version__}", "layout": "trl", "reference": reference_mode,
            **steady_state(clock.ends, step_tokens, args.warmup), **peak_memory(device),
            "row_tokens_per_step": None, "prep_s": prep_s, "tokens_exact": sequential,
        })
        print(f"  trl {reference_mode:<11} {results[-1]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
        del trainer, model, clock
        reset_memory(device)


# ---------------------------------------------------------------------------------------------
# Report


def add_ratios(results: list[dict[str, Any]]) -> None:
    """vs_trl: lora-dpo's tokens/s over TRL's with the same reference mode (None without TRL)."""
    trl = {r["reference"]: r["tokens_per_s"] for r in results if r["impl"].startswith("trl")}
    for r in results:
        mine = not r["impl"].startswith("trl")
        r["vs_trl"] = r["tokens_per_s"] / trl[r["reference"]] if mine and r["reference"] in trl else None


def table(results: list[dict[str, Any]]) -> str:
    def number(value: Any, digits: int) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

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


def environment(device: torch.device, with_trl: bool) -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    if with_trl:
        import trl

        versions["trl"] = trl.__version__
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} logical cores)"
    return {"date": datetime.date.today().isoformat(), "device": card, "versions": versions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b",
                        help="model shape (tiny: CPU smoke, no timing claims)")
    parser.add_argument("--long-rows", action="store_true",
                        help="prompt and responses ~U(768,1024), max_length 2048, micro-batch 1")
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=at_least(1), default=3,
                        help="untimed steps first (at least 1: the first timed interval starts at the end of warm-up)")
    parser.add_argument("--breakdown-steps", type=at_least(0), default=2,
                        help="lora-dpo steps after the timed ones, with the GPU synchronised after each part of the "
                             "step, for the per-part times (collate, reference, policy, backward, update); 0 skips them")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also profile two lora-dpo steps per configuration with torch.profiler and write the "
                             "top operators to DIR/lora-dpo-LAYOUT-REFERENCE.txt")
    parser.add_argument("--check-layouts", action="store_true",
                        help="first measure how far every layout's log-probs and gradients are from padded's")
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
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.no_gradient_checkpointing and args.checkpoint_layers is not None:
        parser.error("--checkpoint-layers needs gradient checkpointing; drop --no-gradient-checkpointing")
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    args.reference = [name.strip() for name in args.reference.split(",") if name.strip()]
    for name in args.layouts:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    for name in args.reference:
        if name not in REFERENCE_MODES:
            parser.error(f"--reference: unknown mode {name!r}; choose from {', '.join(REFERENCE_MODES)}")
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
    run_trl_too = not args.skip_trl and trl_available()
    model_dir = build_model_dir(args.shape, shape, args.model_root or default_model_root(args.shape, shape))
    count = shape.micro_batch * (args.warmup + args.steps + args.breakdown_steps)
    rows = make_rows(shape, count, args.seed)
    pairs = tokenize_rows(rows, build_tokenizer(shape.words), shape)
    info = environment(device, run_trl_too)
    print(f"bench: {args.shape}{' long rows' if args.long_rows else ''} on {info['device']}, "
          f"{shape.micro_batch} pairs/step, {args.warmup} warm-up + {args.steps} timed steps, model in {model_dir}",
          file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    stopped = None
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="lora-dpo-bench-") as scratch:
            work = Path(scratch)
            if not args.skip_lora_dpo:
                run_lora_dpo(args, shape, model_dir, pairs, work, device, results, agreement)
            if run_trl_too:
                run_trl(args, shape, model_dir, rows, pairs, work, device, results)
    except LoraDpoError as exc:  # e.g. --checkpoint-layers above the shape's layer count
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except TimeUp:
        # `timeout` (scripts/gpu_suite.sh) ended the run: report what was measured so far.
        stopped = "stopped by SIGTERM before every configuration ran; the rows below are those that finished"
        print(f"bench: {stopped}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    add_ratios(results)
    mean_tokens = sum(p.num_tokens for p in pairs) / len(pairs)
    print(f"\n{args.shape}{' (long rows)' if args.long_rows else ''}, {info['device']}, {info['date']}; "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"{shape.micro_batch} pairs/step, mean {mean_tokens:.0f} tokens/pair (2 x prompt + chosen + rejected), "
          f"gradient checkpointing {checkpointing(args)}, {args.optim}, {args.attn}"
          + (", lora-dpo layers compiled" if args.compile else "")
          + (f", PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}"
             if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") else "")
          + ("" if run_trl_too else "; TRL not run (--skip-trl or not installed)"))
    if device.type == "cpu":
        print("CPU run: a smoke test of the code paths; these timings say nothing about GPU throughput.")
    if stopped:
        print(f"PARTIAL: {stopped}.")
    print()
    print(table(results))
    if agreement:
        print(f"\nEach layout against padded on the first micro-batch, {agreement[0]['dtype']}:\n")
        print(agreement_table(agreement))
    phases = phase_table(results)
    if phases:
        print(f"\nlora-dpo step parts, mean of {args.breakdown_steps} steps synchronised after each part:\n")
        print(phases)
    if args.json:
        settings = {"shape": args.shape, "long_rows": args.long_rows, **dataclasses.asdict(shape),
                    "steps": args.steps, "warmup": args.warmup, "gradient_checkpointing": not args.no_gradient_checkpointing,
                    "optim": args.optim, "attn": args.attn, "pack_length": args.pack_length,
                    "checkpoint_layers": args.checkpoint_layers, "compile": args.compile,
                    "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                    "breakdown_steps": args.breakdown_steps,
                    "mean_tokens_per_pair": mean_tokens, "seed": args.seed, "partial": bool(stopped)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, "settings": settings, "results": results, "layout_agreement": agreement},
                                        indent=2) + "\n")
    return 124 if stopped else 0


class TimeUp(Exception):
    """SIGTERM arrived (a time limit): stop measuring and report what is done."""


def _stop_on_sigterm(number: int, frame: Any) -> None:
    raise TimeUp


if __name__ == "__main__":
    sys.exit(main())
