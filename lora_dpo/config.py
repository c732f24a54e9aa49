"""Typed run configuration: dataclasses loaded from YAML, with ``key.sub=value`` overrides.

Every field carries a one-line docstring; ``field_docs`` reads them back (for error messages and
``docs/config.md``), so the documentation cannot drift from the code. Only torch-free, stdlib and
PyYAML code lives here, so a config can be checked without touching a model.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model id or local directory of the base causal LM (required)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model; null takes the default branch."""
    load_in_4bit: bool = True
    """Load the base in 4-bit NF4 with bitsandbytes; false loads it unquantized in compute_dtype (about 4x the memory in 16-bit)."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too, saving about 0.4 bits per weight."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of matmuls and activations; auto is bfloat16 where the GPU supports it, float16 on older GPUs, float32 on CPU."""
    init_adapter: Optional[str] = None
    """Existing LoRA adapter directory (e.g. from SFT) to start from; it is also the frozen reference."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: about 30% more compute for a large cut in memory."""
    checkpoint_layers: Optional[int] = None
    """Decoder layers to checkpoint, counted from the first; null checkpoints all. Each layer left out skips its recompute (about a third of its backward cost) and keeps its activations in memory."""
    compile: bool = False
    """torch.compile each decoder layer: fewer, fused kernels per step, after a one-time compile in the first steps (off until measured to pay on your setup)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel: auto lets transformers choose what the model supports (sdpa where it can, else eager; the log names it), or one of sdpa, eager, flash_attention_2."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train; auto takes the first CUDA GPU when there is one, else the CPU."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model repository; only turn on for repositories you trust."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank: trainable parameters and adapter size grow linearly with it."""
    alpha: float = 32.0
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Modules that get adapters: all-linear (every linear layer but the output head) or a list of module names."""


@dataclass
class DataConfig:
    train_file: str = ""
    """Training pairs: a .jsonl, .json or .parquet file, or a Hugging Face dataset name (needs the datasets package)."""
    train_split: str = "train"
    """Split to read when train_file is a Hugging Face dataset name."""
    eval_file: Optional[str] = None
    """Held-out pairs in the same formats; null splits eval_fraction off the training file instead."""
    eval_split: str = "test"
    """Split to read when eval_file is a Hugging Face dataset name."""
    eval_fraction: float = 0.05
    """Share of the training pairs held out for evaluation when no eval_file is given (0 disables evaluation)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages)."""
    chosen_column: str = "chosen"
    """Column holding the preferred response (a string, or assistant messages, or a whole conversation)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred response, in the same shape as the chosen one."""
    max_length: int = 1024
    """Most tokens in prompt + response; responses are cut at their end to fit."""
    max_prompt_length: int = 512
    """Most prompt tokens; longer prompts keep their last tokens (the part next to the response)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed row does: error stops with file, line and field; skip logs the row and goes on."""
    layout: Literal["padded", "prefix_shared", "packed", "packed_prefix_shared"] = "padded"
    """How pairs fill a forward pass: padded rows, the prompt shared by both responses, several pairs packed per row, or both."""
    pack_length: Optional[int] = None
    """Row width of the packed layouts in tokens; null packs into rows as wide as the longest sequence of the micro-batch."""
    group_by_length: bool = False
    """Fill micro-batches with pairs of similar length (less padding); batch order stays shuffled."""


LossName = Literal["sigmoid", "ipo", "hinge", "robust", "rpo", "simpo", "orpo", "sigmoid_norm", "exo_pair",
                   "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop"]

# The dpo.* hyper-parameters that belong to one loss (or a few), and the losses that read them.
# Config.validate rejects one set for a loss that is not selected: a silently ignored
# rpo_alpha is a run the user did not mean to do. beta is shared by every loss.
LOSS_PARAMETERS: dict[str, tuple[str, ...]] = {
    "label_smoothing": ("sigmoid", "rpo", "exo_pair", "aot", "aot_unpaired"),
    "robust_epsilon": ("robust",),
    "rpo_alpha": ("rpo",),
    "simpo_gamma": ("simpo",),
    "orpo_lambda": ("orpo",),
    "discopop_tau": ("discopop",),
}

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses built on the difference of the chosen and rejected scores, the only ones an
# f-divergence generalises (f-DPO's reparameterisation leaves a beta * log Z(x) term that cancels
# only in that difference); nll reads no reference, so it is unaffected.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "rpo", "nll")
# Losses that read only the policy's log-probs: with these alone, no reference pass is run.
REFERENCE_FREE_LOSSES = ("simpo", "orpo", "nll")
# Losses that sort the pairs of a micro-batch, so a per-pair weight (WPO) would meet another pair's loss.
SORTING_LOSSES = ("aot", "aot_unpaired")


@dataclass
class LossTerm:
    name: Literal[LossName, "nll"]
    """A loss of dpo.loss, or nll: the per-token negative log-likelihood of the chosen response."""
    weight: float = 1.0
    """Factor of this loss in the sum."""


@dataclass
class DPOSettings:
    loss: Literal[LossName, "weighted_sum"] = "sigmoid"
    """Preference loss: sigmoid (DPO), ipo, hinge, robust, rpo, simpo, orpo, TRL's other losses (sigmoid_norm, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop), or weighted_sum of dpo.losses (see docs/losses.md)."""
    losses: list[LossTerm] = field(default_factory=list)
    """With loss weighted_sum: the terms, e.g. [{name: sigmoid, weight: 1.0}, {name: nll, weight: 0.2}]."""
    beta: float = 0.1
    """Loss temperature: KL strength towards the reference (smaller drifts further); SimPO's reward scale (use 2-2.5)."""
    label_smoothing: float = 0.0
    """sigmoid/rpo/aot/aot_unpaired: assumed share of flipped preference labels (conservative DPO), below 0.5; exo_pair (required there, the paper uses 1e-3): EXO's eps."""
    robust_epsilon: Optional[float] = None
    """robust (required): assumed share of flipped preference labels, in [0, 0.5); the loss stays unbiased under it."""
    rpo_alpha: Optional[float] = None
    """rpo: weight of the chosen response's per-token NLL added to DPO; null means 1.0."""
    simpo_gamma: Optional[float] = None
    """simpo: target reward margin gamma; null means 0.5."""
    orpo_lambda: Optional[float] = None
    """orpo: weight of the odds-ratio term added to the chosen response's NLL; null means 0.1."""
    discopop_tau: Optional[float] = None
    """discopop: temperature of the blend between its logistic and exponential parts; null means 0.05 (the paper's)."""
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """f-DPO: the divergence from the reference that sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and rpo regularise with; reverse_kl is DPO's."""
    f_divergence_alpha: Optional[float] = None
    """alpha of f_divergence alpha_divergence; null means 0.5."""
    wpo_weighting: bool = False
    """WPO (TRL's use_weighting): weight each pair by how likely the policy is to produce both responses, to make off-policy pairs count less."""
    ld_alpha: Optional[float] = None
    """LD-DPO: weight in [0, 1] of the response tokens past the shorter response's length in every log-prob (null: 1, no down-weighting); counters DPO's preference for length."""
    logps_chunk_size: int = 512
    """Response tokens whose vocabulary logits are formed at once: lower it to save memory on large vocabularies."""
    ref_sync_every: int = 0
    """TR-DPO: every this many steps, move the reference towards the trained adapter (0: the reference stays fixed); see docs/losses.md."""
    ref_sync_alpha: Optional[float] = None
    """TR-DPO: share of the trained adapter in each reference update, in (0, 1] (1 makes the reference the policy); null means 0.6."""
    precompute_reference: bool = False
    """Compute the reference log-probs of every pair once before training (cached on disk) instead of every step."""
    reference_cache_dir: str = "~/.cache/lora-dpo/reference"
    """Where precomputed reference log-probs are kept, keyed by model, adapter, data and tokenization; reused by later runs."""


