"""bertopt: BERT's exact optimization recipe for PyTorch.

    import bertopt
    optimizer, scheduler = bertopt.create_optimizer(model, init_lr=5e-5,
                                                    num_train_steps=10_000, num_warmup_steps=1_000)
"""

from bertopt import compat, schedules
from bertopt.grouping import BERT_EXCLUDE, decay_report, param_groups
from bertopt.optim import BertAdam, Lamb, clip_coefficient, global_grad_norm
from bertopt.recipe import create_optimizer
from bertopt.schedules import bert_schedule

__version__ = "0.1.0"

# TensorFlow checkpoints, without TensorFlow (bertopt.interop.tf_checkpoint): loaded on first use, since it
# needs numpy, which the core does not (and so left out of __all__: `import *` must not need numpy).
_INTEROP = ("TFCheckpointError", "list_tf_checkpoint", "read_tf_checkpoint", "write_tf_checkpoint")


def __getattr__(name):
    if name in _INTEROP:
        from bertopt.interop import tf_checkpoint

        return getattr(tf_checkpoint, name)
    if name == "export_tf":  # a run directory as a Google TF checkpoint (needs transformers)
        from bertopt.interop.export_command import export_tf

        return export_tf
    raise AttributeError(f"module 'bertopt' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_INTEROP, "export_tf"])

__all__ = [
    "BERT_EXCLUDE",
    "BertAdam",
    "Lamb",
    "bert_schedule",
    "clip_coefficient",
    "create_optimizer",
    "decay_report",
    "global_grad_norm",
    "param_groups",
    "schedules",
]
