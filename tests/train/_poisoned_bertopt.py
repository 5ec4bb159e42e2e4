"""``python _poisoned_bertopt.py STEPS bertopt-args...``: ``bertopt`` whose pretraining loss (and
gradient) at the 0-based data steps STEPS (comma-separated) is multiplied by 50: poisoned batches
in a process that torchrun starts, where no test fixture can reach."""

from __future__ import annotations

import sys

from bertopt.cli import main
from bertopt.train.pretrain import MaskedLMTask

POISON = {int(s) for s in sys.argv[1].split(",")}
_batch, _forward = MaskedLMTask.batch, MaskedLMTask.forward
_current = {}


def batch(self, step):
    _current["step"] = step
    return _batch(self, step)


def forward(self, model, inputs):
    out = _forward(self, model, inputs)
    if _current["step"] in POISON:
        out.loss_sum = out.loss_sum * 50.0
    return out


MaskedLMTask.batch, MaskedLMTask.forward = batch, forward

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