@dataclass
class TrainConfig:
    micro_batch_size: Union[int, Literal["auto"]] = 2
    """Preference pairs per forward/backward pass (each pair is two sequences); auto: the largest that fits the GPU (docs/memory.md), confirmed by a trial step."""
    gradient_accumulation_steps: int = 4
    """Micro-batches summed into one optimizer step; pairs per step = micro_batch_size x this (derived with micro_batch_size auto)."""
    pairs_per_step: Optional[int] = None
    """With micro_batch_size auto: pairs per optimizer step, split into micro-batches that fit; null means 8."""
    epochs: float = 1.0
    """Passes over the training pairs (fractions allowed); ignored when max_steps is set."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; null derives them from epochs."""
    learning_rate: float = 5e-6
    """Peak learning rate of the LoRA weights; 5e-6 as in published QLoRA DPO recipes (docs/first-run.md)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming the learning rate up from 0 (ignored when warmup_steps is set)."""
    warmup_steps: Optional[int] = None
    """Warm-up steps; null uses warmup_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = 1.0
    """Clip the gradient to this global norm (0 disables clipping)."""
    optim: Literal["adamw", "paged_adamw_8bit"] = "paged_adamw_8bit"
    """Optimizer: torch AdamW, or bitsandbytes' paged 8-bit AdamW (a quarter of the optimizer memory)."""
    seed: int = 42
    """Seed for LoRA initialisation, data order and the eval split."""
    eval_every: int = 0
    """Evaluate on the held-out pairs every this many steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint-STEP every this many steps (0: none); the final adapter always goes to output.dir."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted only after a newer one is fully written."""
    resume: Literal["never", "auto", "always"] = "never"
    """Continue from the newest complete checkpoint in output.dir: always (as --resume), never, or auto: continue when there is one, else start, and do nothing when this run already finished."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped, not applied)."""
    sample_every: int = 0
    """Answer a few fixed prompts every this many steps (and before the first and after the last) into samples.jsonl, to see how answers change (0: never)."""
    sample_prompts: int = 4
    """How many prompts sample_every answers: the first of sample_file, or of the held-out pairs' prompts."""
    sample_file: Optional[str] = None
    """Prompt file for sample_every (.txt one per line, or .jsonl/.json/.parquet with a prompt column); null takes the held-out pairs' prompts."""
    sample_max_new_tokens: int = 64
    """Longest sample_every answer, in tokens."""
    sample_temperature: float = 0.7
    """Sampling temperature of sample_every answers (0: greedy); each prompt keeps its random numbers from step to step, so answers change only as the model does."""


