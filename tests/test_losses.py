"""Preference losses: hand-worked values, gradient signs, selection from the config, and a short
QLoRA training run per loss that must lower the loss (and skip the reference pass when it can).

Shared arithmetic: l(z) = -log sigmoid(z) = ln(1 + e^-z), so l(2) = ln(1 + e^-2) = ln(1.135335)
= 0.126928, and l(-2) = ln(1 + e^2) = 2 + ln(e^-2 + 1) = l(2) + 2 = 2.126928.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch

from lora_dpo.batching import PairLogps
from lora_dpo.config import DPOSettings, LossTerm, load_config, save_config
from lora_dpo.errors import ConfigError
from lora_dpo.losses import (
    chosen_nll_loss,
    hinge_loss,
    ipo_loss,
    needs_reference,
    orpo_loss,
    preference_loss,
    robust_dpo_loss,
    rpo_loss,
    sigmoid_dpo_loss,
    simpo_loss,
)

from conftest import make_config, write_jsonl

L2 = 0.1269280110429725  # l(2) = ln(1 + e^-2)
LN2 = math.log(2)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Pair 0: policy (-10, -14), reference (-12, -12): log-ratios +2 and -2, so h = 4.
# Pair 1: policy (-12, -12), reference (-12, -12): h = 0.
POLICY_CHOSEN, POLICY_REJECTED = t(-10.0, -12.0), t(-14.0, -12.0)
REF_CHOSEN, REF_REJECTED = t(-12.0, -12.0), t(-12.0, -12.0)
LOGPS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


# ---------------------------------------------------------------------------------------------
# Each loss against hand-worked values


def test_sigmoid_dpo_values():
    """beta = 0.5. Pair 0: beta*h = 2, loss = l(2) = 0.126928; rewards 0.5*2 = 1 and 0.5*(-2) = -1.
    Pair 1: h = 0, loss = l(0) = ln 2 = 0.693147, rewards 0 and 0."""
    result = sigmoid_dpo_loss(*LOGPS, beta=0.5)
    assert result.losses.tolist() == pytest.approx([L2, LN2], abs=1e-6)
    assert result.chosen_rewards.tolist() == [1.0, 0.0]
    assert result.rejected_rewards.tolist() == [-1.0, 0.0]


def test_sigmoid_dpo_with_label_smoothing_values():
    """beta = 0.5, eps = 0.1. Pair 0: 0.9*l(2) + 0.1*l(-2) = 0.9*l(2) + 0.1*(l(2) + 2) = l(2) + 0.2
    = 0.326928. Pair 1 (h = 0): 0.9*ln 2 + 0.1*ln 2 = ln 2 whatever eps is; rewards stay 0."""
    result = sigmoid_dpo_loss(*LOGPS, beta=0.5, label_smoothing=0.1)
    assert result.losses.tolist() == pytest.approx([L2 + 0.2, LN2], abs=1e-6)
    assert result.chosen_rewards.tolist() == [1.0, 0.0]
    assert result.rejected_rewards.tolist() == [-1.0, 0.0]
    at_zero = sigmoid_dpo_loss(t(-3.0), t(-7.0), t(-3.0), t(-7.0), beta=0.1, label_smoothing=0.3)
    assert at_zero.losses.item() == pytest.approx(LN2, abs=1e-12)
    assert at_zero.chosen_rewards.item() == 0 and at_zero.rejected_rewards.item() == 0


def test_ipo_values():
    """beta = 0.5, target 1/(2*0.5) = 1; chosen 4 tokens, rejected 2 tokens.
    Pair 0: per-token log-ratios 2/4 = 0.5 and -2/2 = -1, h = 1.5, loss = (1.5 - 1)^2 = 0.25;
    rewards 0.5*0.5 = 0.25 and 0.5*(-1) = -0.5. Pair 1: h = 0, loss = (0 - 1)^2 = 1."""
    result = ipo_loss(*LOGPS, t(4, 4), t(2, 2), beta=0.5)
    assert result.losses.tolist() == pytest.approx([0.25, 1.0], abs=1e-12)
    assert result.chosen_rewards.tolist() == [0.25, 0.0]
    assert result.rejected_rewards.tolist() == [-0.5, 0.0]


def test_hinge_values():
    """beta = 0.5. Pair 0: 1 - 0.5*4 = -1, relu -> 0. Pair 1: 1 - 0 = 1.
    Pair 2 (policy -11/-12 over reference -12/-12): h = 1, 1 - 0.5 = 0.5."""
    result = hinge_loss(t(-10, -12, -11), t(-14, -12, -12), t(-12, -12, -12), t(-12, -12, -12), beta=0.5)
    assert result.losses.tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-12)
    assert result.chosen_rewards.tolist() == [1.0, 0.0, 0.5]


def test_robust_dpo_values():
    """beta = 0.5, eps = 0.25. Pair 0: (0.75*l(2) - 0.25*l(-2)) / (1 - 0.5)
    = (0.75*l(2) - 0.25*l(2) - 0.5) / 0.5 = l(2) - 1 = -0.873072 (negative: the loss is unbounded
    below). Pair 1: (0.75 - 0.25)*ln 2 / 0.5 = ln 2. eps = 0 gives plain DPO."""
    result = robust_dpo_loss(*LOGPS, beta=0.5, epsilon=0.25)
    assert result.losses.tolist() == pytest.approx([L2 - 1, LN2], abs=1e-6)
    assert result.chosen_rewards.tolist() == [1.0, 0.0]
    plain = robust_dpo_loss(*LOGPS, beta=0.5, epsilon=0.0)
    assert plain.losses.tolist() == pytest.approx([L2, LN2], abs=1e-6)


def test_rpo_values():
    """beta = 0.5, alpha = 0.5, chosen 4 tokens. Pair 0: DPO l(2) plus 0.5 * (10/4 = 2.5)
    = 0.126928 + 1.25 = 1.376928. Pair 1: ln 2 + 0.5 * 12/4 = 0.693147 + 1.5 = 2.193147.
    Rewards are DPO's."""
    result = rpo_loss(*LOGPS, t(4, 4), beta=0.5, alpha=0.5)
    assert result.losses.tolist() == pytest.approx([L2 + 1.25, LN2 + 1.5], abs=1e-6)
    assert result.chosen_rewards.tolist() == [1.0, 0.0]
    assert result.rejected_rewards.tolist() == [-1.0, 0.0]
    assert chosen_nll_loss(t(-10, -12), t(4, 4)).tolist() == [2.5, 3.0]


