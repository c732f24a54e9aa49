"""Merging a trained adapter into its base, and checking that the merged model still behaves like
the base + adapter it was trained as.

An adapter trained on a 4-bit base learned a correction to the NF4-dequantized weights, not to the
original ones. Merging it into the original 16-bit weights (``base_weights="original"``, the usual
way) therefore yields a model that was never trained: its outputs differ from the trained model by
the quantization error. Merging into the dequantized weights (``base_weights="dequantized"``)
reproduces the trained model exactly, at the price of carrying the quantization error into the
standalone model. The verification step measures which of the two you got, and whether the merge
kept what the adapter does at all: a 16-bit rounding of a small adapter's update, or a merge that
lost the adapter, would otherwise pass as "close to the trained model".

The merge writes into a temporary sibling of the output directory and renames it at the end, so a
failure (a verification that finds the adapter lost included) never leaves a model behind.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .batching import PairLogps, score_pairs
from .config import DataConfig, ModelConfig
from .data import DataReport, TokenizedPair, load_examples, load_preference_data, tokenize_examples
from .errors import DataError, LoraDpoError, one_line
from .modeling import (BASE_FIX, DTYPES, TRAINING_CONFIG, AdapterSource, apply_adapter, inspect_adapter,
                       load_adapter_tokenizer, load_base, resolve_compute_dtype, resolve_device)

log = logging.getLogger(__name__)

MERGE_REPORT = "merge_report.json"
BASE_WEIGHTS = ("original", "dequantized")
DEFAULT_VERIFY_PAIRS = 16
# Mean |log-prob difference| per response token above which the merged model is reported (with a
# warning, not a failure) as not behaving like the trained one. Measured on the tiny demo model
# (CPU): saving the exact (dequantized) merge in bfloat16 costs about 0.002 nats/token, merging a
# 4-bit-trained adapter into the original weights about 0.014 (docs/merge.md).
DEFAULT_MAX_LOGP_DIFF = 0.01
# The merge fails when it keeps less than this share of the adapter's effect on the held-out
# log-probs. Measured on the demo model (docs/merge.md): correct merges keep 93% or more (the
# original-weights merge of a small 4-bit-trained adapter, the worst of them, 93-94%; the exact
# ones 99.9%); a merge that drops the adapter keeps 0%, and a bfloat16 merge of a small adapter,
# whose rounding loses over 90% of the update, keeps less than nothing (its rounding noise
# outweighs the adapter's effect).
DEFAULT_MIN_ADAPTER_KEPT = 0.75
# Below this many nats per response token the adapter changes nothing measurable, and what a merge
# kept of it is not computed: 60x float32 scoring noise on the demo model (1.5e-7), 14x below the
# smallest real adapter measured there (1.4e-4, 10 steps at learning rate 5e-6).
ADAPTER_EFFECT_FLOOR = 1e-5


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    """``auto`` keeps the dtype the base checkpoint was saved in (float32 when it names none)."""
    if name != "auto":
        return DTYPES[name]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_config.name_or_path, revision=model_config.revision,
                                            trust_remote_code=model_config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LoraDpoError(_base_not_found(model_config.name_or_path, exc)) from None
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in DTYPES.values() else torch.float32


def _base_not_found(name: str, exc: BaseException) -> str:
    return f"{name}: cannot load the base model ({one_line(exc)}). Fix: {BASE_FIX}"


def copy_dequantized_weights(four_bit_model: Any, plain_model: Any) -> int:
    """Overwrite each weight the 4-bit model quantized with its NF4-dequantized value; returns how many.

    Walking the loaded 4-bit model (instead of quantizing tensors here) takes exactly the layers
    transformers quantized in training, with its block size and double-quant settings.
    """
    import bitsandbytes as bnb

    replaced = 0
    with torch.no_grad():
        for name, module in four_bit_model.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = plain_model.get_submodule(name).weight
            if dequantized.shape != target.shape:
                raise LoraDpoError(f"{name}: the 4-bit weight dequantizes to {tuple(dequantized.shape)}, the base "
                                   f"holds {tuple(target.shape)}. Fix: use --base-weights original")
            target.copy_(dequantized.to(target.device, target.dtype))
            replaced += 1
    return replaced


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass
class Verification:
    """How closely the merged model reproduces the trained base + adapter on held-out pairs.

    Every figure compares per-pair summed response log-probs (chosen and rejected), and the
    per-token ones divide the summed absolute differences by the summed response tokens.
    """

    reference: str
    """What the merged model was compared against."""
    data: str
    """Where the pairs came from."""
    pairs: int
    logp_abs_diff_mean: float
    """Mean |merged - reference| of the per-pair summed response log-probs (chosen and rejected), nats."""
    logp_abs_diff_max: float
    logp_abs_diff_per_token: float
    """The merge error: |merged - reference| per response token, compared to ``max_logp_diff``."""
    adapter_effect_per_token: float
    """What the adapter changes: |reference - its base with the adapter off| per response token."""
    adapter_error_per_token: float
    """What the merge missed of that change: |(merged - the weights it was merged into) - (reference -
    its base)| per response token. A merge that dropped the adapter misses all of it."""
    adapter_kept: Optional[float]
    """1 - adapter_error / adapter_effect: 1 when the merge reproduces the adapter's effect exactly, 0
    when it kept none of it, below 0 when its rounding moves the log-probs more than the adapter
    does; None when the adapter's effect is below ADAPTER_EFFECT_FLOOR (nothing to keep)."""
    decision_agreement: float
    """Share of pairs where both models agree on whether chosen outscores rejected."""
    flipped_pairs: list[int]
    reference_accuracy: float
    """Share of pairs where the reference gives chosen the higher log-prob."""
    merged_accuracy: float
    max_logp_diff: float
    """Threshold on logp_abs_diff_per_token (a warning)."""
    min_adapter_kept: float
    """Threshold on adapter_kept (below it the merge fails)."""
    passed: bool
    warning: Optional[str]

    @property
    def adapter_lost(self) -> bool:
        """The merge kept too little of the adapter's effect (NaN counts as too little)."""
        return self.adapter_kept is not None and not self.adapter_kept >= self.min_adapter_kept


