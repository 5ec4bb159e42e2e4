"""Shard helpers: parameters sharded as DTensors (FSDP2's ``fully_shard``, tensor parallel).

A norm of a shard is not the norm of the tensor: sums of squares of the local shards are
added across the mesh (``whole_sums_of_squares``) before a norm is formed. The fast paths
work on ``local_part`` of each tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def local_part(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: its shard for a DTensor, else ``t`` itself.

    In-place operations on the result change ``t`` (``to_local`` is a view under no_grad).
    """
    return t.to_local() if isinstance(t, DTensor) else t


def whole_sums_of_squares(local_sums: Tensor, tensors: list[Tensor]) -> Tensor:
    """Turn per-tensor sums of squares of local shards into those of the whole tensors.

    ``local_sums[i]`` is the sum of squares of ``local_part(tensors[i])``. Entries of
    DTensors are summed over the mesh dimensions the tensor is sharded on (replicated
    dimensions already hold the whole), with one all-reduce per distinct
    (mesh, placements); plain tensors are returned as they are. Every process must call
    this with the same list of tensors, in the same order.
    """
    by_layout: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            by_layout.setdefault((t.device_mesh, tuple(t.placements)), []).append(i)
    if not by_layout:
        return local_sums
    out = local_sums.clone()
    for (mesh, placements), indices in by_layout.items():
        if any(p.is_partial() for p in placements):
            raise ValueError(
                f"cannot take the norm of a DTensor with Partial placements {placements}; "
                "redistribute it to Shard/Replicate first"
            )
        # The local sums of a sharded dimension add up to the whole: reduce them as Partial.
        as_partial = [Partial() if p.is_shard() else Replicate() for p in placements]
        index = torch.tensor(indices, device=local_sums.device)
        local = local_sums.index_select(0, index).to(mesh.device_type)
        summed = DTensor.from_local(local, mesh, as_partial, run_check=False).full_tensor()
        out.index_copy_(0, index, summed.to(out.device))
    return out
