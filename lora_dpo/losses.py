"""Preference losses: pure functions of per-pair summed log-probs, each of shape (batch,).

Names follow the papers: ``policy_chosen_logps`` is log pi_theta(y_w | x) summed over the response
tokens, ``reference_rejected_logps`` is log pi_ref(y_l | x), ``chosen_tokens`` is |y_w|, and so on.
Each function returns the per-pair losses (the caller reduces them) and rewards, which are
detached: they are metrics, not part of the objective. The rewards are beta times the per-response
score that the loss compares, so ``chosen_rewards > rejected_rewards`` means the loss ranks the pair
the right way:

- reference-based losses (sigmoid, hinge, robust, rpo): beta * (log pi(y) - log ref(y)), the DPO
  implicit reward; ipo: beta * (log pi(y) - log ref(y)) / |y|, the per-token version it acts on;
- reference-free losses (simpo, orpo): beta * log pi(y) / |y|, SimPO's reward.

``preference_loss`` picks the loss(es) that ``DPOSettings`` selects; ``needs_reference`` says
whether the reference forward pass is needed at all (SimPO and ORPO skip it, saving one forward
over every token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .batching import PairLogps
from .config import DPOSettings

# Losses that read only the policy's log-probs: with these alone, no reference pass is run.
REFERENCE_FREE = frozenset({"simpo", "orpo", "nll"})

# Defaults of the optional per-loss hyper-parameters (dpo.<name>: null means these).
DEFAULT_RPO_ALPHA = 1.0
DEFAULT_SIMPO_GAMMA = 0.5
DEFAULT_ORPO_LAMBDA = 0.1


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor
    """(batch,) loss of each pair."""
    chosen_rewards: torch.Tensor
    """(batch,) reward of the chosen response, detached (see the module docstring for its definition)."""
    rejected_rewards: torch.Tensor
    """(batch,) reward of the rejected response, detached."""


def sigmoid_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290), with conservative label smoothing.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = label_smoothing is the assumed probability that a preference label is flipped
    (cDPO, Mitchell 2023); eps = 0 is plain DPO. At h = 0 the loss is ln 2 for any eps.
    Implicit rewards: beta * (log pi(y) - log ref(y)).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = chosen_logratios - rejected_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036), on length-normalised log-ratios.

    With h = (log pi(y_w) - log ref(y_w)) / |y_w| - (log pi(y_l) - log ref(y_l)) / |y_l|:

        loss = (h - 1 / (2 * beta))^2

    beta is the paper's tau. Unlike DPO, whose loss keeps falling as h grows (so the policy can
    drift without bound on deterministic preferences), IPO regresses h onto the finite target
    1 / (2 beta). Rewards: beta * (log pi(y) - log ref(y)) / |y|, so the margin goes to 0.5.
    """
    chosen_logratios = (policy_chosen_logps - reference_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected_logratios = (policy_rejected_logps - reference_rejected_logps) / rejected_tokens.clamp(min=1)
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """Hinge loss of SLiC (Zhao et al., 2023, "SLiC-HF", arXiv:2305.10425) on reference-normalised
    log-probs, as in RSO (Liu et al., 2023, "Statistical Rejection Sampling Improves Preference
    Optimization", arXiv:2309.06657).

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

        loss = max(0, 1 - beta * h)

    Pairs already separated by a margin of 1 / beta contribute neither loss nor gradient.
    Implicit rewards: beta * (log pi(y) - log ref(y)).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    epsilon: float = 0.1,
) -> PreferenceLoss:
    """Robust DPO (Chowdhury, Kini and Natarajan, 2024, "Provably Robust DPO: Aligning Language
    Models with Noisy Feedback", arXiv:2403.00409).

    With h as in DPO and l(z) = -log sigmoid(z):

        loss = ((1 - eps) * l(beta * h) - eps * l(-beta * h)) / (1 - 2 * eps)

    If each label is flipped with probability eps (0 <= eps < 0.5), the expectation of this loss
    over the noise equals the DPO loss on the clean labels. Unlike cDPO's label smoothing, the
    second term is subtracted, so the loss is unbounded below (it can go negative): compare
    runs by their reward accuracy, not by the loss value. eps = 0 is plain DPO.
    Implicit rewards: beta * (log pi(y) - log ref(y)).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = (-(1 - epsilon) * F.logsigmoid(logits) + epsilon * F.logsigmoid(-logits)) / (1 - 2 * epsilon)
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def chosen_nll_loss(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen response, -log pi(y_w) / |y_w|, shape (batch,).

    The supervised term of RPO and ORPO; on its own it is SFT on the chosen responses.
    """
    return -policy_chosen_logps / chosen_tokens.clamp(min=1)


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    beta: float = 0.1,
    alpha: float = DEFAULT_RPO_ALPHA,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733):
    DPO plus a negative log-likelihood term on the chosen response.

        loss = DPO(h; beta, label_smoothing) + alpha * (-log pi(y_w) / |y_w|)

    DPO alone may lower the likelihood of both responses as long as the rejected one falls
    faster; the NLL term keeps the chosen response likely. Implicit rewards as in DPO.
    """
    dpo = sigmoid_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta=beta, label_smoothing=label_smoothing)
    losses = dpo.losses + alpha * chosen_nll_loss(policy_chosen_logps, chosen_tokens)
    return PreferenceLoss(losses, dpo.chosen_rewards, dpo.rejected_rewards)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = DEFAULT_SIMPO_GAMMA,
) -> PreferenceLoss:
    """SimPO (Meng, Xia and Chen, 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", arXiv:2405.14734). No reference model.

        loss = -log sigmoid(beta / |y_w| * log pi(y_w) - beta / |y_l| * log pi(y_l) - gamma)

    The reward beta * log pi(y) / |y| is the average token log-prob the model generates with,
    so it does not favour long responses; gamma is the margin the chosen reward must clear.
    The paper uses beta between 2.0 and 2.5, far above DPO's 0.1.
    Rewards: beta * log pi(y) / |y|.
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * policy_rejected_logps / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    lam: float = DEFAULT_ORPO_LAMBDA,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO (Hong, Lee and Thorne, 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", arXiv:2403.07691). No reference model.

    With P(y) = exp(log pi(y) / |y|) (the geometric mean token probability) and
    odds(y) = P(y) / (1 - P(y)):

        loss = -log pi(y_w) / |y_w| - lam * log sigmoid(log odds(y_w) - log odds(y_l))

    SFT on the chosen response with a penalty that pushes its odds above the rejected one's,
    so ORPO can start from a base model without a separate SFT stage. beta only scales the
    logged rewards: beta * log pi(y) / |y| (the log-odds are increasing in it, so the reward
    margin has the sign of the log odds ratio).
    """
    # A per-token log-prob of exactly 0 (the model is certain) would make the odds infinite;
    # capping it just below 0 costs the gradient only on such already-perfect responses.
    chosen_mean = (policy_chosen_logps / chosen_tokens.clamp(min=1)).clamp(max=-1e-6)
    rejected_mean = (policy_rejected_logps / rejected_tokens.clamp(min=1)).clamp(max=-1e-6)
    # log odds = log P - log(1 - P); expm1 keeps 1 - P accurate when P is close to 1.
    log_odds_ratio = (chosen_mean - torch.log(-torch.expm1(chosen_mean))) - (
        rejected_mean - torch.log(-torch.expm1(rejected_mean)))
    losses = chosen_nll_loss(policy_chosen_logps, chosen_tokens) - lam * F.logsigmoid(log_odds_ratio)
    return PreferenceLoss(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


# ---------------------------------------------------------------------------------------------
# Selection from the config


def loss_terms(settings: DPOSettings) -> list[tuple[str, float]]:
    """(loss name, weight) of each term the settings select: one term unless loss is weighted_sum."""
    if settings.loss == "weighted_sum":
        return [(term.name, term.weight) for term in settings.losses]
    return [(settings.loss, 1.0)]


def reward_definition(settings: DPOSettings) -> str:
    """What ``rewards/*`` in the metrics measure for these settings (see docs/losses.md)."""
    name = next(name for name, _ in loss_terms(settings) if name != "nll")
    if name in REFERENCE_FREE:
        return "beta * average per-token log-prob of the policy (reference-free: likelihood, not drift)"
    if name == "ipo":
        return "beta * per-token log-ratio of policy to reference"
    return "beta * log-ratio of policy to reference (the DPO implicit reward)"


def needs_reference(settings: DPOSettings) -> bool:
    """Whether any selected loss reads reference log-probs; if not, skip the reference pass."""
    return any(name not in REFERENCE_FREE for name, _ in loss_terms(settings))


def preference_loss(settings: DPOSettings, policy: PairLogps, reference: PairLogps | None) -> PreferenceLoss:
    """The loss that ``settings`` selects, per pair; ``reference`` may be None when
    ``needs_reference(settings)`` is false.

    For a weighted sum the losses add up with their weights, and the rewards are those of the
    first term that has rewards (every term but nll), so the reward metrics of
    [sigmoid, nll] are DPO's.
    """
    if reference is None and needs_reference(settings):
        raise ValueError(f"dpo.loss={settings.loss} needs reference log-probs, but none were computed")
    total: torch.Tensor | None = None
    rewards: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, weight in loss_terms(settings):
        if name == "nll":
            losses = chosen_nll_loss(policy.chosen, policy.chosen_tokens)
        else:
            result = _single_loss(name, settings, policy, reference)
            losses = result.losses
            if rewards is None:
                rewards = (result.chosen_rewards, result.rejected_rewards)
        total = weight * losses if total is None else total + weight * losses
    assert total is not None and rewards is not None, "Config.validate admits no empty or nll-only selection"
    return PreferenceLoss(total, *rewards)


def _single_loss(name: str, settings: DPOSettings, policy: PairLogps, reference: PairLogps | None) -> PreferenceLoss:
    beta = settings.beta
    if name == "simpo":
        gamma = DEFAULT_SIMPO_GAMMA if settings.simpo_gamma is None else settings.simpo_gamma
        return simpo_loss(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, beta, gamma)
    if name == "orpo":
        lam = DEFAULT_ORPO_LAMBDA if settings.orpo_lambda is None else settings.orpo_lambda
        return orpo_loss(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, lam, beta)
    assert reference is not None
    logps = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    if name == "sigmoid":
        return sigmoid_dpo_loss(*logps, beta=beta, label_smoothing=settings.label_smoothing)
    if name == "ipo":
        return ipo_loss(*logps, policy.chosen_tokens, policy.rejected_tokens, beta=beta)
    if name == "hinge":
        return hinge_loss(*logps, beta=beta)
    if name == "robust":
        if settings.robust_epsilon is None:
            raise ValueError("dpo.loss=robust needs dpo.robust_epsilon")
        return robust_dpo_loss(*logps, beta=beta, epsilon=settings.robust_epsilon)
    if name == "rpo":
        alpha = DEFAULT_RPO_ALPHA if settings.rpo_alpha is None else settings.rpo_alpha
        return rpo_loss(*logps, policy.chosen_tokens, beta=beta, alpha=alpha, label_smoothing=settings.label_smoothing)
    raise ValueError(f"unknown preference loss {name!r}")