class MergeCheckFailed(LoraDpoError):
    """The merged model kept too little of the adapter's effect; nothing was written."""

    def __init__(self, message: str, verification: Verification):
        super().__init__(message)
        self.verification = verification


def verification_pairs(source: AdapterSource, tokenizer: Any, verify_data: str | None,
                       limit: int) -> tuple[list[TokenizedPair], str]:
    """Up to ``limit`` held-out pairs: from ``verify_data``, else the training run's eval data."""
    training = source.training
    data_config = training.data if training is not None else DataConfig()
    columns = (data_config.prompt_column, data_config.chosen_column, data_config.rejected_column)
    fix = "pass --verify-data FILE, or --no-verify to skip the check"
    try:
        if verify_data:
            file, split = verify_data, data_config.eval_split
        elif training is None:
            raise LoraDpoError(f"{source.directory}: no {TRAINING_CONFIG} with the adapter, so its held-out pairs "
                               f"are unknown. Fix: {fix}")
        elif data_config.eval_file:
            file, split = data_config.eval_file, data_config.eval_split
        elif data_config.eval_fraction > 0:
            # The held-out share of the training file, split exactly as training split it.
            held_out = load_preference_data(data_config, tokenizer, training.train.seed).eval
            if not held_out:
                raise LoraDpoError(f"{data_config.train_file}: holds too few pairs to hold any out. Fix: {fix}")
            return held_out[:limit], f"{data_config.train_file} (held-out share {data_config.eval_fraction:g})"
        else:
            raise LoraDpoError(f"{source.directory}: its run held out no pairs "
                               f"(data.eval_fraction=0, no data.eval_file). Fix: {fix}")
        examples = load_examples(file, split, columns, "skip", DataReport(file))[:limit]
        pairs = tokenize_examples(examples, tokenizer, data_config.max_length, data_config.max_prompt_length,
                                  DataReport(file))
    except DataError as exc:
        raise LoraDpoError(f"verification data: {exc} (or {fix})") from None
    if not pairs:
        raise LoraDpoError(f"{file}: no usable pairs for verification. Fix: {fix}")
    return pairs, file


def _summed(logps: PairLogps) -> torch.Tensor:
    """(2, pairs) on the CPU: chosen and rejected summed log-probs, in float64 so that differencing
    sums of hundreds of nats adds no rounding of its own."""
    return torch.stack([logps.chosen, logps.rejected]).cpu().double()


