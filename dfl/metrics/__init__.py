"""Every speech quality metric of dfl, used by validation and by ``dfl-eval``.

    >>> from dfl.metrics import compute, compute_many
    >>> compute("pesq", clean, estimate, 16000)
    >>> compute_many(["pesq", "stoi", "csig"], clean, estimate, 16000)

Names: ``pesq`` (wide band), ``pesq_nb``, ``stoi``, ``estoi``, ``si_sdr``, ``snr``,
``seg_snr``, ``csig``, ``cbak``, ``covl``, ``dnsmos_sig``, ``dnsmos_bak``,
``dnsmos_ovrl`` (DNSMOS ignores ``clean``). Higher is better for all of them. The
settings that take metric names (``system.metrics``, dfl-eval's ``metrics``) also take
``dnsmos`` and ``composite`` for their three scores (:func:`expand_metric_names`).
"""

from dfl.metrics.base import MetricError, MetricFailure
from dfl.metrics.registry import METRIC_NAMES, compute, compute_many, expand_metric_names

__all__ = ["METRIC_NAMES", "MetricError", "MetricFailure", "compute", "compute_many", "expand_metric_names"]
