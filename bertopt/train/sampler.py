"""Which examples each optimizer step trains on: a pure function of the step, so that resuming
needs no sampler state."""

from __future__ import annotations

import numpy as np


class EpochBatchSampler:
    """Example indices for each step: epoch e visits a permutation seeded by (seed, e) in slices of
    ``global_batch_size`` (the last incomplete slice is dropped); rank r takes its contiguous share.
    """

    def __init__(self, num_examples: int, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if global_batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {global_batch_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"batch size {global_batch_size} must be divisible by the number of processes {world_size}"
            )
        if num_examples < global_batch_size:
            raise ValueError(
                f"only {num_examples} training examples, fewer than one batch of {global_batch_size}; "
                "use a smaller --batch-size or a bigger corpus"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_examples // global_batch_size
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1]

    def position(self, step: int) -> dict[str, int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": index, "example_offset": index * self.global_batch_size}

    def global_indices(self, step: int) -> np.ndarray:
        """All ranks' indices for ``step``, in rank order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self._order(epoch)[start:start + self.global_batch_size]

    def indices(self, step: int) -> np.ndarray:
        """This rank's indices for ``step``."""
        share = self.global_batch_size // self.world_size
        return self.global_indices(step)[self.rank * share:(self.rank + 1) * share]
