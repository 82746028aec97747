"""Speech metrics in worker processes: validation (``DenoisingSystem``) and ``dfl-eval`` score through this.

PESQ-wb costs 0.1-0.2 s per utterance on one core; scored in the training process, a VoiceBank
validation split keeps the GPU idle for minutes. :class:`MetricPool` hands each utterance to a pool
of ``spawn`` worker processes (not ``fork``: the parent holds torch / CUDA / onnxruntime threads)
and returns futures, so the caller keeps running the model on the next utterances meanwhile.
``num_workers=0`` scores in the calling process (the futures are already done; the same numbers up to
float64 rounding: workers run single-threaded).

This module imports nothing heavy at the top: worker processes import it to unpickle their jobs.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any


def score_utterance(job: tuple) -> dict:
    """``(id, clean, {kind: estimate}, metrics, sample_rate)`` → ``{"id", "values": {"<kind>/<metric>": ...}}``.

    A metric that cannot be computed is a :class:`~dfl.metrics.MetricFailure` (left out of means);
    bad input (lengths, rates) raises ``ValueError``.
    """
    from dfl.metrics import compute_many

    uid, clean, estimates, metrics, sample_rate = job
    values: dict[str, Any] = {}
    for kind, estimate in estimates.items():
        for name, value in compute_many(metrics, clean, estimate, sample_rate).items():
            values[f"{kind}/{name}"] = value
    return {"id": uid, "values": values}


def _one_thread_per_worker() -> None:
    """A worker scores one utterance at a time on one core: the pool's size is its parallelism. With the
    libraries' own thread pools (torch, OpenBLAS, OpenMP) each worker would also take the cores that the
    training process and the other workers use (measured: 1 worker next to 1 busy training thread on 2
    cores took 3.5 s for what it scores in 1.9 s alone; single-threaded, 1.9 s)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def default_workers(processes_per_host: int = 1) -> int:
    """Worker processes per training process: this host's cores shared by its training processes, one
    core left to each of those; 0 (score in-process) when that leaves none."""
    share = (os.cpu_count() or 1) // max(processes_per_host, 1) - 1
    return max(share, 0)


class MetricPool:
    """Scores jobs in ``num_workers`` spawn processes (started on first use, kept until :meth:`close`).

    Args:
        num_workers: worker processes; 0 scores in the calling process.
    """

    def __init__(self, num_workers: int) -> None:
        if num_workers < 0:
            raise ValueError(f"metric workers must be >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, fn, job) -> Future:
        """``fn(job)`` in a worker (or here, with ``num_workers=0``); its future."""
        if self.num_workers == 0:
            done: Future = Future()
            try:
                done.set_result(fn(job))
            except Exception as exc:
                done.set_exception(exc)
            return done
        if self._executor is None:
            from multiprocessing import get_context

            self._executor = ProcessPoolExecutor(self.num_workers, mp_context=get_context("spawn"),
                                                 initializer=_one_thread_per_worker)
        return self._executor.submit(fn, job)

    def map(self, fn, jobs) -> list:
        """``[fn(job) for job in jobs]``, in order."""
        return [result(f) for f in [self.submit(fn, job) for job in jobs]]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> MetricPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CoreShare:
    """Training's torch threads on a CPU while metric workers score: ``threads - workers`` (at least 1) while
    any of the watched futures is pending, all of them otherwise, so training and workers do not ask for more
    cores than there are (oversubscribed, the model's OpenMP threads wait on each other). Validation does
    not use it: a forward pass outlasts a scoring job, so yielding per utterance left a core idle
    (docs/performance.md#validation-metrics); its workers start once the model is done.

    Args:
        workers: the pool's worker processes (0: nothing to share).
    """

    def __init__(self, workers: int) -> None:
        self.workers = int(workers)
        self._threads: int | None = None  # torch threads before yielding
        self._watched: list | None = None
        self._done = 0  # futures of the watched list known to be done (they finish about in order)

    @property
    def yielded(self) -> bool:
        return self._threads is not None

    def update(self, futures: list) -> None:
        """Yield or reclaim cores for what ``futures`` (a list that grows; pass the same list) still need."""
        if futures is not self._watched:
            self._watched, self._done = futures, 0
        while self._done < len(futures) and futures[self._done].done():
            self._done += 1
        if self._done < len(futures):
            self.yield_cores()
        else:
            self.reclaim()

    def yield_cores(self) -> None:
        import torch

        threads = torch.get_num_threads()
        keep = max(1, threads - self.workers)
        if self._threads is None and keep < threads:
            self._threads = threads
            torch.set_num_threads(keep)

    def reclaim(self) -> None:
        import torch

        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None


def result(future: Future):
    """A future's result; a worker that died (killed, out of memory) is a clear error."""
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(f"a metric worker process died ({exc}); rerun with fewer metric workers "
                           "(system.metric_workers / num_workers) or 0 to score in-process") from exc
