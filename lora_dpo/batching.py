"""How preference pairs become token batches, and how a model turns a batch into per-pair log-probs.

A ``PairBatch`` lists, besides the model inputs, every scored token explicitly: the row and
position whose hidden state predicts it, the token id, and the segment (pair and side) its
log-prob is summed into. The log-prob code therefore does not care how pairs were laid out, and
the training loop only ever sees ``collate`` and ``pair_logps``. Layouts (``LAYOUTS``):

- ``padded``: one row per sequence (prompt + chosen, prompt + rejected), right-padded. Works with
  every attention kernel; pays for padding and for each prompt twice.
- ``prefix_shared``: one row per pair, ``[prompt, chosen, rejected]``. Rejected tokens see the
  prompt and earlier rejected tokens but not chosen, and their positions restart at len(prompt),
  so each prompt is processed once; the first rejected token is predicted from the last prompt
  position, exactly as in its own row.
- ``packed``: the padded layout's sequences laid end to end in rows of up to ``pack_length``
  tokens, positions restarting per sequence and attention confined to each sequence. Little
  padding, same tokens as ``padded`` otherwise.
- ``packed_prefix_shared``: ``prefix_shared`` units packed the same way: both savings.

Every layout but ``padded`` passes the decoder a 4D mask (rows, 1, T, T) with explicit position
ids, which the ``sdpa`` and ``eager`` attention kernels accept and ``flash_attention_2`` does not.
A custom mask reaches every layer unchanged, so sliding-window layers get the window built in,
from the position ids; where full and sliding layers mix, each kind gets its own mask (a dict by
layer type, which those families take as is). Layers no mask can keep to one sequence
(recurrent, convolution, chunked attention) are refused by their layer types, and a one-time
probe refuses the rest that disagree with the padded layout (ALiBi, learned positions, RWKV).
On a GPU such a dense mask keeps SDPA off its flash kernel and costs T x T per row; the token
savings have to pay for that, which only a measurement shows (docs/benchmarks.md).

``pair_logps`` runs the output head itself, so ``HeadPath`` repeats what each family's forward
does to the head's output (scales, soft caps), and a one-time probe against the model's own
forward refuses any transform it does not know.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
import weakref
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .data import TokenizedPair
from .errors import ConfigError, LoraDpoError, one_line

LAYOUTS = ("padded", "prefix_shared", "packed", "packed_prefix_shared")
MASKED_LAYOUT_KERNELS = ("sdpa", "eager")


@dataclass
class PairBatch:
    input_ids: torch.Tensor
    """(rows, length) token ids."""
    attention_mask: torch.Tensor | None
    """(rows, length) 1 for real tokens and 0 for padding; or, for the prefix-shared and packed
    layouts, (rows, 1, length, length) bool, True where query token i may attend to key token j."""
    position_ids: torch.Tensor | None
    """(rows, length) positions, or None for 0..length-1."""
    target_rows: torch.Tensor
    """(n,) row of each scored token's predicting hidden state."""
    target_positions: torch.Tensor
    """(n,) position of that hidden state (one before the token itself in a plain row)."""
    target_tokens: torch.Tensor
    """(n,) the scored token ids."""
    target_segments: torch.Tensor
    """(n,) pair index for chosen tokens, num_pairs + pair index for rejected tokens."""
    num_pairs: int
    num_tokens: int
    """Throughput count: 2 x prompt + chosen + rejected tokens over the pairs (what unshared work costs)."""
    layout: str = "padded"
    """The layout (one of ``LAYOUTS``) the rows were laid out in."""
    target_offsets: torch.Tensor | None = None
    """(n,) index of each scored token within its response (0 for the first): what LD-DPO weights by."""

    def to(self, device: torch.device | str) -> "PairBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return PairBatch(**moved)