def test_simpo_values():
    """beta = 2, gamma = 1, 4 tokens each. Pair 0: average log-probs -10/4 = -2.5 and -12/4 = -3,
    rewards 2*(-2.5) = -5 and 2*(-3) = -6; loss l(-5 - (-6) - 1) = l(0) = ln 2.
    Pair 1: policy -4/-12 -> averages -1 and -3, rewards -2 and -6, loss l(4 - 1) = l(3)
    = ln(1 + e^-3) = 0.048587."""
    result = simpo_loss(t(-10, -4), t(-12, -12), t(4, 4), t(4, 4), beta=2.0, gamma=1.0)
    assert result.losses.tolist() == pytest.approx([LN2, 0.048587], abs=1e-6)
    assert result.chosen_rewards.tolist() == [-5.0, -2.0]
    assert result.rejected_rewards.tolist() == [-6.0, -6.0]


def test_orpo_values():
    """lambda = 0.1, beta = 0.1. Chosen: 2 tokens, log pi = 2 ln 0.5, so P = 0.5 per token and
    odds = 0.5/0.5 = 1 (log-odds 0). Rejected: 3 tokens, log pi = 3 ln 0.2, P = 0.2, odds
    0.2/0.8 = 0.25 (log-odds ln 0.25). Log odds ratio ln 4; l(ln 4) = -ln(4/5) = ln 1.25 = 0.223144.
    NLL of chosen: -ln 0.5 = 0.693147. Loss 0.693147 + 0.1*0.223144 = 0.715461.
    Rewards: 0.1 * ln 0.5 = -0.069315 and 0.1 * ln 0.2 = -0.160944."""
    result = orpo_loss(t(2 * math.log(0.5)), t(3 * math.log(0.2)), t(2), t(3), lam=0.1, beta=0.1)
    assert result.losses.item() == pytest.approx(0.715461, abs=1e-6)
    assert result.chosen_rewards.item() == pytest.approx(-0.069315, abs=1e-6)
    assert result.rejected_rewards.item() == pytest.approx(-0.160944, abs=1e-6)


