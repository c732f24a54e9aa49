"""Merging a trained adapter into its base, and checking that the merged model still behaves like
the base + adapter it was trained as.

An adapter trained on a 4-bit base learned a correction to the NF4-dequantized weights, not to the
original ones. Merging it into the original 16-bit weights (``base_weights="original"``, the usual
way) therefore yields a model that was never trained: its outputs differ from the trained model by
the quantization error. Merging into the dequantized weights (``base_weights="dequantized"``)
reproduces the trained model exactly, at the price of carrying the quantization error into the
standalone model. The verification step measures which of the two you got.

The merge writes into a temporary sibling of the output directory and renames it at the end, so a
failure never leaves a half-written model behind.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .batching import collate, pair_logps
from .checkpoint import complete_checkpoints
from .config import Config, DataConfig, ModelConfig, load_config
from .data import DataReport, TokenizedPair, load_examples, load_preference_data, tokenize_examples
from .errors import DataError, LoraDpoError, one_line
from .modeling import (autocast_for, four_bit_config, keep_cpu_4bit_trainable, load_tokenizer, resolve_compute_dtype,
                       resolve_device)

log = logging.getLogger(__name__)

MERGE_REPORT = "merge_report.json"
TRAINING_CONFIG = "config.yaml"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASE_WEIGHTS = ("original", "dequantized")
DEFAULT_VERIFY_PAIRS = 16
# Mean |log-prob difference| per response token above which the merged model is reported as not
# behaving like the trained one. Measured on the tiny demo model (CPU): saving the exact
# (dequantized) merge in bfloat16 costs about 0.0017 nats/token, merging a 4-bit-trained adapter
# into the original weights about 0.016 (docs/merge.md).
DEFAULT_MAX_LOGP_DIFF = 0.01


# ---------------------------------------------------------------------------------------------
# The adapter and how it was trained


@dataclass
class AdapterSource:
    """A checked adapter directory and what is known about the run that produced it."""

    directory: Path
    model: ModelConfig
    """How training loaded the base (from config.yaml, or the project defaults), naming the base to use."""
    training: Optional[Config]
    """The run's resolved config.yaml, when the directory (or, for a checkpoint, its run) holds one."""
    tokenizer_path: str
    weights: dict[str, torch.Tensor] = field(repr=False)


def inspect_adapter(directory: str | Path, base: str | None = None) -> AdapterSource:
    """Check an adapter directory before any model is loaded; ``base`` overrides the base it names."""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        check_finished_run(directory)
        raise LoraDpoError(f"{directory}: no adapter_config.json here. Fix: point at the output.dir of a "
                           "training run (or any directory written by peft's save_pretrained)")
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraDpoError(f"{config_file}: not valid JSON ({one_line(exc)}). "
                           "Fix: restore the file from the training run") from None
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
        raise LoraDpoError(f"{config_file}: peft_type is {kind!r}, only LORA adapters can be merged. "
                           "Fix: point at a LoRA adapter directory")
    weights = _read_adapter_weights(directory)

    # A checkpoint-STEP directory holds the adapter only; its run's config and tokenizer are one level up.
    run_dirs = [directory] + ([directory.parent] if directory.name.startswith("checkpoint-") else [])
    training = None
    for run_dir in run_dirs:
        if (run_dir / TRAINING_CONFIG).is_file():
            training = load_config(run_dir / TRAINING_CONFIG)
            break
    named_base = adapter_config.get("base_model_name_or_path")
    if not base and not named_base:
        raise LoraDpoError(f"{config_file}: names no base model (base_model_name_or_path). Fix: pass --base")
    model = training.model if training is not None else ModelConfig()
    same_base = not base or base == model.name_or_path
    model = dataclasses.replace(model, name_or_path=base or named_base, init_adapter=None,
                                revision=model.revision if same_base else None)
    with_tokenizer = [str(d) for d in run_dirs if (d / "tokenizer_config.json").is_file()]
    tokenizer_path = with_tokenizer[0] if with_tokenizer else model.name_or_path
    return AdapterSource(directory, model, training, tokenizer_path, weights)


def check_finished_run(directory: Path) -> None:
    """Refuse a training run that stopped early with a message naming the checkpoint to use instead.

    Training writes the adapter to the top of output.dir only when it finishes; an interrupted run
    holds config.yaml (written before the first step) and checkpoint-STEP directories, each with an
    adapter of its own. A model directory (config.json) is never one, even with checkpoint-STEP
    directories of its own, as transformers' Trainer leaves them.
    """
    if not (directory / TRAINING_CONFIG).is_file() or (directory / "config.json").is_file():
        return
    complete = complete_checkpoints(directory)
    if complete:
        raise LoraDpoError(f"{directory}: the run did not finish (no adapter_config.json at the top, only "
                           f"checkpoints). Fix: use {complete[-1]}, the newest complete checkpoint, or finish the "
                           "run with lora-dpo train CONFIG --resume")
    raise LoraDpoError(f"{directory}: the run did not finish and saved no complete checkpoint (none holds "
                       "trainer_state.json), so it has no adapter yet. Fix: train it again with "
                       "lora-dpo train CONFIG --overwrite")


