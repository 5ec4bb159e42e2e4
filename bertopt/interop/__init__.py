"""Other frameworks' files, read and written without those frameworks (numpy only, no torch):
:mod:`.tf_checkpoint` for TensorFlow's checkpoints, :mod:`.tfrecord` for TFRecord shards of
``tf.train.Example``, :mod:`.google_pairs` for Google's pretraining data."""

from .tf_checkpoint import TFCheckpointError, list_tf_checkpoint, read_tf_checkpoint, to_torch, write_tf_checkpoint

__all__ = ["TFCheckpointError", "list_tf_checkpoint", "read_tf_checkpoint", "to_torch", "write_tf_checkpoint"]
