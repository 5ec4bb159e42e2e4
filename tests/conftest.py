"""Fixtures shared by the test folders."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings


@pytest.fixture
def fault_at_steps(monkeypatch):
    """``fault_at_steps(TaskClass, steps, fault)``: apply ``fault(step_output)`` to the training
    forward pass of the given (1-based) steps of a training task (see loop.TrainingTask)."""

    def apply(task_class, steps: set[int], fault) -> None:
        real_batch, real_forward = task_class.batch, task_class.forward
        current = {}

        def batch(self, step):
            current["step"] = step + 1
            return real_batch(self, step)

        def forward(self, model, inputs):
            out = real_forward(self, model, inputs)
            if current["step"] in steps:
                fault(out)
            return out

        monkeypatch.setattr(task_class, "batch", batch)
        monkeypatch.setattr(task_class, "forward", forward)

    return apply


# Property tests (hypothesis) draw the same examples on every run, so the suite's result
# does not depend on luck (CI must be reproducible); HYPOTHESIS_RANDOM=1 explores new ones.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("HYPOTHESIS_RANDOM") else "reproducible")
