"""Model selection for detectors trained on normal images only: a splitter and scorers.

``y`` is either image labels (``1`` normal, ``-1`` anomalous) or pixel masks of
shape (n_images, H, W) (an image is anomalous when its mask has a defect pixel);
masks let one ``GridSearchCV`` score image AUROC, pixel AUROC and AUPRO at once.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.model_selection import BaseCrossValidator, KFold

from .._tools.maps import anomaly_maps
from .metrics import aupro, check_outlier_labels, image_auroc, pixel_auroc

__all__ = [
    "InlierKFold",
    "aupro_scorer",
    "image_auroc_scorer",
    "pixel_auroc_scorer",
]


def labels_of(y) -> np.ndarray:
    """Image labels from labels or from masks (anomalous = any defect pixel)."""
    if y is None:
        raise ValueError(
            "y is required: image labels (1 normal, -1 anomalous) or pixel masks."
        )
    y = np.asarray(y)
    if y.ndim >= 3:
        return np.where(y.reshape(len(y), -1).any(axis=1), -1, 1)
    return check_outlier_labels(y)


def _masks_of(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 3:
        raise ValueError(
            "Pixel metrics need y to be masks of shape (n_images, H, W) (True on "
            f"defect pixels), got shape {y.shape}."
        )
    return y


class InlierKFold(BaseCrossValidator):
    """K-fold cross-validation that trains on normal images only.

    The normal images are split into ``n_splits`` folds as by
    :class:`~sklearn.model_selection.KFold`; each split trains on all but one fold
    of them and tests on that fold **plus every anomalous image**, so each test
    fold can measure how well anomalies are told apart from unseen normal images.
    Anomalous images are never trained on.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds of the normal images (at least 2).
    shuffle : bool, default=False
        Shuffle the normal images before splitting them.
    random_state : int, RandomState instance or None, default=None
        Order of the shuffle, when ``shuffle=True``.

    Notes
    -----
    ``split`` needs ``y``: labels ``1`` (normal) and ``-1`` (anomalous), or pixel
    masks (n_images, H, W). 0/1 labels raise a ``ValueError`` rather than being
    guessed, since 1 means "anomalous" in anomalib and "normal" in scikit-learn.

    ``GridSearchCV(refit=True)`` refits on all of ``X`` with all of ``y``;
    :meth:`DFMDetector.fit <skdfm.DFMDetector.fit>` leaves out the rows ``y``
    marks anomalous (with an :class:`~skdfm.OutlierLabelWarning`), so
    ``best_estimator_`` is fitted on the normal images only, as a Pipeline
    ending in the detector is.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import InlierKFold
    >>> y = np.array([1, 1, 1, 1, -1, -1])
    >>> for train, test in InlierKFold(n_splits=2).split(np.zeros(6), y):
    ...     print(train, test)
    [2 3] [0 1 4 5]
    [0 1] [2 3 4 5]
    """

    def __init__(self, n_splits=5, *, shuffle=False, random_state=None):
        if not isinstance(n_splits, Integral) or n_splits < 2:
            raise ValueError(f"n_splits={n_splits!r} must be an integer >= 2.")
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None):
        """Number of splits, ``n_splits``."""
        return self.n_splits

    def _iter_test_indices(self, X=None, y=None, groups=None):
        labels = labels_of(y)
        inliers = np.flatnonzero(labels == 1)
        outliers = np.flatnonzero(labels == -1)
        if len(inliers) < self.n_splits:
            raise ValueError(
                f"Cannot split {len(inliers)} normal images into "
                f"n_splits={self.n_splits} folds."
            )
        folds = KFold(
            self.n_splits, shuffle=self.shuffle, random_state=self.random_state
        )
        for _, fold in folds.split(inliers):
            yield np.sort(np.r_[inliers[fold], outliers])


def image_auroc_scorer(estimator, X, y) -> float:
    """Scorer (for ``GridSearchCV(scoring=...)``): image AUROC of ``score_samples``.

    ``y``: labels (1 normal, -1 anomalous; 0/1 raise) or masks (n_images, H, W).
    """
    return image_auroc(labels_of(y), estimator.score_samples(X))


def pixel_auroc_scorer(estimator, X, y) -> float:
    """Scorer: pixel AUROC of :func:`~skdfm.anomaly_maps` against masks ``y``.

    ``y``: masks of shape (n_images, H, W), the images' own size.
    """
    masks = _masks_of(y)
    return pixel_auroc(masks, anomaly_maps(estimator, X, size="image").maps)


def aupro_scorer(estimator, X, y) -> float:
    """Scorer: AUPRO (FPR up to 0.3) of :func:`~skdfm.anomaly_maps` against masks ``y``.

    ``y``: masks of shape (n_images, H, W), the images' own size.
    """
    masks = _masks_of(y)
    return aupro(masks, anomaly_maps(estimator, X, size="image").maps)
