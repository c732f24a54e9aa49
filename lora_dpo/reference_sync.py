"""TR-DPO with LoRA: a reference that follows the policy (dpo.ref_sync_every, dpo.ref_sync_alpha).

TR-DPO (Gorbatovski et al., 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656) updates the reference during training: every tau steps,
ref <- alpha * policy + (1 - alpha) * ref (alpha = 1 is a hard update: the reference becomes the
policy). Here the policy is the 4-bit base plus the trained LoRA adapter, so the reference is a
second, frozen LoRA adapter on the same base (``modeling.REFERENCE_ADAPTER``, the mechanism
``model.init_adapter`` uses), and the update mixes the two adapters. Both share the base, so
what is mixed is each layer's weight delta, scaling * B @ A.

Mixing A and B separately is not mixing the models: (alpha B_p + (1 - alpha) B_r)(alpha A_p +
(1 - alpha) A_r) holds the cross terms B_p A_r and B_r A_p, which belong to neither model; from
the usual start (B_r = 0) it gives alpha^2 B_p A_p + ... instead of alpha B_p A_p. So the product
is mixed: M = alpha s_p B_p A_p + (1 - alpha) s_r B_r A_r, which has rank up to r_p + r_r, and is
re-factorised at the reference's own rank r_r by a truncated SVD, the closest rank-r_r matrix
to M (Eckart-Young). That is exact whenever M has rank <= r_r: a hard update (alpha = 1, which
copies the matrices), the first soft update from a reference of B = 0, and whenever the policy
has not left the reference's subspace; otherwise the smallest singular values are dropped, and
the relative error (Frobenius) of the worst layer is logged at every update. The SVD never forms
M: QR of the stacked factors (d_out x 2r and d_in x 2r) and an SVD of the 2r x 2r core cost
O((d_in + d_out) r^2) per layer, milliseconds for a whole 8B model at r = 16, and no more memory
than the factors. The reference adapter costs what the trained adapter's weights cost (no
optimizer state), e.g. 160 MB for r = 16 on an 8B model in float32.

A checkpoint holds the reference adapter (``reference_adapter.safetensors``), so a resume goes on
with the reference it had, bit for bit. A precomputed reference table (dpo.precompute_reference)
cannot follow a moving reference: Config.validate refuses the two together.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import LoraDpoError
from .modeling import REFERENCE_ADAPTER, TRAINED_ADAPTER, load_adapter_weights

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_adapter.safetensors"
DEFAULT_SYNC_ALPHA = 0.6  # TRL's ref_model_mixup_alpha, and one of the paper's settings


def add_reference_adapter(model: Any) -> None:
    """Give a peft model a frozen reference adapter equal to its trained adapter (with LoRA's fresh
    B = 0 that is the bare base: the usual DPO reference, until the first update).

    The adapter is added without drawing random numbers (its initial values are overwritten), so
    the run's random stream, and so its dropout masks, are those of a run without TR-DPO.
    """
    if REFERENCE_ADAPTER in model.peft_config:
        return  # model.init_adapter's frozen copy already is one
    settings = copy.deepcopy(model.peft_config[TRAINED_ADAPTER])
    settings.inference_mode = True  # peft freezes an adapter added in inference mode
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model.add_adapter(REFERENCE_ADAPTER, settings)
    model.set_adapter(TRAINED_ADAPTER)
    copy_adapter(model, TRAINED_ADAPTER, REFERENCE_ADAPTER)


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)
              and TRAINED_ADAPTER in module.lora_A and REFERENCE_ADAPTER in module.lora_A]
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and (REFERENCE_ADAPTER in getattr(layer, "lora_embedding_A", {})
                                             or getattr(layer, "use_dora", {}).get(TRAINED_ADAPTER)):
            raise LoraDpoError("dpo.ref_sync_every: the adapter has embedding or DoRA layers, whose reference update "
                               "lora-dpo does not implement. Fix: use a plain LoRA adapter on linear layers, or set "
                               "dpo.ref_sync_every=0")
    return layers


@torch.no_grad()
def copy_adapter(model: Any, source: str, target: str) -> None:
    """Set adapter ``target``'s matrices to ``source``'s (the same shapes and scaling)."""
    for layer in _lora_layers(model):
        layer.lora_A[target].weight.copy_(layer.lora_A[source].weight)
        layer.lora_B[target].weight.copy_(layer.lora_B[source].weight)


@torch.no_grad()
def sync_reference(model: Any, alpha: float) -> float:
    """ref <- alpha * policy + (1 - alpha) * ref, of each layer's delta scaling * B @ A (see the
    module docstring); returns the worst layer's relative truncation error (0 where exact)."""
    if alpha == 1.0:
        copy_adapter(model, TRAINED_ADAPTER, REFERENCE_ADAPTER)
        return 0.0
    worst = 0.0
    for layer in _lora_layers(model):
        a_policy, b_policy = layer.lora_A[TRAINED_ADAPTER].weight, layer.lora_B[TRAINED_ADAPTER].weight
        a_reference, b_reference = layer.lora_A[REFERENCE_ADAPTER].weight, layer.lora_B[REFERENCE_ADAPTER].weight
        policy_scale, reference_scale = layer.scaling[TRAINED_ADAPTER], layer.scaling[REFERENCE_ADAPTER]
        # M = left @ right with left (d_out, r_p + r_r) and right (r_p + r_r, d_in), in float64:
        # the factors are small, and the rounding of a float32 QR would show in a bit-exact resume
        # only as noise, but in the truncation as a floor of ~1e-7 instead of ~1e-15.
        left = torch.cat([alpha * policy_scale / reference_scale * b_policy.double(),
                          (1 - alpha) * b_reference.double()], dim=1)
        right = torch.cat([a_policy.double(), a_reference.double()], dim=0)
        q_left, r_left = torch.linalg.qr(left)
        q_right, r_right = torch.linalg.qr(right.T)
        u, s, vh = torch.linalg.svd(r_left @ r_right.T)
        rank = a_reference.shape[0]
        k = min(rank, s.numel())  # a layer narrower than 2r has fewer singular values than the rank
        kept = s[:k].sqrt()
        b_reference.zero_()[:, :k] = (q_left @ u[:, :k] * kept).to(b_reference.dtype)
        a_reference.zero_()[:k] = (kept[:, None] * vh[:k] @ q_right.T).to(a_reference.dtype)
        total = s.square().sum()
        if total > 0:
            worst = max(worst, (s[rank:].square().sum() / total).sqrt().item())
    return worst


def save_reference(model: Any, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the reference adapter's weights into a checkpoint directory (nothing without one).
    ``weights``: a sharded model's LoRA weights gathered whole (``distributed.Processes.whole_adapter``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        return
    state = get_peft_model_state_dict(model, state_dict=weights, adapter_name=REFERENCE_ADAPTER,
                                      save_embedding_layers=False)
    save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(directory / REFERENCE_FILE))


def restore_reference(model: Any, directory: Path, processes: Any = None) -> None:
    """Load the reference adapter a checkpoint holds into the model's own (a checkpoint without one
    leaves the model's reference as it was loaded); a sharded model (``processes.sharded``) into
    its shards."""
    from safetensors.torch import load_file

    path = directory / REFERENCE_FILE
    if not path.is_file() or REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        return
    load_adapter_weights(model, load_file(str(path)), REFERENCE_ADAPTER, processes)