def _read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise LoraDpoError(f"{directory}: no adapter_model.safetensors here. Fix: point at a finished training "
                           "run (checkpoints and the final output.dir hold one)")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraDpoError(f"{path}: cannot read the adapter weights, the file looks corrupted or cut off "
                           f"({one_line(exc)}). Fix: copy it again from the training run") from None
    if not weights:
        raise LoraDpoError(f"{path}: holds no tensors. Fix: copy it again from the training run")
    broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise LoraDpoError(f"{path}: {len(broken)} tensors hold NaN or inf (first: {broken[0]}), training diverged. "
                           "Fix: retrain with a lower train.learning_rate, or use an earlier checkpoint")
    return weights


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
    return (f"{name}: cannot load the base model ({one_line(exc)}). Fix: pass --base with the local "
            "directory or hub id of the model the adapter was trained on")


def load_base(model_config: ModelConfig, device: torch.device, dtype: torch.dtype, four_bit: bool) -> Any:
    """The base in ``dtype`` (16/32-bit), or in 4-bit NF4 computing in ``dtype`` as training did."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(revision=model_config.revision, trust_remote_code=model_config.trust_remote_code,
                                  dtype=dtype, device_map={"": str(device)})
    if four_bit:
        # Same quantization settings as modeling.load_model, so the 4-bit weights are those training saw.
        kwargs["quantization_config"] = four_bit_config(model_config, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_config.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoraDpoError(_base_not_found(model_config.name_or_path, exc)) from None
    if four_bit and device.type == "cpu":
        keep_cpu_4bit_trainable(model)
    return model.eval()


def apply_adapter(base_model: Any, source: AdapterSource) -> Any:
    """The base with the adapter loaded (not merged), refusing an adapter that does not fit the base."""
    from peft import PeftModel, get_peft_model_state_dict

    try:
        model = PeftModel.from_pretrained(base_model, str(source.directory), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise LoraDpoError(f"{source.directory}: the adapter does not fit the base {source.model.name_or_path} "
                           f"({one_line(exc)}). Fix: pass --base with the model the adapter was trained on") from None
    # peft loads whatever keys match and only warns about the rest; a partial adapter must not pass.
    # Only the LoRA matrices are compared: they are what a merge uses, and what every adapter holds.
    loaded = {key for key in get_peft_model_state_dict(model, save_embedding_layers=False) if ".lora_" in key}
    expected = {key for key in source.weights if ".lora_" in key}
    if loaded != expected:
        odd = sorted(expected - loaded) or sorted(loaded - expected)
        raise LoraDpoError(f"{source.directory}: the adapter weights do not match the layers it adapts in "
                           f"{source.model.name_or_path} ({len(expected - loaded)} unused, {len(loaded - expected)} "
                           f"missing, e.g. {odd[0]}). Fix: pass --base with the model the adapter was trained on")
    return model.eval()


def load_adapter_tokenizer(source: AdapterSource) -> Any:
    """The tokenizer training used: the run directory's copy, else the base's."""
    from_base = source.tokenizer_path == source.model.name_or_path
    fix = ("pass --base with the local directory or hub id of the model the adapter was trained on" if from_base
           else "copy the tokenizer files again from the training run")
    return load_tokenizer(dataclasses.replace(source.model, name_or_path=source.tokenizer_path,
                                                   revision=source.model.revision if from_base else None), fix)


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
    """How closely the merged model reproduces the trained base + adapter on held-out pairs."""

    reference: str
    """What the merged model was compared against."""
    data: str
    """Where the pairs came from."""
    pairs: int
    logp_abs_diff_mean: float
    """Mean |merged - reference| of the per-pair summed response log-probs (chosen and rejected), nats."""
    logp_abs_diff_max: float
    logp_abs_diff_per_token: float
    """Summed |difference| over summed response tokens: length-independent, compared to the threshold."""
    decision_agreement: float
    """Share of pairs where both models agree on whether chosen outscores rejected."""
    flipped_pairs: list[int]
    reference_accuracy: float
    """Share of pairs where the reference gives chosen the higher log-prob."""
    merged_accuracy: float
    max_logp_diff: float
    """Threshold on logp_abs_diff_per_token."""
    passed: bool
    warning: Optional[str]


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


def score_pairs(model: Any, pairs: list[TokenizedPair], pad_token_id: int, device: torch.device,
                compute_dtype: torch.dtype, micro_batch_size: int, chunk_size: int) -> torch.Tensor:
    """(4, pairs): chosen log-prob, rejected log-prob, chosen tokens, rejected tokens."""
    autocast = autocast_for(device, compute_dtype)
    columns = []
    with torch.no_grad(), autocast:
        for start in range(0, len(pairs), micro_batch_size):
            batch = collate(pairs[start : start + micro_batch_size], pad_token_id).to(device)
            result = pair_logps(model, batch, chunk_size)
            columns.append(torch.stack([result.chosen.float(), result.rejected.float(),
                                        result.chosen_tokens.float(), result.rejected_tokens.float()]).cpu())
    return torch.cat(columns, dim=1)


def compare_scores(reference: torch.Tensor, merged: torch.Tensor, reference_name: str, data_name: str,
                   max_logp_diff: float, base_weights: str, trained_in_4bit: bool) -> Verification:
    diff = (merged[:2] - reference[:2]).abs()
    per_token = float(diff.sum() / reference[2:].sum().clamp(min=1))
    reference_prefers = reference[0] > reference[1]
    merged_prefers = merged[0] > merged[1]
    flipped = torch.nonzero(reference_prefers != merged_prefers).flatten().tolist()
    pairs = reference.shape[1]
    problems = []
    if not per_token <= max_logp_diff:  # also catches NaN
        problems.append(f"log-probs differ by {per_token:.4g} nats per token (threshold {max_logp_diff:g})")
    if flipped:
        problems.append(f"{len(flipped)} of {pairs} preference decisions flipped (pairs {flipped[:10]})")
    warning = None
    if problems:
        warning = "the merged model does not behave like the trained base + adapter: " + "; ".join(problems) + "."
        if base_weights == "original" and trained_in_4bit:
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
        decision_agreement=1 - len(flipped) / pairs,
        flipped_pairs=flipped,
        reference_accuracy=float(reference_prefers.float().mean()),
        merged_accuracy=float(merged_prefers.float().mean()),
        max_logp_diff=max_logp_diff,
        passed=not problems,
        warning=warning,
    )


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
                  max_logp_diff: float = DEFAULT_MAX_LOGP_DIFF, max_shard_size: str | int = "5GB",
                  overwrite: bool = False) -> MergeResult:
    """Merge the adapter into its base, save a standalone model to ``out``, and verify it."""
    started = time.perf_counter()
    out = Path(out)
    if base_weights not in BASE_WEIGHTS:
        raise LoraDpoError(f"--base-weights {base_weights!r}: use one of {', '.join(BASE_WEIGHTS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise LoraDpoError(f"--dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    if verify_pairs < 1:
        raise LoraDpoError(f"--verify-pairs {verify_pairs}: must be at least 1 (or pass --no-verify)")
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

    # Order matters for memory: the trained model is scored (and freed) before the merge, and the
    # merged model is loaded back only after the merge's copy is gone, so at most the 16-bit base
    # and, for the dequantized variant, the 4-bit base are in memory at once.
    reference_name = (f"{'4-bit NF4' if trained_in_4bit else '16-bit'} base + adapter "
                      f"(compute {_name(compute_dtype)})")
    reference_scores = None
    plain = None
    dequantized_layers = 0
    if base_weights == "dequantized":
        plain = load_base(source.model, target, target_dtype, four_bit=False)
        four_bit = load_base(source.model, target, compute_dtype, four_bit=True)
        dequantized_layers = copy_dequantized_weights(four_bit, plain)
        if verify:
            reference_scores = _score_trained(source, four_bit, pairs, tokenizer.pad_token_id, target, compute_dtype)
        del four_bit
    elif verify:
        reference_base = load_base(source.model, target, compute_dtype, four_bit=trained_in_4bit)
        reference_scores = _score_trained(source, reference_base, pairs, tokenizer.pad_token_id, target, compute_dtype)
        del reference_base
    gc.collect()
    if plain is None:
        log.info("loading %s in %s on %s", source.model.name_or_path, _name(target_dtype), target)
        plain = load_base(source.model, target, target_dtype, four_bit=False)
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
            merged_scores = _score_saved(source, staging, pairs, tokenizer.pad_token_id, target)
            verification = compare_scores(reference_scores, merged_scores, reference_name, data_name, max_logp_diff,
                                          base_weights, trained_in_4bit)
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


def _scoring_settings(source: AdapterSource) -> tuple[int, int]:
    """Micro-batch size and log-prob chunk size: the training run's, so verification fits where training did."""
    if source.training is None:
        return 4, 1024
    return source.training.train.micro_batch_size, source.training.dpo.logps_chunk_size


def _score_trained(source: AdapterSource, base_model: Any, pairs: list[TokenizedPair], pad_token_id: int,
                   device: torch.device, compute_dtype: torch.dtype) -> torch.Tensor:
    """Scores of the model as trained: the base as training loaded it, plus the unmerged adapter."""
    model = apply_adapter(base_model, source)
    return score_pairs(model, pairs, pad_token_id, device, compute_dtype, *_scoring_settings(source))


def _score_saved(source: AdapterSource, merged_dir: Path, pairs: list[TokenizedPair], pad_token_id: int,
                 device: torch.device) -> torch.Tensor:
    """Scores of the merged model as a user gets it: loaded from disk by transformers alone, in its saved dtype."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto", device_map={"": str(device)},
                                                     trust_remote_code=source.model.trust_remote_code).eval()
    except (OSError, ValueError) as exc:
        raise LoraDpoError(f"the merged model does not load back ({one_line(exc)}). Fix: rerun with --debug "
                           "and report it") from None
    return score_pairs(model, pairs, pad_token_id, device, torch.float32, *_scoring_settings(source))


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
