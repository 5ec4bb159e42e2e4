"""pytorch-pretrained-bert 0.6.2's LR schedules, for ``bertopt.compat.BertAdam``.

They live inside the optimizer and count *progress*, ``step / t_total``; ``warmup`` is a
fraction of ``t_total`` (``-1``: none), and ``t_total < 0`` turns the schedule off (a
multiplier of 1). The classes, their arguments and ``get_lr(step, nowarn=False)`` are
0.6.2's, so a subclass written for it (overriding ``get_lr_(progress)``) works here.

Within ``t_total`` they are bertopt's step-based schedules with ``num_warmup_steps =
warmup * t_total`` (``WarmupLinearSchedule`` is ``bert_schedule(style="rebased")``,
``WarmupConstantSchedule`` is ``constant_schedule``, ``WarmupCosineSchedule`` is
``cosine_schedule``; tests/optim/test_schedules.py checks this against 0.6.2 to 1e-12).
They are kept here in 0.6.2's form because it differs where bertopt's cannot follow:
past ``t_total`` the cosines go on (0.6.2's cosine rises again; bertopt's holds 0),
``t_total`` may be negative or fractional, and ``get_lr_`` works on progress.

Training past ``t_total`` with a schedule for which that makes no sense (linear and
cosine decays) logs 0.6.2's warning, once per new progress value.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


def _check_warmup(warmup) -> None:
    if not (0.0 <= warmup < 1.0 or warmup == -1):
        raise ValueError(f"warmup must be a fraction of t_total in [0, 1), or -1 for no warmup, got {warmup}")


class LRSchedule:
    """Base of the schedules (0.6.2's ``_LRSchedule``): warmup fraction and ``t_total``."""

    warn_t_total = False  # True where going past t_total makes no sense (the decays)

    def __init__(self, warmup: float = 0.002, t_total: float = -1):
        _check_warmup(warmup)
        if t_total < 0 and type(self) is not ConstantLR:
            logger.warning("t_total=%s: the %s schedule is not applied (the LR stays at its base value); "
                           "pass t_total, the number of optimizer steps planned", t_total, type(self).__name__)
        self.warmup, self.t_total = float(max(warmup, 0.0)), float(t_total)
        self.warned_for_t_total_at_progress = -1

    def get_lr(self, step: int, nowarn: bool = False) -> float:
        """The LR multiplier of update number ``step`` (counted from 0)."""
        if self.t_total < 0:
            return 1.0
        progress = float(step) / self.t_total
        ret = self.get_lr_(progress)
        if not nowarn and self.warn_t_total and progress > 1.0 and progress > self.warned_for_t_total_at_progress:
            logger.warning("Training beyond t_total (%s steps, now step %s): the LR multiplier of %s is %s. "
                           "Set t_total to the number of optimizer steps you run.",
                           self.t_total, step, type(self).__name__, ret)
            self.warned_for_t_total_at_progress = progress
        return ret

    def get_lr_(self, progress: float) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "warned_for_t_total_at_progress")
        return f"{type(self).__name__}({fields})"


_LRSchedule = LRSchedule  # 0.6.2's name


class ConstantLR(LRSchedule):
    def get_lr_(self, progress: float) -> float:
        return 1.0


class WarmupCosineSchedule(LRSchedule):
    """Warmup, then ``0.5 * (1 + cos(2 pi cycles x))`` of the progress x after warmup."""

    warn_t_total = True

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 0.5):
        super().__init__(warmup=warmup, t_total=t_total)
        self.cycles = cycles

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * self.cycles * 2 * progress))


class WarmupCosineWithHardRestartsSchedule(WarmupCosineSchedule):
    """Warmup, then ``cycles`` cosine decays from 1 to 0, each restarting at 1."""

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 1.0):
        if not cycles >= 1.0:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        super().__init__(warmup=warmup, t_total=t_total, cycles=cycles)

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1)))


class WarmupCosineWithWarmupRestartsSchedule(WarmupCosineWithHardRestartsSchedule):
    """``cycles`` equal parts, each a warmup (``warmup`` of the part) and a cosine decay."""

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 1.0):
        if not warmup * cycles < 1.0:
            raise ValueError(f"warmup * cycles must be < 1, got {warmup} * {cycles}")
        warmup = warmup * cycles if warmup >= 0 else warmup
        super().__init__(warmup=warmup, t_total=t_total, cycles=cycles)

    def get_lr_(self, progress: float) -> float:
        progress = progress * self.cycles % 1.0
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupConstantSchedule(LRSchedule):
    """Warmup, then 1."""

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        return 1.0


class WarmupLinearSchedule(LRSchedule):
    """Warmup, then linear from 1 at the end of warmup to 0 at ``t_total``; 0 after."""

    warn_t_total = True

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        return max((progress - 1.0) / (self.warmup - 1.0), 0.0)


SCHEDULES = {
    None: ConstantLR,
    "none": ConstantLR,
    "warmup_cosine": WarmupCosineSchedule,
    "warmup_constant": WarmupConstantSchedule,
    "warmup_linear": WarmupLinearSchedule,
}

_CLASSES = {cls.__name__: cls for cls in (
    ConstantLR, WarmupCosineSchedule, WarmupCosineWithHardRestartsSchedule,
    WarmupCosineWithWarmupRestartsSchedule, WarmupConstantSchedule, WarmupLinearSchedule)}


def from_original(schedule):
    """Our equivalent of a pytorch-pretrained-bert schedule object (e.g. from its state_dict).

    Same class name, same fields, including how far it has warned. Objects of any other
    class (yours, or a ppb subclass) are returned as they are: anything with
    ``get_lr(step)`` works as a schedule.
    """
    cls = type(schedule)
    if not cls.__module__.startswith("pytorch_pretrained_bert") or cls.__name__ not in _CLASSES:
        return schedule
    ours = _CLASSES[cls.__name__].__new__(_CLASSES[cls.__name__])
    ours.__dict__.update(vars(schedule))
    return ours