@dataclass
class PairLogps:
    """Summed log-probs of each pair's responses, with their token counts, shape (pairs,) each.

    With LD-DPO (``pair_logps(..., ld_alpha=a)``) the sums weight the tokens past the shorter
    response's length by a; the counts stay whole.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_aligned: torch.Tensor | None = None
    """WPO (``pair_logps(..., wpo=True)``): sum over the response of log p(token) - log sum_v p(v)^2, no grad."""
    rejected_aligned: torch.Tensor | None = None

    def first(self, count: int) -> "PairLogps":
        """The rows of the first ``count`` pairs."""
        return PairLogps(*(None if value is None else value[:count]
                           for value in (getattr(self, f.name) for f in fields(self))))


def collate(pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int = 8,
            layout: str = "padded", pack_length: int | None = None) -> PairBatch:
    """Lay ``pairs`` out as ``layout`` (one of ``LAYOUTS``) for one forward pass.

    ``pack_length`` is the row width of the packed layouts; None packs into rows as wide as the
    longest sequence (or prefix-shared unit) of the batch, so packing never widens a batch. A
    unit longer than ``pack_length`` gets a row of its own.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)} (got {layout!r})", key="data.layout")
    if any(len(p.prompt_ids) == 0 for p in pairs):
        raise ValueError("every pair needs at least one prompt token (BOS counts) to predict its first response token")
    if layout == "padded":
        return _collate_padded(pairs, pad_token_id, pad_to_multiple_of)
    num_pairs = len(pairs)
    if layout.endswith("prefix_shared"):
        units = [_prefix_shared_unit(pair, index, num_pairs) for index, pair in enumerate(pairs)]
    else:
        units = ([_sequence_unit(p.prompt_ids, p.chosen_ids, index) for index, p in enumerate(pairs)]
                 + [_sequence_unit(p.prompt_ids, p.rejected_ids, num_pairs + index) for index, p in enumerate(pairs)])
    if layout.startswith("packed"):
        rows = _pack(units, pack_length)
    else:
        rows = [[unit] for unit in units]
    return _assemble(rows, pad_token_id, pad_to_multiple_of, num_pairs, sum(p.num_tokens for p in pairs), layout)


def _collate_padded(pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int) -> PairBatch:
    """Padded layout: rows 0..B-1 hold prompt + chosen, rows B..2B-1 prompt + rejected, right-padded.

    Chosen and rejected share one forward pass, so each pass is one launch sequence for 2B rows.
    Padding to a multiple of 8 keeps tensor-core shapes and limits recompilation of kernels.
    """
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    length = max(len(r) for r in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    target_rows, target_positions, target_tokens, target_segments, target_offsets = [], [], [], [], []
    num_pairs = len(pairs)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        pair = pairs[row % num_pairs]
        start = len(pair.prompt_ids)
        response = ids[start:]
        target_rows.append(torch.full((len(response),), row, dtype=torch.long))
        target_positions.append(torch.arange(start - 1, start - 1 + len(response), dtype=torch.long))
        target_tokens.append(torch.tensor(response, dtype=torch.long))
        target_segments.append(torch.full((len(response),), row, dtype=torch.long))
        target_offsets.append(torch.arange(len(response), dtype=torch.long))
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=None,
        target_rows=torch.cat(target_rows),
        target_positions=torch.cat(target_positions),
        target_tokens=torch.cat(target_tokens),
        target_segments=torch.cat(target_segments),
        num_pairs=num_pairs,
        num_tokens=sum(p.num_tokens for p in pairs),
        target_offsets=torch.cat(target_offsets),
    )


@dataclass
class _Unit:
    """A stretch of one row: its tokens, their positions, the tokens it scores, and its attention."""

    tokens: list[int]
    positions: list[int]
    predictors: list[int]
    """Index (within the unit) of the hidden state that predicts each scored token."""
    targets: list[int]
    segments: list[int]
    offsets: list[int]
    """Index of each scored token within its response."""
    hidden_span: tuple[int, int] | None = None
    """Columns [start, end) that tokens from ``end`` on must not see: the chosen response, for rejected tokens."""

    def allowed(self) -> torch.Tensor:
        size = len(self.tokens)
        allowed = torch.ones(size, size, dtype=torch.bool).tril_()
        if self.hidden_span is not None:
            start, end = self.hidden_span
            allowed[end:, start:end] = False
        return allowed


def _sequence_unit(prompt: list[int], response: list[int], segment: int) -> _Unit:
    start = len(prompt)
    return _Unit(
        tokens=prompt + response,
        positions=list(range(start + len(response))),
        predictors=list(range(start - 1, start - 1 + len(response))),
        targets=list(response),
        segments=[segment] * len(response),
        offsets=list(range(len(response))),
    )


def _prefix_shared_unit(pair: TokenizedPair, index: int, num_pairs: int) -> _Unit:
    """``[prompt, chosen, rejected]``: rejected continues from the prompt as if chosen were not there."""
    prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    rejected_start = prompt + chosen
    return _Unit(
        tokens=pair.prompt_ids + pair.chosen_ids + pair.rejected_ids,
        positions=list(range(rejected_start)) + list(range(prompt, prompt + rejected)),
        # The first rejected token is predicted by the last prompt token, like the first chosen one.
        predictors=(list(range(prompt - 1, rejected_start - 1))
                    + [prompt - 1] + list(range(rejected_start, rejected_start + rejected - 1))),
        targets=pair.chosen_ids + pair.rejected_ids,
        segments=[index] * chosen + [num_pairs + index] * rejected,
        offsets=list(range(chosen)) + list(range(rejected)),
        hidden_span=(prompt, rejected_start),
    )


