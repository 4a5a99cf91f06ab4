"""The numbers of an evaluation: image and pixel metrics, overall and per defect type.

What ``skdfm evaluate`` prints and writes (``--json``): image AUROC and AUPR,
precision, recall and F1 at the model's threshold, and, where ground-truth masks
exist, pixel AUROC and AUPR and AUPRO; then the same per defect type (each defect
type against the good images). AUPR is scikit-learn's average precision with the
anomalous images (pixels) as the positive class, as anomalib reports it.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from .metrics import aupro, image_auroc, pixel_auroc

__all__ = ["evaluation_metrics"]


def _image_metrics(y, scores, labels) -> dict:
    out = {"images": int(len(y)), "defective": int(np.sum(y == -1))}
    if 0 < out["defective"] < out["images"]:
        out["image_auroc"] = image_auroc(y, scores)
        out["image_aupr"] = float(average_precision_score(y == -1, -scores))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y == -1, labels == -1, average="binary", zero_division=0.0
    )
    out.update(precision=float(precision), recall=float(recall), f1=float(f1))
    out["flagged"] = int(np.sum(labels == -1))
    return out


def _pixel_metrics(masks, maps) -> dict:
    truth = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    if truth.all() or not truth.any():
        return {}
    values = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    return {
        "pixel_images": len(masks),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_aupr": float(average_precision_score(truth, values)),
        "aupro": aupro(masks, maps),
    }


def evaluation_metrics(y, scores, labels, defect_types, masks=None, maps=None):
    """Image metrics of every image, pixel metrics of those with a mask.

    Parameters
    ----------
    y : array of shape (n,)
        ``1`` good, ``-1`` defective.
    scores : array of shape (n,)
        ``score_samples`` (higher = more normal).
    labels : array of shape (n,)
        ``predict`` at the model's threshold.
    defect_types : sequence of str of length n
        ``"good"`` for good images.
    masks : list of (2-D bool array or None), default=None
        Ground truth of each image (None: not known, left out of the pixel
        metrics); None for no pixel metrics at all.
    maps : list of 2-D arrays, default=None
        The anomaly maps, at the masks' sizes.

    Returns
    -------
    metrics : dict
        ``overall`` and ``per_defect`` (by defect type), each a dict of the
        metrics that can be computed (AUROC and AUPR need good and defective
        images; pixel metrics need masks with defective and normal pixels).
    """
    y, scores, labels = np.asarray(y), np.asarray(scores), np.asarray(labels)
    kinds = np.asarray(defect_types, dtype=object)
    has_mask = (
        np.zeros(len(y), bool)
        if masks is None or maps is None
        else np.array([m is not None for m in masks])
    )

    def pixels(keep):
        index = np.flatnonzero(keep & has_mask)
        if not len(index):
            return {}
        return _pixel_metrics([masks[i] for i in index], [maps[i] for i in index])

    overall = _image_metrics(y, scores, labels)
    overall.update(pixels(np.ones(len(y), bool)))
    per_defect = {}
    good = kinds == "good"
    for kind in sorted(set(kinds[~good])):
        keep = good | (kinds == kind)
        metrics = _image_metrics(y[keep], scores[keep], labels[keep])
        metrics.update(pixels(keep))
        per_defect[str(kind)] = metrics
    return {"overall": overall, "per_defect": per_defect}