def test_orpo_is_finite_when_the_model_is_certain():
    result = orpo_loss(t(0.0), t(-5.0), t(3), t(3), lam=0.1)
    assert torch.isfinite(result.losses).all()


def test_weighted_sum_values_and_rewards_of_the_first_preference_term():
    """[nll 0.2, sigmoid 1.0], beta = 0.5, chosen 4 tokens. Pair 0: 0.2*2.5 + l(2) = 0.626928;
    pair 1: 0.2*3 + ln 2 = 1.293147. The rewards are sigmoid's (nll has none)."""
    settings = DPOSettings(loss="weighted_sum", beta=0.5,
                           losses=[LossTerm("nll", 0.2), LossTerm("sigmoid", 1.0)])
    result = preference_loss(settings, pair_logps(POLICY_CHOSEN, POLICY_REJECTED, 4, 2),
                             pair_logps(REF_CHOSEN, REF_REJECTED, 4, 2))
    assert result.losses.tolist() == pytest.approx([0.5 + L2, 0.6 + LN2], abs=1e-6)
    assert result.chosen_rewards.tolist() == [1.0, 0.0]
    assert result.rejected_rewards.tolist() == [-1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Selection, gradient signs, reference-free dispatch


def pair_logps(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: int, rejected_tokens: int) -> PairLogps:
    n = chosen.shape[0]
    return PairLogps(chosen, rejected, torch.full((n,), chosen_tokens), torch.full((n,), rejected_tokens))


SETTINGS = {
    "sigmoid": DPOSettings(loss="sigmoid", label_smoothing=0.1),
    "ipo": DPOSettings(loss="ipo"),
    "hinge": DPOSettings(loss="hinge"),
    "robust": DPOSettings(loss="robust", robust_epsilon=0.2),
    "rpo": DPOSettings(loss="rpo", rpo_alpha=0.5),
    "simpo": DPOSettings(loss="simpo", beta=2.0, simpo_gamma=0.5),
    "orpo": DPOSettings(loss="orpo", orpo_lambda=0.1),
    "weighted_sum": DPOSettings(loss="weighted_sum", losses=[LossTerm("sigmoid", 1.0), LossTerm("nll", 0.2)]),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_raising_chosen_logp_lowers_the_loss_and_raising_rejected_raises_it(name):
    settings = SETTINGS[name]
    # At policy == reference (h = 0), chosen -10 and rejected -12 over 4 tokens each: no loss is saturated here.
    chosen, rejected = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    reference = pair_logps(t(-10.0), t(-12.0), 4, 4)
    loss = preference_loss(settings, pair_logps(chosen, rejected, 4, 4), reference).losses.sum()
    loss.backward()
    assert chosen.grad.item() < 0
    assert rejected.grad.item() > 0
    up = preference_loss(settings, pair_logps(t(-9.5), t(-12.0), 4, 4), reference).losses.item()
    down = preference_loss(settings, pair_logps(t(-10.0), t(-11.5), 4, 4), reference).losses.item()
    assert up < loss.item() < down


@pytest.mark.parametrize("settings,expected", [
    (DPOSettings(), True),
    (SETTINGS["ipo"], True),
    (SETTINGS["rpo"], True),
    (SETTINGS["simpo"], False),
    (SETTINGS["orpo"], False),
    (DPOSettings(loss="weighted_sum", losses=[LossTerm("simpo"), LossTerm("nll", 0.1)]), False),
    (DPOSettings(loss="weighted_sum", losses=[LossTerm("orpo"), LossTerm("hinge", 0.5)]), True),
])
def test_needs_reference(settings, expected):
    assert needs_reference(settings) is expected


def test_reference_free_losses_run_without_reference_and_others_refuse():
    policy = pair_logps(t(-10.0), t(-12.0), 4, 4)
    for name in ("simpo", "orpo"):
        assert torch.isfinite(preference_loss(SETTINGS[name], policy, None).losses).all()
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(SETTINGS["sigmoid"], policy, None)


def test_defaults_of_the_optional_hyper_parameters():
    """rpo_alpha null = 1.0, simpo_gamma null = 0.5, orpo_lambda null = 0.1."""
    policy, reference = pair_logps(t(-10.0), t(-12.0), 4, 4), pair_logps(t(-10.0), t(-12.0), 4, 4)
    # RPO at h = 0: ln 2 + 1.0 * 10/4
    assert preference_loss(DPOSettings(loss="rpo"), policy, reference).losses.item() == pytest.approx(LN2 + 2.5)
    # SimPO, beta 2: rewards -5 and -6, l(1 - 0.5) = ln(1 + e^-0.5) = 0.474077
    assert preference_loss(DPOSettings(loss="simpo", beta=2.0), policy, None).losses.item() == pytest.approx(0.474077, abs=1e-6)
    explicit = preference_loss(SETTINGS["orpo"], policy, None).losses.item()
    assert preference_loss(DPOSettings(loss="orpo"), policy, None).losses.item() == explicit


# ---------------------------------------------------------------------------------------------
# Config: selection form and validation

REQUIRED = ["model.name_or_path=m", "data.train_file=t.jsonl"]


def dpo_settings(*overrides: str) -> DPOSettings:
    return load_config(None, REQUIRED + list(overrides)).dpo


def test_weighted_sum_from_yaml_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train_file: t.jsonl\ndpo:\n  loss: weighted_sum\n"
                    "  losses:\n    - {name: sigmoid, weight: 1.0}\n    - {name: nll, weight: 0.2}\n"
                    "  label_smoothing: 0.1\n")
    config = load_config(path)
    assert config.dpo.losses == [LossTerm("sigmoid", 1.0), LossTerm("nll", 0.2)]
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_weighted_sum_from_an_override_and_default_weight():
    settings = dpo_settings("dpo.loss=weighted_sum", "dpo.losses=[{name: simpo}, {name: nll, weight: 0.5}]",
                            "dpo.simpo_gamma=1.0")
    assert settings.losses == [LossTerm("simpo", 1.0), LossTerm("nll", 0.5)]
    assert settings.simpo_gamma == 1.0


@pytest.mark.parametrize("overrides,key,message", [
    (["dpo.rpo_alpha=0.5"], "dpo.rpo_alpha", "dpo.rpo_alpha belongs to the rpo loss, but dpo.loss is sigmoid"),
    (["dpo.loss=simpo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing", "belongs to the sigmoid and rpo and .* loss"),
    (["dpo.loss=ipo", "dpo.robust_epsilon=0.1"], "dpo.robust_epsilon", "Fix: remove dpo.robust_epsilon, or select robust"),
    (["dpo.orpo_lambda=0.2"], "dpo.orpo_lambda", "belongs to the orpo loss"),
    (["dpo.loss=orpo", "dpo.simpo_gamma=1"], "dpo.simpo_gamma", "belongs to the simpo loss, but dpo.loss is orpo"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{name: sigmoid}]", "dpo.rpo_alpha=1"], "dpo.rpo_alpha",
     "dpo.loss is weighted_sum of sigmoid"),
    (["dpo.beta=-0.1"], "dpo.beta", "must be positive"),
    (["dpo.loss=robust", "dpo.robust_epsilon=0.5"], "dpo.robust_epsilon", r"must be in \[0, 0.5\)"),
    (["dpo.loss=robust"], "dpo.robust_epsilon", "is required by the robust loss"),
    (["dpo.loss=rpo", "dpo.rpo_alpha=0"], "dpo.rpo_alpha", "must be positive"),
    (["dpo.loss=simpo", "dpo.simpo_gamma=-1"], "dpo.simpo_gamma", "must be >= 0"),
    (["dpo.loss=orpo", "dpo.orpo_lambda=-0.1"], "dpo.orpo_lambda", "must be positive"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing", r"must be in \[0, 0.5\)"),
    (["dpo.loss=dpo"], "dpo.loss", "must be one of sigmoid, ipo, hinge, robust, rpo, simpo, orpo, sigmoid_norm, .*, "
                                   "discopop, weighted_sum"),
    (["dpo.losses=[{name: sigmoid}]"], "dpo.losses", "only read when dpo.loss is weighted_sum"),
    (["dpo.loss=weighted_sum"], "dpo.losses", "must list the terms"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{name: nll}]"], "dpo.losses", "holds only nll"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{name: sigmoid}, {name: sigmoid}]"], "dpo.losses", "listed twice"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{name: sigmoid, weight: 0}]"], "dpo.losses", r"losses\[0\].weight must be positive"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{weight: 1}]"], "dpo.losses", r"dpo.losses\[0\].name is required"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{name: sigmoid, wieght: 1}]"], "dpo.losses", r"unknown key dpo.losses\[0\].wieght \(valid keys: name, weight\)"),
    (["dpo.loss=weighted_sum", "dpo.losses=[{name: nl}]"], "dpo.losses", r"dpo.losses\[0\].name: must be one of .*nll"),
    (["dpo.loss=weighted_sum", "dpo.losses={name: sigmoid}"], "dpo.losses", "expected a list"),
])
def test_invalid_loss_settings_are_rejected_naming_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, REQUIRED + overrides)
    assert info.value.key == key


