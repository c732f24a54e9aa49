"""The losses lora-dpo shares with TRL 1.16's DPOTrainer beyond the classic ones: hand-worked values,
gradient signs, the f-divergence scores, WPO weights and LD-DPO's length weighting, selection and
validation from the config, and (when trl is installed: the test extra) the same numbers as TRL's
own loss code on the same per-token log-probs.

Shared arithmetic: l(z) = -log sigmoid(z) = ln(1 + e^-z); l(1) = 0.313262, l(-1) = l(1) + 1,
l(2) = 0.126928, l(-2) = l(2) + 2, s(x) = sigmoid(x), s(1) = 0.731059, s(2) = 0.880797.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_dpo.batching import HeadPath, PairLogps, _pair_logps, collate
from lora_dpo.config import DPOSettings, LossTerm, load_config
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import ConfigError
from lora_dpo.losses import (aot_loss, aot_unpaired_loss, apo_down_loss, apo_zero_loss, bco_pair_loss, discopop_loss,
                             exo_pair_loss, f_divergence_scores, nca_pair_loss, needs_reference, preference_loss,
                             sigmoid_dpo_loss, sigmoid_norm_loss, sppo_hard_loss, wpo_weights)

LN2 = math.log(2)
L1 = math.log1p(math.exp(-1))
L2 = math.log1p(math.exp(-2))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Pair 0: policy (-10, -14), reference (-12, -12): log-ratios +2 and -2, h = 4. Pair 1: all -12, h = 0.
LOGPS = (t(-10.0, -12.0), t(-14.0, -12.0), t(-12.0, -12.0), t(-12.0, -12.0))


def test_nca_bco_sppo_apo_values():
    """beta = 0.5, so the rewards of pair 0 are r_w = 1 and r_l = -1; pair 1 has 0 and 0.
    nca: l(1) + 0.5 l(-1) + 0.5 l(1) = 1.5 l(1) + 0.5 (l(1) + 1) = 2 l(1) + 0.5 = 1.126523; pair 1: 2 ln 2.
    bco: l(1) + l(1) = 0.626523; pair 1: 2 ln 2.
    apo_zero: (1 - s(1)) + s(-1) = 2 (1 - s(1)) = 0.537883; pair 1: 0.5 + 0.5 = 1.
    apo_down: s(1) + 1 - s(0.5 * 4) = 0.731059 + 0.119203 = 0.850262; pair 1: 0.5 + 0.5 = 1.
    sppo_hard at beta = 0.25 (targets +-1/(2 beta) = +-2): pair 0 hits them, (2-2)^2 + (-2+2)^2 = 0;
    pair 1: (0-2)^2 + (0+2)^2 = 8."""
    assert nca_pair_loss(*LOGPS, beta=0.5).losses.tolist() == pytest.approx([2 * L1 + 0.5, 2 * LN2], abs=1e-6)
    assert bco_pair_loss(*LOGPS, beta=0.5).losses.tolist() == pytest.approx([2 * L1, 2 * LN2], abs=1e-6)
    assert apo_zero_loss(*LOGPS, beta=0.5).losses.tolist() == pytest.approx([0.537883, 1.0], abs=1e-6)
    assert apo_down_loss(*LOGPS, beta=0.5).losses.tolist() == pytest.approx([0.850262, 1.0], abs=1e-6)
    sppo = sppo_hard_loss(*LOGPS, beta=0.25)
    assert sppo.losses.tolist() == pytest.approx([0.0, 8.0], abs=1e-12)
    assert sppo.chosen_rewards.tolist() == [0.5, 0.0] and sppo.rejected_rewards.tolist() == [-0.5, 0.0]


def test_exo_discopop_sigmoid_norm_values():
    """exo_pair, beta = 0.5, eps = 0.1. Pair 0 (beta h = 2): q = (s(2), s(-2)) = (0.880797, 0.119203),
    log q = (-l(2), -l(-2)) = (-0.126928, -2.126928); KL = 0.880797 (-0.126928 - ln 0.9)
    + 0.119203 (-2.126928 - ln 0.1) = -0.018997 + 0.020939 = 0.001942. Pair 1: q = (0.5, 0.5):
    0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826.
    discopop, beta = 0.5, tau = 0.05. Pair 0: m = s(2/0.05) = 1 - 4e-18, loss = e^-2 = 0.135335.
    Pair 1: m = 0.5, loss = 0.5 ln 2 + 0.5 e^0 = 0.846574.
    sigmoid_norm, beta = 0.5, 4 chosen and 2 rejected tokens: pair 0: h_norm = 2/4 + 2/2 = 1.5,
    loss l(0.75) = ln(1 + e^-0.75) = 0.386871; rewards 0.5 * 0.5 and 0.5 * (-1). Pair 1: ln 2."""
    assert exo_pair_loss(*LOGPS, beta=0.5, epsilon=0.1).losses.tolist() == pytest.approx([0.001942, 0.510826], abs=1e-6)
    assert discopop_loss(*LOGPS, beta=0.5, tau=0.05).losses.tolist() == pytest.approx([0.135335, 0.846574], abs=1e-6)
    norm = sigmoid_norm_loss(*LOGPS, t(4, 4), t(2, 2), beta=0.5)
    assert norm.losses.tolist() == pytest.approx([0.386871, LN2], abs=1e-6)
    assert norm.chosen_rewards.tolist() == [0.25, 0.0] and norm.rejected_rewards.tolist() == [-0.5, 0.0]


def test_aot_compares_sorted_margins_not_pairs():
    """Policy margins log pi(y_w) - log pi(y_l) = (4, 0), reference margins (-1, 3). Pair by pair
    that is h = (5, -3), DPO's losses l(5) and l(-3); sorted, (0, 4) against (-1, 3): deltas (1, 1),
    so AOT (beta = 1) gives l(1) twice. Unpaired: chosen log-ratios (2, -2) sorted (-2, 2), rejected
    (-3, 1) sorted (-3, 1): deltas (1, 1) again. With eps = 0.25: 0.75 l(1) + 0.25 l(-1) = l(1) + 0.25."""
    logps = (t(-10, -12), t(-14, -12), t(-12, -10), t(-11, -13))
    assert sigmoid_dpo_loss(*logps, beta=1.0).losses.tolist() == pytest.approx([0.006715, 3.048587], abs=1e-6)
    assert aot_loss(*logps, beta=1.0).losses.tolist() == pytest.approx([L1, L1], abs=1e-6)
    assert aot_unpaired_loss(*logps, beta=1.0).losses.tolist() == pytest.approx([L1, L1], abs=1e-6)
    assert aot_loss(*logps, beta=1.0, label_smoothing=0.25).losses.tolist() == pytest.approx([L1 + 0.25] * 2, abs=1e-6)
    one = tuple(x[:1] for x in logps)  # a micro-batch of one pair: nothing to sort, AOT is DPO
    assert aot_loss(*one, beta=1.0).losses.item() == pytest.approx(sigmoid_dpo_loss(*one, beta=1.0).losses.item())


def test_f_divergence_scores_and_the_dpo_loss_under_them():
    """Log-ratios +2 (chosen) and -2 (rejected), beta = 0.5.
    forward_kl: f'(u) = 1 - 1/u: 1 - e^-2 = 0.864665 and 1 - e^2 = -6.389056; difference 7.253721,
    loss l(3.626860) = 0.026252.
    js_divergence: ln 2 + log s(x); the difference is log s(2) - log s(-2) = 2 exactly, loss l(1).
    alpha_divergence, alpha = 0.5: (u^-0.5 - 1)/(-0.5) = 2 (1 - e^(-x/2)): 1.264241 and -3.436564;
    difference 4.700805, loss l(2.350402) = 0.091056. alpha = 1 is reverse_kl (DPO): l(2)."""
    x = t(2.0, -2.0)
    assert f_divergence_scores(x, "forward_kl").tolist() == pytest.approx([0.864665, -6.389056], abs=1e-6)
    assert f_divergence_scores(x, "alpha_divergence", 0.5).tolist() == pytest.approx([1.264241, -3.436564], abs=1e-6)
    assert f_divergence_scores(x, "alpha_divergence", 1.0).tolist() == [2.0, -2.0]
    pair = tuple(v[:1] for v in LOGPS)
    for divergence, alpha, want in [("forward_kl", 0.5, 0.026252), ("js_divergence", 0.5, L1),
                                    ("alpha_divergence", 0.5, 0.091056), ("alpha_divergence", 1.0, L2),
                                    ("reverse_kl", 0.5, L2)]:
        result = sigmoid_dpo_loss(*pair, beta=0.5, f_divergence=divergence, f_alpha=alpha)
        assert result.losses.item() == pytest.approx(want, abs=1e-6), divergence
        assert result.chosen_rewards.item() == 1.0  # the rewards stay the log-ratios
    # Far from the reference the alpha score's exponent is capped, so it stays finite.
    assert torch.isfinite(f_divergence_scores(t(-500.0), "alpha_divergence", 0.5)).all()


def test_wpo_weights_multiply_every_term():
    """Aligned sums -2 over 4 chosen tokens and -3 over 2 rejected tokens: weight
    exp(-2/4) * exp(-3/2) = e^-2 = 0.135335; times DPO's l(2) (beta 0.5, pair 0), and in a
    weighted sum [sigmoid 1, nll 0.5] times l(2) + 0.5 * 10/4 as a whole."""
    policy = PairLogps(t(-10.0), t(-14.0), torch.tensor([4]), torch.tensor([2]), t(-2.0), t(-3.0))
    reference = PairLogps(t(-12.0), t(-12.0), torch.tensor([4]), torch.tensor([2]))
    assert wpo_weights(policy).item() == pytest.approx(math.exp(-2), abs=1e-12)
    single = preference_loss(DPOSettings(beta=0.5, wpo_weighting=True), policy, reference)
    assert single.losses.item() == pytest.approx(math.exp(-2) * L2, abs=1e-9)
    mixed = DPOSettings(loss="weighted_sum", beta=0.5, wpo_weighting=True,
                        losses=[LossTerm("sigmoid"), LossTerm("nll", 0.5)])
    assert preference_loss(mixed, policy, reference).losses.item() == pytest.approx(math.exp(-2) * (L2 + 1.25))
    with pytest.raises(ValueError, match="needs pair_logps"):
        preference_loss(DPOSettings(wpo_weighting=True), reference, reference)


class _Stub(torch.nn.Module):
    """A decoder whose last hidden states are given: with an identity head, they are the logits."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.config = SimpleNamespace(layer_types=None, sliding_window=None)  # one full-attention mask
        self.embeddings = torch.nn.Embedding(8, 2)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(last_hidden_state=self.hidden.expand(*input_ids.shape, -1))