@dataclass
class OutputConfig:
    dir: str = "runs/dpo"
    """Directory that receives the adapter, tokenizer, resolved config, metrics, plots and report."""
    report: bool = True
    """Write report.md, report.html and plots/ at the end of the run (lora-dpo report RUN_DIR writes them at any time); a few seconds of plotting."""
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)
    """Experiment trackers that also receive every metrics row, e.g. [tensorboard]; each is an optional extra (pip install 'lora-dpo[tensorboard]'), W&B runs offline unless WANDB_MODE says otherwise."""


@dataclass
class EvalConfig:
    after_training: bool = False
    """Run the evaluation of `lora-dpo eval` on the finished run at the end of `lora-dpo train` (writes output.dir/eval/)."""
    judge: Optional[str] = None
    """Judge of the win rate: a reward model directory or hub id, or module:function / file.py:function scoring (prompt, answer); null: no win rate."""
    judge_4bit: bool = False
    """Load a reward-model judge in 4-bit NF4 (about a quarter of its 16-bit memory)."""
    prompts: int = 32
    """Held-out prompts answered by the reference and the policy (the first distinct ones of the held-out pairs)."""
    samples: int = 2
    """Answers per prompt from each model, the same seeds for both."""
    max_new_tokens: int = 256
    """Longest answer, in tokens; answers cut here count in their length and KL as they are."""
    temperature: float = 1.0
    """Sampling temperature; 1 with top_p 1 and top_k 0 samples the models themselves, which the KL estimate assumes."""
    top_p: float = 1.0
    """Nucleus sampling; 1 disables it."""
    top_k: int = 0
    """Top-k sampling; 0 disables it."""
    seed: int = 0
    """Sampling seed; answer j to prompt i has its own stream from (seed, i, j)."""
    batch_size: int = 8
    """Sequences generated (and judged) together; more is faster and needs more memory."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and how it is loaded."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The LoRA adapters."""
    data: DataConfig = field(default_factory=DataConfig)
    """The preference pairs."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    """The preference loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluation after training (the settings of `lora-dpo eval`)."""

    def validate(self) -> None:
        """Cross-field and range checks that types alone cannot express."""
        checks: list[tuple[bool, str, str]] = [
            (bool(self.model.name_or_path), "model.name_or_path", "is required: set it to a Hugging Face model id or a local model directory"),
            (bool(self.data.train_file), "data.train_file", "is required: set it to a .jsonl/.json/.parquet file or a dataset name"),
            (self.lora.r > 0, "lora.r", "must be a positive integer"),
            (self.lora.alpha > 0, "lora.alpha", "must be positive"),
            (0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
            (0 <= self.data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)"),
            (self.data.max_length >= 2, "data.max_length", "must be at least 2"),
            (0 < self.data.max_prompt_length < self.data.max_length, "data.max_prompt_length",
             f"must be positive and below data.max_length ({self.data.max_length}) so every response keeps a token"),
            (self.model.checkpoint_layers is None or self.model.checkpoint_layers >= 0, "model.checkpoint_layers",
             "must be >= 0 or null"),
            (self.dpo.beta > 0, "dpo.beta", "must be positive"),
            (0 <= self.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)"),
            (self.dpo.robust_epsilon is None or 0 <= self.dpo.robust_epsilon < 0.5, "dpo.robust_epsilon", "must be in [0, 0.5)"),
            (self.dpo.rpo_alpha is None or self.dpo.rpo_alpha > 0, "dpo.rpo_alpha", "must be positive"),
            (self.dpo.simpo_gamma is None or self.dpo.simpo_gamma >= 0, "dpo.simpo_gamma", "must be >= 0"),
            (self.dpo.orpo_lambda is None or self.dpo.orpo_lambda > 0, "dpo.orpo_lambda", "must be positive"),
            (self.dpo.discopop_tau is None or self.dpo.discopop_tau > 0, "dpo.discopop_tau", "must be positive"),
            (self.dpo.f_divergence_alpha is None or self.dpo.f_divergence_alpha > 0, "dpo.f_divergence_alpha",
             "must be positive"),
            (self.dpo.ld_alpha is None or 0 <= self.dpo.ld_alpha <= 1, "dpo.ld_alpha", "must be in [0, 1] or null"),
            (self.dpo.ref_sync_every >= 0, "dpo.ref_sync_every", "must be >= 0 (0 keeps the reference fixed)"),
            (self.dpo.ref_sync_alpha is None or 0 < self.dpo.ref_sync_alpha <= 1, "dpo.ref_sync_alpha",
             "must be in (0, 1] or null"),
            (self.dpo.logps_chunk_size > 0, "dpo.logps_chunk_size", "must be positive"),
            (self.data.pack_length is None or self.data.pack_length > 0, "data.pack_length", "must be positive or null"),
            (self.data.layout == "padded" or self.model.attn_implementation != "flash_attention_2", "data.layout",
             "needs model.attn_implementation sdpa or eager (its attention masks are not expressible for flash_attention_2)"),
            (self.train.micro_batch_size == "auto" or self.train.micro_batch_size > 0, "train.micro_batch_size",
             "must be positive or auto"),
            (self.train.pairs_per_step is None or self.train.pairs_per_step > 0, "train.pairs_per_step",
             "must be positive or null"),
            (self.train.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be positive"),
            (self.train.epochs > 0, "train.epochs", "must be positive"),
            (self.train.max_steps is None or self.train.max_steps > 0, "train.max_steps", "must be positive or null"),
            (self.train.learning_rate > 0, "train.learning_rate", "must be positive"),
            (0 <= self.train.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
            (self.train.warmup_steps is None or self.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0 or null"),
            (self.train.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
            (self.train.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)"),
            (self.train.eval_every >= 0, "train.eval_every", "must be >= 0"),
            (self.train.save_every >= 0, "train.save_every", "must be >= 0"),
            (self.train.log_every > 0, "train.log_every", "must be positive"),
            (self.train.keep_last > 0, "train.keep_last", "must be positive"),
            (self.train.max_bad_steps > 0, "train.max_bad_steps", "must be positive"),
            (self.train.sample_every >= 0, "train.sample_every", "must be >= 0 (0: never)"),
            (self.train.sample_prompts > 0, "train.sample_prompts", "must be positive"),
            (self.train.sample_max_new_tokens > 0, "train.sample_max_new_tokens", "must be positive"),
            (self.train.sample_temperature >= 0, "train.sample_temperature", "must be >= 0 (0: greedy)"),
            (len(set(self.output.report_to)) == len(self.output.report_to), "output.report_to", "lists a tracker twice"),
            (bool(self.output.dir), "output.dir", "is required"),
            (self.eval.prompts > 0, "eval.prompts", "must be positive"),
            (self.eval.samples > 0, "eval.samples", "must be positive"),
            (self.eval.samples == 1 or self.eval.temperature > 0, "eval.samples",
             "must be 1 with eval.temperature=0 (greedy decoding gives the same answer every time)"),
            (self.eval.max_new_tokens > 0, "eval.max_new_tokens", "must be positive"),
            (self.eval.temperature >= 0, "eval.temperature", "must be >= 0 (0 decodes greedily)"),
            (0 < self.eval.top_p <= 1, "eval.top_p", "must be in (0, 1]"),
            (self.eval.top_k >= 0, "eval.top_k", "must be >= 0 (0 disables it)"),
            (self.eval.batch_size > 0, "eval.batch_size", "must be positive"),
            (self.eval.judge is None or bool(self.eval.judge.strip()), "eval.judge", "must be null or name a judge"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key} {message} (got {_get(self, key)!r})", key=key)
        if self.model.checkpoint_layers is not None and not self.model.gradient_checkpointing:
            raise ConfigError("model.checkpoint_layers is set but model.gradient_checkpointing is false, so no layer "
                              "would be checkpointed. Fix: set model.gradient_checkpointing=true, or remove "
                              "model.checkpoint_layers", key="model.checkpoint_layers")
        if self.train.pairs_per_step is not None and self.train.micro_batch_size != "auto":
            raise ConfigError("train.pairs_per_step is only read with train.micro_batch_size=auto (otherwise pairs per "
                              "step = micro_batch_size x gradient_accumulation_steps). Fix: set "
                              "train.micro_batch_size=auto, or remove train.pairs_per_step", key="train.pairs_per_step")
        if self.model.init_adapter:
            for name in (f.name for f in dataclasses.fields(LoraSettings)):
                if getattr(self.lora, name) != getattr(LoraSettings(), name):
                    raise ConfigError(f"lora.{name} cannot be set with model.init_adapter: the adapter's own "
                                      "adapter_config.json decides its shape. Fix: remove lora.* from the config",
                                      key=f"lora.{name}")
        self._validate_loss_selection()

    def _validate_loss_selection(self) -> None:
        """dpo.losses only with weighted_sum, and no hyper-parameter of a loss that is not selected."""
        dpo = self.dpo
        if dpo.loss == "weighted_sum":
            if not dpo.losses:
                raise ConfigError("dpo.losses must list the terms when dpo.loss is weighted_sum, "
                                  "e.g. [{name: sigmoid, weight: 1.0}, {name: nll, weight: 0.2}]", key="dpo.losses")
            names = [term.name for term in dpo.losses]
            for index, term in enumerate(dpo.losses):
                if not term.weight > 0:
                    raise ConfigError(f"dpo.losses[{index}].weight must be positive (got {term.weight!r})", key="dpo.losses")
                if term.name in names[:index]:
                    raise ConfigError(f"dpo.losses[{index}]: {term.name} is listed twice. Fix: give it one entry "
                                      "with the summed weight", key="dpo.losses")
            if set(names) == {"nll"}:
                raise ConfigError("dpo.losses holds only nll, which learns nothing from the rejected responses. "
                                  "Fix: add a preference loss such as sigmoid", key="dpo.losses")
            selected = set(names)
            described = "weighted_sum of " + ", ".join(names)
        else:
            if dpo.losses:
                raise ConfigError(f"dpo.losses is only read when dpo.loss is weighted_sum (got dpo.loss={dpo.loss}). "
                                  "Fix: set dpo.loss=weighted_sum, or remove dpo.losses", key="dpo.losses")
            selected = {dpo.loss}
            described = dpo.loss
        for key, owners in LOSS_PARAMETERS.items():
            value = getattr(dpo, key)
            is_set = value is not None and not (key == "label_smoothing" and value == 0)
            if is_set and not selected.intersection(owners):
                raise ConfigError(f"dpo.{key} belongs to the {' and '.join(owners)} loss, but dpo.loss is {described}. "
                                  f"Fix: remove dpo.{key}, or select {' or '.join(owners)}", key=f"dpo.{key}")
        if "robust" in selected and dpo.robust_epsilon is None:
            raise ConfigError("dpo.robust_epsilon is required by the robust loss. Fix: set it to the share of "
                              "preference labels you expect to be flipped, e.g. dpo.robust_epsilon=0.1", key="dpo.robust_epsilon")
        if "exo_pair" in selected and dpo.label_smoothing == 0:
            raise ConfigError("dpo.label_smoothing must be above 0 for the exo_pair loss (its eps enters as log eps). "
                              "Fix: set dpo.label_smoothing=0.001, the EXO paper's value", key="dpo.label_smoothing")
        if dpo.f_divergence != "reverse_kl":
            other = sorted(selected - set(F_DIVERGENCE_LOSSES))
            if other:
                raise ConfigError(f"dpo.f_divergence={dpo.f_divergence} does not apply to {', '.join(other)} (only the "
                                  f"losses on the chosen-rejected score difference have an f-divergence form: "
                                  f"{', '.join(F_DIVERGENCE_LOSSES[:-1])}). Fix: set dpo.f_divergence=reverse_kl, "
                                  "or select one of those", key="dpo.f_divergence")
        if dpo.f_divergence_alpha is not None and dpo.f_divergence != "alpha_divergence":
            raise ConfigError(f"dpo.f_divergence_alpha is only read with dpo.f_divergence=alpha_divergence (got "
                              f"{dpo.f_divergence}). Fix: remove dpo.f_divergence_alpha, or set "
                              "dpo.f_divergence=alpha_divergence", key="dpo.f_divergence_alpha")
        sorting = sorted(selected.intersection(SORTING_LOSSES))
        if dpo.wpo_weighting and sorting:
            raise ConfigError(f"dpo.wpo_weighting cannot weight {', '.join(sorting)}: it sorts the pairs of a micro-batch, "
                              "so a pair's weight would meet another pair's loss. Fix: set dpo.wpo_weighting=false, or "
                              "select another loss", key="dpo.wpo_weighting")
        if dpo.ref_sync_alpha is not None and not dpo.ref_sync_every:
            raise ConfigError("dpo.ref_sync_alpha is only read when dpo.ref_sync_every is above 0 (TR-DPO). Fix: set "
                              "dpo.ref_sync_every, e.g. 64, or remove dpo.ref_sync_alpha", key="dpo.ref_sync_alpha")
        if dpo.ref_sync_every and selected <= set(REFERENCE_FREE_LOSSES):
            raise ConfigError(f"dpo.ref_sync_every: dpo.loss {described} reads no reference, so there is none to update. "
                              "Fix: set dpo.ref_sync_every=0, or select a loss with a reference", key="dpo.ref_sync_every")
        if dpo.ref_sync_every and dpo.precompute_reference:
            raise ConfigError("dpo.ref_sync_every and dpo.precompute_reference are incompatible: TR-DPO moves the "
                              "reference during training, a precomputed table holds the reference of the start. Fix: "
                              "set dpo.precompute_reference=false, or dpo.ref_sync_every=0", key="dpo.ref_sync_every")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or nothing), apply ``key.sub=value`` overrides, and validate everything."""
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = str(path) if path is not None else "<overrides>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text)
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
        lines = _key_lines(node)
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        overridden.add(key)
    try:
        config = _build(Config, raw, prefix="")
        config.validate()
    except ConfigError as exc:
        key = exc.key or ""
        line = lines.get(key)
        if key and any(o == key or o.startswith(key + ".") for o in overridden):
            where = "command-line override"
        else:
            where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: {exc}", key=exc.key) from None
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """``train.learning_rate=1e-4`` -> ("train.learning_rate", 1e-4); values are read as YAML scalars."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (for example train.learning_rate=1e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section", key=key)
        node = child
    node[parts[-1]] = value


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted keys to their 1-based line in the YAML file, for error messages."""
    found: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            found[dotted] = key_node.start_mark.line + 1
            found.update(_key_lines(value_node, dotted + "."))
    return found


