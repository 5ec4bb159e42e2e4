"""Which parameters get weight decay.

Google's BERT skips decay for every variable whose name matches one of
``["LayerNorm", "layer_norm", "bias"]`` by an unanchored ``re.search``. That rule
depends on names: RoBERTa-style ``layer_norm``, RMSNorm ``weight``s or ``gamma``/``beta``
names slip through it. So ``param_groups`` can also exclude normalisation layers by
module type and small tensors by rank, and ``decay_report`` shows the decision for every
parameter, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from torch import Tensor, nn

BERT_EXCLUDE = ("LayerNorm", "layer_norm", "bias")

NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class DecayDecision:
    name: str
    shape: tuple[int, ...]
    decayed: bool
    reason: str  # why not decayed ("name matches 'bias'", ...) or "decayed"


def _owner_types(model: nn.Module) -> dict[int, type[nn.Module]]:
    """Map each parameter (by id) to the type of the module that directly holds it."""
    owners: dict[int, type[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), type(module))
    return owners


def decide_decay(
    model: nn.Module,
    exclude: Iterable[str] = BERT_EXCLUDE,
    *,
    exclude_norm_layers: bool = False,
    exclude_ndim_below: int | None = None,
    norm_layer_types: tuple[type[nn.Module], ...] = NORM_LAYER_TYPES,
) -> list[tuple[DecayDecision, Tensor]]:
    """The decision for every trainable parameter, in ``named_parameters()`` order.

    Shared (tied) parameters appear once, under their first name, as in
    ``named_parameters()``. Frozen parameters (``requires_grad=False``) are left out.
    """
    patterns = [re.compile(p) for p in exclude]
    owners = _owner_types(model) if exclude_norm_layers else {}
    decisions = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        reason = "decayed"
        hit = next((pat.pattern for pat in patterns if pat.search(name)), None)
        if hit is not None:
            reason = f"name matches {hit!r}"
        elif exclude_norm_layers and issubclass(owners[id(p)], norm_layer_types):
            reason = f"held by a {owners[id(p)].__name__}"
        elif exclude_ndim_below is not None and p.ndim < exclude_ndim_below:
            reason = f"ndim {p.ndim} < {exclude_ndim_below}"
        decisions.append((DecayDecision(name, tuple(p.shape), reason == "decayed", reason), p))
    return decisions


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    exclude: Iterable[str] = BERT_EXCLUDE,
    *,
    exclude_norm_layers: bool = False,
    exclude_ndim_below: int | None = None,
) -> list[dict]:
    """Two param groups, decayed and not, with the parameter names kept in each.

    ``exclude`` are regular expressions searched (unanchored, as in Google's code) in
    the names from ``model.named_parameters()``. ``exclude_norm_layers=True`` also
    excludes every parameter held by a normalisation layer (LayerNorm, RMSNorm, ...);
    ``exclude_ndim_below=2`` excludes vectors and scalars (biases, norm gains), the rule
    for models not named like BERT. Empty groups are dropped.

    >>> optimizer = BertAdam(param_groups(model, weight_decay=0.01), lr=1e-4)
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decisions = decide_decay(
        model, exclude, exclude_norm_layers=exclude_norm_layers, exclude_ndim_below=exclude_ndim_below
    )
    groups = [
        {"params": [], "param_names": [], "weight_decay": weight_decay},
        {"params": [], "param_names": [], "weight_decay": 0.0},
    ]
    for decision, p in decisions:
        group = groups[0] if decision.decayed else groups[1]
        group["params"].append(p)
        group["param_names"].append(decision.name)
    return [g for g in groups if g["params"]]


def decay_report(model: nn.Module, exclude: Iterable[str] = BERT_EXCLUDE, **options) -> str:
    """A table of every trainable parameter: decayed or not, and why. Print it once."""
    decisions = [d for d, _ in decide_decay(model, exclude, **options)]
    width = max((len(d.name) for d in decisions), default=4)
    lines = [f"{'name':<{width}}  {'shape':<16} decay  reason"]
    for d in decisions:
        lines.append(f"{d.name:<{width}}  {str(list(d.shape)):<16} {'yes' if d.decayed else 'no ':<5}  {d.reason}")
    n_decayed = sum(d.decayed for d in decisions)
    lines.append(f"{n_decayed} of {len(decisions)} parameter tensors decayed")
    return "\n".join(lines)
