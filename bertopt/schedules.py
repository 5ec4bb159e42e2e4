"""Learning-rate schedules: BERT's own, and the usual warmup family.

Every schedule is two things:

* a small frozen dataclass (``PolynomialDecay``, ``Cosine``, ...) that is a pure
  function of the step: ``schedule(step) -> multiplier`` of the base LR; and
* ``ScheduledLR``, one ``torch.optim.lr_scheduler.LRScheduler`` that applies such a
  schedule to every param group's own base LR (``group["initial_lr"]``).

``ScheduledLR.state_dict()`` holds only plain Python values (the schedule is stored as
a dict of its fields), so it pickles, loads with ``torch.load(weights_only=True)``, and
a scheduler rebuilt and loaded from it continues with identical LRs.

Conventions shared by all schedules:

* ``step`` counts optimizer updates from 0. The LR used by update ``k`` is
  ``base_lr * schedule(k)``: build the scheduler before training and call
  ``scheduler.step()`` after each ``optimizer.step()`` (this is also what Google's
  code does: its first update runs at ``global_step == 0``).
* Warmup is linear from 0: ``schedule(step) = step / num_warmup_steps`` for
  ``step < num_warmup_steps``. ``num_warmup_steps=None`` means
  ``int(num_train_steps * warmup_proportion)`` (Google's ``run_classifier.py``);
  a fractional ``num_warmup_steps`` is allowed (pytorch-pretrained-bert's warmup
  fraction times ``t_total`` need not be whole).
* ``end_factor`` is a fraction of each group's base LR, not an absolute LR
  (TF's ``end_learning_rate=1e-7`` with ``lr=1e-4`` is ``end_factor=1e-3``).
* Past ``num_train_steps`` the decaying schedules hold their final value (no
  second cosine cycle, no negative base for the power); constant and inverse-sqrt
  schedules have no end and keep going.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

STYLES = ("google", "rebased")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


# ----------------------------------------------------------------------------------------
# argument checks


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain_number(value: numbers.Real) -> int | float:
    """int for whole numbers given as ints, else float (keeps state_dict plain)."""
    return int(value) if _is_integer(value) else float(value)


def _check_fraction(name: str, value: Any) -> None:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def resolve_warmup_steps(num_train_steps: int, num_warmup_steps: float | None,
                         warmup_proportion: float = 0.1) -> int | float:
    """``num_warmup_steps``, or ``int(num_train_steps * warmup_proportion)`` when it is None."""
    if num_warmup_steps is not None:
        return num_warmup_steps
    _check_fraction("warmup_proportion", warmup_proportion)
    if not _is_integer(num_train_steps):
        raise ValueError(f"num_train_steps must be a positive integer, got {num_train_steps!r}")
    return int(num_train_steps * warmup_proportion)


# ----------------------------------------------------------------------------------------
# schedules: pure functions of the step


@dataclass(frozen=True)
class Schedule:
    """Linear warmup from 0 to 1 over ``num_warmup_steps``; subclasses define the rest."""

    num_train_steps: int
    num_warmup_steps: int | float

    def __post_init__(self) -> None:
        total, warmup = self.num_train_steps, self.num_warmup_steps
        if not _is_integer(total) or total <= 0:
            raise ValueError(f"num_train_steps must be a positive integer, got {total!r}")
        if not _is_real(warmup) or warmup < 0:
            raise ValueError(f"num_warmup_steps must be a finite number >= 0, got {warmup!r}")
        if warmup > total:
            raise ValueError(
                f"num_warmup_steps={warmup} is longer than training (num_train_steps={total}); "
                "use fewer warmup steps or a smaller warmup_proportion"
            )
        # Plain Python numbers (not numpy scalars) so state_dicts stay weights_only-loadable.
        object.__setattr__(self, "num_train_steps", int(total))
        object.__setattr__(self, "num_warmup_steps", _plain_number(warmup))

    def __call__(self, step: int) -> float:
        if not _is_integer(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if step < self.num_warmup_steps:
            return step / self.num_warmup_steps
        return self.after_warmup(int(step))

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def decay_progress(self, step: int, start: float) -> float:
        """Fraction in [0, 1] of the way from ``start`` to the end of training."""
        length = self.num_train_steps - start
        return 1.0 if length <= 0 else (min(step, self.num_train_steps) - start) / length

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(fields: dict[str, Any]) -> Schedule:
        fields = dict(fields)
        kind = fields.pop("kind", None)
        if kind not in _SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r} in state_dict; known: {sorted(_SCHEDULE_KINDS)}")
        return _SCHEDULE_KINDS[kind](**fields)


@dataclass(frozen=True)
class PolynomialDecay(Schedule):
    """``end + (1 - end) * (1 - progress) ** power`` after warmup.

    ``style="google"``: progress counts from step 0 (``min(step, T) / T``), as
    ``tf.train.polynomial_decay`` under Google's warmup override, and NVIDIA's LAMB
    recipe with power 0.5; the LR drops at the end of warmup.
    ``style="rebased"``: progress counts from the end of warmup
    (``(step - W) / (T - W)``), as transformers' schedules: decay starts at the peak.
    """

    power: float = 1.0
    end_factor: float = 0.0
    style: str = "google"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("power", self.power)
        _check_fraction("end_factor", self.end_factor)
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")

    def after_warmup(self, step: int) -> float:
        start = 0 if self.style == "google" else self.num_warmup_steps
        length = self.num_train_steps - start
        # (T - min(step, T)) / length rounds once, where 1 - progress would round twice.
        remaining = (self.num_train_steps - min(step, self.num_train_steps)) / length if length > 0 else 0.0
        return (1.0 - self.end_factor) * remaining**self.power + self.end_factor


@dataclass(frozen=True)
class Constant(Schedule):
    """1 after warmup (pytorch-pretrained-bert's WarmupConstantSchedule)."""

    def after_warmup(self, step: int) -> float:
        return 1.0


@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine from 1 at the end of warmup, ``num_cycles`` periods (0.5: down to ``end_factor`` at T)."""

    num_cycles: float = 0.5
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("num_cycles", self.num_cycles)
        _check_fraction("end_factor", self.end_factor)

    def after_warmup(self, step: int) -> float:
        progress = self.decay_progress(step, self.num_warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress))
        return (1.0 - self.end_factor) * cosine + self.end_factor


@dataclass(frozen=True)
class CosineWithHardRestarts(Schedule):
    """``num_cycles`` half-cosines from 1 to 0 after warmup, each restarting at 1; 0 from T on."""

    num_cycles: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("num_cycles", self.num_cycles)

    def after_warmup(self, step: int) -> float:
        progress = self.decay_progress(step, self.num_warmup_steps)
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0)))


@dataclass(frozen=True)
class InverseSqrt(Schedule):
    """``1 / sqrt((step + timescale - W) / timescale)`` after warmup (1 at step W).

    ``timescale=None`` means W, or 10000 without warmup (transformers' default); with
    ``timescale == W`` this is the Transformer paper's ``sqrt(W / step)``.
    """

    timescale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timescale is None:
            object.__setattr__(self, "timescale", self.num_warmup_steps or 10_000)
        _check_positive("timescale", self.timescale)
        object.__setattr__(self, "timescale", _plain_number(self.timescale))

    def after_warmup(self, step: int) -> float:
        shift = self.timescale - self.num_warmup_steps
        return 1.0 / math.sqrt((step + shift) / self.timescale)


@dataclass(frozen=True)
class WarmupStableDecay(Schedule):
    """Warmup, then 1 until the last ``num_decay_steps``, which decay to ``end_factor``.

    ``decay_shape``: "linear" ``1 - p``, "cosine" ``(1 + cos(pi p)) / 2``, or "1-sqrt"
    ``1 - sqrt(p)`` (Hägele et al. 2024), with p the progress through the decay.
    """

    num_decay_steps: int | float = 0
    decay_shape: str = "cosine"
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        decay = self.num_decay_steps
        if not _is_real(decay) or decay < 0:
            raise ValueError(f"num_decay_steps must be a finite number >= 0, got {decay!r}")
        if self.num_warmup_steps + decay > self.num_train_steps:
            raise ValueError(
                f"num_warmup_steps + num_decay_steps = {self.num_warmup_steps} + {decay} is longer "
                f"than training (num_train_steps={self.num_train_steps})"
            )
        object.__setattr__(self, "num_decay_steps", _plain_number(decay))
        if self.decay_shape not in WSD_DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {WSD_DECAY_SHAPES}, got {self.decay_shape!r}")
        _check_fraction("end_factor", self.end_factor)

    def after_warmup(self, step: int) -> float:
        decay_start = self.num_train_steps - self.num_decay_steps
        if step < decay_start:
            return 1.0
        if step >= self.num_train_steps:
            return self.end_factor
        progress = (step - decay_start) / self.num_decay_steps
        if self.decay_shape == "linear":
            factor = 1.0 - progress
        elif self.decay_shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - math.sqrt(progress)
        return (1.0 - self.end_factor) * factor + self.end_factor


_SCHEDULE_KINDS = {
    cls.__name__: cls
    for cls in (PolynomialDecay, Constant, Cosine, CosineWithHardRestarts, InverseSqrt, WarmupStableDecay)
}


# ----------------------------------------------------------------------------------------
# the LRScheduler


class ScheduledLR(LRScheduler):
    """Sets each param group's LR to ``base_lr * schedule(step)``.

    ``schedule`` is one of the dataclasses above. ``lr_at(step)`` gives the LRs of any
    step without changing state. The state_dict stores the schedule as plain fields,
    and loading it restores that schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a bertopt.schedules.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> list[float]:
        multiplier = self.schedule(step)
        return [base_lr * multiplier for base_lr in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    # The LR is a closed-form function of the step, so step(epoch) needs nothing else.
    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["schedule"] = self.schedule.to_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        schedule = Schedule.from_dict(state.pop("schedule"))
        super().load_state_dict(state)
        self.schedule = schedule


# ----------------------------------------------------------------------------------------
# factories


def polynomial_schedule(optimizer, num_train_steps, num_warmup_steps=None, warmup_proportion=0.1, *,
                        power=1.0, end_factor=0.0, style="google", last_epoch=-1) -> ScheduledLR:
    """Linear warmup, then polynomial decay to ``end_factor * base_lr`` at ``num_train_steps``.

    The default ``style="google"`` counts the decay from step 0, as TF's
    ``polynomial_decay`` in Google's BERT; NVIDIA's BERT LAMB recipe is
    ``polynomial_schedule(opt, T, W, power=0.5)``. ``style="rebased"`` counts from the end
    of warmup, as transformers' ``get_polynomial_decay_schedule_with_warmup`` (whose
    ``lr_end`` is absolute: pass ``end_factor=lr_end / lr``).
    """
    warmup = resolve_warmup_steps(num_train_steps, num_warmup_steps, warmup_proportion)
    schedule = PolynomialDecay(num_train_steps, warmup, power=power, end_factor=end_factor, style=style)
    return ScheduledLR(optimizer, schedule, last_epoch)


def bert_schedule(optimizer, num_train_steps, num_warmup_steps=None, warmup_proportion=0.1,
                  style="google", last_epoch=-1) -> ScheduledLR:
    """BERT's linear warmup + linear decay, for T = num_train_steps and W = num_warmup_steps.

    ``style="google"`` is google-research/bert exactly (``optimization.create_optimizer``):
    ``lr * step / W`` for step < W, then ``lr * (1 - min(step, T) / T)``. The LR at step 0
    is 0, and the decay is counted from step 0, so the LR *drops* at the end of warmup,
    from about ``lr`` to ``lr * (1 - W / T)``; it reaches 0 at T and stays there.

    ``style="rebased"`` is Hugging Face transformers' ``get_linear_schedule_with_warmup``
    (and pytorch-pretrained-bert's ``WarmupLinearSchedule``): the same warmup, then
    ``lr * (T - step) / (T - W)``, a decay that starts from the peak ``lr`` at step W.

    ``num_warmup_steps=None`` means ``int(num_train_steps * warmup_proportion)``, as
    Google's ``run_classifier.py`` computes it.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return polynomial_schedule(optimizer, num_train_steps, num_warmup_steps, warmup_proportion,
                               power=1.0, end_factor=0.0, style=style, last_epoch=last_epoch)


def constant_schedule(optimizer, num_train_steps, num_warmup_steps=None, warmup_proportion=0.1, *,
                      last_epoch=-1) -> ScheduledLR:
    """Linear warmup, then the base LR for ever."""
    warmup = resolve_warmup_steps(num_train_steps, num_warmup_steps, warmup_proportion)
    return ScheduledLR(optimizer, Constant(num_train_steps, warmup), last_epoch)


def cosine_schedule(optimizer, num_train_steps, num_warmup_steps=None, warmup_proportion=0.1, *,
                    num_cycles=0.5, end_factor=0.0, last_epoch=-1) -> ScheduledLR:
    """Linear warmup, then cosine decay from the peak to ``end_factor * base_lr`` at T."""
    warmup = resolve_warmup_steps(num_train_steps, num_warmup_steps, warmup_proportion)
    schedule = Cosine(num_train_steps, warmup, num_cycles=num_cycles, end_factor=end_factor)
    return ScheduledLR(optimizer, schedule, last_epoch)


def cosine_with_hard_restarts_schedule(optimizer, num_train_steps, num_warmup_steps=None,
                                       warmup_proportion=0.1, *, num_cycles=1.0,
                                       last_epoch=-1) -> ScheduledLR:
    """Linear warmup, then ``num_cycles`` cosine decays to 0, each restarting at the peak."""
    warmup = resolve_warmup_steps(num_train_steps, num_warmup_steps, warmup_proportion)
    schedule = CosineWithHardRestarts(num_train_steps, warmup, num_cycles=num_cycles)
    return ScheduledLR(optimizer, schedule, last_epoch)


def inverse_sqrt_schedule(optimizer, num_train_steps, num_warmup_steps=None, warmup_proportion=0.1, *,
                          timescale=None, last_epoch=-1) -> ScheduledLR:
    """Linear warmup, then decay as the inverse square root of the step (no end)."""
    warmup = resolve_warmup_steps(num_train_steps, num_warmup_steps, warmup_proportion)
    return ScheduledLR(optimizer, InverseSqrt(num_train_steps, warmup, timescale=timescale), last_epoch)


def wsd_schedule(optimizer, num_train_steps, num_warmup_steps=None, warmup_proportion=0.1, *,
                 num_decay_steps=None, decay_proportion=0.2, decay_shape="cosine", end_factor=0.0,
                 last_epoch=-1) -> ScheduledLR:
    """Warmup-stable-decay: warmup, constant, then decay over the last ``num_decay_steps``.

    ``num_decay_steps=None`` means ``int(num_train_steps * decay_proportion)``.
    """
    warmup = resolve_warmup_steps(num_train_steps, num_warmup_steps, warmup_proportion)
    if num_decay_steps is None:
        _check_fraction("decay_proportion", decay_proportion)
        num_decay_steps = int(num_train_steps * decay_proportion)
    schedule = WarmupStableDecay(num_train_steps, warmup, num_decay_steps=num_decay_steps,
                                 decay_shape=decay_shape, end_factor=end_factor)
    return ScheduledLR(optimizer, schedule, last_epoch)


_FACTORIES = {
    "bert": bert_schedule,
    "polynomial": polynomial_schedule,
    "constant": constant_schedule,
    "cosine": cosine_schedule,
    "cosine_with_hard_restarts": cosine_with_hard_restarts_schedule,
    "inverse_sqrt": inverse_sqrt_schedule,
    "wsd": wsd_schedule,
}
SCHEDULE_NAMES = tuple(_FACTORIES)


def schedule_options(name: str) -> tuple[str, ...]:
    """Keyword options that schedule ``name`` takes beyond the optimizer and step counts."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    fixed = {"optimizer", "num_train_steps", "num_warmup_steps"}
    return tuple(p for p in inspect.signature(_FACTORIES[name]).parameters if p not in fixed)


def get_schedule(name: str, optimizer, num_train_steps: int, num_warmup_steps=None, **kwargs) -> ScheduledLR:
    """Build schedule ``name`` (one of ``SCHEDULE_NAMES``) for ``optimizer``.

    ``kwargs`` are that schedule's options (``schedule_options(name)``), e.g.
    ``style`` for "bert", ``power`` for "polynomial", ``warmup_proportion`` for all.
    """
    allowed = schedule_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} does not take {unknown}; its options are {list(allowed)}")
    return _FACTORIES[name](optimizer, num_train_steps, num_warmup_steps, **kwargs)