def _build(cls: type, raw: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a mapping of keys, got {raw!r}", key=prefix.rstrip("."))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            # An item of a list of mappings (dpo.losses[0].) has only its own keys to offer.
            hint = f" (valid keys: {', '.join(fields)})" if "[" in prefix else _suggest(dotted)
            raise ConfigError(f"unknown key {dotted}{hint}", key=dotted)
    values = {}
    for name, value in raw.items():
        dotted = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, dotted + ".")
        else:
            values[name] = _coerce(value, hint, dotted)
    for f in dataclasses.fields(cls):
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name} is required", key=prefix.rstrip("."))
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}", key=key)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}", key=key)
    if origin is list:
        (item_type,) = args
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        if dataclasses.is_dataclass(item_type):
            # Errors name the item (dpo.losses[1].name) but keep the list's key, whose YAML line is known.
            items = []
            for index, item in enumerate(value):
                try:
                    items.append(_build(item_type, item, f"{key}[{index}]."))
                except ConfigError as exc:
                    raise ConfigError(str(exc), key=key) from None
            return items
        return [_coerce(item, item_type, key) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}", key=key)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(dotted: str) -> str:
    keys = all_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]  # right name, wrong section
    if not close:
        close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not close:
        section = dotted.split(".")[0]
        close = difflib.get_close_matches(section, [k.split(".")[0] for k in keys], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = following.value.value.strip()
    return docs


def config_reference_markdown() -> str:
    """Markdown table of every config key, its type, default and docstring (docs/config.md)."""
    out = []
    hints = typing.get_type_hints(Config)
    section_docs = field_docs(Config)
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        out.append(f"### `{section.name}` — {section_docs[section.name]}\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        docs = field_docs(cls)
        section_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section.name), f.name)
            out.append(f"| `{section.name}.{f.name}` | {_describe(section_hints[f.name])} | "
                       f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | "
                       f"{docs[f.name]} |")
        out.append("")
    return "\n".join(out)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
