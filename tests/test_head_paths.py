"""The output head as each family applies it: pair_logps scores with the model's own logits.

pair_logps runs the decoder and the head itself, on scored positions only, so each family's
transform between the head and the returned logits (Granite's division, Cohere's scale, Gemma's
softcap, MiniCPM3's scaled hidden state) must be applied here too; a transform it does not know
must stop the run, once per model, instead of training at the wrong temperature.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import log_softmax
from transformers import LlamaForCausalLM

from lora_dpo.batching import LAYOUTS, HeadPath, collate, decoder_and_head, head_path, pair_logps
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import LoraDpoError
from tiny_families import WINDOW, plain_logps, tiny_model

_g = torch.Generator().manual_seed(0)


def _ids(n: int) -> list[int]:
    return torch.randint(3, 800, (n,), generator=_g).tolist()


PAIRS = [TokenizedPair([1] + _ids(6), _ids(9) + [2], _ids(4) + [2]),
         TokenizedPair([1] + _ids(2), _ids(3) + [2], _ids(11) + [2])]

# Values far from 1 so that a missing transform moves the log-probs by whole nats.
HEAD_FAMILIES = {
    "granite": (dict(logits_scaling=8.0), HeadPath(divisor=8.0)),
    "granitemoe": (dict(logits_scaling=8.0, num_local_experts=2, num_experts_per_tok=1), HeadPath(divisor=8.0)),
    "cohere": (dict(logit_scale=4.0), HeadPath(multiplier=4.0)),
    "cohere2": (dict(logit_scale=4.0, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
                HeadPath(multiplier=4.0)),
    "hyperclovax": (dict(logits_scaling=4.0), HeadPath(multiplier=4.0)),
    "gemma2": (dict(final_logit_softcapping=0.5, attn="eager"), HeadPath(softcap=0.5)),
    "nanochat": (dict(final_logit_softcapping=0.5), HeadPath(softcap=0.5)),
    "minicpm3": (dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=16), HeadPath(hidden_divisor=0.25)),  # hidden 64 / dim_model_base 256
}
HEAD_GAIN = 20.0
"""Random-init heads give logits near 0, where scales and caps hardly matter; real models' logits
span units to tens. The head weights are scaled up by this much to get there."""


def _untransformed(model, pair: TokenizedPair, response: list[int]) -> float:
    """What the old path gave: decoder, head, log-softmax, nothing in between."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=torch.tensor([pair.prompt_ids + response])).last_hidden_state[0]
    logps = log_softmax(head(hidden).float(), dim=-1)
    return sum(logps[len(pair.prompt_ids) + i - 1, token].item() for i, token in enumerate(response))


@pytest.mark.parametrize("family", sorted(HEAD_FAMILIES))
def test_pair_logps_equal_the_models_own_logits(family):
    overrides, path = HEAD_FAMILIES[family]
    model = tiny_model(family, tie_word_embeddings=False, **overrides)
    assert head_path(model) == path
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_GAIN)
        want = [(plain_logps(model, p.prompt_ids, p.chosen_ids).item(),
                 plain_logps(model, p.prompt_ids, p.rejected_ids).item()) for p in PAIRS]
        # The transform matters here: leaving it out is off by far more than any tolerance.
        assert abs(_untransformed(model, PAIRS[0], PAIRS[0].chosen_ids) - want[0][0]) > 0.5
        for layout in LAYOUTS:
            got = pair_logps(model, collate(PAIRS, pad_token_id=0, layout=layout))
            for i, (chosen, rejected) in enumerate(want):
                assert got.chosen[i].item() == pytest.approx(chosen, abs=1e-4), (layout, i)
                assert got.rejected[i].item() == pytest.approx(rejected, abs=1e-4), (layout, i)


class TemperedLlama(LlamaForCausalLM):
    """Stands in for a family (or remote code) whose forward rescales its logits in a way lora-dpo does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out


class ShiftedLlama(LlamaForCausalLM):
    """Adds a constant to every logit: the log-probs do not change, so nothing is wrong."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + 3.0
        return out


def _stand_in(cls):
    model = tiny_model("llama", tie_word_embeddings=False)
    stand_in = cls(model.config).eval()
    stand_in.load_state_dict(model.state_dict())
    with torch.no_grad():
        stand_in.lm_head.weight.mul_(HEAD_GAIN)
    return stand_in


def test_an_unknown_logit_transform_fails_loudly_before_any_number_is_used():
    model = _stand_in(TemperedLlama)
    for layout in ("padded", "packed_prefix_shared"):
        with pytest.raises(LoraDpoError, match=r"^llama \(TemperedLlama\): lora-dpo's output-head path gives log-probs up "
                                               r"to .* nats away from the model's own forward .*HEAD_TRANSFORMS") as info:
            pair_logps(model, collate(PAIRS, pad_token_id=0, layout=layout))
        assert "\n" not in str(info.value)
    with torch.no_grad():  # a shift of all logits is not a change of distribution
        shifted = _stand_in(ShiftedLlama)
        got = pair_logps(shifted, collate(PAIRS, pad_token_id=0))
        alone = plain_logps(shifted, PAIRS[0].prompt_ids, PAIRS[0].chosen_ids).item()
        assert got.chosen[0].item() == pytest.approx(alone, abs=1e-4)


def test_the_check_runs_once_per_model_and_leaves_train_mode_and_dropout_alone():
    model = tiny_model("llama", attention_dropout=0.5)
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    modes = {name: module.training for name, module in model.named_modules()}
    calls = {"model": 0, "decoder": 0}
    model.register_forward_hook(lambda *args: calls.__setitem__("model", calls["model"] + 1))
    model.model.register_forward_hook(lambda *args: calls.__setitem__("decoder", calls["decoder"] + 1))
    seen = []
    for layout in ("padded", "padded", "prefix_shared", "packed"):
        pair_logps(model, collate(PAIRS, pad_token_id=0, layout=layout))
        seen.append(dict(calls))
    # First call: the model's own forward on the probe + the batch. First masked call: the two
    # probe layouts + the batch. Every other call: the batch alone.
    assert [s["model"] for s in seen] == [1, 1, 1, 1]
    assert [s["decoder"] for s in seen] == [2, 3, 6, 7]
    assert {name: module.training for name, module in model.named_modules()} == modes


@pytest.mark.parametrize("family, overrides", [
    ("modernbert-decoder", dict(global_attn_every_n_layers=2, local_attention=16)),  # get_decoder() is its head
    ("bert", dict(is_decoder=True)),  # a transform + layer norm between the body and the output projection
])
def test_families_whose_head_is_not_one_projection_are_refused(family, overrides):
    model = tiny_model(family, attn=None, **overrides)
    with pytest.raises(LoraDpoError, match=f"^{family} ") as info:
        pair_logps(model, collate(PAIRS, pad_token_id=0))
    assert "Fix: use another model family" in str(info.value) and "\n" not in str(info.value)