def compare_scores(trained: PairLogps, trained_base: PairLogps, merged: PairLogps, merged_base: PairLogps, *,
                   reference_name: str, data_name: str, max_logp_diff: float = DEFAULT_MAX_LOGP_DIFF,
                   min_adapter_kept: float = DEFAULT_MIN_ADAPTER_KEPT, base_weights: str = "original",
                   trained_in_4bit: bool = False) -> Verification:
    """The verification figures of a merged model from four scorings of the same pairs.

    ``trained`` is the model as trained (base as training loaded it + adapter, unmerged) and
    ``trained_base`` the same with the adapter switched off; ``merged`` is the saved merge and
    ``merged_base`` the weights it was merged into, in the merged dtype, without the adapter.

    Comparing the merged model with the trained one alone cannot tell a lost adapter from a good
    merge when the adapter is small: a merge that drops it entirely differs from the trained model
    by just the adapter's effect, a fraction of the usual threshold. So what the merge did to the
    log-probs (merged - merged_base) is compared with what the adapter does (trained -
    trained_base). Differencing each against its own base also removes the gap between the 4-bit
    base training saw and the 16-bit weights an original-weights merge uses, which is a property of
    the base (reported by the merge error and its warning), not a loss of the adapter.
    """
    trained_sums, merged_sums = _summed(trained), _summed(merged)
    adapter_delta = trained_sums - _summed(trained_base)
    merge_delta = merged_sums - _summed(merged_base)
    tokens = (trained.chosen_tokens.sum() + trained.rejected_tokens.sum()).clamp(min=1).cpu().double()
    diff = (merged_sums - trained_sums).abs()
    per_token = float(diff.sum() / tokens)
    effect = float(adapter_delta.abs().sum() / tokens)
    error = float((merge_delta - adapter_delta).abs().sum() / tokens)
    kept = 1 - error / effect if effect >= ADAPTER_EFFECT_FLOOR else None
    reference_prefers = trained_sums[0] > trained_sums[1]
    merged_prefers = merged_sums[0] > merged_sums[1]
    flipped = torch.nonzero(reference_prefers != merged_prefers).flatten().tolist()
    pairs = trained_sums.shape[1]
    lost = kept is not None and not kept >= min_adapter_kept  # NaN counts as lost
    problems, notes = [], []
    if kept is None:
        notes.append(f"the adapter changes the held-out log-probs by only {effect:.2g} nats per token (below "
                     f"{ADAPTER_EFFECT_FLOOR:g}), too little to tell whether the merge kept it; check that training "
                     "ran (train.max_steps, train.learning_rate)")
    elif lost:
        problems.append(f"the merge kept {max(kept, 0.0):.0%} of the adapter's effect (it misses {error:.3g} of "
                        f"the adapter's {effect:.3g} nats per token; at least {min_adapter_kept:.0%} is needed)")
    if not per_token <= max_logp_diff:  # also catches NaN
        problems.append(f"log-probs differ by {per_token:.4g} nats per token (threshold {max_logp_diff:g})")
    if flipped:
        problems.append(f"{len(flipped)} of {pairs} preference decisions flipped (pairs {flipped[:10]})")
    warning = None
    if problems or notes:
        warning = "; ".join(notes + problems) + "."
        if problems:
            warning = "the merged model does not behave like the trained base + adapter: " + warning
            if lost:
                warning += " A float32 --dtype keeps small adapter updates that 16-bit rounding loses."
            elif base_weights == "original" and trained_in_4bit:
                warning += (" The adapter was trained on the 4-bit base; --base-weights dequantized merges into the "
                            "weights it saw (see docs/merge.md).")
            else:
                warning += " A 16-bit --dtype that matches training (or float32) narrows the gap."
    return Verification(
        reference=reference_name,
        data=data_name,
        pairs=pairs,
        logp_abs_diff_mean=float(diff.mean()),
        logp_abs_diff_max=float(diff.max()),
        logp_abs_diff_per_token=per_token,
        adapter_effect_per_token=effect,
        adapter_error_per_token=error,
        adapter_kept=kept,
        decision_agreement=1 - len(flipped) / pairs,
        flipped_pairs=flipped,
        reference_accuracy=float(reference_prefers.float().mean()),
        merged_accuracy=float(merged_prefers.float().mean()),
        max_logp_diff=max_logp_diff,
        min_adapter_kept=min_adapter_kept,
        passed=not problems,
        warning=warning,
    )


