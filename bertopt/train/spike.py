"""Loss-spike detection and the data order after a rewind (``--on-spike rewind``).

A *spike* is an optimizer step whose training loss (summed over micro-batches and processes, so
the same on every rank) stands far above the run's recent level, or whose global gradient norm
(the optimizer's own ``last_grad_norm``: the same on every rank under DDP and FSDP2) is many
times its recent median. The recent level is robust: the median and the MAD (median absolute
deviation, scaled by 1.4826 to estimate a standard deviation) of the last ``--spike-window``
applied steps, so one bad step does not move it. Steps whose update was not applied (a non-finite
loss, an fp16 overflow: their norm is inf) are neither spikes nor part of the level.

A step that passes either threshold counts as a spike once ``--spike-patience`` steps in a row
have (one that heals at the next step is left alone: the clipped update of a single wild step
did no lasting harm, and a rewind could not help when the model's state, not a batch, caused it).
A step is *elevated* when it passes half of either threshold; the spike's window is the run of
elevated steps that ends at the spike. The loop then restores the newest checkpoint taken before
that window (:func:`bertopt.train.resume.rewind`) and skips the window's batches: the batch of
optimizer step ``s`` is the task's batch of *data step* :meth:`SpikeState.data_step` ``(s)``, a
pure function of ``s`` and the skipped ranges, which the checkpoint carries, so a resumed run
reads the same batches in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class Verdict:
    spike: bool
    elevated: bool
    reason: str = ""


@dataclass
class SpikeState:
    """What the detector and the data order remember; part of the loop state in checkpoints."""

    losses: list[float] = field(default_factory=list)  # last N applied steps, oldest first
    norms: list[float] = field(default_factory=list)
    elevated_since: int | None = None  # first step (1-based) of the current run of elevated steps
    skipped: list[list[int]] = field(default_factory=list)  # data-step ranges [start, end), merged, sorted
    rewinds: list[dict[str, Any]] = field(default_factory=list)  # one event per rewind
    lr_scale: float = 1.0  # product of the --spike-lr-factor of every rewind so far
    spiking: int = 0  # steps in a row past a threshold (kept out of the level)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "elevated_since": self.elevated_since,
                "skipped": [list(r) for r in self.skipped], "rewinds": [dict(e) for e in self.rewinds],
                "lr_scale": self.lr_scale, "spiking": self.spiking}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any] | None) -> "SpikeState":
        saved = saved or {}
        return cls(losses=[float(x) for x in saved.get("losses", [])],
                   norms=[float(x) for x in saved.get("norms", [])],
                   elevated_since=saved.get("elevated_since"),
                   skipped=[[int(a), int(b)] for a, b in saved.get("skipped", [])],
                   rewinds=[dict(e) for e in saved.get("rewinds", [])],
                   lr_scale=float(saved.get("lr_scale", 1.0)), spiking=int(saved.get("spiking", 0)))

    # --- data order ---------------------------------------------------------------------------

    def data_step(self, step: int) -> int:
        """The data step (argument of ``task.batch``) of 0-based optimizer step ``step``: the
        ``step``-th data step not inside a skipped range."""
        for start, end in self.skipped:  # sorted, disjoint
            if step >= start:
                step += end - start
            else:
                break
        return step

    def skip(self, start: int, end: int) -> None:
        """Never read data steps ``[start, end)`` again (merged with the ranges already skipped)."""
        ranges = sorted([*self.skipped, [start, end]])
        merged: list[list[int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.skipped = merged

    # --- detection ----------------------------------------------------------------------------

    def judge(self, step: int, loss: float, grad_norm: float, *, window: int, loss_mads: float,
              min_rise: float, grad_ratio: float, patience: int = 1) -> Verdict:
        """Judge 1-based ``step`` (loss and gradient norm of an update already applied): a spike
        once ``patience`` steps in a row pass a threshold (a single step that passes and heals at
        once is left alone). A step that passes none joins the recent level. Non-finite values (a
        skipped update) are ignored."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict(False, self.elevated_since is not None)
        verdict = Verdict(False, False)
        if len(self.losses) >= min(window, MIN_HISTORY):
            level, spread = median_and_mad(self.losses)
            rise = loss - level
            # the MAD of a flat curve can be ~0: a spike must also rise by min_rise of the level
            loss_bar = max(loss_mads * spread, min_rise * abs(level))
            norm_level = _median(sorted(self.norms))
            ratio = grad_norm / norm_level if norm_level > 0 else 1.0
            if rise > loss_bar or ratio > grad_ratio:
                what = (f"loss {loss:.4g} against a recent median of {level:.4g} (MAD {spread:.3g})"
                        if rise > loss_bar else
                        f"gradient norm {grad_norm:.4g}, {ratio:.1f}x the recent median {norm_level:.4g}")
                verdict = Verdict(True, True, what)
            elif rise > loss_bar / 2 or ratio > grad_ratio / 2:
                verdict = Verdict(False, True)
        if verdict.spike:
            if self.elevated_since is None:
                self.elevated_since = step
            self.spiking = self.spiking + 1
            verdict.spike = self.spiking >= patience
            return verdict
        self.spiking = 0
        self.elevated_since = (self.elevated_since or step) if verdict.elevated else None
        for history, value in ((self.losses, loss), (self.norms, grad_norm)):
            history.append(value)
            del history[:-window]
        return verdict


MIN_HISTORY = 20  # steps of history before any verdict (or --spike-window, if smaller)


def median_and_mad(values: list[float]) -> tuple[float, float]:
    """Median and MAD (scaled to a standard deviation) of ``values``."""
    ordered = sorted(values)
    level = _median(ordered)
    spread = _median(sorted(abs(v - level) for v in ordered)) * MAD_TO_SIGMA
    return level, spread


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
