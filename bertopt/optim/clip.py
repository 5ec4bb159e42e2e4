"""Global gradient norm and TensorFlow's clip coefficient.

BERT clips all gradients together by their global norm (``tf.clip_by_global_norm``),
before the Adam moments see them. We never rewrite the gradients here: the optimizers
fold the coefficient into their update, which saves a read-modify-write pass.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

try:  # DTensor (FSDP2 / tensor parallel): a local norm is not the norm of the whole tensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def global_grad_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of all ``grads`` taken together, as a 0-dim float32 tensor.

    Squares are summed per device in one ``_foreach_norm`` call, then across devices.
    For DTensors the sums are reduced over the mesh, so the result is the norm of the
    full (unsharded) tensors, the same on every rank.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    per_device = []
    for device_grads in by_device.values():
        norms = torch._foreach_norm(device_grads, 2.0)
        per_device.append(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
    first = per_device[0]
    total = torch.linalg.vector_norm(torch.stack([n.to(first.device) for n in per_device]))
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return total


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """TensorFlow's ``clip_by_global_norm`` scale: ``c * min(1/norm, 1/c)``.

    This equals ``c / max(norm, c)``; we keep TF's form so the float32 result is the
    same to the last bit. No epsilon (torch's ``clip_grad_norm_`` adds 1e-6), and the
    coefficient is exactly 1 when ``norm <= c`` and ``c == 1``.
    """
    c = torch.tensor(max_norm, dtype=total_norm.dtype, device=total_norm.device)
    return c * torch.minimum(1.0 / total_norm, 1.0 / c)
