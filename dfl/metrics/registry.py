"""The front door: metric names, grouped into families that are computed together."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache

import numpy as np

from dfl.metrics import composite as _composite
from dfl.metrics import dnsmos as _dnsmos
from dfl.metrics import pesq_stoi, sdr
from dfl.metrics.base import MetricError, MetricFailure, as_pair, as_signal

# family -> (names it yields, function(clean, estimate, sample_rate) -> {name: value})
Family = tuple[tuple[str, ...], Callable[[np.ndarray, np.ndarray, int], dict[str, float]]]

FAMILIES: dict[str, Family] = {
    "pesq": (("pesq",), lambda c, e, sr: {"pesq": pesq_stoi.pesq_score(c, e, sr, "wb")}),
    "pesq_nb": (("pesq_nb",), lambda c, e, sr: {"pesq_nb": pesq_stoi.pesq_score(c, e, sr, "nb")}),
    "stoi": (("stoi",), lambda c, e, sr: {"stoi": pesq_stoi.stoi_score(c, e, sr, extended=False)}),
    "estoi": (("estoi",), lambda c, e, sr: {"estoi": pesq_stoi.stoi_score(c, e, sr, extended=True)}),
    "si_sdr": (("si_sdr",), lambda c, e, sr: {"si_sdr": sdr.si_sdr(c, e)}),
    "snr": (("snr",), lambda c, e, sr: {"snr": sdr.snr(c, e)}),
    "seg_snr": (("seg_snr",), lambda c, e, sr: {"seg_snr": sdr.seg_snr(c, e, sr)}),
    "composite": (("csig", "cbak", "covl"), _composite.composite),
    "dnsmos": (("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"), lambda c, e, sr: _dnsmos.dnsmos(e, sr)),
}
REFERENCE_FREE = {"dnsmos"}  # families that ignore ``clean``

FAMILY_OF = {name: fam for fam, (names, _) in FAMILIES.items() for name in names}
METRIC_NAMES: tuple[str, ...] = tuple(FAMILY_OF)
# Higher is better for every metric here (used for "improvement" = enhanced - noisy).


def expand_metric_names(names: Iterable[str], setting: str = "metrics") -> list[str]:
    """Metric names with family names expanded (``dnsmos`` → its three scores, ``composite`` → CSIG/CBAK/COVL).

    Raises:
        ValueError: an unknown name; the message names ``setting`` and lists the valid names.
    """
    out: list[str] = []
    for name in names:
        if name in FAMILY_OF:
            out.append(name)
        elif name in FAMILIES:
            out += FAMILIES[name][0]
        else:
            families = ", ".join(f"{fam} (= {'/'.join(n)})" for fam, (n, _) in FAMILIES.items() if len(n) > 1)
            raise ValueError(
                f"{setting}: unknown metric {name!r}; valid: {', '.join(METRIC_NAMES)}, or a family: {families}"
            )
    return list(dict.fromkeys(out))


def _family(name: str) -> str:
    try:
        return FAMILY_OF[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}") from None


def _inputs(family: str, clean, estimate) -> tuple[np.ndarray | None, np.ndarray]:
    if family in REFERENCE_FREE:
        return None, as_signal(estimate, "estimate")
    return as_pair(clean, estimate)


def _check_rate(sample_rate) -> int:
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


@cache
def _blas_pools():
    """The BLAS/OpenMP pools of numpy and scipy (pystoi loads scipy's), found once: 4 µs per limit after."""
    import pystoi  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _run_family(family: str, c, e, sample_rate: int) -> dict[str, float]:
    # One BLAS thread: a multi-threaded dot product sums in another order, so the in-process route and a
    # (single-threaded) metric worker would disagree in the last digits (seen in SI-SDR).
    with _blas_pools().limit(limits=1):
        values = FAMILIES[family][1](c, e, sample_rate)
    for k, v in values.items():
        if not np.isfinite(v):
            raise MetricError(f"{k}: result is not finite ({v})")
    return values


def compute(name: str, clean: np.ndarray | None, estimate: np.ndarray, sample_rate: int = 16_000) -> float:
    """One metric of ``estimate`` against ``clean`` (mono float 1-D arrays of equal length).

    Raises :class:`MetricError` when the metric is undefined on this input (e.g. PESQ
    finds no utterance) and ``ValueError`` for bad input (shapes, lengths, rate, name).
    """
    family = _family(name)
    sample_rate = _check_rate(sample_rate)
    c, e = _inputs(family, clean, estimate)
    return _run_family(family, c, e, sample_rate)[name]


def compute_many(
    names: Iterable[str], clean: np.ndarray | None, estimate: np.ndarray, sample_rate: int = 16_000
) -> dict[str, float | MetricFailure]:
    """Several metrics at once; a metric that cannot be computed becomes a :class:`MetricFailure`.

    Metrics of one family (CSIG/CBAK/COVL, the three DNSMOS scores) are computed once.
    Bad input (shapes, lengths, sample rate, unknown name) still raises ``ValueError``.
    """
    names = list(dict.fromkeys(names))
    families = list(dict.fromkeys(_family(n) for n in names))
    sample_rate = _check_rate(sample_rate)
    for fam in families:  # validate every input up front: bad input is an error, not a "missing"
        _inputs(fam, clean, estimate)
    results: dict[str, float | MetricFailure] = {}
    for fam in families:
        c, e = _inputs(fam, clean, estimate)
        try:
            values = _run_family(fam, c, e, sample_rate)
        except MetricError as exc:
            values = {n: MetricFailure(n, str(exc)) for n in FAMILIES[fam][0]}
        except (ValueError, IndexError, ArithmeticError) as exc:  # a library's own error: inputs are checked above
            reason = f"{fam}: {type(exc).__name__}: {exc} ({np.size(e)} samples)"
            values = {n: MetricFailure(n, reason) for n in FAMILIES[fam][0]}
        results.update({n: v for n, v in values.items() if n in names})
    return {n: results[n] for n in names}
