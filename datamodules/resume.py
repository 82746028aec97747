"""Exact mid-epoch resume: a resumed run skips the batches its interrupted epoch already trained on.

A checkpoint taken inside an epoch (SIGTERM, SLURM requeue, ``every_n_train_steps``) records how
many batches of that epoch were trained on (the fit loop's batch progress). Lightning then runs the
rest of the epoch, but a plain DataLoader would start the epoch's order from its beginning: the
first batches would be seen twice and the last ones never. :class:`ResumableDataLoader` skips
them instead — indices only, no audio is read — after any distributed sharding, so every DDP rank
skips its own first batches.
"""

from __future__ import annotations

import itertools

from torch.utils.data import DataLoader


def interrupted_epoch_position(trainer) -> tuple[int, int]:
    """``(epoch, batches already trained on)`` when the trainer resumes inside an epoch, else ``(-1, 0)``.

    Read while the train loader is built, after Lightning restored the loops from the checkpoint:
    the epoch has started but not finished, and ``processed`` counts its trained batches (a
    checkpoint written in ``on_train_batch_end`` has not yet marked its last batch completed).
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    epochs = getattr(getattr(fit_loop, "epoch_progress", None), "current", None)
    batches = getattr(getattr(getattr(fit_loop, "epoch_loop", None), "batch_progress", None), "current", None)
    if epochs is None or batches is None:  # not a Lightning fit loop (e.g. a bare datamodule)
        return -1, 0
    if epochs.started == epochs.processed + 1 and batches.processed > 0:
        return int(epochs.processed), int(batches.processed)
    return -1, 0


class _SkipFirstBatches:
    """The loader's index sampler; the first epoch it is iterated in starts ``skip_batches`` in."""

    def __init__(self, index_sampler, loader: ResumableDataLoader) -> None:
        self.index_sampler, self.loader = index_sampler, loader

    def __len__(self) -> int:
        return len(self.index_sampler)

    def __iter__(self):
        # A generator: nothing runs until the first batch is drawn. DataLoader iterators call iter()
        # once more than they use, and under DDP Lightning sets the epoch only after building the
        # iterator; the skip belongs to the iteration that actually draws batches.
        it = iter(self.index_sampler)
        skip, self.loader.skip_batches = self.loader.skip_batches, 0
        if 0 < skip < len(self.index_sampler):
            it = itertools.islice(it, skip, None)
        yield from it


class ResumableDataLoader(DataLoader):
    """A DataLoader whose first epoch starts after ``skip_batches`` batches (then whole epochs).

    ``len()`` stays the whole epoch's, so the fit loop's batch indices (it continues counting from
    the checkpoint) still end the epoch where an uninterrupted run ends it.
    """

    def __init__(self, *args, skip_batches: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = int(skip_batches)

    @property
    def _index_sampler(self):
        # DataLoader iterators take their batch indices from here (PyTorch's own hook point).
        base = super()._index_sampler
        return _SkipFirstBatches(base, self) if self.skip_batches > 0 else base
