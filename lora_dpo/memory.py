"""Will it fit: the peak GPU memory of a training run, from the model's config.json and the run's config.

``plan_memory`` is pure arithmetic over a ``ModelShape`` (read from config.json: no weights, no
torch) and a ``Config``: it returns the run's parts in bytes, what each adds to the peak, and
the predicted peak reserved memory. ``plan_command`` is ``lora-dpo plan``; ``choose_batch``
finds the largest micro-batch that fits a budget while keeping the pairs per step;
``resolve_auto_batch`` is ``train.micro_batch_size: auto`` (the plan, then a real trial step on
the longest pairs, backing off on out-of-memory); ``planner_hint`` is what an out-of-memory
error adds. docs/memory.md explains the model and what of it was measured.

The peak comes in the backward pass of the policy, in one of two phases: the log-prob chunks
(logits of ``dpo.logps_chunk_size`` tokens against the vocabulary, forward and backward, while
every checkpoint is held), or the first decoder layer's backward (its activations recomputed,
plus the gradients in flight). The reference pass (no grad) keeps nothing and peaks lower; it
adds only where it would not. Every byte count below states where it comes from; the constants
that are not exact sizes (per-token activation bytes, CUDA context, allocator slack) are
predictions until the `plan` stage of scripts/gpu_suite.sh measures them.

Several GPUs (``Sharding``, ``lora-dpo plan --processes N [--sharded]``): every number is per
GPU. Data-parallel, a GPU needs one GPU's plan and DDP's gradient buckets. Sharded (FSDP2, as
``distributed.shard_model`` lays the units out), the weights and the LoRA state are 1/N, the
quantization constants stay whole, and ``gathered_phases`` adds what each phase of the step
holds whole (a third phase, the embeddings' forward, competes with the two above);
``gpus_needed`` is the fewest GPUs that fit when nothing does. Unmeasured on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import Config, TrainConfig
from .errors import ConfigError, LoraDpoError

log = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
DEFAULT_PAIRS_PER_STEP = 8
"""Pairs per step under micro_batch_size auto when train.pairs_per_step is null (the defaults' 2 x 4)."""

NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantization: the absmaxes in 8 bits, one float32 per 256 of them
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only state tensors of at least this many elements
EIGHT_BIT_MIN_NUMEL = 4096  # smaller tensors keep 32-bit Adam state in bitsandbytes' 8-bit optimizers
EIGHT_BIT_BLOCK = 256  # one float32 absmax per 256 values of each 8-bit state
CUDA_CONTEXT = GIB // 2
"""CUDA context, cuBLAS and the kernels loaded in a step: outside torch's counters (predicted)."""
SLACK_EXPANDABLE = 0.03
"""Reserved over allocated with expandable segments (the lora-dpo commands' default; predicted)."""
SLACK_DEFAULT = 0.10
"""Reserved over allocated with PyTorch's default allocator: TRL's 8B long rows measured 7.43 GiB
allocated and 8.14 GiB reserved (+9.6 %, H100, docs/bench-reference.md)."""
LOGITS_BACKWARD_BYTES = 12  # per logit: bf16 logits, their float32 copy, float32 and bf16 gradients
LOGITS_FORWARD_BYTES = 10  # per logit without grad: bf16, float32, and logsumexp's float32 exp
LONGEST_SEARCHED = 131072
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# The model, from config.json


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only transformer's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    experts: int = 1
    """MLP experts per layer (1: a dense model); every expert's weights are held."""
    experts_per_token: int = 1
    sliding_window: bool = False
    """Some layers attend in a window: the masked layouts build a second mask."""
    model_type: str = ""
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config (its text config for multimodal models) or a config.json dict."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
            values = config.to_dict()
            values.setdefault("tie_word_embeddings", getattr(config, "tie_word_embeddings", True))
        else:
            values = dict(config.get("text_config") or config)
            values.setdefault("model_type", config.get("model_type", ""))

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                if values.get(name) is not None:
                    return values[name]
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head", "num_heads")
        vocab = first("vocab_size")
        if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
            raise LoraDpoError(f"config.json of model type {values.get('model_type')!r} names no hidden_size, "
                               "num_hidden_layers, num_attention_heads and vocab_size, so its memory cannot be "
                               "planned. Fix: plan with a decoder-only transformer's config.json")
        experts = first("num_local_experts", "num_experts", "n_routed_experts", default=1) or 1
        intermediate = first("moe_intermediate_size" if experts > 1 else "intermediate_size", "intermediate_size",
                             "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden
        kv_heads = first("num_key_value_heads", "num_kv_heads", default=1 if values.get("multi_query") else heads)
        return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, layers=layers, heads=heads,
                   kv_heads=kv_heads, head_dim=first("head_dim", default=hidden // heads),
                   tied=bool(first("tie_word_embeddings", default=True)), experts=experts,
                   experts_per_token=first("num_experts_per_tok", "moe_top_k", default=1) if experts > 1 else 1,
                   sliding_window=bool(values.get("sliding_window")) and values.get("use_sliding_window", True) is not False,
                   model_type=str(values.get("model_type", "")),
                   max_positions=first("max_position_embeddings", "n_positions"))

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Each decoder layer's linear layers: name -> (in features, out features, copies per layer)."""
        h, a, kv = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        i, e = self.intermediate_size, self.experts
        return {"q_proj": (h, a, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (a, h, 1),
                "gate_proj": (h, i, e), "up_proj": (h, i, e), "down_proj": (i, h, e)}

    def quantized_params(self) -> int:
        """Weights of the decoder's linear layers: what 4-bit NF4 quantizes."""
        return self.layers * sum(n_in * n_out * copies for n_in, n_out, copies in self.linears().values())

    def unquantized_params(self) -> int:
        """Embeddings, the output head unless tied, and the norms (two per layer and a final one):
        bitsandbytes leaves them in the compute dtype."""
        head = 0 if self.tied else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + head + (2 * self.layers + 1) * self.hidden_size

    def describe(self) -> str:
        moe = f", {self.experts} experts ({self.experts_per_token} per token)" if self.experts > 1 else ""
        return (f"{self.model_type or 'model'}: {self.layers} layers, hidden {self.hidden_size}, intermediate "
                f"{self.intermediate_size}, {self.heads} heads ({self.kv_heads} KV), vocab {self.vocab_size}"
                f"{', tied head' if self.tied else ''}{moe}; "
                f"{(self.quantized_params() + self.unquantized_params()) / 1e9:.2f}B parameters")


def read_model_shape(model_config: Any, offline: bool | None = None) -> ModelShape:
    """The ``ModelShape`` of ``model.name_or_path`` from its config.json alone: a local directory,
    the local hub cache, or (unless offline) the hub. No weights are read."""
    name, revision = model_config.name_or_path, model_config.revision
    path = Path(name).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise LoraDpoError(f"{path}: no config.json in this directory. Fix: point model.name_or_path at a model "
                               "saved with save_pretrained, or at a hub id")
    else:
        file = _hub_config_file(name, revision, offline)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoraDpoError(f"{file}: not a readable config.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise LoraDpoError(f"{file}: not a config.json (its top level is not a mapping)")
    try:
        from transformers import AutoConfig

        # transformers fills in the defaults a config.json leaves out (they differ by model type).
        values = {key: value for key, value in raw.items() if key != "model_type"}
        return ModelShape.from_config(AutoConfig.for_model(raw.get("model_type", ""), **values))
    except (ImportError, ValueError, KeyError, TypeError):  # remote code or an unknown model type: the file as it is
        return ModelShape.from_config(raw)


def _hub_config_file(name: str, revision: str | None, offline: bool | None) -> Path:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    if offline:
        raise LoraDpoError(f"{name}: not a local directory, and its config.json is not in the local hub cache "
                           "(offline). Fix: check the name, or download the model's config.json first")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception as exc:  # noqa: BLE001 - every hub failure has the same fix
        raise LoraDpoError(f"{name}: cannot read its config.json: not a local directory, not in the hub cache, and "
                           f"the hub said {type(exc).__name__}. Fix: check the name, your network or HF_HUB_OFFLINE"
                           ) from None


# ---------------------------------------------------------------------------------------------
# The micro-batch a forward pass holds


@dataclass(frozen=True)
class MicroBatch:
    """The rows of one forward pass, as ``batching.collate`` lays them out."""

    rows: int
    length: int
    """Row width in tokens, padding included."""
    scored: int
    """Response tokens whose log-probs are summed (what the head runs on)."""
    masked: bool
    """A (rows, 1, length, length) mask: the prefix-shared and packed layouts."""

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def _round8(tokens: int) -> int:
    return -(-tokens // 8) * 8  # collate pads rows to a multiple of 8


def longest_micro_batch(micro_batch_size: int, max_length: int, layout: str,
                        pack_length: int | None = None) -> MicroBatch:
    """The largest batch ``collate`` can make of ``micro_batch_size`` pairs under ``max_length``:
    every response as long as truncation allows after a one-token prompt. For the prefix-shared
    layouts that is a row of 2 x max_length - 1 tokens per pair."""
    pairs = micro_batch_size
    scored = 2 * pairs * (max_length - 1)
    if layout.endswith("prefix_shared"):
        units, unit = pairs, 2 * max_length - 1
    else:
        units, unit = 2 * pairs, max_length
    if layout.startswith("packed"):
        width = max(pack_length or 0, unit)
        per_row = max(1, width // unit)
        rows, length = -(-units // per_row), _round8(min(units, per_row) * unit)
    else:
        rows, length = units, _round8(unit)
    return MicroBatch(rows, length, scored, masked=layout != "padded")


def micro_batch_of(pairs: Sequence[Any], layout: str, pack_length: int | None = None) -> MicroBatch:
    """The batch ``collate`` makes of these pairs (token ids only; nothing is built)."""
    prompt = [len(p.prompt_ids) for p in pairs]
    chosen = [len(p.chosen_ids) for p in pairs]
    rejected = [len(p.rejected_ids) for p in pairs]
    scored = sum(chosen) + sum(rejected)
    if layout.endswith("prefix_shared"):
        units = [p + c + r for p, c, r in zip(prompt, chosen, rejected)]
    else:
        units = [p + c for p, c in zip(prompt, chosen)] + [p + r for p, r in zip(prompt, rejected)]
    if not layout.startswith("packed"):
        return MicroBatch(len(units), _round8(max(units)), scored, masked=layout != "padded")
    width = max([pack_length or 0] + units)
    room: list[int] = []
    for size in sorted(units, reverse=True):  # batching._pack's first-fit decreasing
        for row, free in enumerate(room):
            if size <= free:
                room[row] -= size
                break
        else:
            room.append(width - size)
    return MicroBatch(len(room), _round8(max(width - free for free in room)), scored, masked=True)


# ---------------------------------------------------------------------------------------------
# Per-token activation bytes of one decoder layer (bf16 autocast, 4-bit base, LoRA)


def lora_modules(target_modules: str | list[str]) -> list[str]:
    """The layer's linear layers that get adapters (all-linear: every one; the head never)."""
    if target_modules == "all-linear":
        return list(LINEAR_NAMES)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [name for name in LINEAR_NAMES if name in names]


def layer_saved_bytes(shape: ModelShape, targets: list[str], dropout: float, attn: str, length: int) -> int:
    """Bytes per token that autograd keeps for one decoder layer's backward.

    bitsandbytes' 4-bit matmul keeps no input (the weights are frozen, only the input gradient is
    needed). Each RMSNorm keeps its float32 input (4h). SDPA keeps q, k and v (k and v repeated to
    every head where a mask is passed, which transformers does for every layout here), its output
    and a float32 log-sum-exp per head. The MLP keeps gate (for SiLU), SiLU's output and up (for
    the product). Each LoRA module keeps its (dropped-out) input for lora_A's gradient, plus a
    one-byte dropout mask when dropout is on, and lora_A's rank-r output; without dropout the
    modules that read one tensor share it. The eager kernel also keeps the attention scores in
    bf16, the float32 softmax and its bf16 copy: 8 bytes per head per key.
    """
    h, a, i = shape.hidden_size, shape.heads * shape.head_dim, shape.intermediate_size
    active = shape.experts_per_token
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": a, "gate_proj": h * active, "up_proj": h * active,
              "down_proj": i * active}
    kept = 2 * 4 * h  # the two norms' float32 inputs
    kept += 4 * 2 * a + 4 * shape.heads  # SDPA: q, k, v, output; log-sum-exp
    kept += 3 * 2 * i * active  # gate, SiLU(gate), up
    if attn == "eager":
        kept += 8 * shape.heads * length
    shared_inputs = set()
    for name in targets:
        width = inputs[name]
        if dropout > 0:
            kept += width + 2 * width  # mask + dropped input
        else:
            # q/k/v read the normed hidden state, gate/up the second one; o and down their own inputs.
            group = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
            key = group.get(name, name)
            if key not in shared_inputs:
                shared_inputs.add(key)
                kept += 2 * width
    return kept


def lora_rank_bytes(targets: list[str], rank: int, experts_per_token: int) -> int:
    """Per token: lora_A's rank-r bf16 output, kept for lora_B's gradient, per targeted module."""
    per_layer = sum(experts_per_token if name in ("gate_proj", "up_proj", "down_proj") else 1 for name in targets)
    return 2 * rank * per_layer


def backward_work_bytes(shape: ModelShape) -> int:
    """Per token, at the widest point of one layer's backward (its MLP, whose saved tensors are
    freed as they are used): bf16 gradients of the product, SiLU's output and up (6i), and of the
    residual stream coming in and going out (4h). The attention's gradients come later, when the
    MLP's saved tensors are gone, and are smaller."""
    return 6 * shape.intermediate_size * shape.experts_per_token + 4 * shape.hidden_size


def no_grad_layer_bytes(shape: ModelShape) -> int:
    """Per token, a layer's forward without grad at its widest: the residual stream in and out
    (4h), a norm's float32 copy (4h), and three of gate, up, SiLU and their product (6i)."""
    return 8 * shape.hidden_size + 6 * shape.intermediate_size * shape.experts_per_token


def mask_bytes(batch: MicroBatch, sliding_window: bool) -> int:
    """The attention masks of a forward pass, held until its backward ends: the padded layout gets
    transformers' bool (rows, 1, T, T) mask; the masked layouts collate's bool mask and its
    additive bf16 copy, and one more bf16 copy with the window band where layers slide."""
    square = batch.rows * batch.length * batch.length
    if not batch.masked:
        return square
    return square * (3 + (2 if sliding_window else 0))


# ---------------------------------------------------------------------------------------------
# LoRA and optimizer state


def compute_bytes(model_config: Any) -> int:
    """Bytes per element of the compute dtype (float32 4; bfloat16, float16 and auto planned as 2)."""
    return 4 if model_config.compute_dtype == "float32" else 2


def lora_tensors(shape: ModelShape, targets: list[str], rank: int) -> list[int]:
    """Element counts of every LoRA A and B matrix of the model."""
    sizes = []
    for name, (n_in, n_out, copies) in shape.linears().items():
        if name in targets:
            sizes += [rank * n_in, n_out * rank] * copies
    return sizes * shape.layers


def optimizer_bytes(sizes: list[int], optim: str) -> tuple[int, int]:
    """(bytes on the GPU in torch's allocator, bytes in paged managed memory) of the Adam state.

    AdamW: two float32 moments (8 bytes per weight). bitsandbytes' paged 8-bit AdamW: two uint8
    moments with a float32 absmax per 256 values (2 + 8/256 bytes per weight), float32 for
    tensors under 4,096 elements; tensors of 100,000 elements or more are paged (CUDA managed
    memory, which the driver moves to CPU RAM when the card runs short), smaller ones are not.
    """
    if optim != "paged_adamw_8bit":
        return 8 * sum(sizes), 0
    on_gpu = paged = 0
    for numel in sizes:
        if numel < EIGHT_BIT_MIN_NUMEL:
            on_gpu += 8 * numel
            continue
        size = 2 * numel + 2 * 4 * -(-numel // EIGHT_BIT_BLOCK)
        if numel >= PAGED_MIN_NUMEL:
            paged += size
        else:
            on_gpu += size
    return on_gpu, paged


# ---------------------------------------------------------------------------------------------
# Several GPUs: data-parallel, or the model sharded over them (FSDP2, lora_dpo/distributed.py)


@dataclass(frozen=True)
class Sharding:
    """How a run spreads over GPUs: ``processes`` of them (one each), the model sharded over
    them with FSDP2 or whole on every one (data-parallel, DDP)."""

    processes: int = 1
    sharded: bool = False

    def share(self, size: int) -> int:
        """One process's share of ``size`` bytes that FSDP splits. Each tensor is padded to a
        multiple of N rows first; that padding (a few rows per tensor) is not counted."""
        return -(-int(size) // self.processes) if self.sharded else int(size)

    def describe(self) -> str:
        if self.sharded:
            return (f"per GPU of {self.processes} processes, the model sharded over them (FSDP2; planned with "
                    "fsdp_reshard_after_forward: true and fsdp_offload_params: false, as configs/accelerate/fsdp.yaml)")
        if self.processes > 1:
            return (f"per GPU of {self.processes} data-parallel processes: each GPU holds the whole model and its "
                    "micro-batches, so it needs what one GPU needs, plus DDP's gradient buckets")
        return "one GPU"


ONE_GPU = Sharding()


@dataclass(frozen=True)
class FsdpUnits:
    """Whole sizes, in bytes, of the FSDP units that are gathered (``distributed.shard_model``)."""

    layer: int
    """One decoder layer: its linear weights (4-bit packed, stored in the compute dtype), its two
    norms and its LoRA weights in float32."""
    embeddings: int
    """What the embedding forward gathers: the embeddings' unit, or the tail unit when tied."""
    tail: int
    """The final norm and the head (the shared embeddings when tied)."""
    layer_lora_gradients: int
    """One layer's LoRA gradients in float32: what its backward reduce-scatters."""


def fsdp_units(shape: ModelShape, config: Config, lora_params: int) -> FsdpUnits:
    """The gathered sizes of ``shape``'s units, with ``lora_params`` LoRA weights over all layers
    (an init adapter's frozen reference copy is in the layers too, without gradients)."""
    dtype_bytes = compute_bytes(config.model)
    linear = shape.quantized_params() // shape.layers
    linear_bytes = linear // 2 if config.model.load_in_4bit else linear * dtype_bytes
    lora_layer = lora_params // shape.layers
    lora_copies = 2 if config.model.init_adapter else 1
    tail = (shape.vocab_size * shape.hidden_size + shape.hidden_size) * dtype_bytes
    return FsdpUnits(layer=linear_bytes + 2 * shape.hidden_size * dtype_bytes + 4 * lora_layer * lora_copies,
                     embeddings=tail if shape.tied else shape.vocab_size * shape.hidden_size * dtype_bytes,
                     tail=tail, layer_lora_gradients=4 * lora_layer)


def gathered(size: int, sharding: Sharding) -> int:
    """A unit gathered whole, and the all-gather's input: a copy of this process's shard."""
    return size + sharding.share(size)


def gathered_phases(units: FsdpUnits, sharding: Sharding) -> dict[str, dict[str, tuple[int, str]]]:
    """What each phase of a sharded step holds whole beside the shards: {phase: {part: (bytes, note)}}.

    FSDP2 gathers a layer for its forward and again for its backward, and prefetches the next
    unit while one runs (in forward and backward order), so two units are whole at once: the one
    running and the next one's all-gather output. The tail unit stays gathered from its forward
    through the log-prob chunks' backward; the embeddings are whole only for their forward (the
    start of the forward, with the first layer prefetched). A layer's backward also holds its LoRA
    gradients whole, and the reduce-scatter's input copy of them and its output shard.
    """
    layer = gathered(units.layer, sharding)
    scatter = 2 * units.layer_lora_gradients + sharding.share(units.layer_lora_gradients)
    return {
        "the head": {"gathered: norm and head, and the last layer prefetched": (
            gathered(units.tail, sharding) + layer, "the tail unit whole through the log-prob chunks, the last "
            "decoder layer whole for its backward, and their all-gather inputs (a shard each)")},
        "a layer's backward": {
            "gathered: two decoder layers": (2 * layer, "the layer in backward and the next one prefetched, whole, "
                                                        "and their all-gather inputs (a shard each)"),
            "reduce-scatter of a layer's LoRA gradients": (scatter, "float32: the layer's gradients whole, the "
                                                                    "reduce-scatter's input copy and its output shard")},
        "the embeddings' forward": {"gathered: embeddings, and the first layer prefetched": (
            gathered(units.embeddings, sharding) + layer, "at the start of the forward (counted as if the "
            "checkpoints were held, on the side of caution)")},
    }


def fsdp_config(config: Config) -> Config:
    """``config`` as a sharded run must have it: train.optim=adamw (distributed.check_sharded_config
    refuses the paged 8-bit optimizers: their state lives outside FSDP's shards)."""
    return config if config.train.optim == "adamw" else with_overrides(config, ["train.optim=adamw"])


def sharded_refusals(config: Config) -> list[str]:
    """What the plan changed or assumed because a sharded run refuses it, and the first other
    setting ``distributed.check_sharded_config`` would stop the run on (one line each)."""
    notes = []
    if config.train.optim != "adamw":
        notes.append(f"train.optim={config.train.optim} is refused under FSDP: planned with train.optim=adamw "
                     "(set it in the config)")
    if config.train.micro_batch_size == "auto":
        notes.append("train.micro_batch_size=auto is refused under FSDP: set the micro-batch planned below")
    from .distributed import check_sharded_config

    numeric = with_overrides(fsdp_config(config), ["train.micro_batch_size=1"]) if \
        config.train.micro_batch_size == "auto" else fsdp_config(config)
    try:
        check_sharded_config(numeric)
    except ConfigError as exc:
        notes.append(f"the run would stop before loading: {exc}")
    return notes


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Part:
    name: str
    bytes: int
    """The part's size."""
    counted: int
    """What it adds to the predicted peak (0 for a part that is not alive at the peak)."""
    note: str = ""
    kind: str = "step"
    """weights (loaded with the model), state (LoRA and optimizer, for the whole run) or step."""
    sharded: bool = False
    """Split over the processes (FSDP), wholly or in part: ``bytes`` is what one process holds."""


@dataclass
class MemoryPlan:
    shape: ModelShape
    batch: MicroBatch
    micro_batch_size: int
    max_length: int
    parts: list[Part]
    allocated: int
    """Predicted peak of torch.cuda.max_memory_allocated."""
    reserved: int
    """Predicted peak of torch.cuda.max_memory_reserved: allocated plus the allocator's slack."""
    context: int
    paged: int
    """Paged optimizer state: managed memory, outside torch's counters and movable to CPU RAM."""
    sharding: Sharding = ONE_GPU
    """The GPUs the run spreads over; every byte above is per GPU."""

    @property
    def on_card(self) -> int:
        """What must fit the card: peak reserved and the CUDA context (paged state can move off it)."""
        return self.reserved + self.context

    def fits(self, budget: int) -> bool:
        return self.on_card <= budget

    def table(self) -> str:
        lines = ["| part | GiB | at the peak | note |", "|---|---|---|---|"]
        for part in self.parts:
            name = f"{part.name}, sharded: 1/{self.sharding.processes} per GPU" if part.sharded else part.name
            lines.append(f"| {name} | {gib(part.bytes)} | {gib(part.counted)} | {part.note} |")
        lines.append(f"| **peak allocated (predicted)** | | **{gib(self.allocated)}** | torch.cuda.max_memory_allocated |")
        lines.append(f"| **peak reserved (predicted)** | | **{gib(self.reserved)}** | torch.cuda.max_memory_reserved |")
        lines.append(f"| CUDA context | {gib(self.context)} | {gib(self.context)} | outside torch's counters (predicted) |")
        lines.append(f"| **on the card** | | **{gib(self.on_card)}** | peak reserved + CUDA context |")
        return "\n".join(lines)


def gib(size: int) -> str:
    return f"{size / GIB:.2f}"


def plan_memory(shape: ModelShape, config: Config, batch: MicroBatch | None = None, *,
                micro_batch_size: int | None = None, max_length: int | None = None,
                expandable_segments: bool = True, sharding: Sharding = ONE_GPU) -> MemoryPlan:
    """Predicted peak memory of ``config``'s training step on ``batch`` (default: the longest
    micro-batch of ``micro_batch_size`` pairs at ``max_length``, both defaulting to the config's),
    per GPU of ``sharding``. Pure arithmetic: nothing is loaded.

    Sharded, every weight, the LoRA weights, their gradients and the optimizer state are one
    process's share, except the quantization constants and the bf16 autocast copies of the LoRA
    weights (whole on every GPU); ``gathered_phases`` adds the units each phase holds whole.
    The activations are one GPU's with the same micro-batch."""
    model, lora, dpo = config.model, config.lora, config.dpo
    micro = micro_batch_size or (config.train.micro_batch_size if isinstance(config.train.micro_batch_size, int) else 1)
    length = max_length or config.data.max_length
    if batch is None:
        batch = longest_micro_batch(micro, length, config.data.layout, config.data.pack_length)
    h, v, n = shape.hidden_size, shape.vocab_size, batch.tokens
    dtype_bytes = compute_bytes(model)
    # An init adapter's own shape is unknown here: planned as the default, r=16 on every linear layer.
    targets = list(LINEAR_NAMES) if model.init_adapter else lora_modules(lora.target_modules)
    rank = 16 if model.init_adapter else lora.r
    sizes = lora_tensors(shape, targets, rank)
    lora_params = sum(sizes)
    parts: list[Part] = []

    def add(name: str, size: int, note: str = "", counted: int | None = None, kind: str = "step",
            sharded: bool = False) -> None:
        size = int(size)
        parts.append(Part(name, size, size if counted is None else int(counted), note, kind, sharded))

    split, share = sharding.sharded, sharding.share  # what FSDP splits over the processes, and one's share

    quantized = shape.quantized_params()
    if model.load_in_4bit:
        add("4-bit weights (NF4)", share(quantized // 2), f"{quantized / 1e9:.2f}B weights of the decoder's linear layers, "
            "two per byte" + (", stored in the compute dtype" if split else ""), kind="weights", sharded=split)
        constants = quantized * (1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)) if model.double_quant \
            else quantized * 4 / NF4_BLOCK
        add("quantization constants", constants, ("absmax per 64 weights, 8-bit with a float32 per 256 (double "
            "quantization)" if model.double_quant else "float32 absmax per 64 weights (model.double_quant=true "
            "saves 0.37 bits per weight)") + ("; whole on every GPU: bitsandbytes keeps them beside each weight, "
                                              "not as FSDP parameters" if split else ""), kind="weights")
    else:
        add("16-bit weights of the linear layers", share(quantized * dtype_bytes), "model.load_in_4bit=false", kind="weights",
            sharded=split)
    add("16-bit weights (embeddings, head, norms)", share(shape.unquantized_params() * dtype_bytes),
        "embeddings" + (" (tied head)" if shape.tied else " and the output head") + ", norms, in the compute dtype", kind="weights",
        sharded=split)
    # With an init adapter its frozen float32 copy is the reference: 4 more bytes per weight.
    master = lora_params * (4 + (4 if model.init_adapter else 0))
    # Sharded, the float32 weights are split; autocast's bf16 copies are of the gathered weights.
    add("LoRA weights", share(master) + lora_params * 2,
        f"{lora_params / 1e6:.1f}M in float32" + (" (sharded)" if split else "") + ", and their bf16 copies under "
        "autocast" + (" (whole)" if split else "") + (
            "; planned as r=16 on every linear layer, with the frozen reference copy (model.init_adapter)"
            if model.init_adapter else ""), kind="state", sharded=split)
    add("LoRA gradients", share(lora_params * 4), "float32, kept across the micro-batches of a step", kind="state",
        sharded=split)
    on_gpu, paged = optimizer_bytes(sizes, config.train.optim)
    add("optimizer state", share(on_gpu), "AdamW: two float32 moments" if config.train.optim == "adamw"
        else "8-bit moments of the tensors too small to page (under 100k elements)", kind="state", sharded=split)
    if sharding.processes > 1 and not split:
        add("DDP gradient buckets", lora_params * 4, "float32: DDP all-reduces the gradients through a copy of "
            "them, held for the whole run", kind="state")
    add("paged optimizer state", paged, "CUDA managed memory, outside torch's counters: the driver moves it to CPU "
        "RAM when the card runs short (a PCIe copy per step)" if paged else "none" + (
            " (train.optim=adamw)" if config.train.optim == "adamw" else ": every state tensor is under 100k elements"),
        counted=0,
        kind="state")

    checked = shape.layers if model.gradient_checkpointing else 0
    if model.gradient_checkpointing and model.checkpoint_layers is not None:
        checked = min(model.checkpoint_layers, shape.layers)
    unchecked = shape.layers - checked
    saved = layer_saved_bytes(shape, targets, lora.dropout, model.attn_implementation, batch.length) \
        + lora_rank_bytes(targets, rank, shape.experts_per_token)
    masks = mask_bytes(batch, shape.sliding_window) if model.attn_implementation != "flash_attention_2" else 0
    add("attention masks", masks, f"{batch.rows} rows x {batch.length}^2" + (
        ", bool + additive bf16" if batch.masked else ", bool (padded rows)"))
    add("checkpointed layer inputs", checked * n * 2 * h, f"{checked} layers x {n} tokens x hidden, bf16")
    add("activations of unchecked layers", unchecked * n * saved,
        f"{unchecked} layers x {saved} bytes per token" if unchecked else "none: every layer is checkpointed")

    # Phase 1 of backward: the head over the scored tokens, chunk by chunk, every checkpoint held.
    chunk = min(dpo.logps_chunk_size, batch.scored)
    head_phase = {
        "decoder output and scored hidden states": (n * 6 * h + batch.scored * 2 * 2 * h,
                                                    "final norm's float32 input and bf16 output; scored hidden states "
                                                    "and their gradient"),
        "log-prob chunk (logits forward + backward)": (chunk * v * LOGITS_BACKWARD_BYTES,
                                                       f"{chunk} tokens x {v} vocabulary x 12 bytes"),
    }
    # Phase 2: a layer's backward, its activations recomputed when it is checkpointed.
    largest_linear = max(n_in * n_out for n_in, n_out, _ in shape.linears().values())
    layer_phase = {
        "one layer's activations in backward": (n * saved if checked else 0,
                                                f"recomputed: {saved} bytes per token" if checked
                                                else "kept from the forward (counted above)"),
        "backward working memory": (n * backward_work_bytes(shape) + largest_linear * 2,
                                    "gradients in flight and the largest weight dequantized to bf16"),
    }
    phases = {"the head": head_phase, "a layer's backward": layer_phase}
    units = fsdp_units(shape, config, lora_params) if split else None
    if units:
        for phase, extra in gathered_phases(units, sharding).items():
            phases.setdefault(phase, {}).update(extra)
    add_peak_phase(add, phases)
    policy_peak = sum(part.counted for part in parts)

    static = sum(part.counted for part in parts if part.kind in ("weights", "state"))
    # Sharded, the reference pass gathers as the policy's forward does: two layers, then the tail.
    layer_gathered, tail_gathered = (2 * gathered(units.layer, sharding), gathered(units.tail, sharding)) \
        if units else (0, 0)
    reference_peak = static + masks + n * 2 * h + max(n * no_grad_layer_bytes(shape) + layer_gathered,
                                                      chunk * v * LOGITS_FORWARD_BYTES + tail_gathered)
    from .losses import needs_reference

    if not needs_reference(dpo):
        add("reference pass", 0, f"none: dpo.loss={dpo.loss} needs no reference", counted=0)
    else:
        when = "precomputed before training (dpo.precompute_reference)" if dpo.precompute_reference else "every step"
        add("reference pass", reference_peak - static, f"{when}, no grad: peaks at {gib(reference_peak)} GiB"
            + ("" if reference_peak > policy_peak else ", below the policy's backward"),
            counted=max(0, reference_peak - policy_peak))
    allocated = sum(part.counted for part in parts)
    slack = SLACK_EXPANDABLE if expandable_segments else SLACK_DEFAULT
    add("allocator slack", allocated * slack, f"{slack:.0%} of allocated ("
        + ("expandable segments" if expandable_segments else "PyTorch's default allocator") + ")")
    reserved = sum(part.counted for part in parts)
    return MemoryPlan(shape, batch, micro, length, parts, allocated, reserved, CUDA_CONTEXT, paged, sharding)


def add_peak_phase(add: Callable[..., None], phases: dict[str, dict[str, tuple[int, str]]]) -> None:
    """Every phase's parts; only those of the phase that needs most count at the peak (the first
    listed wins a tie), the others are shown with 0 and the phase that beats them."""
    totals = {phase: sum(size for size, _ in parts.values()) for phase, parts in phases.items()}
    peak = max(totals, key=lambda phase: totals[phase])
    for phase, parts in phases.items():
        for name, (size, note) in parts.items():
            wins = phase == peak
            add(name, size, note if wins else f"{note}; not at the peak ({peak} needs more)", None if wins else 0)


# ---------------------------------------------------------------------------------------------
# What fits


def pairs_per_step(train: TrainConfig) -> int:
    """The pairs each optimizer step trains on, as configured."""
    if train.micro_batch_size == "auto":
        return train.pairs_per_step or DEFAULT_PAIRS_PER_STEP
    return train.micro_batch_size * train.gradient_accumulation_steps


def divisors(number: int) -> list[int]:
    """Micro-batch sizes that split ``number`` pairs evenly, largest first."""
    return [d for d in range(number, 0, -1) if number % d == 0]


def expandable_segments_on() -> bool:
    """What the lora-dpo commands run with (cli.set_cuda_allocator_defaults): expandable segments
    unless the user's PYTORCH_CUDA_ALLOC_CONF says otherwise."""
    return "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True").lower()


@dataclass
class BatchChoice:
    pairs_per_step: int
    budget: int
    micro_batch_size: int | None
    """The largest divisor of the pairs per step that fits; None when not even 1 does."""
    plan: MemoryPlan
    """The plan of the chosen micro-batch (of micro-batch 1 when nothing fits)."""
    largest_micro_batch: int | None = None
    """The largest micro-batch that fits at all (at most 64), whatever the pairs per step."""

    @property
    def accumulation(self) -> int | None:
        return None if self.micro_batch_size is None else self.pairs_per_step // self.micro_batch_size


def choose_batch(shape: ModelShape, config: Config, budget: int, *, batch_of: Callable[[int], MicroBatch] | None = None,
                 expandable_segments: bool = True, sharding: Sharding = ONE_GPU) -> BatchChoice:
    """The largest micro-batch that divides the configured pairs per step (per process) and fits
    ``budget`` bytes of card memory on each GPU. ``batch_of(size)`` gives the longest micro-batch
    of ``size`` pairs (default: worst case at data.max_length)."""
    def plan(size: int) -> MemoryPlan:
        return plan_memory(shape, config, batch_of(size) if batch_of else None, micro_batch_size=size,
                           expandable_segments=expandable_segments, sharding=sharding)

    pairs = pairs_per_step(config.train)
    chosen = next((size for size in divisors(pairs) if plan(size).fits(budget)), None)
    largest = None
    if chosen is not None:
        low, high = chosen, 64  # monotone in the size: the largest that fits by bisection
        if plan(high).fits(budget):
            largest = high
        else:
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if plan(middle).fits(budget) else (low, middle)
            largest = low
    return BatchChoice(pairs, budget, chosen, plan(chosen or 1), largest)


def longest_max_length(shape: ModelShape, config: Config, budget: int, micro_batch_size: int = 1,
                       expandable_segments: bool = True, step: int = 64, sharding: Sharding = ONE_GPU) -> int | None:
    """The longest data.max_length (a multiple of ``step``) at which ``micro_batch_size`` pairs
    fit ``budget``; None when not even ``step`` tokens do."""
    limit = min(LONGEST_SEARCHED, shape.max_positions or LONGEST_SEARCHED)

    def fits(length: int) -> bool:
        return plan_memory(shape, config, micro_batch_size=micro_batch_size, max_length=length,
                           expandable_segments=expandable_segments, sharding=sharding).fits(budget)

    if not fits(step):
        return None
    low, high = 1, limit // step
    if fits(high * step):
        return high * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle)
    return low * step


SWITCHES: list[tuple[str, Callable[[Config], Any], str]] = [
    # (override, applies when, what it costs)
    ("model.gradient_checkpointing=true", lambda c: not c.model.gradient_checkpointing, "about 30% more compute"),
    ("model.checkpoint_layers=null", lambda c: c.model.gradient_checkpointing and c.model.checkpoint_layers is not None,
     "a third more backward time in the unchecked layers"),
    ("dpo.logps_chunk_size=128", lambda c: c.dpo.logps_chunk_size > 128, "a few more, smaller head matmuls"),
    ("train.optim=paged_adamw_8bit", lambda c: c.train.optim != "paged_adamw_8bit", "8-bit moments"),
    ("model.double_quant=true", lambda c: c.model.load_in_4bit and not c.model.double_quant, "none to speak of"),
    ("model.load_in_4bit=true", lambda c: not c.model.load_in_4bit, "4-bit rounding of the base"),
    ("model.attn_implementation=sdpa", lambda c: c.model.attn_implementation == "eager", "none"),
    ("data.layout=padded", lambda c: c.data.layout != "padded", "prompts computed twice"),
    ("lora.dropout=0", lambda c: c.lora.dropout > 0 and not c.model.init_adapter, "no dropout regularisation"),
]


def room_from_switches(shape: ModelShape, config: Config, micro_batch_size: int, max_length: int | None = None,
                       expandable_segments: bool = True, sharding: Sharding = ONE_GPU) -> list[tuple[str, int, str]]:
    """(override, bytes it saves, what it costs) for each switch that lowers the peak, most first
    (sharded: not the optimizer, which must stay adamw)."""
    def on_card(changed: Config) -> int:
        return plan_memory(shape, changed, micro_batch_size=micro_batch_size, max_length=max_length,
                           expandable_segments=expandable_segments, sharding=sharding).on_card

    base = on_card(config)
    found = []
    for override, applies, cost in SWITCHES:
        if not applies(config) or (sharding.sharded and override.startswith("train.optim=")):
            continue
        saved = base - on_card(with_overrides(config, [override]))
        if saved >= MIB:
            found.append((override, saved, cost))
    return sorted(found, key=lambda item: -item[1])


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """A copy of ``config`` with ``key=value`` overrides (strings as on the command line)."""
    from .config import parse_override

    changed = dataclasses.replace(config, **{f.name: dataclasses.replace(getattr(config, f.name))
                                             for f in dataclasses.fields(config)})
    for item in overrides:
        key, value = parse_override(item)
        section, name = key.split(".")
        setattr(getattr(changed, section), name, value)
    return changed


def verdict(shape: ModelShape, config: Config, budget: int, expandable_segments: bool = True,
            sharding: Sharding = ONE_GPU) -> str:
    """One line for when not even micro-batch 1 fits: what would (a shorter max_length, more GPUs
    to shard over, a switch), or that the card is too small."""
    one = plan_memory(shape, config, micro_batch_size=1, expandable_segments=expandable_segments, sharding=sharding)
    per_gpu = " per GPU" if sharding.processes > 1 else ""
    need = (f"micro-batch 1 at data.max_length={config.data.max_length} needs {gib(one.on_card)} GiB{per_gpu} "
            f"of {gib(budget)}")
    length = longest_max_length(shape, config, budget, 1, expandable_segments, sharding=sharding)
    more = gpus_needed(shape, fsdp_config(config), budget, expandable_segments,
                       above=sharding.processes if sharding.sharded else 1)
    sharded_fix = f"sharded over {more} GPUs (--processes {more} --sharded) it fits" if more else ""
    if length is not None:
        shorter = f"data.max_length={length} fits at micro-batch 1 (data.max_prompt_length below it)"
        if sharding.sharded and more:
            return f"nothing fits: {need}; {sharded_fix}, or {shorter}"
        return f"nothing fits: {need}; {shorter}"
    if sharding.sharded and more:
        return f"nothing fits: {need}; {sharded_fix}"
    for override, _, _ in room_from_switches(shape, config, 1, expandable_segments=expandable_segments,
                                             sharding=sharding):
        changed = with_overrides(config, [override])
        if plan_memory(shape, changed, micro_batch_size=1, expandable_segments=expandable_segments,
                       sharding=sharding).fits(budget):
            return f"nothing fits: {need}; {override} makes it fit"
    if sharding.sharded:
        whole = plan_memory(shape, config, micro_batch_size=1, expandable_segments=expandable_segments,
                            sharding=Sharding(MOST_GPUS, sharded=True)).on_card
        return (f"nothing fits: {need}, and no shorter max_length, switch or number of GPUs helps: what every GPU "
                f"holds whole (the gathered units, the quantization constants, the activations and the CUDA context) "
                f"takes {gib(whole)} GiB")
    weights = sum(part.counted for part in one.parts if part.kind == "weights") + one.context
    return (f"nothing fits: {need}, and no shorter max_length or switch helps: the model needs a larger card "
            f"(its weights and the CUDA context alone take {gib(weights)} GiB)" + (f"; {sharded_fix}" if more else ""))


MOST_GPUS = 1024
"""The most processes ``gpus_needed`` considers."""


def gpus_needed(shape: ModelShape, config: Config, budget: int, expandable_segments: bool = True, *,
                above: int = 1) -> int | None:
    """The fewest GPUs (more than ``above``) of ``budget`` bytes each that micro-batch 1 at
    data.max_length fits on with the model sharded over them (``config`` as a sharded run has it:
    ``fsdp_config``); None when no number up to MOST_GPUS does."""
    def plan(count: int) -> MemoryPlan:
        return plan_memory(shape, config, micro_batch_size=1, expandable_segments=expandable_segments,
                           sharding=Sharding(count, sharded=True))

    if above >= MOST_GPUS or not plan(MOST_GPUS).fits(budget):
        return None
    low, high = above, MOST_GPUS  # fits at high, not known at low: the on-card bytes fall as count grows
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if plan(middle).fits(budget) else (middle, high)
    return high


# ---------------------------------------------------------------------------------------------
# Budgets and the plan command


def parse_memory(text: str) -> int:
    """``12GiB``, ``12GB``, ``12G``, ``800MiB`` or a bare number of GiB -> bytes. Cards sold as
    "12 GB" hold 12 GiB, so GB and G count as GiB too."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GM]i?B?|[GM])?\s*", text, re.I)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 12GiB, 24GB or 800MiB")
    unit = (match[2] or "G")[0].upper()
    return int(float(match[1]) * (GIB if unit == "G" else MIB))


def visible_gpu_budget() -> int | None:
    """Card memory a training process could use: the visible GPU's free memory, plus what this
    process holds (its weights when called from a run) and the CUDA context the plan counts;
    no more than torch.cuda.set_per_process_memory_fraction allows. None without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    usable = free + torch.cuda.memory_reserved()
    fraction = torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    return int(min(usable, fraction * total)) + CUDA_CONTEXT


def plan_command(config: Config, gpu_memory: str | None, processes: int = 1, sharded: bool = False) -> int:
    """``lora-dpo plan``: the parts table, then what fits the card (each card of ``processes``,
    the model sharded over them when ``sharded``)."""
    if processes < 1:
        raise ConfigError(f"--processes {processes}: expected 1 or more GPUs")
    if sharded and processes < 2:
        raise ConfigError("--sharded: lora-dpo shards the model only over 2 or more processes. Fix: add "
                          "--processes N (the GPUs of the launch)")
    sharding = Sharding(processes, sharded)
    notes = sharded_refusals(config) if sharded else []
    if sharded:
        config = fsdp_config(config)
    shape = read_model_shape(config.model)
    expandable = expandable_segments_on()
    micro = config.train.micro_batch_size
    auto = micro == "auto"
    pairs = pairs_per_step(config.train)
    shown = plan_memory(shape, config, micro_batch_size=1 if auto else micro, expandable_segments=expandable,
                        sharding=sharding)
    print(f"{config.model.name_or_path}: {shape.describe()}")
    print(run_line(config, shape, shown))
    print(f"memory {sharding.describe()}")
    for note in notes:
        print(f"note: {note}")
    print()
    print(shown.table())
    print()
    budget = parse_memory(gpu_memory) if gpu_memory else visible_gpu_budget()
    if budget is None:
        raise LoraDpoError("no CUDA GPU is visible, so there is no card to fit. Fix: pass --gpu-memory SIZE "
                           "(the card's memory, e.g. --gpu-memory 12GiB) to plan for a card")
    source = "--gpu-memory" if gpu_memory else "free memory of the visible GPU"
    per_process = " per process" if processes > 1 else ""
    print(f"card: {gib(budget)} GiB ({source}){' each' if processes > 1 else ''}; pairs per step{per_process}: {pairs}")
    choice = choose_batch(shape, config, budget, expandable_segments=expandable, sharding=sharding)
    if choice.micro_batch_size is None:
        print(verdict(shape, config, budget, expandable, sharding))
        return 0
    print_fit(shape, config, budget, choice, expandable, sharding)
    return 0


def run_line(config: Config, shape: ModelShape, shown: MemoryPlan) -> str:
    """What the table below is of: the batch, the layout, the reference, checkpointing, the optimizer."""
    reference = "no reference" if not _needs_reference(config) else (
        "reference precomputed" if config.dpo.precompute_reference else "reference every step")
    checkpointing = "off" if not config.model.gradient_checkpointing else (
        f"{config.model.checkpoint_layers} of {shape.layers} layers" if config.model.checkpoint_layers is not None
        else "every layer")
    return (f"micro-batch {shown.micro_batch_size} pairs at data.max_length={config.data.max_length} "
            f"(the longest batch: {shown.batch.rows} rows x {shown.batch.length} tokens), layout {config.data.layout}, "
            f"{reference}, checkpointing {checkpointing}, train.optim={config.train.optim}")


def print_fit(shape: ModelShape, config: Config, budget: int, choice: BatchChoice, expandable: bool,
              sharding: Sharding) -> None:
    """The largest micro-batch that fits, the longest max_length, and the switches that buy room."""
    pairs, fitted = choice.pairs_per_step, choice.micro_batch_size
    auto = config.train.micro_batch_size == "auto"
    print(f"largest micro-batch at data.max_length={config.data.max_length}: train.micro_batch_size={fitted} "
          f"train.gradient_accumulation_steps={choice.accumulation} ({pairs} pairs per step"
          f"{f' per process, {pairs * sharding.processes} in all' if sharding.processes > 1 else ''}"
          f"{', as configured' if auto or fitted * choice.accumulation == pairs else ''}; "
          f"{gib(choice.plan.on_card)} GiB on {'each' if sharding.processes > 1 else 'the'} card)"
          + (f"; {choice.largest_micro_batch} fit if the pairs per step may change" if
             choice.largest_micro_batch and choice.largest_micro_batch > fitted else ""))
    for size in sorted({1, fitted}):
        length = longest_max_length(shape, config, budget, size, expandable, sharding=sharding)
        print(f"longest data.max_length at micro-batch {size}: {length if length else 'none'}")
    switches = room_from_switches(shape, config, fitted, expandable_segments=expandable, sharding=sharding)
    if switches:
        print(f"switches that buy the most room (at micro-batch {fitted}):")
        for override, saved, cost in switches[:5]:
            print(f"  {override}: {saved / GIB:.2f} GiB less ({cost})")


def _needs_reference(config: Config) -> bool:
    from .losses import needs_reference

    return needs_reference(config.dpo)


# ---------------------------------------------------------------------------------------------
# train.micro_batch_size: auto


def resolve_auto_batch(config: Config, model: Any, pairs: Sequence[Any], device: Any, pad_id: int) -> Config:
    """``config`` with train.micro_batch_size=auto replaced by the largest micro-batch that fits.

    The planner proposes the largest divisor of the pairs per step that fits this GPU (on the
    longest pairs of the data); real trial steps, forward and backward on the longest pairs with
    room held for the optimizer state, start one divisor above it and settle it. On out-of-memory the failed step's
    gradients are dropped and the next smaller divisor is tried, with the gradient accumulation
    raised to match, so the pairs per step stay as configured. The RNG is restored afterwards, so
    the run trains as it would with the chosen size written in the config. On a CPU there is no
    budget to plan with: the trial starts from the whole step. The choice is logged; the
    returned config (saved as the run's config.yaml) holds it.
    """
    import torch

    pairs_total = pairs_per_step(config.train)
    order = sorted(range(len(pairs)), key=lambda i: _layout_length(pairs[i], config.data.layout), reverse=True)
    candidates, planned = trial_sizes(config, model, pairs, order,
                                      visible_gpu_budget() if device.type == "cuda" else None)
    from .train import DpoStep

    step = DpoStep(config, model, None, None, None, device, pad_id)
    placeholder = _optimizer_bytes_of(model, config.train.optim) if device.type == "cuda" else 0
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for size in candidates:
                indices = order[:size]
                try:
                    with _room_held(placeholder, device):
                        model.train()
                        trial_step(step, pairs, indices)
                except torch.OutOfMemoryError:
                    # The failed step's gradients would be summed into the next one's.
                    model.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    log.info("train.micro_batch_size auto: %d pairs ran out of memory on the longest pairs; "
                             "trying fewer", size)
                    continue
                model.zero_grad(set_to_none=True)
                return _with_batch(config, size, pairs_total, planned)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    longest = order[0] if order else None
    tokens = _layout_length(pairs[longest], config.data.layout) if longest is not None else 0
    raise LoraDpoError(f"train.micro_batch_size=auto: not even one pair fits: a trial step on the longest pair "
                       f"({tokens} tokens, data.max_length={config.data.max_length}) ran out of GPU memory. Fix: lower "
                       "data.max_length; `lora-dpo plan CONFIG` shows what fits and which switches buy room")


def trial_sizes(config: Config, model: Any, pairs: Sequence[Any], order: list[int],
                budget: int | None) -> tuple[list[int], str]:
    """The micro-batch sizes to try, largest first, and what the planner said: every divisor of
    the pairs per step without a budget; with one, from one divisor above the plan down."""
    pairs_total = pairs_per_step(config.train)
    candidates = divisors(pairs_total)
    if budget is None:
        return candidates, ""
    shape = ModelShape.from_config(_base_config(model))
    choice = choose_batch(shape, config, budget, expandable_segments=expandable_segments_on(),
                          batch_of=lambda size: micro_batch_of([pairs[i] for i in order[:size]],
                                                               config.data.layout, config.data.pack_length))
    # One divisor above the plan first: the trial, not the prediction, has the last word, so a
    # plan that errs on the side of caution by one size costs one trial step, not the batch.
    above = [size for size in candidates if size > (choice.micro_batch_size or 0)]
    start = above[-1] if above else pairs_total
    planned = (f"the planner fits {choice.micro_batch_size} in {gib(budget)} GiB" if choice.micro_batch_size
               else f"the planner fits none in {gib(budget)} GiB")
    return [size for size in candidates if size <= start], planned


@contextlib.contextmanager
def _room_held(size: int, device: Any) -> Any:
    """Hold ``size`` bytes on ``device`` meanwhile: the optimizer state a real step will have."""
    import torch

    held = torch.empty(size, dtype=torch.uint8, device=device) if size else None
    try:
        yield
    finally:
        del held


def trial_step(step: Any, pairs: Sequence[Any], indices: list[int]) -> None:
    """Forward and backward of one micro-batch, as a training step runs them; no update."""
    result, _, _ = step.forward(pairs, indices, None)
    (result.losses.sum() / len(indices)).backward()


def _with_batch(config: Config, size: int, pairs_total: int, planned: str) -> Config:
    train = dataclasses.replace(config.train, micro_batch_size=size, gradient_accumulation_steps=pairs_total // size,
                                pairs_per_step=None)
    log.info("train.micro_batch_size auto: %d pairs per micro-batch x %d accumulation steps = %d pairs per step "
             "(%sa trial step on the longest pairs fit)", size, pairs_total // size, pairs_total,
             f"{planned}; " if planned else "")
    return dataclasses.replace(config, train=train)


def _layout_length(pair: Any, layout: str) -> int:
    from .batching import layout_length

    return layout_length(pair, layout)


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _optimizer_bytes_of(model: Any, optim: str) -> int:
    """What the optimizer will hold in torch's allocator for this model's trainable tensors."""
    return optimizer_bytes([p.numel() for p in model.parameters() if p.requires_grad], optim)[0]


def auto_batch_as_saved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Flat config ``after`` (micro_batch_size auto) as a run saves it once resolved, when the
    saved run ``before`` split the same pairs per step: so an auto run resumed, or started again
    when finished, is the same run and not one with changed settings."""
    keys = ("train.micro_batch_size", "train.gradient_accumulation_steps", "train.pairs_per_step")
    size, steps = before.get(keys[0]), before.get(keys[1])
    if after.get(keys[0]) != "auto" or not isinstance(size, int) or not isinstance(steps, int):
        return after
    if size * steps != (after.get(keys[2]) or DEFAULT_PAIRS_PER_STEP):
        return after
    return {**after, **{key: before.get(key) for key in keys}}


def planner_hint(config: Config) -> str:
    """What an out-of-memory message adds: the micro-batch the planner picks for this card (from
    config.json alone, offline), or that not even one pair fits; empty when it cannot tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ""
        card = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        shape = read_model_shape(config.model, offline=True)
        choice = choose_batch(shape, config, card, expandable_segments=expandable_segments_on())
    except Exception:  # noqa: BLE001 - a hint must never hide the error it is attached to
        return ""
    if choice.micro_batch_size is None:
        return f"; the planner (lora-dpo plan) predicts {verdict(shape, config, card, expandable_segments_on())}"
    return (f"; the planner (lora-dpo plan) would have chosen train.micro_batch_size={choice.micro_batch_size} with "
            f"train.gradient_accumulation_steps={choice.accumulation} for this {gib(card)} GiB card at "
            f"data.max_length={config.data.max_length} (or set train.micro_batch_size=auto)")
