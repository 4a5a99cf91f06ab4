"""Anomaly-detection metrics: image AUROC, pixel AUROC, AUPRO, and the label guard.

Image labels follow scikit-learn's outlier convention (``1`` normal, ``-1``
anomalous) and image scores its "higher = more normal" convention
(``score_samples``, ``decision_function``). Pixel masks and anomaly maps follow the
imaging convention instead: a mask is True (or non-zero) on defective pixels, a map
is higher where a pixel is more anomalous.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from .._core.validation import check_labels_and_scores, check_outlier_labels

__all__ = ["aupro", "check_outlier_labels", "image_auroc", "pixel_auroc"]


def image_auroc(y_true, y_score) -> float:
    """Area under the ROC curve of detecting anomalous images.

    Parameters
    ----------
    y_true : array-like of shape (n_images,)
        ``1`` for normal images, ``-1`` for anomalous ones; 0/1 labels raise
        (see :func:`check_outlier_labels`).
    y_score : array-like of shape (n_images,)
        Higher = more normal: ``score_samples`` or ``decision_function``.

    Returns
    -------
    auroc : float
        1.0 when every anomalous image scores below every normal one, 0.5 for
        chance.

    Examples
    --------
    >>> from skdfm import image_auroc
    >>> image_auroc([1, 1, -1, -1], [-1.0, -2.0, -2.5, -9.0])
    1.0
    """
    y_true, y_score = check_labels_and_scores(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise ValueError(
            "image_auroc needs both normal (1) and anomalous (-1) images in y_true."
        )
    return float(roc_auc_score(y_true == -1, -y_score))


def _pixels(masks, maps) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks as bool and maps as float64 arrays, checked image by image."""
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} anomaly maps.")
    if len(masks) == 0:
        raise ValueError("No masks and anomaly maps given.")
    mask_list, map_list = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask, amap = np.asarray(mask), np.asarray(amap, dtype=np.float64)
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(
                f"Mask {i} has shape {mask.shape} and anomaly map {i} {amap.shape}; "
                "each must be one 2-D image of the same size (compute maps at the "
                "masks' size, e.g. anomaly_maps(model, X, size='image'))."
            )
        if not np.isfinite(amap).all():
            raise ValueError(f"Anomaly map {i} contains NaN or infinity.")
        mask_list.append(mask.astype(bool))
        map_list.append(amap)
    return mask_list, map_list


def pixel_auroc(masks, maps) -> float:
    """Area under the per-pixel ROC curve, all pixels of all images pooled.

    Parameters
    ----------
    masks : sequence of 2-D arrays, or array of shape (n_images, H, W)
        Ground truth: True (non-zero) on defective pixels.
    maps : sequence of 2-D arrays, or array of shape (n_images, H, W)
        Anomaly maps of the same sizes: higher = more anomalous.

    Returns
    -------
    auroc : float

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import pixel_auroc
    >>> masks = np.array([[[0, 1], [0, 0]]])
    >>> pixel_auroc(masks, [[[0.1, 0.9], [0.3, 0.2]]])
    1.0
    """
    mask_list, map_list = _pixels(masks, maps)
    truth = np.concatenate([m.ravel() for m in mask_list])
    score = np.concatenate([m.ravel() for m in map_list])
    if truth.all() or not truth.any():
        raise ValueError("pixel_auroc needs both defective and normal pixels.")
    return float(roc_auc_score(truth, score))


_EIGHT_CONNECTED = np.ones((3, 3), bool)


def aupro(masks, maps, *, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve (AUPRO), as in MVTec AD.

    Every connected defect region (8-connectivity) of every mask counts equally,
    whatever its size. At a threshold ``t`` the per-region overlap (PRO) is the
    mean over regions of the share of the region's pixels whose map value is
    ``>= t``, and the false-positive rate is the share of all normal pixels
    (of every image) ``>= t``. The PRO-versus-FPR curve, taken at every distinct
    map value, is integrated with the trapezoidal rule from FPR 0 to
    ``fpr_limit`` (interpolating linearly at the limit) and divided by
    ``fpr_limit``, so a perfect map scores 1.

    Parameters
    ----------
    masks : sequence of 2-D arrays, or array of shape (n_images, H, W)
        Ground truth: True (non-zero) on defective pixels.
    maps : sequence of 2-D arrays, or array of shape (n_images, H, W)
        Anomaly maps of the same sizes: higher = more anomalous.
    fpr_limit : float in (0, 1], default=0.3
        Upper integration limit; 0.3 is the MVTec AD benchmark's.

    Returns
    -------
    aupro : float

    References
    ----------
    Bergmann, P. et al., "The MVTec Anomaly Detection Dataset", IJCV 129, 2021,
    section 5.2.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import aupro
    >>> masks = np.array([[[1, 0, 0, 0]]])
    >>> round(aupro(masks, [[[0.9, 0.1, 0.2, 0.3]]]), 6)
    1.0
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit={fpr_limit} must be in (0, 1].")
    mask_list, map_list = _pixels(masks, maps)
    # Weight of each pixel on the PRO axis: 1 / (region size * number of regions).
    weights, normal, scores = [], [], []
    n_regions = 0
    labelled = []
    for mask in mask_list:
        labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        labelled.append(labels)
        n_regions += count
    if n_regions == 0:
        raise ValueError("aupro needs at least one defect region in the masks.")
    for labels, amap in zip(labelled, map_list, strict=True):
        flat = labels.ravel()
        sizes = np.bincount(flat)
        w = np.where(flat > 0, 1.0 / sizes[flat], 0.0) / n_regions
        weights.append(w)
        normal.append(flat == 0)
        scores.append(amap.ravel())
    weights = np.concatenate(weights)
    normal = np.concatenate(normal)
    scores = np.concatenate(scores)
    n_normal = normal.sum()
    if n_normal == 0:
        raise ValueError("aupro needs normal pixels to measure false positives.")
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    pro = np.cumsum(weights[order])
    fpr = np.cumsum(normal[order]) / n_normal
    # Thresholds at distinct values: keep the last index of each run of ties.
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:
        j = np.searchsorted(fpr, fpr_limit)  # first point past the limit
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    area = np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2  # trapezoidal rule
    return float(area / fpr_limit)