def test_ld_alpha_and_wpo_sums_in_the_chunked_pass():
    """Every position's logits are (ln 3, 0): p = (0.75, 0.25), sum p^2 = 0.625. Chosen is 3
    tokens [0, 0, 1], rejected 1 token [1], so min length 1: the 2nd and 3rd chosen tokens are
    "verbose". ld_alpha 0.5: chosen = ln .75 + 0.5 (ln .75 + ln .25) = -1.124748; rejected ln .25.
    Aligned (WPO) sums: log(p / 0.625): chosen 2 ln 1.2 + ln 0.4 = -0.551655, rejected ln 0.4,
    the same whatever ld_alpha, and chunking (2 tokens a chunk) changes nothing."""
    pair = TokenizedPair([5], [0, 0, 1], [1])
    decoder, head = _Stub(torch.tensor([math.log(3.0), 0.0])), torch.nn.Identity()
    for layout in ("padded", "packed_prefix_shared"):
        batch = collate([pair], pad_token_id=0, layout=layout)
        plain = _pair_logps(decoder, head, HeadPath(), batch, 2)
        assert plain.chosen.item() == pytest.approx(2 * math.log(0.75) + math.log(0.25)) and plain.chosen_aligned is None
        out = _pair_logps(decoder, head, HeadPath(), batch, 2, ld_alpha=0.5, wpo=True)
        assert out.chosen.item() == pytest.approx(math.log(0.75) + 0.5 * (math.log(0.75) + math.log(0.25)))
        assert out.rejected.item() == pytest.approx(math.log(0.25))
        assert out.chosen_tokens.item() == 3 and out.rejected_tokens.item() == 1
        assert out.chosen_aligned.item() == pytest.approx(2 * math.log(1.2) + math.log(0.4))
        assert out.rejected_aligned.item() == pytest.approx(math.log(0.4))