def _pack(units: list[_Unit], pack_length: int | None) -> list[list[_Unit]]:
    """First-fit decreasing: each unit, longest first, goes into the first row with room for it."""
    width = max([pack_length or 0] + [len(unit.tokens) for unit in units])
    rows: list[list[_Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: len(u.tokens), reverse=True):
        size = len(unit.tokens)
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(unit)
                room[row] -= size
                break
        else:
            rows.append([unit])
            room.append(width - size)
    return rows


def _assemble(rows: list[list[_Unit]], pad_token_id: int, pad_to_multiple_of: int, num_pairs: int,
              num_tokens: int, layout: str) -> PairBatch:
    """Lay units end to end in rows; attention is block-diagonal, one block per unit."""
    length = max(sum(len(unit.tokens) for unit in row) for row in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
    target_rows, target_positions, target_tokens, target_segments, target_offsets = [], [], [], [], []
    for row, units in enumerate(rows):
        offset = 0
        for unit in units:
            size = len(unit.tokens)
            input_ids[row, offset : offset + size] = torch.tensor(unit.tokens, dtype=torch.long)
            position_ids[row, offset : offset + size] = torch.tensor(unit.positions, dtype=torch.long)
            allowed[row, 0, offset : offset + size, offset : offset + size] = unit.allowed()
            target_rows.append(torch.full((len(unit.targets),), row, dtype=torch.long))
            target_positions.append(torch.tensor(unit.predictors, dtype=torch.long) + offset)
            target_tokens.append(torch.tensor(unit.targets, dtype=torch.long))
            target_segments.append(torch.tensor(unit.segments, dtype=torch.long))
            target_offsets.append(torch.tensor(unit.offsets, dtype=torch.long))
            offset += size
        # Padding attends to itself and to the row's first token, and nothing attends to padding. A
        # query that may attend to nothing would make softmax NaN; one that sees only itself can go
        # NaN too where the pad id embeds to zeros (Gemma 3n's normed zero vectors do, in backward).
        # NaN in an unscored row still poisons the backward pass through the weight gradients.
        padding = torch.arange(offset, length)
        allowed[row, 0, padding, padding] = True
        allowed[row, 0, padding, 0] = True
    return PairBatch(
        input_ids=input_ids,
        attention_mask=allowed,
        position_ids=position_ids,
        target_rows=torch.cat(target_rows),
        target_positions=torch.cat(target_positions),
        target_tokens=torch.cat(target_tokens),
        target_segments=torch.cat(target_segments),
        num_pairs=num_pairs,
        num_tokens=num_tokens,
        layout=layout,
        target_offsets=torch.cat(target_offsets),
    )


def layout_length(pair: TokenizedPair, layout: str = "padded") -> int:
    """Tokens one pair puts in its layout's rows (per row for padded): what length grouping sorts by."""
    if layout.endswith("prefix_shared"):
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def length_grouped_batches(pairs: Sequence[TokenizedPair], micro_batch_size: int, seed: int,
                           layout: str = "padded", window: int = 64) -> list[list[int]]:
    """One epoch of micro-batches (lists of pair indices) whose pairs have similar lengths.

    The pairs are shuffled, cut into windows of ``window`` micro-batches, sorted by length inside
    each window and split into micro-batches; then the micro-batches are shuffled. Padding drops to
    what a window's spread of lengths leaves, while batch contents still change with the seed and
    training does not see short pairs first and long ones last. Same seed, same batches.
    """
    if micro_batch_size < 1 or window < 1:
        raise ValueError("micro_batch_size and window must be positive")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    span = micro_batch_size * window
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: layout_length(pairs[i], layout), reverse=True)
        batches.extend(group[i : i + micro_batch_size] for i in range(0, len(group), micro_batch_size))
    rng.shuffle(batches)
    return batches


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output projection of a (possibly peft-wrapped) causal LM."""
    base = _base_model(model)
    decoder = base.get_decoder()
    if decoder is base and isinstance(getattr(base, "model", None), torch.nn.Module):
        # get_decoder() falls back to the model itself where base_model_prefix names no attribute
        # (Llama4ForCausalLM in transformers 5.24); the body is then under .model, as in most families.
        decoder = base.model
    return decoder, base.get_output_embeddings()


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------------
# The output head as each family's forward applies it
#
# pair_logps runs the decoder and the head itself (on scored positions only), so whatever a
# family's forward does between the decoder's last hidden state and the logits it returns has to
# be done here too. A survey of every causal-LM forward in transformers 5.24 found these
# (keyed by class, because the forward decides: Gemma3ForConditionalGeneration applies no
# softcap even where its text config names one, Gemma3ForCausalLM does):
# - logits / config.logits_scaling: Granite, GraniteSWA, GraniteMoe, GraniteMoeSWA,
#   GraniteMoeHybrid, GraniteMoeShared.
# - logits * config.logit_scale: Cohere, Cohere2, Cohere2Moe, CohereCompass.
# - logits * config.logits_scaling (Granite's name, the other way round): HyperCLOVAX.
# - logits * config.lm_head_multiplier: FalconH1.
# - tanh(logits / cap) * cap: config.final_logit_softcapping in Gemma2, Gemma3 (text), Gemma3n,
#   Gemma4, Gemma4Unified (text and multimodal), VaultGemma, NanoChat, Beam, Inkling2(Loop);
#   config.logits_soft_cap in RecurrentGemma; config.output_logit_soft_cap in xLSTM.
# - hidden / config.logits_scaling before the head: MiniCPM3; hidden /
#   config.logits_mup_width_multiplier and only the first config.unpadded_vocab_size logits:
#   Inkling.
# Every other family returns the head's output unchanged (some cast it to float32, which
# _token_logps does anyway). Families whose head is not one projection (BERT-style prediction
# heads, Electra, ModernBertDecoder, MusicGen's several heads, the Gemma 4 assistants) are not
# listed: the one-time check in pair_logps refuses them, as it refuses any transform missing
# here (remote code included), instead of training on the wrong numbers.

_LOGITS_SCALING_DIVIDES = {"divisor": "logits_scaling"}
_LOGIT_SCALE = {"multiplier": "logit_scale"}
_FINAL_SOFTCAP = {"softcap": "final_logit_softcapping"}
HEAD_TRANSFORMS: dict[str, dict[str, str]] = {
    **dict.fromkeys(["GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
                     "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM"], _LOGITS_SCALING_DIVIDES),
    **dict.fromkeys(["CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM"],
                    _LOGIT_SCALE),
    "HyperCLOVAXForCausalLM": {"multiplier": "logits_scaling"},
    "FalconH1ForCausalLM": {"multiplier": "lm_head_multiplier"},
    **dict.fromkeys(["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
                     "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
                     "Gemma4UnifiedForConditionalGeneration", "VaultGemmaForCausalLM", "NanoChatForCausalLM",
                     "BeamForCausalLM", "Inkling2ForCausalLM", "Inkling2LoopForCausalLM"], _FINAL_SOFTCAP),
    "RecurrentGemmaForCausalLM": {"softcap": "logits_soft_cap"},
    "xLSTMForCausalLM": {"softcap": "output_logit_soft_cap"},
    "MiniCPM3ForCausalLM": {"hidden_divisor": "logits_scaling"},
    "InklingForCausalLM": {"hidden_divisor": "logits_mup_width_multiplier", "vocab_size": "unpadded_vocab_size"},
}
"""Model class name -> {HeadPath field: config attribute holding its value} (the text config of multimodal models)."""


@dataclass(frozen=True)
class HeadPath:
    """What a model's forward does around its output head, in this order: hidden state divided
    by ``hidden_divisor``, the head, logits times ``multiplier``, divided by ``divisor``,
    soft-capped as tanh(logits / softcap) * softcap, cut to the first ``vocab_size`` columns."""

    hidden_divisor: float | None = None
    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None
    vocab_size: int | None = None

    def logits(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden`` (..., hidden size), as the model's forward returns them."""
        if self.hidden_divisor is not None:
            hidden = hidden / self.hidden_divisor
        logits = head(hidden).float()
        if self.multiplier is not None:
            logits = logits * self.multiplier
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.vocab_size is not None:
            logits = logits[..., : self.vocab_size]
        return logits


def head_path(model: Any) -> HeadPath:
    """The ``HeadPath`` of a (possibly peft-wrapped) causal LM, from ``HEAD_TRANSFORMS`` and its config."""
    base = _base_model(model)
    config = base.config.get_text_config()
    transforms = HEAD_TRANSFORMS.get(type(base).__name__, {})
    values = {name: getattr(config, attribute, None) for name, attribute in transforms.items()}
    return HeadPath(**{name: value for name, value in values.items() if value is not None})


def pair_logps(model: Any, batch: PairBatch, chunk_size: int = 512, *, ld_alpha: float | None = None,
               wpo: bool = False) -> PairLogps:
    """Per-pair summed response log-probs, forming vocabulary logits only for scored tokens.

    The body runs once over all rows; the output head then runs on the scored positions alone, in
    chunks of ``chunk_size`` tokens. With gradients on, each chunk is checkpointed, so at most one
    chunk's (chunk_size x vocab) float32 logits exist at a time in forward and backward — about
    256 MB for a 128k vocabulary at 512 tokens, instead of gigabytes for full-sequence logits.
    The price is one extra head matmul per chunk in the backward pass.

    Two per-token quantities of other losses are formed here, from each chunk's logits while they
    exist: ``ld_alpha`` (LD-DPO, Liu et al. 2024, arXiv:2409.06411) weights every response token
    past the shorter response's length by ld_alpha in the sums (tokens 0..min(|y_w|, |y_l|) - 1
    keep weight 1); ``wpo`` also sums, without grad, log p(token) - log sum_v p(v)^2 into
    ``chosen_aligned`` / ``rejected_aligned`` for WPO's weights (one more logsumexp over the
    chunk's vocabulary, and a second chunk-sized temporary while it runs).

    The first call for a model checks, once, that this path gives the model's own numbers: on a
    16-token probe, head + ``HeadPath`` against the model's forward; and, the first time a
    masked layout comes, a packed prefix-shared probe against the padded one. Either
    disagreeing beyond rounding is an error (three no-grad forwards of under 30 tokens, once).
    """
    decoder, head = decoder_and_head(model)
    masked = batch.attention_mask is not None and batch.attention_mask.dim() == 4
    if masked:
        _require_mask_kernel(decoder)
    path = _checked_head_path(model, decoder, head, batch, masked)
    return _pair_logps(decoder, head, path, batch, chunk_size, ld_alpha, wpo)


def _pair_logps(decoder: torch.nn.Module, head: torch.nn.Module, path: HeadPath, batch: PairBatch,
                chunk_size: int, ld_alpha: float | None = None, wpo: bool = False) -> PairLogps:
    attention_mask = batch.attention_mask
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = _decoder_masks(decoder, attention_mask, batch.position_ids)
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    selected = hidden[batch.target_rows, batch.target_positions]
    pieces, aligned_pieces = [], []
    for start in range(0, selected.shape[0], chunk_size):
        h = selected[start : start + chunk_size]
        tokens = batch.target_tokens[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            piece = checkpoint(_token_logps, head, h, tokens, path, wpo, use_reentrant=False)
        else:
            piece = _token_logps(head, h, tokens, path, wpo)
        pieces.append(piece[0])
        aligned_pieces.append(piece[1])
    empty = selected.new_zeros(0, dtype=torch.float32)
    token_logps = torch.cat(pieces) if pieces else empty
    segments = 2 * batch.num_pairs
    device = token_logps.device
    # index_add rather than bincount: bincount on CUDA reads its maximum back to the host (a sync).
    counts = torch.zeros(segments, dtype=torch.long, device=device).index_add(
        0, batch.target_segments, torch.ones_like(batch.target_segments))
    b = batch.num_pairs
    weighted = token_logps
    if ld_alpha is not None:
        # LD-DPO: a token at offset >= min(|y_w|, |y_l|) of its response is the "verbose" part.
        shared = torch.minimum(counts[:b], counts[b:]).repeat(2)
        verbose = batch.target_offsets >= shared[batch.target_segments]
        weighted = token_logps * torch.where(verbose, ld_alpha, 1.0)
    sums = torch.zeros(segments, dtype=torch.float32, device=device).index_add(0, batch.target_segments, weighted)
    logps = PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])
    if wpo:
        aligned = torch.zeros(segments, dtype=torch.float32, device=device).index_add(
            0, batch.target_segments, torch.cat(aligned_pieces) if aligned_pieces else empty)
        logps.chosen_aligned, logps.rejected_aligned = aligned[:b], aligned[b:]
    return logps


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, path: HeadPath,
                 wpo: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) of each row of ``hidden``, and with ``wpo`` log p(token) - log sum_v p(v)^2 (no grad)."""
    logits = path.logits(head, hidden)
    normaliser = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - normaliser
    if not wpo:
        return token_logps, None
    with torch.no_grad():
        # log sum_v p(v)^2 = logsumexp(2 * logits) - 2 * logsumexp(logits)
        aligned = token_logps - (torch.logsumexp(2 * logits, dim=-1) - 2 * normaliser)
    return token_logps, aligned


# ---------------------------------------------------------------------------------------------
# One-time checks against the model's own forward

PROBE_TOKENS = 16


@dataclass
class _Checked:
    head: HeadPath
    masked_layouts: bool = False


_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, _Checked]" = weakref.WeakKeyDictionary()
"""Models already checked (weakly held: a model that is freed drops out)."""


def _checked_head_path(model: Any, decoder: torch.nn.Module, head: torch.nn.Module, batch: PairBatch,
                       masked: bool) -> HeadPath:
    base = _base_model(model)
    checked = _CHECKED.get(base)
    if checked is None:
        path = head_path(base)
        with _probe_mode(base):
            _check_head_path(base, decoder, head, path, batch.input_ids[0, :PROBE_TOKENS])
        checked = _CHECKED[base] = _Checked(path)
    if masked and not checked.masked_layouts:
        _require_attention_layers(decoder, batch.layout)
        with _probe_mode(base):
            _check_masked_layouts(base, decoder, head, checked.head, batch)
        checked.masked_layouts = True
    return checked.head


@contextlib.contextmanager
def _probe_mode(model: torch.nn.Module) -> Iterator[None]:
    """No grad and eval mode (no dropout, so two paths can agree), each module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _model_name(model: torch.nn.Module) -> str:
    return f"{getattr(model.config, 'model_type', '?')} ({type(model).__name__})"


