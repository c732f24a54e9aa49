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
On a GPU such a dense mask keeps SDPA off its flash kernel and costs T x T per row; the token
savings have to pay for that, which only a measurement shows (docs/benchmarks.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .data import TokenizedPair
from .errors import ConfigError

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

    def to(self, device: torch.device | str) -> "PairBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return PairBatch(**moved)


@dataclass
class PairLogps:
    """Summed log-probs of each pair's responses, with their token counts, shape (pairs,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


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
    return _assemble(rows, pad_token_id, pad_to_multiple_of, num_pairs, sum(p.num_tokens for p in pairs))


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
    target_rows, target_positions, target_tokens, target_segments = [], [], [], []
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
              num_tokens: int) -> PairBatch:
    """Lay units end to end in rows; attention is block-diagonal, one block per unit."""
    length = max(sum(len(unit.tokens) for unit in row) for row in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
    target_rows, target_positions, target_tokens, target_segments = [], [], [], []
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
            offset += size
        # Padding attends to itself only: a query that may attend to nothing would make softmax NaN,
        # and NaN in an unscored row still poisons the backward pass through the attention weights.
        padding = torch.arange(offset, length)
        allowed[row, 0, padding, padding] = True
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def pair_logps(model: Any, batch: PairBatch, chunk_size: int = 512) -> PairLogps:
    """Per-pair summed response log-probs, forming vocabulary logits only for scored tokens.

    The body runs once over all rows; the output head then runs on the scored positions alone, in
    chunks of ``chunk_size`` tokens. With gradients on, each chunk is checkpointed, so at most one
    chunk's (chunk_size x vocab) float32 logits exist at a time in forward and backward — about
    256 MB for a 128k vocabulary at 512 tokens, instead of gigabytes for full-sequence logits.
    The price is one extra head matmul per chunk in the backward pass.
    """
    decoder, head = decoder_and_head(model)
    attention_mask = batch.attention_mask
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = _additive_mask(decoder, attention_mask)
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    selected = hidden[batch.target_rows, batch.target_positions]
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h = selected[start : start + chunk_size]
        tokens = batch.target_tokens[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, head, h, tokens, softcap, use_reentrant=False))
        else:
            pieces.append(_token_logps(head, h, tokens, softcap))
    token_logps = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    segments = 2 * batch.num_pairs
    sums = torch.zeros(segments, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, batch.target_segments, token_logps)
    # index_add rather than bincount: bincount on CUDA reads its maximum back to the host (a sync).
    counts = torch.zeros(segments, dtype=torch.long, device=token_logps.device).index_add(
        0, batch.target_segments, torch.ones_like(batch.target_segments))
    b = batch.num_pairs
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _additive_mask(decoder: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The bool (rows, 1, T, T) mask as transformers takes a custom mask: 0 where allowed, the
    dtype's minimum elsewhere, in the dtype attention computes in (the autocast dtype under
    autocast, else the embeddings' dtype), so SDPA gets a mask matching its queries."""
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if implementation not in MASKED_LAYOUT_KERNELS:
        raise ConfigError(f"model.attn_implementation {implementation} takes no per-token attention mask, which the "
                          "prefix-shared and packed layouts need. Fix: set model.attn_implementation=sdpa, or "
                          "data.layout=padded", key="model.attn_implementation")
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
                progress: Any = None) -> PairLogps:
    """Summed response log-probs of ``pairs`` in one no-grad pass, row i for pair i.

    The no-grad scoring loop for whole sets of pairs (reference cache, merge verification,
    evaluation). The pairs are walked longest first in micro-batches of ``micro_batch_size``
    similar lengths: little padding, and an out-of-memory error shows on the first micro-batch
    rather than at the end. The pass runs in eval mode (no dropout), and every module's own
    train/eval mode is restored afterwards; under autocast in ``compute_dtype`` (float32: none).
    ``reference=True`` scores the reference model instead (``modeling.reference_model``: the
    trained adapter switched off, or the frozen init adapter on), which needs a peft model.
    ``progress``, a callable or None, is called after each micro-batch with the number of pairs it
    scored (e.g. a tqdm bar's ``update``).

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
                logps = pair_logps(model, batch, chunk_size)
                rows = torch.tensor(indices, dtype=torch.long).to(device, non_blocking=True)
                chosen.index_copy_(0, rows, logps.chosen.float())
                rejected.index_copy_(0, rows, logps.rejected.float())
                chosen_tokens.index_copy_(0, rows, logps.chosen_tokens)
                rejected_tokens.index_copy_(0, rows, logps.rejected_tokens)
                if progress is not None:
                    progress(len(indices))
    finally:
        for module, training in modes:
            module.training = training
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
