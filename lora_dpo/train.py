"""The DPO training loop: one explicit loop, no Trainer.

Per optimizer step, for each micro-batch: reference log-probs (no grad, adapters off), policy
log-probs (adapters on), the loss, backward. Then clip, step, schedule, log. Everything the user
can get wrong (config, output directory, data, model path) is checked before the output directory
is created, so a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .batching import PairLogps, collate, pair_logps
from .config import Config, save_config
from .data import TokenizedPair, read_preference_examples, tokenize_preference_data
from .errors import LoraDpoError
from .losses import needs_reference, preference_loss
from .modeling import load_model, load_tokenizer, reference_model, resolve_compute_dtype, resolve_device, save_adapter, trainable_parameters

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class RunSummary:
    output_dir: str
    steps: int
    train_pairs: int
    eval_pairs: int
    seconds: float
    final_train: dict[str, float]
    final_eval: dict[str, float] | None

    def lines(self) -> list[str]:
        out = [f"trained {self.steps} steps on {self.train_pairs} pairs in {self.seconds:.0f} s"]
        if self.final_eval:
            e = self.final_eval
            out.append(f"held-out ({self.eval_pairs} pairs): preference accuracy {e['rewards/accuracy']:.3f}, "
                       f"reward margin {e['rewards/margins']:.3f}, loss {e['loss']:.4f}")
        out.append(f"adapter, tokenizer, config and metrics in {self.output_dir}")
        return out


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise LoraDpoError(f"output.dir {path} is a file. Fix: choose a directory path")
    if path.is_dir() and any(path.iterdir()):
        finished = all((path / name).exists() for name in ADAPTER_FILES)
        if not overwrite:
            what = "a finished run" if finished else "files"
            raise LoraDpoError(f"output.dir {path} already holds {what}. Fix: choose another output.dir, "
                               "or pass --overwrite to replace it")


def train(config: Config, overwrite: bool = False, progress: bool | None = None) -> RunSummary:
    """Train a LoRA adapter with DPO as ``config`` says; returns what the run achieved."""
    started = time.perf_counter()
    out = Path(config.output.dir)
    check_output_dir(out, overwrite)
    _seed_everything(config.train.seed)
    device = resolve_device(config.model)
    examples = read_preference_examples(config.data, config.train.seed)
    tokenizer = load_tokenizer(config.model)
    data = tokenize_preference_data(examples, config.data, tokenizer)
    for report in data.reports:
        log.info("data %s", report.summary())
    model = load_model(config, device)
    compute_dtype = resolve_compute_dtype(config.model, device)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    # float16 gradients of small LoRA updates underflow without loss scaling; bfloat16 needs none.
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None

    pairs_per_step = config.train.micro_batch_size * config.train.gradient_accumulation_steps
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * len(data.train) / pairs_per_step))
    optimizer = _optimizer(config, trainable_parameters(model), device)
    warmup = config.train.warmup_steps if config.train.warmup_steps is not None else round(config.train.warmup_ratio * total_steps)
    scheduler = _scheduler(config, optimizer, warmup, total_steps)

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    metrics_file = (out / "metrics.jsonl").open("w", encoding="utf-8")
    pad_id = tokenizer.pad_token_id
    chunk = config.dpo.logps_chunk_size
    log.info("training %d steps of %d pairs (%d train, %d held-out pairs) on %s, %s",
             total_steps, pairs_per_step, len(data.train), len(data.eval), device, str(compute_dtype).removeprefix("torch."))

    def dpo_forward(pairs: list[TokenizedPair]) -> tuple[Any, PairLogps, int]:
        batch = collate(pairs, pad_id).to(device)
        reference = None
        if needs_reference(config.dpo):  # SimPO/ORPO: no reference, one forward over every token saved
            with torch.no_grad(), reference_model(model), autocast:
                reference = pair_logps(model, batch, chunk)
        with autocast:
            policy = pair_logps(model, batch, chunk)
        result = preference_loss(config.dpo, policy, reference)
        return result, policy, batch.num_tokens

    def evaluate() -> dict[str, float]:
        model.eval()
        totals = _MetricSums()
        with torch.no_grad():
            for start in range(0, len(data.eval), config.train.micro_batch_size):
                result, policy, _ = dpo_forward(data.eval[start : start + config.train.micro_batch_size])
                totals.add(result, policy)
        model.train()
        return totals.means()

    stream = _pair_stream(data.train, config.train.seed)
    bar = _progress_bar(total_steps, progress)
    final_train: dict[str, float] = {}
    final_eval = None
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(1, total_steps + 1):
            step_start = time.perf_counter()
            step_pairs = [next(stream) for _ in range(pairs_per_step)]
            totals = _MetricSums()
            tokens = 0
            for start in range(0, len(step_pairs), config.train.micro_batch_size):
                micro = step_pairs[start : start + config.train.micro_batch_size]
                result, policy, num_tokens = dpo_forward(micro)
                loss = result.losses.sum() / len(step_pairs)
                (scaler.scale(loss) if scaler else loss).backward()
                totals.add(result, policy)
                tokens += num_tokens
            if scaler:
                scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - step_start
            row = {"step": step, "split": "train", "epoch": step * pairs_per_step / len(data.train), **totals.means(),
                   "grad_norm": float(grad_norm), "lr": lr, "tokens_per_s": tokens / seconds,
                   "seconds": seconds, **_memory(device)}
            final_train = row
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % config.train.log_every == 0 or step == total_steps:
                _write(metrics_file, row)
                if bar.disable and (step % max(1, total_steps // 10) == 0 or step == total_steps):
                    log.info("step %d/%d loss %.4f accuracy %.2f margin %.3f %.0f tokens/s", step, total_steps,
                             row["loss"], row["rewards/accuracy"], row["rewards/margins"], row["tokens_per_s"])
            last = step == total_steps
            if data.eval and ((config.train.eval_every and step % config.train.eval_every == 0) or last):
                final_eval = {"step": step, "split": "eval", **evaluate()}
                _write(metrics_file, final_eval)
                bar.write(f"eval step {step}: loss {final_eval['loss']:.4f} accuracy {final_eval['rewards/accuracy']:.3f} "
                          f"margin {final_eval['rewards/margins']:.3f}")
            if config.train.save_every and step % config.train.save_every == 0 and not last:
                save_adapter(model, out / f"checkpoint-{step}")
    finally:
        bar.close()
        metrics_file.close()

    save_adapter(model, out)
    tokenizer.save_pretrained(out)
    summary = RunSummary(str(out), total_steps, len(data.train), len(data.eval), time.perf_counter() - started,
                         final_train, final_eval)
    (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n", encoding="utf-8")
    return summary


class _MetricSums:
    """Per-pair metric sums over micro-batches; means are over pairs, not micro-batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0

    def add(self, result: Any, policy: PairLogps) -> None:
        margins = result.chosen_rewards - result.rejected_rewards
        values = {
            "loss": result.losses.detach(),
            "rewards/chosen": result.chosen_rewards,
            "rewards/rejected": result.rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracy": (margins > 0).float(),
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        }
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.float().sum())
        self.pairs += result.losses.shape[0]

    def means(self) -> dict[str, float]:
        return {name: total / max(1, self.pairs) for name, total in self.sums.items()}


def _pair_stream(pairs: list[TokenizedPair], seed: int) -> Iterator[TokenizedPair]:
    """Endless reshuffled passes over the pairs; epoch e uses seed + e, so runs are repeatable."""
    epoch = 0
    while True:
        order = list(range(len(pairs)))
        random.Random(seed + epoch).shuffle(order)
        for index in order:
            yield pairs[index]
        epoch += 1


def _optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    settings = dict(lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    if config.train.optim == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LoraDpoError("train.optim=paged_adamw_8bit needs bitsandbytes. Fix: pip install bitsandbytes, "
                               "or set train.optim=adamw") from None
        return bnb.optim.PagedAdamW8bit(params, **settings)
    return torch.optim.AdamW(params, **settings)


def _scheduler(config: Config, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.train.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _progress_bar(total: int, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    # progress=None: a bar on a terminal, periodic log lines otherwise (CI logs, files).
    return tqdm(total=total, desc="dpo", unit="step", disable=(not sys.stderr.isatty()) if progress is None else not progress,
                dynamic_ncols=True)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # CPU: peak resident set of the process (Linux reports KiB).
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _write(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row) + "\n")
    handle.flush()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed)
