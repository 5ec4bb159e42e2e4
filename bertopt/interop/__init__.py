"""Other frameworks' files, read and written without those frameworks (numpy only, no torch):
:mod:`.tf_checkpoint` for TensorFlow's checkpoints."""

from .tf_checkpoint import TFCheckpointError, list_tf_checkpoint, read_tf_checkpoint, to_torch, write_tf_checkpoint

__all__ = ["TFCheckpointError", "list_tf_checkpoint", "read_tf_checkpoint", "to_torch", "write_tf_checkpoint"]