def lost_adapter_message(check: Verification, adapter_dir: Path, out: Path, dtype: torch.dtype) -> str:
    """The one-line error of a merge that kept too little of the adapter."""
    kept = check.adapter_kept if check.adapter_kept is not None and math.isfinite(check.adapter_kept) else 0.0
    what = (f"{adapter_dir}: the merged model keeps {max(kept, 0.0):.0%} of what the adapter changes on "
            f"{check.pairs} held-out pairs (the adapter moves their log-probs by {check.adapter_effect_per_token:.3g} "
            f"nats per response token, the merge misses {check.adapter_error_per_token:.3g} of that; at least "
            f"{check.min_adapter_kept:.0%} must be kept), so nothing was written to {out}")
    if dtype != torch.float32:
        fix = (f"merge with --dtype float32 ({_name(dtype)} rounding loses most of an update this small), or use "
               "the adapter unmerged (lora-dpo generate ADAPTER_DIR); --no-verify saves the merge unchecked")
    else:
        fix = ("a float32 merge should keep the adapter exactly: rerun with --debug and report it; --no-verify "
               "saves the merge unchecked")
    return f"{what}. Fix: {fix}"


# ---------------------------------------------------------------------------------------------
# The merge


@dataclass
class MergeResult:
    adapter: str
    base: str
    output_dir: str
    dtype: str
    base_weights: str
    trained_in_4bit: bool
    dequantized_layers: int
    shards: int
    size_bytes: int
    seconds: float
    verification: Optional[Verification]

    def lines(self) -> list[str]:
        out = [f"merged {self.adapter} into {self.base} ({self.base_weights} base weights, "
               f"{self.dtype}): {self.output_dir}, {self.shards} shard(s), {self.size_bytes / 2**20:.1f} MiB, "
               f"{self.seconds:.0f} s"]
        check = self.verification
        if check is None:
            out.append("verification skipped (--no-verify)")
            return out
        out.append(f"verification on {check.pairs} held-out pairs from {check.data} against the {check.reference}:")
        if check.adapter_kept is None:
            out.append(f"  adapter effect: {check.adapter_effect_per_token:.2g} nats per token, too small to measure "
                       "what the merge kept")
        else:
            out.append(f"  adapter effect: {check.adapter_effect_per_token:.4g} nats per token, of which the merge keeps "
                       f"{check.adapter_kept:.1%} (at least {check.min_adapter_kept:.0%} required)")
        out.append(f"  per-pair log-prob difference: mean {check.logp_abs_diff_mean:.4g}, max {check.logp_abs_diff_max:.4g} "
                   f"nats ({check.logp_abs_diff_per_token:.4g} per token, threshold {check.max_logp_diff:g})")
        agree = check.pairs - len(check.flipped_pairs)
        out.append(f"  preference decisions agree on {agree}/{check.pairs} pairs "
                   f"(chosen preferred: reference {check.reference_accuracy:.3f}, merged {check.merged_accuracy:.3f})")
        out.append(f"  report: {Path(self.output_dir) / MERGE_REPORT}")
        if check.warning:
            out.append(f"WARNING: {check.warning}")
        return out