def _rounding(*dtypes: torch.dtype) -> float:
    """The coarsest machine epsilon among ``dtypes`` and the autocast dtype in force, if any."""
    dtypes = list(dtypes)
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            dtypes.append(torch.get_autocast_dtype(device_type))
    return max(torch.finfo(dtype).eps for dtype in dtypes if dtype.is_floating_point)


def _check_head_path(base: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module, path: HeadPath,
                     probe: torch.Tensor) -> None:
    """Log-probs of the head + ``path`` against the model's forward on ``probe``, all vocabulary.

    One forward of the model; its decoder's output is caught on the way, so both sides start
    from the same hidden state (a second decoder run could differ by rounding, e.g. where MoE
    routing adds up in a different order on a GPU).
    """
    caught = []
    hook = decoder.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        theirs = base(input_ids=probe.unsqueeze(0), use_cache=False).logits[0]
    finally:
        hook.remove()
    try:
        if len(caught) != 1:
            raise RuntimeError(f"the forward ran get_decoder() {len(caught)} times, not once")
        ours = path.logits(head, caught[0].last_hidden_state[0])
    except torch.OutOfMemoryError:
        raise
    except (TypeError, AttributeError, RuntimeError) as exc:
        # get_decoder() returning the head (ModernBertDecoder), a prediction head between body and
        # output projection (Electra): the parts do not compose as decoder then head.
        raise LoraDpoError(f"{_model_name(base)}: its get_decoder() ({type(decoder).__name__}) and "
                           f"get_output_embeddings() ({type(head).__name__}) do not compose into its forward "
                           f"({type(exc).__name__}: {one_line(exc, 120)}), so lora-dpo cannot score it. Fix: use "
                           "another model family (docs/training.md lists the ones it knows)") from None
    rounding = _rounding(theirs.dtype, caught[0].last_hidden_state.dtype)
    theirs = theirs.float()
    if ours.shape != theirs.shape:
        raise LoraDpoError(f"{_model_name(base)}: its forward returns logits of shape {tuple(theirs.shape)} where its "
                           f"output head gives {tuple(ours.shape)}, so lora-dpo cannot score it. Fix: use another "
                           "model family (docs/training.md lists the head transforms it knows)")
    gap = (ours.log_softmax(-1) - theirs.log_softmax(-1)).abs().max().item()
    # The same hidden state through the same head; what is left is the rounding of the transform
    # in the model's dtype: a few epsilons of the largest logit (8 x 2^-7 x it in bf16).
    tolerance = 8 * rounding * (1.0 + theirs.abs().max().item())
    if not gap <= tolerance:
        raise LoraDpoError(f"{_model_name(base)}: lora-dpo's output-head path gives log-probs up to {gap:.3g} nats "
                           f"away from the model's own forward (rounding allows {tolerance:.2g}), so it would train on "
                           "wrong numbers: the forward transforms its logits in a way batching.HEAD_TRANSFORMS does "
                           "not know. Fix: use another model family (docs/training.md lists the ones it knows)")


