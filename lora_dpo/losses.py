"""Preference losses: pure functions of per-pair summed log-probs, each of shape (batch,).

Names follow the papers: ``policy_chosen_logps`` is log pi_theta(y_w | x) summed over the response
tokens, ``reference_rejected_logps`` is log pi_ref(y_l | x), ``chosen_tokens`` is |y_w|, and so on.
Each function returns the per-pair losses (the caller reduces them) and rewards, which are
detached: they are metrics, not part of the objective. The rewards are beta times the per-response
score that the loss compares, so ``chosen_rewards > rejected_rewards`` means the loss ranks the pair
the right way:

- reference-based losses (sigmoid, hinge, robust, rpo and the rest): beta * (log pi(y) - log ref(y)),
  the DPO implicit reward; ipo and sigmoid_norm: beta * (log pi(y) - log ref(y)) / |y|, the
  per-token version they act on;
- reference-free losses (simpo, orpo): beta * log pi(y) / |y|, SimPO's reward.

Two options change what the losses read rather than adding a loss: ``f_divergence`` replaces the
log-ratio log(pi / ref) inside the losses built on the chosen-rejected score difference by f'(pi / ref)
of another f-divergence (f-DPO); WPO weighting multiplies each pair's loss by a weight that
``batching.pair_logps`` computes alongside the log-probs. LD-DPO (``ld_alpha``) is applied there
too, to the log-probs themselves, so every loss sees it.

``preference_loss`` picks the loss(es) that ``DPOSettings`` selects; ``needs_reference`` says
whether the reference forward pass is needed at all (SimPO and ORPO skip it, saving one forward
over every token).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .batching import PairLogps
from .config import F_DIVERGENCES, REFERENCE_FREE_LOSSES, DPOSettings

# Losses that read only the policy's log-probs: with these alone, no reference pass is run.
REFERENCE_FREE = frozenset(REFERENCE_FREE_LOSSES)


# Defaults of the optional per-loss hyper-parameters (dpo.<name>: null means these).
DEFAULT_RPO_ALPHA = 1.0
DEFAULT_SIMPO_GAMMA = 0.5
DEFAULT_ORPO_LAMBDA = 0.1
DEFAULT_DISCOPOP_TAU = 0.05
DEFAULT_F_DIVERGENCE_ALPHA = 0.5


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor
    """(batch,) loss of each pair."""
    chosen_rewards: torch.Tensor
    """(batch,) reward of the chosen response, detached (see the module docstring for its definition)."""
    rejected_rewards: torch.Tensor
    """(batch,) reward of the rejected response, detached."""


def f_divergence_scores(logratios: torch.Tensor, divergence: str = "reverse_kl",
                        alpha: float = DEFAULT_F_DIVERGENCE_ALPHA) -> torch.Tensor:
    """f'(u) at u = pi(y) / ref(y), given log u: the per-response score of f-DPO (Wang et al., 2023,
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", arXiv:2309.16240), which takes the place of log u in the DPO family.

    - reverse_kl (DPO's own): f'(u) = log u;
    - forward_kl: f'(u) = 1 - 1/u;
    - js_divergence (Jensen-Shannon): f'(u) = log(2u / (1 + u)) = log 2 + log sigmoid(log u);
    - alpha_divergence: f'(u) = (u^(alpha - 1) - 1) / (alpha - 1), log u at alpha = 1.

    The exponent in the alpha case is capped at 80 (11 in float16), so exp stays finite when the
    policy has drifted far; beyond that cap the score is constant and gives no gradient.
    """
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit of (u^(a-1) - 1) / (a - 1) as a -> 1
            return logratios
        cap = 11.0 if logratios.dtype == torch.float16 else 80.0
        exponent = ((alpha - 1.0) * logratios).float().clamp(max=cap)
        return (torch.expm1(exponent) / (alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"unknown f-divergence {divergence!r} (one of {', '.join(F_DIVERGENCES)})")


def _score_difference(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                      reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                      f_divergence: str, f_alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-ratio, rejected log-ratio, f'(chosen ratio) - f'(rejected ratio))."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    difference = (f_divergence_scores(chosen_logratios, f_divergence, f_alpha)
                  - f_divergence_scores(rejected_logratios, f_divergence, f_alpha))
    return chosen_logratios, rejected_logratios, difference


def sigmoid_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290), with conservative label smoothing.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = label_smoothing is the assumed probability that a preference label is flipped
    (cDPO, Mitchell 2023); eps = 0 is plain DPO. At h = 0 the loss is ln 2 for any eps.
    Implicit rewards: beta * (log pi(y) - log ref(y)). ``f_divergence`` (``f_divergence_scores``)
    replaces each log-ratio in h by f'(pi / ref); the rewards stay the log-ratios.
    """
    chosen_logratios, rejected_logratios, logits = _score_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence, f_alpha)
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
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036), on length-normalised log-ratios.

    With h = (log pi(y_w) - log ref(y_w)) / |y_w| - (log pi(y_l) - log ref(y_l)) / |y_l|:

        loss = (h - 1 / (2 * beta))^2

    beta is the paper's tau. Unlike DPO, whose loss keeps falling as h grows (so the policy can
    drift without bound on deterministic preferences), IPO regresses h onto the finite target
    1 / (2 beta). Rewards: beta * (log pi(y) - log ref(y)) / |y|, so the margin goes to 0.5.
    With ``f_divergence``, f'(pi / ref) of each whole response is divided by its length instead.
    """
    chosen_count, rejected_count = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    chosen_logratios = (policy_chosen_logps - reference_chosen_logps) / chosen_count
    rejected_logratios = (policy_rejected_logps - reference_rejected_logps) / rejected_count
    chosen_scores = f_divergence_scores(policy_chosen_logps - reference_chosen_logps, f_divergence, f_alpha)
    rejected_scores = f_divergence_scores(policy_rejected_logps - reference_rejected_logps, f_divergence, f_alpha)
    losses = (chosen_scores / chosen_count - rejected_scores / rejected_count - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """Hinge loss of SLiC (Zhao et al., 2023, "SLiC-HF", arXiv:2305.10425) on reference-normalised
    log-probs, as in RSO (Liu et al., 2023, "Statistical Rejection Sampling Improves Preference
    Optimization", arXiv:2309.06657).

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

        loss = max(0, 1 - beta * h)

    Pairs already separated by a margin of 1 / beta contribute neither loss nor gradient.
    Implicit rewards: beta * (log pi(y) - log ref(y)); ``f_divergence`` as in ``sigmoid_dpo_loss``.
    """
    chosen_logratios, rejected_logratios, difference = _score_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence, f_alpha)
    losses = torch.relu(1 - beta * difference)
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    epsilon: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """Robust DPO (Chowdhury, Kini and Natarajan, 2024, "Provably Robust DPO: Aligning Language
    Models with Noisy Feedback", arXiv:2403.00409).

    With h as in DPO and l(z) = -log sigmoid(z):

        loss = ((1 - eps) * l(beta * h) - eps * l(-beta * h)) / (1 - 2 * eps)

    If each label is flipped with probability eps (0 <= eps < 0.5), the expectation of this loss
    over the noise equals the DPO loss on the clean labels. Unlike cDPO's label smoothing, the
    second term is subtracted, so the loss is unbounded below (it can go negative): compare
    runs by their reward accuracy, not by the loss value. eps = 0 is plain DPO.
    Implicit rewards: beta * (log pi(y) - log ref(y)); ``f_divergence`` as in ``sigmoid_dpo_loss``.
    """
    chosen_logratios, rejected_logratios, difference = _score_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence, f_alpha)
    logits = beta * difference
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
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733):
    DPO plus a negative log-likelihood term on the chosen response.

        loss = DPO(h; beta, label_smoothing) + alpha * (-log pi(y_w) / |y_w|)

    DPO alone may lower the likelihood of both responses as long as the rejected one falls
    faster; the NLL term keeps the chosen response likely. Implicit rewards as in DPO.
    """
    dpo = sigmoid_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta=beta, label_smoothing=label_smoothing,
                           f_divergence=f_divergence, f_alpha=f_alpha)
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
# The other losses of TRL 1.16's DPOTrainer, each as its paper (or TRL, where it departs) defines it.
# The rewards are beta * (log pi(y) - log ref(y)) unless a docstring says otherwise.


def _logratios(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def _dpo_rewards(losses: torch.Tensor, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                 beta: float) -> PreferenceLoss:
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """Length-normalised DPO, the "DPO-norm" of Tülu 3 (Lambert et al., 2024, arXiv:2411.15124;
    the length bias it removes is analysed in SimPO, arXiv:2405.14734).

        loss = l(beta * ((log pi(y_w) - log ref(y_w)) / |y_w| - (log pi(y_l) - log ref(y_l)) / |y_l|))

    DPO on per-token log-ratios: a long response no longer gets a large |h| just by being long,
    so the policy is not rewarded for lengthening the chosen answers. Per-token log-ratios are
    much smaller than summed ones, so beta must be much larger (Tülu 3 uses 5).
    Rewards: beta * (log pi(y) - log ref(y)) / |y|.
    """
    chosen_count, rejected_count = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    difference = (f_divergence_scores(chosen_logratios, f_divergence, f_alpha) / chosen_count
                  - f_divergence_scores(rejected_logratios, f_divergence, f_alpha) / rejected_count)
    losses = -F.logsigmoid(beta * difference)
    return PreferenceLoss(losses, beta * (chosen_logratios / chosen_count).detach(),
                          beta * (rejected_logratios / rejected_count).detach())


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    epsilon: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """EXO, pairwise form (Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, eq. 16).

    With q = (sigmoid(beta * h), sigmoid(-beta * h)), the policy's preference over the two responses,
    and p = (1 - eps, eps), the label smoothed by eps:

        loss = KL(q || p) = q_w * (log q_w - log(1 - eps)) + q_l * (log q_l - log eps)

    DPO minimises the forward KL(p || q), which averages over the modes of the preferred
    distribution; EXO minimises the reverse KL, which seeks one of them, as RLHF does. eps must
    be above 0 (log eps); the paper uses 1e-3. The loss is 0 where q = p, so it stops pushing a
    pair once sigmoid(beta * h) reaches 1 - eps. ``f_divergence`` as in ``sigmoid_dpo_loss``.
    """
    chosen_logratios, rejected_logratios, difference = _score_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence, f_alpha)
    logits = beta * difference
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-epsilon))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(epsilon)))
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """NCA, pairwise form (Chen et al., 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369).

    With r(y) = beta * (log pi(y) - log ref(y)):

        loss = l(r(y_w)) + 0.5 * l(-r(y_w)) + 0.5 * l(-r(y_l))

    Each response's reward is judged on its own (an absolute likelihood), not only relative to
    the other: unlike DPO, NCA keeps the chosen response's likelihood from falling, which the
    paper finds helps on reasoning and maths.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
              - 0.5 * F.logsigmoid(-rejected_rewards))
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """BCO on pairs (Jung et al., 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656), as TRL's DPOTrainer has it: without the paper's running reward
    shift delta.

        loss = l(r(y_w)) + l(-r(y_l)),  r(y) = beta * (log pi(y) - log ref(y))

    A binary classifier with the implicit reward as its logit: chosen responses are pushed to a
    positive reward and rejected ones to a negative reward, each on its own. The same loss works on
    unpaired thumbs-up / thumbs-down data, for which the paper made it.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """SPPO with hard labels (Wu et al., 2024, "Self-Play Preference Optimization for Language Model
    Alignment", arXiv:2405.00675, eq. 4.7 with the win probability set to 1 for the chosen response
    and 0 for the rejected one):

        loss = (log pi(y_w) - log ref(y_w) - 1 / (2 beta))^2 + (log pi(y_l) - log ref(y_l) + 1 / (2 beta))^2

    Like IPO a regression onto finite targets, but of each response's log-ratio separately: the
    chosen one goes up by 1/(2 beta) and the rejected one down by as much. The paper's soft
    version uses win probabilities from a preference model, estimated outside training. Here the
    ref is the reference of this run (SPPO's self-play iterates it round by round: iterative
    training, docs/pipeline.md).
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """AOT, paired form (Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport", arXiv:2406.05882).

    With z = log pi(y_w) - log pi(y_l) and z_ref the same under the reference, each sorted over the
    batch (sort(z)_i is the i-th smallest):

        loss_i = (1 - eps) * l(beta * (sort(z)_i - sort(z_ref)_i)) + eps * l(-beta * (...))

    Matching sorted values makes the policy's distribution of margins dominate the reference's
    (first-order stochastic dominance), the one-dimensional optimal transport plan, instead of
    asking it of every pair. The batch is the micro-batch, so train.micro_batch_size is the
    sample size of the distributions: with 1 pair AOT is DPO. Loss i belongs to no one pair
    (the sort reorders them), which is why WPO's per-pair weights are refused with it.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    policy_margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    reference_margins, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    losses = _smoothed_logistic(beta * (policy_margins - reference_margins), label_smoothing)
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """AOT, unpaired form (Melnyk et al., 2024, arXiv:2406.05882): the chosen log-ratios
    log pi(y_w) - log ref(y_w) and the rejected ones, each sorted over the batch, are compared
    rank by rank:

        loss_i = (1 - eps) * l(beta * (sort(chosen)_i - sort(rejected)_i)) + eps * l(-beta * (...))

    The distribution of chosen rewards is made to dominate that of rejected rewards, so chosen and
    rejected responses need not come in pairs over the same prompt. Sorting over the micro-batch
    as in ``aot_loss``.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266, eq. 7):

        loss = (1 - sigmoid(r(y_w))) + sigmoid(r(y_l)),  r(y) = beta * (log pi(y) - log ref(y))

    Anchored: the chosen likelihood is pushed up and the rejected one down, each from the
    reference, where DPO only moves their difference. For chosen answers better than what the
    model says now (e.g. from a stronger model, or revisions of its own answers).
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 8):

        loss = sigmoid(r(y_w)) + (1 - sigmoid(r(y_w) - r(y_l)))

    Both likelihoods go down, the rejected one faster: for chosen answers that are still worse
    than what the model says now (the chosen response ranks above the rejected one, but the model
    should not imitate it). At policy = reference the chosen response gets no gradient; once the
    rejected one has fallen, the first term pulls the chosen one down too.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = (torch.sigmoid(beta * chosen_logratios)
              + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))))
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    tau: float = DEFAULT_DISCOPOP_TAU,
    f_divergence: str = "reverse_kl",
    f_alpha: float = DEFAULT_F_DIVERGENCE_ALPHA,
) -> PreferenceLoss:
    """DiscoPOP, the log-ratio modulated loss (Lu et al., 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", arXiv:2406.08414, eq. 5):

        m = sigmoid(beta * h / tau),  loss = (1 - m) * l(beta * h) + m * exp(-beta * h)

    A blend, found by an LLM-driven search, of DPO's logistic loss (where the pair is ranked the
    wrong way, m -> 0) and an exponential loss (where it is ranked right, m -> 1). The loss is
    not convex: near h = 0 its slope has the wrong sign (at beta * h = 0 with tau = 0.05 it rises
    with h), so pairs the policy ranks about even drift apart slowly at first; the paper's tau is
    0.05. ``f_divergence`` as in ``sigmoid_dpo_loss``.
    """
    chosen_logratios, rejected_logratios, difference = _score_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence, f_alpha)
    logits = beta * difference
    modulation = torch.sigmoid(logits / tau)
    losses = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    return _dpo_rewards(losses, chosen_logratios, rejected_logratios, beta)


def wpo_weights(policy: PairLogps) -> torch.Tensor:
    """WPO's pair weights (Zhou et al., 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv:2406.11827, eq. 2 with its probability alignment), shape (batch,), no grad:

        w = exp(mean_t [log pi(y_w,t) - log sum_v pi(v)^2]) * exp(mean_t [... of y_l])

    the product of each response's length-normalised likelihood under the current policy, each
    token's probability divided by sum_v pi(v)^2 (the probability a sample from the policy
    repeats itself): how likely the policy is to have produced the pair itself. Off-policy pairs
    (from another model) weigh little; the weighting simulates on-policy data. The per-token
    sums come from ``batching.pair_logps(..., wpo=True)``.
    """
    if policy.chosen_aligned is None or policy.rejected_aligned is None:
        raise ValueError("WPO weighting needs pair_logps(..., wpo=True)")
    chosen = torch.exp(policy.chosen_aligned / policy.chosen_tokens.clamp(min=1))
    rejected = torch.exp(policy.rejected_aligned / policy.rejected_tokens.clamp(min=1))
    return (chosen * rejected).detach()


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
    if name in ("ipo", "sigmoid_norm"):
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
    [sigmoid, nll] are DPO's. With ``wpo_weighting`` every pair's total is multiplied by its WPO
    weight (``wpo_weights``; the same as weighting each term, as TRL does), which needs
    ``policy`` from ``pair_logps(..., wpo=True)``.
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
    if settings.wpo_weighting:
        total = total * wpo_weights(policy)
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
    tokens = (policy.chosen_tokens, policy.rejected_tokens)
    divergence = dict(f_divergence=settings.f_divergence,
                      f_alpha=DEFAULT_F_DIVERGENCE_ALPHA if settings.f_divergence_alpha is None
                      else settings.f_divergence_alpha)
    smoothing = settings.label_smoothing
    if name == "sigmoid":
        return sigmoid_dpo_loss(*logps, beta=beta, label_smoothing=smoothing, **divergence)
    if name == "ipo":
        return ipo_loss(*logps, *tokens, beta=beta, **divergence)
    if name == "hinge":
        return hinge_loss(*logps, beta=beta, **divergence)
    if name == "robust":
        if settings.robust_epsilon is None:
            raise ValueError("dpo.loss=robust needs dpo.robust_epsilon")
        return robust_dpo_loss(*logps, beta=beta, epsilon=settings.robust_epsilon, **divergence)
    if name == "rpo":
        alpha = DEFAULT_RPO_ALPHA if settings.rpo_alpha is None else settings.rpo_alpha
        return rpo_loss(*logps, policy.chosen_tokens, beta=beta, alpha=alpha, label_smoothing=smoothing, **divergence)
    if name == "sigmoid_norm":
        return sigmoid_norm_loss(*logps, *tokens, beta=beta, **divergence)
    if name == "exo_pair":
        return exo_pair_loss(*logps, beta=beta, epsilon=smoothing, **divergence)
    if name == "discopop":
        tau = DEFAULT_DISCOPOP_TAU if settings.discopop_tau is None else settings.discopop_tau
        return discopop_loss(*logps, beta=beta, tau=tau, **divergence)
    if name in ("aot", "aot_unpaired"):
        loss = aot_loss if name == "aot" else aot_unpaired_loss
        return loss(*logps, beta=beta, label_smoothing=smoothing)
    plain = {"nca_pair": nca_pair_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
             "apo_zero": apo_zero_loss, "apo_down": apo_down_loss}
    if name in plain:
        return plain[name](*logps, beta=beta)
    raise ValueError(f"unknown preference loss {name!r}")
