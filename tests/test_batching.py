"""pairs -> padded batch -> per-pair log-probs, checked against a naive full-logits computation."""

from __future__ import annotations

import pytest
import torch

from lora_dpo.batching import collate, pair_logps
from lora_dpo.data import TokenizedPair

PAIRS = [
    TokenizedPair([1, 5, 6, 7], [10, 11, 2], [12, 2]),
    TokenizedPair([1, 8], [13, 14, 15, 16, 17, 2], [18, 19, 20, 2]),
    TokenizedPair([1, 9, 9, 9, 9, 9, 9], [21, 2], [22, 23, 24, 25, 26, 27, 28, 2]),
]


def naive_logps(model, prompt, response):
    """Full-vocabulary logits of one unpadded sequence; sum log p(response token | prefix)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits.float()[0]
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[len(prompt) + i - 1, token] for i, token in enumerate(response))


@pytest.fixture(scope="module")
def model(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def test_collate_layout_scores_only_response_tokens():
    batch = collate(PAIRS, pad_token_id=0)
    assert batch.input_ids.shape == (6, 16)  # longest row 15 tokens, padded to a multiple of 8
    assert batch.num_pairs == 3
    assert batch.num_tokens == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in PAIRS)
    # row 1 is pair 1's chosen row: prompt [1, 8] then 6 response tokens, then padding
    assert batch.input_ids[1, :8].tolist() == [1, 8, 13, 14, 15, 16, 17, 2]
    assert batch.attention_mask[1].sum() == 8
    in_row1 = batch.target_rows == 1
    assert batch.target_positions[in_row1].tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.target_tokens[in_row1].tolist() == [13, 14, 15, 16, 17, 2]
    # rejected tokens of pair 2 are summed into segment 3 + 2
    assert batch.target_tokens[batch.target_segments == 5].tolist() == PAIRS[2].rejected_ids
    assert len(batch.target_tokens) == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in PAIRS)


@pytest.mark.parametrize("chunk_size", [1, 5, 512])
def test_pair_logps_equal_naive_full_logits(model, chunk_size):
    with torch.no_grad():
        got = pair_logps(model, collate(PAIRS, pad_token_id=0), chunk_size=chunk_size)
        for i, pair in enumerate(PAIRS):
            assert got.chosen[i].item() == pytest.approx(naive_logps(model, pair.prompt_ids, pair.chosen_ids).item(), abs=1e-4)
            assert got.rejected[i].item() == pytest.approx(naive_logps(model, pair.prompt_ids, pair.rejected_ids).item(), abs=1e-4)
    assert got.chosen_tokens.tolist() == [len(p.chosen_ids) for p in PAIRS]
    assert got.rejected_tokens.tolist() == [len(p.rejected_ids) for p in PAIRS]


def test_prompt_and_padding_tokens_contribute_nothing(model):
    """Changing padding ids or the pad amount leaves the log-probs unchanged; changing a prompt
    token changes them only through the context (the prompt itself is never scored)."""
    with torch.no_grad():
        a = pair_logps(model, collate(PAIRS, pad_token_id=0))
        b = pair_logps(model, collate(PAIRS, pad_token_id=77, pad_to_multiple_of=32))
    assert torch.allclose(a.chosen, b.chosen, atol=1e-5) and torch.allclose(a.rejected, b.rejected, atol=1e-5)
    # A pair alone in its batch (no padding at all) gives the same numbers as inside the batch.
    with torch.no_grad():
        alone = pair_logps(model, collate(PAIRS[2:], pad_token_id=0, pad_to_multiple_of=1))
    assert alone.chosen[0].item() == pytest.approx(a.chosen[2].item(), abs=1e-4)
    assert alone.rejected[0].item() == pytest.approx(a.rejected[2].item(), abs=1e-4)


def test_gradients_match_naive(model):
    """The checkpointed, chunked head gives the gradients of the plain computation."""
    model.zero_grad()
    out = pair_logps(model, collate(PAIRS, pad_token_id=0), chunk_size=3)
    (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = sum(naive_logps(model, p.prompt_ids, p.chosen_ids) - 0.5 * naive_logps(model, p.prompt_ids, p.rejected_ids) for p in PAIRS)
    total.backward()
    for name, param in model.named_parameters():
        assert torch.allclose(fast[name], param.grad, atol=1e-4, rtol=1e-3), name


def test_vocabulary_logits_exist_only_for_scored_tokens_one_chunk_at_a_time(model):
    """No op, forward or backward, makes a vocabulary-wide tensor of more than chunk_size rows, and
    the head runs on the scored tokens only (twice with gradients: checkpointed chunks recompute)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab = model.config.vocab_size
    biggest = {"rows": 0}
    head_rows = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().data_ptr() in inputs:
                    continue  # a view (the head weight transposed has vocab as its last dimension too)
                if tensor.dim() >= 1 and tensor.shape[-1] == vocab:
                    biggest["rows"] = max(biggest["rows"], tensor.numel() // vocab)
                    if func is torch.ops.aten.mm.default:
                        head_rows.append(tensor.shape[0])
            return out

    batch = collate(PAIRS, pad_token_id=0)
    scored = len(batch.target_tokens)  # 29 response tokens; the rows hold 6 x 16 = 96 positions
    model.zero_grad(set_to_none=True)
    model.get_output_embeddings().weight.requires_grad_(True)
    try:
        with Watch():
            out = pair_logps(model, batch, chunk_size=8)
            out.chosen.sum().backward()
    finally:
        model.get_output_embeddings().weight.requires_grad_(False)
    assert biggest["rows"] == 8  # one chunk of logits at a time, never rows x length x vocab
    assert sum(head_rows) == 2 * scored  # forward, and the checkpointed recompute in backward
