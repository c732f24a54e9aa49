"""How preference pairs become token batches, and how a model turns a batch into per-pair log-probs.

A ``PairBatch`` lists, besides the model inputs, every scored token explicitly: the row and
position whose hidden state predicts it, the token id, and the segment (pair and side) its
log-prob is summed into. The log-prob code therefore does not care how pairs were laid out —
padded rows (here), several pairs packed into a row, or prompt-shared rows where the rejected
response's first token is predicted from the same prompt position as the chosen one's — and the
training loop only ever sees ``collate`` and ``pair_logps``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .data import TokenizedPair


@dataclass
class PairBatch:
    input_ids: torch.Tensor
    """(rows, length) token ids."""
    attention_mask: torch.Tensor | None
    """(rows, length) 1 for real tokens, 0 for padding."""
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


def collate(pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int = 8) -> PairBatch:
    """Padded layout: rows 0..B-1 hold prompt + chosen, rows B..2B-1 prompt + rejected, right-padded.

    Chosen and rejected share one forward pass, so each pass is one launch sequence for 2B rows.
    Padding to a multiple of 8 keeps tensor-core shapes and limits recompilation of kernels.
    """
    if any(len(p.prompt_ids) == 0 for p in pairs):
        raise ValueError("every pair needs at least one prompt token (BOS counts) to predict its first response token")
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
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
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
    counts = torch.bincount(batch.target_segments, minlength=segments)
    b = batch.num_pairs
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