# ---------------------------------------------------------------------------------------------
# Gradient signs, selection and validation

SETTINGS = {
    "sigmoid_norm": DPOSettings(loss="sigmoid_norm"),
    "exo_pair": DPOSettings(loss="exo_pair", label_smoothing=1e-3),
    "nca_pair": DPOSettings(loss="nca_pair"),
    "bco_pair": DPOSettings(loss="bco_pair"),
    "sppo_hard": DPOSettings(loss="sppo_hard"),
    "aot": DPOSettings(loss="aot"),
    "aot_unpaired": DPOSettings(loss="aot_unpaired"),
    "apo_zero": DPOSettings(loss="apo_zero"),
    "discopop": DPOSettings(loss="discopop"),
    "forward_kl": DPOSettings(f_divergence="forward_kl"),
    "js_divergence": DPOSettings(loss="hinge", f_divergence="js_divergence"),
    "alpha_divergence": DPOSettings(loss="ipo", f_divergence="alpha_divergence", f_divergence_alpha=0.3),
    "wpo": DPOSettings(wpo_weighting=True),
    "weighted_sum": DPOSettings(loss="weighted_sum", losses=[LossTerm("apo_zero"), LossTerm("sppo_hard", 0.1)]),
}


def _loss(settings, chosen, rejected):
    policy = PairLogps(chosen, rejected, torch.tensor([4]), torch.tensor([4]), t(-2.0), t(-3.0))
    reference = PairLogps(t(-9.0), t(-13.0), torch.tensor([4]), torch.tensor([4]))
    return preference_loss(settings, policy, reference).losses.sum()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_raising_chosen_lowers_the_loss_and_raising_rejected_raises_it(name):
    """At a pair the policy ranks the wrong way (log-ratios -1 chosen, +1 rejected): DiscoPOP's
    slope has the wrong sign at h = 0 itself (see its docstring), so h = 0 is no test point for all."""
    chosen, rejected = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    loss = _loss(SETTINGS[name], chosen, rejected)
    loss.backward()
    assert chosen.grad.item() < 0 and rejected.grad.item() > 0
    assert _loss(SETTINGS[name], t(-9.9), t(-12.0)) < loss < _loss(SETTINGS[name], t(-10.0), t(-11.9))


