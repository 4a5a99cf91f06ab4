"""The one fit path: fit the statistics, then set the thresholds.

Every way to fit a model goes through :func:`fit_then_threshold`:
``DFMDetector.fit`` is its in-memory special case (rows in one array, threshold
from the training or cross-fitted scores), :func:`~skdfm.stream_fit` (batches),
:func:`skdfm.distributed.fit` (a Dask cluster) and the command's fits (a held-out
share of the images, on one machine or on a cluster) hand it how to gather the
statistics and how to score the normal samples the threshold is taken from. So
the argument checks, the errors and the order of the steps are the same
everywhere, and a failure anywhere leaves the model as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .._core.model import split_model
from .._core.persistence import keep_state_on_error
from .._core.validation import check_contamination

__all__ = [
    "SmallThresholdSampleWarning",
    "check_threshold_request",
    "fit_then_threshold",
    "holdout_split",
    "threshold_from_scores",
]


class SmallThresholdSampleWarning(UserWarning):
    """Too few normal samples for the ``contamination`` quantile to mean more than
    their most anomalous score."""


class ThresholdRequest(NamedTuple):
    """What the threshold pass is asked to do: its ``contamination`` (None: no
    threshold pass, ``offset_`` stays unset)."""

    contamination: float | None


def check_threshold_request(
    detector, threshold_data, contamination, *, caller: str, data_name: str
) -> ThresholdRequest:
    """The checks every fit path makes of its threshold arguments.

    ``contamination`` without ``threshold_data`` is an error (it would be
    ignored); with ``threshold_data``, the ``contamination`` to use is the one
    given, else the detector's, checked to lie in (0, 0.5].

    Parameters
    ----------
    detector : DFMDetector
    threshold_data : object or None
        The normal samples of the threshold pass, in whatever form the caller takes.
    contamination : float or None
    caller : str
        The function's name, for the messages.
    data_name : str
        The name of ``threshold_data`` in ``caller``'s signature.
    """
    if threshold_data is None:
        if contamination is not None:
            raise ValueError(
                f"{caller}: contamination sets the threshold from the scores of "
                f"{data_name}; pass {data_name} too (held-out normal samples, or "
                "the training samples again for the in-sample rule)."
            )
        return ThresholdRequest(None)
    return ThresholdRequest(
        check_contamination(
            detector.contamination if contamination is None else contamination
        )
    )


def threshold_from_scores(
    detector,
    scores,
    contamination: float,
    *,
    method: str | None = None,
    warn_few: bool = True,
) -> None:
    """Set ``offset_`` to the ``contamination`` quantile of normal samples' scores.

    Warns (:class:`SmallThresholdSampleWarning`, unless ``warn_few`` is False)
    when fewer than ``1 / contamination`` scores make that quantile just their
    lowest one.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("none of the threshold samples could be scored.")
    if warn_few and scores.size * contamination < 1:
        warnings.warn(
            f"the {contamination:.3g} quantile of {scores.size} normal samples is "
            f"just their most anomalous score: give at least "
            f"{int(np.ceil(1 / contamination))} samples for the threshold, or a "
            "larger contamination.",
            SmallThresholdSampleWarning,
            stacklevel=3,
        )
    detector.set_threshold(scores, contamination=contamination, method=method)


def fit_then_threshold(
    model,
    fit_statistics: Callable[[], None],
    threshold_scores: Callable[[], np.ndarray] | None,
    request: ThresholdRequest,
    *,
    method: str | None = None,
    warn_few: bool = True,
):
    """Fit ``model`` with ``fit_statistics()``, then its threshold.

    ``fit_statistics`` gathers the statistics and fits the detector's components
    (with ``fit``, ``partial_fit`` + ``finish_partial_fit`` or
    ``fit_from_statistics``); ``threshold_scores`` then returns the
    ``score_samples`` of normal samples, whose ``request.contamination`` quantile
    becomes ``offset_`` (skipped when ``threshold_scores`` is None or the request
    has no contamination). A failure at any step keeps the model as it was.
    ``method`` and ``warn_few`` are passed to :func:`threshold_from_scores`
    (``DFMDetector.fit``'s in-sample rule does not warn, as scikit-learn's
    detectors do not).

    Returns
    -------
    model : DFMDetector or Pipeline
    """
    transformer, detector = split_model(model, fitted=False)
    with keep_state_on_error(*(p for p in (transformer, detector) if p is not None)):
        fit_statistics()
        if threshold_scores is not None and request.contamination is not None:
            threshold_from_scores(
                detector,
                threshold_scores(),
                request.contamination,
                method=method,
                warn_few=warn_few,
            )
    return model


def holdout_split(n: int, holdout: float, *, seed: int = 0):
    """``(held, train)`` indices, sorted: a fixed random ``holdout`` share of ``n``
    samples held out for the threshold, the rest to fit on (at least 2)."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(holdout * n))
    if n_hold and n - n_hold < 2:
        raise ValueError(
            f"holding out {holdout:.0%} of {n} samples leaves fewer than 2 to fit on"
        )
    return np.sort(order[:n_hold]), np.sort(order[n_hold:])
