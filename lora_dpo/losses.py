"""Preference losses: pure functions of per-pair summed log-probs, each of shape (batch,).

Names follow the papers: ``policy_chosen_logps`` is log pi_theta(y_w | x) summed over the response
tokens, ``reference_rejected_logps`` is log pi_ref(y_l | x), and so on. Each function returns the
per-pair losses (the caller reduces them) and the implicit rewards, which are detached: they are
metrics, not part of the objective.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor
    """(batch,) loss of each pair."""
    chosen_rewards: torch.Tensor
    """(batch,) implicit reward of the chosen response, detached."""
    rejected_rewards: torch.Tensor
    """(batch,) implicit reward of the rejected response, detached."""


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