def test_a_bad_list_item_in_yaml_reports_the_line_of_the_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train_file: t.jsonl\ndpo:\n  loss: weighted_sum\n"
                    "  losses:\n    - {name: sigmoid, weight: 1.0}\n    - {name: rpo_nll, weight: 0.2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:7: dpo.losses[1].name: must be one of ")


def test_a_parameter_of_an_unselected_loss_in_yaml_reports_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train_file: t.jsonl\ndpo:\n  loss: simpo\n  rpo_alpha: 0.3\n")
    with pytest.raises(ConfigError, match=f"^{path}:7: dpo.rpo_alpha belongs to the rpo loss, but dpo.loss is simpo"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# A short QLoRA training run per loss on the demo pairs

RUNS = {
    # name: (overrides, loss at step 1 when policy == reference (LoRA B starts at 0), or None)
    "sigmoid": (["dpo.label_smoothing=0.1"], LN2),
    "ipo": ([], 25.0),  # (0 - 1/(2*0.1))^2
    "hinge": ([], 1.0),  # max(0, 1 - 0.1*0)
    "robust": (["dpo.robust_epsilon=0.2"], LN2),
    "rpo": (["dpo.rpo_alpha=0.5"], None),
    "simpo": (["dpo.beta=2.0", "dpo.simpo_gamma=0.5"], None),
    "orpo": (["dpo.orpo_lambda=0.1"], None),
    "weighted_sum": (["dpo.losses=[{name: sigmoid, weight: 1.0}, {name: nll, weight: 0.2}]"], None),
    # TRL's other losses share these paths; one run covers the per-token options of the chunked pass.
    "bco_pair": (["dpo.wpo_weighting=true", "dpo.ld_alpha=0.5"], None),
}
STEPS = 4


@pytest.mark.parametrize("name", list(RUNS))
def test_training_lowers_each_loss_and_reference_free_losses_skip_the_reference(
        name, llama_dir, demo_rows, tmp_path, monkeypatch):
    import lora_dpo.modeling as modeling
    import lora_dpo.train as train_module

    real_reference_model = modeling.reference_model
    entered = []

    @contextlib.contextmanager
    def spy_reference_model(model):
        entered.append(1)
        with real_reference_model(model) as reference:
            yield reference

    # Every lora_dpo module that imported the reference switch (train, and any reference
    # precomputation it uses) gets the spy, so no path to the reference goes unseen.
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("lora_dpo")
                and getattr(module, "reference_model", None) is real_reference_model):
            monkeypatch.setattr(module, "reference_model", spy_reference_model)
    overrides, first_loss = RUNS[name]
    # One fixed batch of 4 pairs every step, so the first and last losses are on the same pairs.
    train_file = write_jsonl(tmp_path / "train.jsonl", demo_rows[:4])
    config = make_config(llama_dir, train_file, tmp_path / "run", f"dpo.loss={name}", *overrides,
                         "data.eval_fraction=0", f"train.max_steps={STEPS}", "train.learning_rate=2e-3",
                         "train.lr_scheduler=constant", "train.warmup_steps=0")
    train_module.train(config, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["split"] == "train"]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 1e-3, losses
    if first_loss is not None:
        assert losses[0] == pytest.approx(first_loss, abs=1e-4)
    if name in ("simpo", "orpo"):
        assert entered == [], "a reference-free loss ran the reference pass"
    else:
        assert entered, "a reference-based loss never ran the reference pass"


@pytest.mark.parametrize("loss,words", [("sigmoid", "log-ratio of policy to reference"), ("ipo", "per-token log-ratio"),
                                        ("simpo", "reference-free"), ("orpo", "reference-free")])
def test_reward_definition_names_what_the_metrics_measure(loss, words):
    from lora_dpo.config import DPOSettings
    from lora_dpo.losses import reward_definition

    assert words in reward_definition(DPOSettings(loss=loss))
