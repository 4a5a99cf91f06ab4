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

from .._core.persistence import keep_state_on_error
from .._core.validation import check_contamination
from .model import split_model

__all__ = [
    "HoldoutFit",
    "SmallThresholdSampleWarning",
    "check_threshold_request",
    "fit_then_threshold",
    "fit_with_holdout",
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
    when fewer than ``1 / contamination`` scores put that quantile between their
    two lowest.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("none of the threshold samples could be scored.")
    if warn_few and scores.size * contamination < 1:
        warnings.warn(
            f"the {contamination:.3g} quantile of {scores.size} normal samples "
            "lies between their two most anomalous scores: give at least "
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
    samples held out for the threshold, the rest to fit on (at least 2). A
    ``holdout > 0`` that holds none out is refused (it would silently give the
    in-sample threshold)."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(holdout * n))
    if n_hold and n - n_hold < 2:
        raise ValueError(
            f"holding out {holdout:.0%} of {n} samples leaves fewer than 2 to fit on"
        )
    if holdout and not n_hold:
        raise ValueError(
            f"holding out {holdout:.0%} of {n} samples holds none out: hold out "
            "a larger share, or 0 for the in-sample threshold"
        )
    return np.sort(order[:n_hold]), np.sort(order[n_hold:])


class HoldoutFit(NamedTuple):
    """Result of :func:`fit_with_holdout`."""

    #: the fitted model (the one given, fitted in place)
    model: object
    #: indices of the rows held out for the thresholds, sorted (empty for
    #: ``holdout=0``)
    held: np.ndarray
    #: indices of the rows the statistics were fitted on, sorted
    train: np.ndarray


def _rows(features, index, feature_shape):
    """Rows picked out of ``features``, with the grid they flatten said again
    (a tensor loses it when indexed)."""
    from .._imaging.features import with_feature_shape

    picked = features[index]
    return (
        picked if feature_shape is None else with_feature_shape(picked, feature_shape)
    )


def fit_with_holdout(
    model,
    features,
    *,
    holdout: float,
    contamination: float | None = None,
    seed: int = 0,
    pixel_contamination: float | None = None,
) -> HoldoutFit:
    """Fit on feature rows, with thresholds taken from a held-out share of them.

    A fixed random ``holdout`` share of the rows (:func:`holdout_split`) is kept
    back; the detector is fitted on the others, and ``offset_`` is set to the
    ``contamination`` quantile of the held-out rows' scores (through
    :func:`fit_then_threshold`, so the checks, the warning about too few rows and
    the order of the steps are those of every fit). Scores of rows the model was
    fitted on are optimistic, so held-out rows give a threshold that flags about
    ``contamination`` of new normal images; with ``holdout=0`` the threshold is
    ``fit``'s in-sample one, at the detector's ``contamination``.

    This is the one-machine fit of ``skdfm fit``; its cluster fit passes the
    held-out images to :func:`skdfm.distributed.fit` as ``threshold_images``.

    Parameters
    ----------
    model : DFMDetector or Pipeline
        A detector, or a ``Pipeline`` whose ``DeepFeatureTransformer`` is fitted
        and made ``features``; the detector is fitted in place.
    features : ndarray or torch.Tensor of shape (n_samples, n_features)
        Feature rows of normal images.
    holdout : float in [0, 1)
        Share of the rows held out for the thresholds.
    contamination : float in (0, 0.5], default=None
        Share of the held-out rows above the threshold; the detector's
        ``contamination`` when None. Only with ``holdout > 0``.
    seed : int, default=0
        Seed of the split.
    pixel_contamination : float in (0, 1), default=None
        When given, also set the pixel threshold
        (:func:`~skdfm._tools.thresholds.calibrate_pixel_threshold_from_features`,
        a Pipeline with ``score_type="fre"``) from the same held-out rows, or
        from the training rows with ``holdout=0`` (in-sample: expect more false
        pixels).

    Returns
    -------
    result : HoldoutFit
        ``model`` (fitted), and the indices ``held`` and ``train`` of the rows.

    Raises
    ------
    ValueError
        When the split leaves fewer than 2 rows to fit on or holds none out of a
        ``holdout > 0``, when ``contamination`` is given with ``holdout=0``, and
        for the errors of ``fit``. The model is then left as it was.

    Warns
    -----
    SmallThresholdSampleWarning
        When fewer than ``1 / contamination`` rows are held out.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DFMDetector
    >>> from skdfm._tools.fitting import fit_with_holdout
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 40))
    >>> det, held, train = fit_with_holdout(
    ...     DFMDetector(pca_level=0.99, device="cpu"), X, holdout=0.2,
    ...     contamination=0.01)
    >>> len(held), det.n_samples_, det.threshold_method_
    (100, 400, 'contamination')
    """
    transformer, detector = split_model(model, fitted=False)
    n = len(features)
    if holdout == 0 and contamination is not None:
        raise ValueError(
            "fit_with_holdout: contamination is the share of held-out rows above "
            "the threshold; with holdout=0 the threshold is fit's in-sample one, "
            "at the detector's contamination."
        )
    if pixel_contamination is not None and transformer is None:
        raise ValueError(
            "fit_with_holdout: the pixel threshold needs the Pipeline (maps at its "
            "input size), not a bare DFMDetector."
        )
    held, train = holdout_split(n, holdout, seed=seed)
    request = check_threshold_request(
        detector,
        held if len(held) else None,
        contamination,
        caller="fit_with_holdout",
        data_name="holdout",
    )
    if transformer is not None:
        feature_shape = transformer.feature_shape_
    else:
        from .._imaging.features import feature_shape_of

        feature_shape = feature_shape_of(features, features.shape[1])

    def threshold_scores():
        return detector.score_samples(_rows(features, held, feature_shape))

    with keep_state_on_error(detector):
        fit_then_threshold(
            model,
            lambda: detector.fit(_rows(features, train, feature_shape)),
            threshold_scores if len(held) else None,
            request,
        )
        if pixel_contamination is not None:
            from .thresholds import calibrate_pixel_threshold_from_features

            calibrate_pixel_threshold_from_features(
                model,
                _rows(features, held if len(held) else train, feature_shape),
                pixel_contamination=pixel_contamination,
            )
    return HoldoutFit(model, held, train)
