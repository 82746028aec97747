"""Per-utterance validation/test results, gathered across DDP ranks by utterance id.

Under DDP, Lightning's distributed sampler pads a split whose size is not a multiple of the world
size with repeats of its first utterances, and a mean synchronised across ranks would count those
repeats. Each rank therefore keeps one record per utterance, keyed by its id (the datamodule's
``names``: its path relative to the split folder); at the end of the epoch the records of all ranks
are gathered, repeats dropped, and the means taken over the real set — the same numbers for any
world size.
"""

from __future__ import annotations

from collections.abc import Iterable

from dfl.metrics import MetricFailure


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records (all ranks receive all of them), or ``records`` outside a distributed run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return [r for rank_records in everyone for r in rank_records]


def unique_by_id(records: Iterable[dict]) -> list[dict]:
    """The first record of each ``id`` (a padded distributed sampler repeats utterances), ordered by id."""
    seen: dict[str, dict] = {}
    for record in records:
        seen.setdefault(str(record["id"]), record)
    return [seen[k] for k in sorted(seen)]


def means(records: list[dict]) -> dict[str, float]:
    """``{"loss": ..., "<kind>/<metric>": ...}``: each a mean over the utterances that have it.

    A record is ``{"id", "values": {"<kind>/<metric>": float | MetricFailure}}`` for one utterance, or
    ``{"id", "loss", "n"}`` for one batch (its loss is the mean over its ``n`` utterances: the loss
    mean is weighted by ``n``). Failed metrics are left out of their mean, never counted as 0; a
    metric with no value at all has no mean.
    """
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for record in records:
        if "loss" in record:
            n = float(record.get("n", 1))
            sums["loss"] = sums.get("loss", 0.0) + float(record["loss"]) * n
            counts["loss"] = counts.get("loss", 0.0) + n
        for key, value in record.get("values", {}).items():
            if isinstance(value, MetricFailure):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0.0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums) if counts[k]}
