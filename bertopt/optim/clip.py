"""Global gradient norm and TensorFlow's clip coefficient.

BERT clips all gradients together by their global norm (``tf.clip_by_global_norm``),
before the Adam moments see them. We never rewrite the gradients here: the optimizers
fold the coefficient into their update, which saves a read-modify-write pass.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from bertopt.optim._dtensor import DTensor, local_part, whole_sums_of_squares
from bertopt.optim.native import build, kernels


def global_grad_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of all ``grads`` taken together, as a 0-dim float32 tensor.

    Squares are summed per device in one ``_foreach_norm`` call, then across devices.
    For DTensors the sums of squares of the local shards are reduced over the mesh
    (``whole_sums_of_squares``), so the result is the norm of the full (unsharded)
    tensors, the same on every rank; DTensors and plain tensors may be mixed.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    per_device = []
    for device_grads in by_device.values():
        if kernels.eligible(device_grads) and (lib := build.library()) is not None:
            # float32 CPU: one multithreaded read of the gradients at memory speed (csrc/norm.c).
            per_device.append(torch.tensor(math.sqrt(kernels.sum_of_squares(lib, device_grads)), dtype=torch.float32))
            continue
        # Norms of the local shards; DTensors (any mix of meshes, or with plain
        # tensors) are then made whole by summing their squares across the mesh.
        norms = torch.stack([n.float() for n in torch._foreach_norm([local_part(g) for g in device_grads], 2.0)])
        if any(isinstance(g, DTensor) for g in device_grads):
            norms = whole_sums_of_squares(norms * norms, device_grads).sqrt()
        per_device.append(torch.linalg.vector_norm(norms))
    first = per_device[0]
    return torch.linalg.vector_norm(torch.stack([n.to(first.device) for n in per_device]))


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """TensorFlow's ``clip_by_global_norm`` scale: ``c * min(1/norm, 1/c)``.

    This equals ``c / max(norm, c)``; we keep TF's form so the float32 result is the
    same to the last bit. No epsilon (torch's ``clip_grad_norm_`` adds 1e-6), and the
    coefficient is exactly 1 when ``norm <= c`` and ``c == 1``.
    """
    c = torch.tensor(max_norm, dtype=total_norm.dtype, device=total_norm.device)
    return c * torch.minimum(1.0 / total_norm, 1.0 / c)