def test_apo_down_lowers_both_likelihoods_the_rejected_one_faster():
    """APO-down's design: a gradient step lowers the chosen log-prob too (positive gradient), but
    the rejected one by more; at policy = reference the chosen one gets no gradient at all."""
    settings = DPOSettings(loss="apo_down")
    chosen, rejected = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    _loss(settings, chosen, rejected).backward()
    assert 0 < chosen.grad.item() < rejected.grad.item()
    chosen, rejected = t(-9.0).requires_grad_(), t(-13.0).requires_grad_()
    _loss(settings, chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-12) and rejected.grad.item() > 0


def test_every_new_loss_needs_the_reference():
    assert all(needs_reference(settings) for settings in SETTINGS.values())


REQUIRED = ["model.name_or_path=m", "data.train_file=t.jsonl"]


@pytest.mark.parametrize("overrides,key,message", [
    (["dpo.loss=exo_pair"], "dpo.label_smoothing", r"must be above 0 for the exo_pair loss.*dpo.label_smoothing=0.001"),
    (["dpo.loss=nca_pair", "dpo.label_smoothing=0.1"], "dpo.label_smoothing", "belongs to the sigmoid and rpo and exo_pair"),
    (["dpo.discopop_tau=0.1"], "dpo.discopop_tau", "belongs to the discopop loss"),
    (["dpo.loss=discopop", "dpo.discopop_tau=0"], "dpo.discopop_tau", "must be positive"),
    (["dpo.loss=bco_pair", "dpo.f_divergence=forward_kl"], "dpo.f_divergence",
     "dpo.f_divergence=forward_kl does not apply to bco_pair"),
    (["dpo.f_divergence=kl"], "dpo.f_divergence", "must be one of reverse_kl, forward_kl, js_divergence, alpha_divergence"),
    (["dpo.f_divergence_alpha=0.3"], "dpo.f_divergence_alpha", "only read with dpo.f_divergence=alpha_divergence"),
    (["dpo.f_divergence=alpha_divergence", "dpo.f_divergence_alpha=-1"], "dpo.f_divergence_alpha", "must be positive"),
    (["dpo.loss=aot", "dpo.wpo_weighting=true"], "dpo.wpo_weighting", "cannot weight aot"),
    (["dpo.ld_alpha=1.5"], "dpo.ld_alpha", r"must be in \[0, 1\]"),
])
def test_invalid_settings_of_the_new_losses_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, REQUIRED + overrides)
    assert info.value.key == key