def _check_masked_layouts(base: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module, path: HeadPath,
                          batch: PairBatch) -> None:
    """Two probe pairs packed prefix-shared into one row against the padded layout: layers that
    carry state along the row (recurrent, convolution) or ignore the mask show up here."""
    ids = batch.input_ids.flatten().tolist()
    ids = (ids * (24 // len(ids) + 1))[:24]
    pairs = [TokenizedPair(ids[0:4], ids[4:9], ids[9:13]), TokenizedPair(ids[13:16], ids[16:20], ids[20:24])]
    device = batch.input_ids.device
    plain = _pair_logps(decoder, head, path, collate(pairs, 0).to(device), PROBE_TOKENS)
    shared_batch = collate(pairs, 0, layout="packed_prefix_shared", pack_length=64).to(device)  # one row
    fix = f"Fix: set data.layout=padded (data.layout={batch.layout} needs attention-only layers that take a per-token mask)"
    try:
        shared = _pair_logps(decoder, head, path, shared_batch, PROBE_TOKENS)
    except (torch.OutOfMemoryError, LoraDpoError):
        raise
    except Exception as exc:  # a family whose layers reject a 4D mask fails in its own way
        raise ConfigError(f"data.layout={batch.layout}: {_model_name(base)} fails with a per-token attention mask "
                          f"({type(exc).__name__}: {one_line(exc, 120)}). {fix}", key="data.layout") from None
    counts = torch.cat([plain.chosen_tokens, plain.rejected_tokens]).float()
    differences = torch.cat([shared.chosen, shared.rejected]) - torch.cat([plain.chosen, plain.rejected])
    gap = (differences.abs() / counts).max().item()
    # Per token: float32 layouts agree to ~1e-6. Half precision rounds rows of other shapes
    # differently; 0.1 nats per token leaves room for that (the bf16 layout test allows 0.05 nats
    # per sequence) and still catches state leaking between sequences.
    tolerance = 1e-4 if _rounding(torch.float32, decoder.get_input_embeddings().weight.dtype) < 1e-6 else 0.1
    if not gap <= tolerance:
        raise ConfigError(f"data.layout={batch.layout}: {_model_name(base)} gives log-probs {gap:.3g} nats per token away "
                          f"from the padded layout on a probe, so its layers do not keep packed or prefix-shared "
                          f"sequences apart. {fix}", key="data.layout")


# ---------------------------------------------------------------------------------------------
# Masks of the masked layouts, per kind of attention layer

MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(decoder: torch.nn.Module) -> list[str] | None:
    """Each decoder layer's attention kind, as the decoder's own mask building decides it.

    The config's ``layer_types`` where it has them (the families that build one mask per kind).
    Otherwise one mask serves every layer: a sliding-window one when ``sliding_window`` is set
    and the forward builds it with ``create_sliding_window_causal_mask`` (Mistral, Mixtral,
    Phi-3, PhiMoE, Starcoder2, Qwen3-MoE, Ministral3, Doge), a full one when a transformers
    forward never does (Moshi applies its window only in flash attention). None where a config
    sets a window that remote code applies its own way, which cannot be told from outside.
    """
    config = decoder.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    if not getattr(config, "sliding_window", None):
        return ["full_attention"]
    if _builds_sliding_window_mask(type(decoder)):
        return ["sliding_attention"]
    return ["full_attention"] if type(decoder).__module__.startswith("transformers.") else None


@functools.lru_cache(maxsize=None)
def _builds_sliding_window_mask(decoder_class: type) -> bool:
    try:
        return "create_sliding_window_causal_mask" in inspect.getsource(decoder_class.forward)
    except (OSError, TypeError):  # no source to read
        return False


def _require_mask_kernel(decoder: torch.nn.Module) -> None:
    """The masked layouts need an attention kernel that takes a 4D mask."""
    if not hasattr(decoder, "config"):
        return  # not a transformer body at all: the head check in pair_logps refuses it
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if implementation not in MASKED_LAYOUT_KERNELS:
        raise ConfigError(f"model.attn_implementation {implementation} takes no per-token attention mask, which the "
                          "prefix-shared and packed layouts need. Fix: set model.attn_implementation=sdpa, or "
                          "data.layout=padded", key="model.attn_implementation")


def _require_attention_layers(decoder: torch.nn.Module, layout: str) -> None:
    """... and layers that attend only through that mask, with windows the mask can carry."""
    name = getattr(decoder.config, "model_type", type(decoder).__name__)
    layer_types = _layer_types(decoder)
    if layer_types is None:
        raise ConfigError(f"data.layout={layout}: {name} has sliding_window={decoder.config.sliding_window}, applied by "
                          "its own (remote) modelling code, so lora-dpo cannot tell which layers to confine to the "
                          "window. Fix: set data.layout=padded", key="data.layout")
    other = sorted(set(layer_types) - set(MASKED_LAYER_TYPES))
    if other:
        raise ConfigError(f"data.layout={layout}: {name} has {', '.join(other)} layers, which the masked layouts "
                          "cannot keep to one sequence (they carry state along the row, or attend in a pattern the "
                          "masks do not build). Fix: set data.layout=padded", key="data.layout")


def _decoder_masks(decoder: torch.nn.Module, allowed: torch.Tensor, position_ids: torch.Tensor) -> Any:
    """The decoder's attention mask for a masked layout: one additive (rows, 1, T, T) mask, or,
    where full and sliding-window layers mix, {layer type: mask}, which those families take as is.

    A custom 4D mask is used unchanged by every layer, so the window band of sliding layers must
    be in it: key j is visible from query i when position(i) - position(j) < window, the rule of
    transformers' sliding_window_overlay. Positions rather than columns, so a rejected response
    in a prefix-shared row (positions restart after the prompt) and each packed sequence see the
    window they see in a row of their own. A second T x T mask costs rows x T^2 bytes in the
    compute dtype (8 MiB for 4 rows of 1,024 tokens in bf16).
    """
    kinds = set(_layer_types(decoder))
    masks = {}
    if "full_attention" in kinds:
        masks["full_attention"] = _additive_mask(decoder, allowed)
    if "sliding_attention" in kinds:
        window = decoder.config.sliding_window
        positions = position_ids[:, None, :]
        band = positions.unsqueeze(-1) - window < positions.unsqueeze(-2)  # (rows, 1, T, T) bool, no int T x T
        masks["sliding_attention"] = _additive_mask(decoder, allowed & band)
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _additive_mask(decoder: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The bool (rows, 1, T, T) mask as transformers takes a custom mask: 0 where allowed, the
    dtype's minimum elsewhere, in the dtype attention computes in (the autocast dtype under
    autocast, else the embeddings' dtype), so SDPA gets a mask matching its queries."""
    device_type = allowed.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = decoder.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def score_pairs(model: Any, pairs: Sequence[TokenizedPair], pad_token_id: int, *, micro_batch_size: int,
                layout: str = "padded", chunk_size: int = 512, pack_length: int | None = None,
                compute_dtype: torch.dtype = torch.float32, reference: bool = False,
                progress: Any = None, ld_alpha: float | None = None, wpo: bool = False,
                scorer: Callable[..., PairLogps] | None = None) -> PairLogps:
    """Summed response log-probs of ``pairs`` in one no-grad pass, row i for pair i.

    The no-grad scoring loop for whole sets of pairs (reference cache, merge verification,
    evaluation). The pairs are walked longest first in micro-batches of ``micro_batch_size``
    similar lengths: little padding, and an out-of-memory error shows on the first micro-batch
    rather than at the end. The pass runs in eval mode (no dropout), and every module's own
    train/eval mode is restored afterwards; under autocast in ``compute_dtype`` (float32: none).
    ``reference=True`` scores the reference model instead (``modeling.reference_model``: the
    trained adapter switched off, or the frozen init adapter on), which needs a peft model.
    ``progress``, a callable or None, is called after each micro-batch with the number of pairs it
    scored (e.g. a tqdm bar's ``update``). ``ld_alpha`` and ``wpo`` as in ``pair_logps``.
    ``scorer``: the module that runs ``pair_logps`` of ``model`` in a multi-process run
    (``distributed.Processes.wrap``: a sharded model's weights are gathered only by a pass
    through it); None calls ``pair_logps`` itself.

    The rows stay on the model's device (float32 sums, int64 token counts), written without a
    host sync per micro-batch. It scores this process's ``pairs`` only and does not reduce across
    processes: a distributed caller splits the pairs and gathers the rows itself.
    """
    # Imported here, not at the top: the rest of this module has no need of how models are loaded.
    from contextlib import nullcontext

    from .modeling import autocast_for, reference_model

    if micro_batch_size < 1:
        raise ValueError("micro_batch_size must be positive")
    if reference and not hasattr(model, "disable_adapter"):
        raise ValueError("reference=True needs a peft model (the reference is its adapter switched off)")
    device = next(model.parameters()).device
    count = len(pairs)
    chosen = torch.zeros(count, dtype=torch.float32, device=device)
    rejected = torch.zeros(count, dtype=torch.float32, device=device)
    chosen_tokens = torch.zeros(count, dtype=torch.long, device=device)
    rejected_tokens = torch.zeros(count, dtype=torch.long, device=device)
    aligned = (torch.zeros(count, dtype=torch.float32, device=device),
               torch.zeros(count, dtype=torch.float32, device=device)) if wpo else (None, None)
    order = sorted(range(count), key=lambda i: layout_length(pairs[i], layout), reverse=True)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    scoring = reference_model(model) if reference else nullcontext()
    try:
        with torch.no_grad(), scoring, autocast_for(device, compute_dtype):
            for start in range(0, count, micro_batch_size):
                indices = order[start : start + micro_batch_size]
                batch = collate([pairs[i] for i in indices], pad_token_id, layout=layout,
                                pack_length=pack_length).to(device)
                logps = (scorer(batch, chunk_size, ld_alpha=ld_alpha, wpo=wpo) if scorer is not None
                         else pair_logps(model, batch, chunk_size, ld_alpha=ld_alpha, wpo=wpo))
                rows = torch.tensor(indices, dtype=torch.long).to(device, non_blocking=True)
                chosen.index_copy_(0, rows, logps.chosen.float())
                rejected.index_copy_(0, rows, logps.rejected.float())
                chosen_tokens.index_copy_(0, rows, logps.chosen_tokens)
                rejected_tokens.index_copy_(0, rows, logps.rejected_tokens)
                if wpo:
                    aligned[0].index_copy_(0, rows, logps.chosen_aligned)
                    aligned[1].index_copy_(0, rows, logps.rejected_aligned)
                if progress is not None:
                    progress(len(indices))
    finally:
        for module, training in modes:
            module.training = training
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, *aligned)
