"""Fit a detector or a whole Pipeline from a stream of batches, in bounded memory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np

from .fitting import check_threshold_request, fit_then_threshold
from .model import split_model

__all__ = ["stream_fit"]


def _is_single_image(item) -> bool:
    if isinstance(item, (str, os.PathLike)):
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(item, Image.Image)


def _batches(items: Iterable, batch_size: int) -> Iterator:
    """Items as batches: single paths or PIL images are grouped ``batch_size`` at a
    time; anything else (arrays, tensors, lists of paths) already is a batch."""
    iterator = iter(items)
    for item in iterator:
        if not _is_single_image(item):
            yield item
            continue
        batch = [item, *islice(iterator, batch_size - 1)]
        if not all(_is_single_image(i) for i in batch):
            raise ValueError(
                "stream_fit got single images mixed with batches; pass either "
                "single image paths (or PIL images) or batches, not both."
            )
        yield batch


def stream_fit(
    model, batches, *, threshold_batches=None, contamination=None, batch_size=None
):
    """Fit a detector or Pipeline from batches, in memory bounded by the features.

    Each batch goes through the backbone (for a Pipeline) and is merged into the
    detector's statistics with :meth:`DFMDetector.partial_fit`: the rows while they
    are no more than the features (then fitted by the Gram route, as ``fit``), else
    float64 D x D statistics. Memory is that of one batch plus at most the D x D
    statistics, whatever the number of images. The
    components are computed once, after the last batch, and the statistics are then
    released (continue a fit with ``partial_fit`` instead). The threshold needs scores
    of normal samples, so it takes a second pass: over ``threshold_batches`` when
    given (held-out good parts, or the training batches again for scikit-learn's
    in-sample rule), else ``offset_`` stays unset and ``predict`` explains how to
    set it (:func:`~skdfm.calibrate_threshold`).

    Parameters
    ----------
    model : DFMDetector or Pipeline
        An unfitted (or to-be-refitted) ``DFMDetector``, or
        ``Pipeline([DeepFeatureTransformer, DFMDetector])``. Refitted in place.
    batches : iterable
        Batches of feature rows (for a detector) or of images in any form
        ``DeepFeatureTransformer`` accepts (uint8 arrays, lists of paths, ...); an
        iterable of single image paths or PIL images is grouped into batches of
        ``batch_size``. A generator is consumed once.
    threshold_batches : iterable, default=None
        Batches of normal samples for the second, scoring pass that sets
        ``offset_`` to their ``contamination`` quantile.
    contamination : float in (0, 0.5], default=None
        Share of ``threshold_batches`` to flag; the detector's ``contamination``
        when None. Only with ``threshold_batches`` (a ``ValueError`` otherwise, as
        in :func:`skdfm.distributed.fit`).
    batch_size : int, default=None
        Batch size for single images; the transformer's ``batch_size`` (or 256)
        when None.

    Returns
    -------
    model : DFMDetector or Pipeline
        The fitted model.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DFMDetector, stream_fit
    >>> rng = np.random.default_rng(0)
    >>> basis = rng.normal(size=(5, 40))
    >>> def good(n):
    ...     return rng.normal(size=(n, 5)) @ basis + 0.01 * rng.normal(size=(n, 40))
    >>> det = stream_fit(DFMDetector(pca_level=0.99, device="cpu"),
    ...                  (good(100) for _ in range(10)),
    ...                  threshold_batches=[good(100)], contamination=0.01)
    >>> det.n_samples_seen_, det.n_components_
    (1000, 5)
    >>> int((det.predict(good(100)) == -1).sum()) < 10
    True
    """
    try:
        transformer, detector = split_model(model, fitted=False)
    except ValueError as error:
        raise ValueError(f"stream_fit: {error}") from None
    request = check_threshold_request(
        detector,
        threshold_batches,
        contamination,
        caller="stream_fit",
        data_name="threshold_batches",
    )
    if batch_size is None:
        batch_size = transformer.batch_size if transformer is not None else 256

    def fit_statistics():
        seen_any = False
        for batch in _batches(batches, batch_size):
            if transformer is not None:
                if not seen_any:
                    transformer.fit(batch)
                batch = transformer.transform(batch)
            detector.partial_fit(batch, restart=not seen_any)
            seen_any = True
        if not seen_any:
            raise ValueError("stream_fit got no batches.")
        detector.finish_partial_fit(release=True)

    def threshold_scores():
        threshold = _batches(threshold_batches, batch_size)
        return np.concatenate([model.score_samples(b) for b in threshold])

    return fit_then_threshold(model, fit_statistics, threshold_scores, request)