def test_new_losses_combine_in_a_weighted_sum_from_the_config():
    config = load_config(None, REQUIRED + ["dpo.loss=weighted_sum", "dpo.f_divergence=js_divergence",
                                           "dpo.losses=[{name: exo_pair}, {name: nll, weight: 0.1}]",
                                           "dpo.label_smoothing=0.001", "dpo.wpo_weighting=true", "dpo.ld_alpha=0.5"])
    assert [term.name for term in config.dpo.losses] == ["exo_pair", "nll"]
    policy = PairLogps(t(-10.0), t(-14.0), torch.tensor([4]), torch.tensor([2]), t(-2.0), t(-3.0))
    reference = PairLogps(t(-12.0), t(-12.0), torch.tensor([4]), torch.tensor([2]))
    exo = exo_pair_loss(t(-10.0), t(-14.0), t(-12.0), t(-12.0), beta=0.1, epsilon=0.001, f_divergence="js_divergence")
    want = math.exp(-2) * (exo.losses.item() + 0.1 * 10 / 4)
    assert preference_loss(config.dpo, policy, reference).losses.item() == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# The same numbers as TRL's DPOTrainer (the test extra installs trl; it is never imported at run time)

TRL_CASES = [
    # (TRL loss_type list, TRL weights, our settings, TRL options)
    (["sigmoid"], None, DPOSettings(), {}),
    (["hinge"], None, DPOSettings(loss="hinge"), {}),
    (["ipo"], None, DPOSettings(loss="ipo"), {}),
    (["robust"], None, DPOSettings(loss="robust", robust_epsilon=0.2), dict(label_smoothing=0.2)),
    (["sigmoid_norm"], None, DPOSettings(loss="sigmoid_norm", beta=2.0), dict(beta=2.0)),
    (["exo_pair"], None, DPOSettings(loss="exo_pair", label_smoothing=0.01), dict(label_smoothing=0.01)),
    (["nca_pair"], None, DPOSettings(loss="nca_pair"), {}),
    (["bco_pair"], None, DPOSettings(loss="bco_pair"), {}),
    (["sppo_hard"], None, DPOSettings(loss="sppo_hard", beta=0.5), dict(beta=0.5)),
    (["aot"], None, DPOSettings(loss="aot", label_smoothing=0.1), dict(label_smoothing=0.1)),
    (["aot_unpaired"], None, DPOSettings(loss="aot_unpaired"), {}),
    (["apo_zero"], None, DPOSettings(loss="apo_zero"), {}),
    (["apo_down"], None, DPOSettings(loss="apo_down"), {}),
    (["discopop"], None, DPOSettings(loss="discopop", discopop_tau=0.1), dict(discopop_tau=0.1)),
    (["sigmoid"], None, DPOSettings(f_divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    (["hinge"], None, DPOSettings(loss="hinge", f_divergence="js_divergence"), dict(f_divergence_type="js_divergence")),
    (["discopop"], None, DPOSettings(loss="discopop", f_divergence="alpha_divergence", f_divergence_alpha=0.3),
     dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    (["ipo"], None, DPOSettings(loss="ipo", f_divergence="alpha_divergence"), dict(f_divergence_type="alpha_divergence")),
    (["sigmoid"], None, DPOSettings(wpo_weighting=True), dict(use_weighting=True)),
    (["sigmoid"], None, DPOSettings(ld_alpha=0.3), dict(ld_alpha=0.3)),
    (["robust"], None, DPOSettings(loss="robust", robust_epsilon=0.1, ld_alpha=0.5, wpo_weighting=True),
     dict(label_smoothing=0.1, ld_alpha=0.5, use_weighting=True)),
    (["apo_zero", "bco_pair"], [1.0, 0.5],
     DPOSettings(loss="weighted_sum", losses=[LossTerm("apo_zero"), LossTerm("bco_pair", 0.5)]), {}),
]


def _trl_methods():
    """TRL's own DPOTrainer._compute_loss and compute_ref_log_probs, compiled from its installed
    source. Importing trl.trainer.dpo_trainer costs 10-20 s (it pulls in the Trainer stack and
    datasets); these two methods need only torch and three helpers that a non-peft trainer does not
    call into, so only they are taken from the file."""
    import ast
    import contextlib
    import importlib.util
    import torch.nn.functional as F

    spec = importlib.util.find_spec("trl")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is a test extra")
    source = Path(spec.submodule_search_locations[0], "trainer", "dpo_trainer.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    trainer = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "DPOTrainer")
    wanted = [node for node in trainer.body if isinstance(node, ast.FunctionDef)
              and node.name in ("_compute_loss", "compute_ref_log_probs")]
    namespace = dict(torch=torch, F=F, math=math, contextlib=contextlib, warnings=__import__("warnings"),
                     is_peft_model=lambda model: False, use_adapter=None,
                     disable_gradient_checkpointing=lambda *args, **kwargs: contextlib.nullcontext())
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "trl/trainer/dpo_trainer.py", "exec"), namespace)
    return SimpleNamespace(_compute_loss=namespace["_compute_loss"],
                           compute_ref_log_probs=namespace["compute_ref_log_probs"])


def _trl_loss(trl_trainer, loss_types, weights, options, per_token, reference_per_token, log_sum_sq, mask):
    """TRL's loss, from its own _compute_loss and compute_ref_log_probs, on given per-token values.

    The model is a stand-in that returns the per-token log-probs (its fused head's outputs), the
    reference log-probs go in as precomputed, and the trainer's state is only what those two
    methods read."""
    settings = {**dict(beta=0.1, label_smoothing=0.0, ld_alpha=None, f_divergence_type="reverse_kl",
                       f_alpha_divergence_coef=0.5, use_weighting=False, discopop_tau=0.05), **options}
    zeros = torch.zeros_like(per_token)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                  autocast=torch.no_grad)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False), ref_model=object(),
        accelerator=accelerator, precompute_ref_logps=True, aux_loss_enabled=False, loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types), args=SimpleNamespace(discopop_tau=settings.pop("discopop_tau"),
                                                                            gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        **settings)

    def model(values):
        return lambda **kwargs: SimpleNamespace(log_probs=values, entropy=zeros, mean_logits=zeros,
                                                is_top1=zeros.bool(), log_sum_sq_probs=log_sum_sq)

    completion_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)  # the first token is prompt
    inputs = dict(input_ids=torch.zeros_like(completion_mask), attention_mask=torch.ones_like(completion_mask),
                  completion_mask=completion_mask)
    reference_chosen, reference_rejected = trl_trainer.compute_ref_log_probs(trainer, model(reference_per_token), inputs)
    inputs.update(ref_chosen_logps=reference_chosen, ref_rejected_logps=reference_rejected)
    return trl_trainer._compute_loss(trainer, model(per_token), inputs, False).item()


