"""Body of a `bertopt pretrain` process with poisoned batches, for tests/reliability/test_spike_faults.py.

Started by _faults.Launcher's fork server (a plain function of an importable module, as
multiprocessing needs): it patches the pretraining task of this process only, then runs the
command line like the console script.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from _faults import _run_cli


def run_poisoned(argv: list[str], log_path: str, poison: tuple[int, ...] = (), skip: tuple[int, ...] = (),
                 factor: float = 50.0, kill_in_rewind: str | None = None) -> None:
    """``bertopt <argv>`` where the loss of the 0-based data steps ``poison`` is multiplied by
    ``factor`` (a poisoned batch: its gradient too), the data steps ``skip`` are never read (the
    clean reference run), and, with ``kill_in_rewind`` "before"/"after", the process SIGKILLs
    itself the first time a rewind saves its checkpoint, just before or just after writing it."""
    from bertopt.train import resume
    from bertopt.train.pretrain import MaskedLMTask

    real_batch, real_forward, real_save = MaskedLMTask.batch, MaskedLMTask.forward, resume.save
    current = {}

    def batch(self, step):
        for s in sorted(skip):
            step += step >= s
        current["step"] = step
        return real_batch(self, step)

    def forward(self, model, inputs):
        out = real_forward(self, model, inputs)
        if current["step"] in poison:
            out.loss_sum = out.loss_sum * factor
        return out

    def save(run, state):
        if kill_in_rewind and state.spike.rewinds:  # only the save inside rewind() has them so early
            marker = Path(run.config.out) / f".killed-{kill_in_rewind}"
            if not marker.exists():
                marker.touch()
                if kill_in_rewind == "after":
                    real_save(run, state)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(run, state)

    MaskedLMTask.batch, MaskedLMTask.forward, resume.save = batch, forward, save
    _run_cli(argv, log_path)