def check_merge_output(out: Path, overwrite: bool, protected: list[Path]) -> None:
    """Refuse an --out that is a file, holds files (without --overwrite), or would swallow an input."""
    if out.exists() and not out.is_dir():
        raise LoraDpoError(f"--out {out} is a file. Fix: choose a directory path")
    resolved = out.resolve()
    for path in protected:
        path = path.resolve()
        if path == resolved or resolved in path.parents:
            raise LoraDpoError(f"--out {out} would replace {path}, an input of this merge. Fix: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LoraDpoError(f"--out {out} is not empty. Fix: choose another directory, or pass --overwrite to replace it")


def check_shard_size(max_shard_size: str | int) -> None:
    """Refuse a --max-shard-size that save_pretrained would refuse, before the merge rather than after it.

    The format check is huggingface_hub's own parser, the one save_pretrained applies (run here on an
    empty state dict, so it costs nothing): a number and a unit, TB, GB, MB or KB. It accepts zero
    and negative sizes, which would put every tensor in a shard of its own.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    fix = "Fix: give a positive number with a unit, e.g. 2GB or 500MB (units: TB, GB, MB, KB)"
    if isinstance(max_shard_size, int):
        positive = max_shard_size > 0
    else:
        try:
            split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)
        except (ValueError, OverflowError):  # OverflowError: "infGB"
            raise LoraDpoError(f"--max-shard-size {max_shard_size!r}: not a size. {fix}") from None
        positive = float(max_shard_size.strip()[:-2]) > 0  # the parser accepted it, so this parses too
    if not positive:
        raise LoraDpoError(f"--max-shard-size {max_shard_size!r}: must be positive. {fix}")


def merge_adapter(adapter_dir: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "auto",
                  device: str = "cpu", base_weights: str = "original", verify: bool = True,
                  verify_data: str | None = None, verify_pairs: int = DEFAULT_VERIFY_PAIRS,
                  max_logp_diff: float = DEFAULT_MAX_LOGP_DIFF, min_adapter_kept: float = DEFAULT_MIN_ADAPTER_KEPT,
                  max_shard_size: str | int = "5GB", overwrite: bool = False) -> MergeResult:
    """Merge the adapter into its base, save a standalone model to ``out``, and verify it.

    A verification that finds the merge kept less than ``min_adapter_kept`` of the adapter's
    effect raises ``MergeCheckFailed`` and leaves ``out`` as it was; a merged model that merely
    differs from the trained one by more than ``max_logp_diff`` is saved with a warning.
    """
    started = time.perf_counter()
    out = Path(out)
    if base_weights not in BASE_WEIGHTS:
        raise LoraDpoError(f"--base-weights {base_weights!r}: use one of {', '.join(BASE_WEIGHTS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise LoraDpoError(f"--dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    if verify_pairs < 1:
        raise LoraDpoError(f"--verify-pairs {verify_pairs}: must be at least 1 (or pass --no-verify)")
    if not (math.isfinite(min_adapter_kept) and min_adapter_kept <= 1):
        raise LoraDpoError(f"min_adapter_kept {min_adapter_kept}: must be a number <= 1")
    check_shard_size(max_shard_size)
    source = inspect_adapter(adapter_dir, base)
    trained_in_4bit = source.model.load_in_4bit
    if base_weights == "dequantized" and not trained_in_4bit:
        raise LoraDpoError(f"--base-weights dequantized: the run's {TRAINING_CONFIG} says the adapter was "
                           "trained on a 16-bit base (model.load_in_4bit: false), so there is nothing to dequantize. "
                           "Fix: use --base-weights original")
    protected = [source.directory] + [Path(p) for p in (source.model.name_or_path, verify_data) if p and Path(p).exists()]
    check_merge_output(out, overwrite, protected)
    target = resolve_device(device, "--device")
    target_dtype = resolve_dtype(dtype, source.model)
    compute_dtype = resolve_compute_dtype(source.model, target)
    tokenizer = load_adapter_tokenizer(source)
    pairs: list[TokenizedPair] = []
    data_name = ""
    if verify:
        # Read the data before the slow part, so a data mistake fails in seconds.
        pairs, data_name = verification_pairs(source, tokenizer, verify_data, verify_pairs)
    if source.training is None:
        log.info("no %s next to the adapter: assuming it was trained the lora-dpo default way (%s base)",
                 TRAINING_CONFIG, "4-bit NF4" if trained_in_4bit else "16-bit")
    pad = tokenizer.pad_token_id

    # Order matters for memory: the trained model is scored (and freed) before the merge, and the
    # merged model is loaded back only after the merge's copy is gone, so at most the 16-bit base
    # and, for the dequantized variant, the 4-bit base are in memory at once.
    reference_name = (f"{'4-bit NF4' if trained_in_4bit else '16-bit'} base + adapter "
                      f"(compute {_name(compute_dtype)})")
    trained = trained_base = merged_base = None
    plain = None
    dequantized_layers = 0
    if base_weights == "dequantized":
        plain = _load_base(source, target, target_dtype, four_bit=False)
        four_bit = _load_base(source, target, compute_dtype, four_bit=True)
        dequantized_layers = copy_dequantized_weights(four_bit, plain)
        if verify:
            trained, trained_base = _score_trained(source, four_bit, pairs, pad, compute_dtype)
        del four_bit
    elif verify:
        reference_base = _load_base(source, target, compute_dtype, four_bit=trained_in_4bit)
        trained, trained_base = _score_trained(source, reference_base, pairs, pad, compute_dtype)
        del reference_base
    gc.collect()
    if plain is None:
        log.info("loading %s in %s on %s", source.model.name_or_path, _name(target_dtype), target)
        plain = _load_base(source, target, target_dtype, four_bit=False)
    if verify:
        # The weights the adapter goes into, scored as the merged model will be (in their dtype):
        # what a merge that kept nothing of the adapter would score.
        merged_base = score_pairs(plain, pairs, pad, **_scoring_settings(source), compute_dtype=torch.float32)
    try:
        merged = apply_adapter(plain, source).merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN in a merged weight
        raise LoraDpoError(f"{source.directory}: merging produced invalid weights ({one_line(exc)}). "
                           "Fix: merge in --dtype float32, or retrain with a lower train.learning_rate") from None
    del plain

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
    try:
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(staging))
        del merged
        gc.collect()
        verification = None
        if verify:
            merged_scores = _score_saved(source, staging, pairs, pad, target)
            verification = compare_scores(trained, trained_base, merged_scores, merged_base,
                                          reference_name=reference_name, data_name=data_name,
                                          max_logp_diff=max_logp_diff, min_adapter_kept=min_adapter_kept,
                                          base_weights=base_weights, trained_in_4bit=trained_in_4bit)
            if verification.adapter_lost:
                # A model that lost the adapter is not the trained model under its name: write nothing.
                raise MergeCheckFailed(lost_adapter_message(verification, source.directory, out, target_dtype),
                                       verification)
        shards = sorted(staging.glob("*.safetensors"))
        result = MergeResult(
            adapter=str(source.directory), base=source.model.name_or_path, output_dir=str(out),
            dtype=_name(target_dtype), base_weights=base_weights, trained_in_4bit=trained_in_4bit,
            dequantized_layers=dequantized_layers, shards=len(shards), size_bytes=sum(p.stat().st_size for p in shards),
            seconds=time.perf_counter() - started, verification=verification,
        )
        (staging / MERGE_REPORT).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _load_base(source: AdapterSource, device: torch.device, dtype: torch.dtype, four_bit: bool) -> Any:
    """The base as training loaded it, but with transformers' default attention kernel whatever the
    run used: a CPU merge of a flash-attention run must not need flash-attn, and the kernel changes
    the log-probs by rounding only."""
    return load_base(source.model, device, dtype, four_bit=four_bit, attn_implementation=None, what="base model",
                     fix=BASE_FIX)


def _scoring_settings(source: AdapterSource) -> dict[str, int]:
    """Micro-batch size and log-prob chunk size: the training run's, so verification fits where training did."""
    if source.training is None:
        return {"micro_batch_size": 4, "chunk_size": 1024}
    return {"micro_batch_size": source.training.train.micro_batch_size,
            "chunk_size": source.training.dpo.logps_chunk_size}


def _score_trained(source: AdapterSource, base_model: Any, pairs: list[TokenizedPair], pad_token_id: int,
                   compute_dtype: torch.dtype) -> tuple[PairLogps, PairLogps]:
    """Scores of the model as trained (the base as training loaded it, plus the unmerged adapter),
    and of the same model with the adapter switched off."""
    model = apply_adapter(base_model, source)
    settings = _scoring_settings(source)
    trained = score_pairs(model, pairs, pad_token_id, **settings, compute_dtype=compute_dtype)
    base = score_pairs(model, pairs, pad_token_id, **settings, compute_dtype=compute_dtype, reference=True)
    return trained, base


def _score_saved(source: AdapterSource, merged_dir: Path, pairs: list[TokenizedPair], pad_token_id: int,
                 device: torch.device) -> PairLogps:
    """Scores of the merged model as a user gets it: loaded from disk by transformers alone, in its saved dtype."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto", device_map={"": str(device)},
                                                     trust_remote_code=source.model.trust_remote_code).eval()
    except (OSError, ValueError) as exc:
        raise LoraDpoError(f"the merged model does not load back ({one_line(exc)}). Fix: rerun with --debug "
                           "and report it") from None
    return score_pairs(model, pairs, pad_token_id, **_scoring_settings(source), compute_dtype=torch.float32)


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished directory in; the old --out is removed only once the new one is in place."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, previous)
    os.replace(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_merge_command(args: Any) -> int:
    """``lora-dpo merge``: the CLI front of merge_adapter."""
    if not math.isfinite(args.max_logp_diff) or args.max_logp_diff < 0:
        raise LoraDpoError(f"--max-logp-diff {args.max_logp_diff}: must be a number >= 0")
    result = merge_adapter(
        args.adapter, args.out, base=args.base, dtype=args.dtype, device=args.device,
        base_weights=args.base_weights, verify=not args.no_verify, verify_data=args.verify_data,
        verify_pairs=args.verify_pairs, max_logp_diff=args.max_logp_diff, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    for line in result.lines():
        print(line)
    return 0