def _our_sums(per_token, mask, ld_alpha):
    """Per-pair sums as pair_logps forms them (checked on a model in test_ld_alpha_and_wpo_sums...)."""
    lengths = mask.sum(1)
    b = mask.shape[0] // 2
    shared = torch.minimum(lengths[:b], lengths[b:]).repeat(2)
    offsets = mask.cumsum(1) - 1
    weights = torch.where(offsets >= shared[:, None], 1.0 if ld_alpha is None else ld_alpha, 1.0) * mask
    sums = (per_token * weights).sum(1)
    return sums[:b], sums[b:], lengths[:b], lengths[b:]


@pytest.mark.parametrize("case", range(len(TRL_CASES)))
def test_same_loss_as_trl_on_the_same_log_probs(case):
    trl_methods = _trl_methods()
    loss_types, weights, settings, options = TRL_CASES[case]
    generator = torch.Generator().manual_seed(case)
    pairs, width = 5, 9
    lengths = torch.randint(1, width + 1, (2 * pairs,), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # responses of 1 to 9 tokens, right-padded
    per_token = -3 * torch.rand(2 * pairs, width, generator=generator) * mask
    reference_per_token = (per_token + 0.4 * torch.randn(2 * pairs, width, generator=generator)) * mask
    log_sum_sq = -torch.rand(2 * pairs, width, generator=generator)
    want = _trl_loss(trl_methods, loss_types, weights, options, per_token, reference_per_token, log_sum_sq, mask)

    ld_alpha = settings.ld_alpha
    chosen, rejected, chosen_tokens, rejected_tokens = _our_sums(per_token, mask, ld_alpha)
    aligned = ((per_token - log_sum_sq) * mask).sum(1)
    policy = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, aligned[:pairs], aligned[pairs:])
    reference = PairLogps(*_our_sums(reference_per_token, mask, ld_alpha))
    got = preference_loss(settings, policy, reference).losses.mean().item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
