"""Length-bucketed batches of whole utterances: little padding, still shuffled every epoch.

The sampler underneath (an :class:`~datamodules.paired_folder.EpochSampler`, or the
``DistributedSamplerWrapper`` Lightning puts around it under DDP) decides *which* indices this
process sees and in what order; this batch sampler only groups them: it cuts that order into
windows of ``batch_size · window`` indices, sorts each window by length, splits it into batches
and shuffles the batches. So bucketing never changes which utterances a DDP rank gets, every
utterance appears once per epoch, and the result is deterministic per (seed, epoch).

The padding that remains is masked out of the losses (``lengths`` in every batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler


class BucketBatchSampler(BatchSampler):
    """Batches of indices with similar ``lengths[index % len(lengths)]``.

    Yields indices ``epoch * n + index`` (what ``EpochSampler`` yields, so datasets can draw per
    (seed, epoch, index)), with the epoch from the sampler's ``epoch``; the batch order is
    shuffled with ``(seed, epoch)``. The argument is called ``sampler`` so that
    Lightning can re-create this batch sampler around its distributed sampler.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        window: int = 50,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if window < 1:
            raise ValueError(f"data.bucket_window must be >= 1 batches, got {window}")
        if not len(lengths):
            raise ValueError("BucketBatchSampler needs at least one utterance length")
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.seed = seed
        self.window = window

    def __iter__(self):
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        if indices.size == 0:
            return iter([])
        n = len(self.lengths)
        # Re-encode the epoch: under DDP Lightning replaces the EpochSampler (a DataLoader with a
        # batch sampler reports a SequentialSampler) by a plain DistributedSampler over 0..n-1.
        # Both keep the epoch Lightning sets in `.epoch`.
        epoch = int(getattr(self.sampler, "epoch", int(indices.min()) // n))
        indices = epoch * n + indices % n
        span = self.batch_size * self.window
        batches = []
        for start in range(0, indices.size, span):
            chunk = indices[start : start + span]
            chunk = chunk[np.argsort(self.lengths[chunk % n], kind="stable")]
            batches += [chunk[k : k + self.batch_size].tolist() for k in range(0, chunk.size, self.batch_size)]
        # windows hold whole batches except the last, so only the final batch can be short
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        order = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
        return iter([batches[i] for i in order])

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
