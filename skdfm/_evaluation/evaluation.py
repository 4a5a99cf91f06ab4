"""The numbers of an evaluation: image and pixel metrics, overall and per defect type.

What ``skdfm evaluate`` prints and writes (``--json``): image AUROC and AUPR,
precision, recall and F1 at the model's threshold, and, where ground-truth masks
exist, pixel AUROC and AUPR and AUPRO; then the same per defect type (each defect
type against the good images). AUPR is scikit-learn's average precision with the
anomalous images (pixels) as the positive class, as anomalib reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from .metrics import aupro, image_auroc, pixel_auroc

__all__ = [
    "MVTecEvaluation",
    "ValidationCalibration",
    "calibrate_on_validation",
    "evaluate_mvtec",
    "evaluation_metrics",
]


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


class MVTecEvaluation(NamedTuple):
    """Result of :func:`evaluate_mvtec`: one entry per readable image, in the
    order of ``data.paths``."""

    #: :func:`~skdfm.load_mvtec`'s listing of the category (every image)
    data: object
    #: (n,) indices into ``data.paths`` of the images that could be read
    index: np.ndarray
    #: (n,) ``1`` good, ``-1`` defective
    y: np.ndarray
    #: (n,) ``score_samples`` (higher = more normal)
    score_samples: np.ndarray
    #: (n,) labels at the model's threshold
    labels: np.ndarray
    #: defect type of each image (``"good"`` for good images)
    defect_types: list
    #: ground truth at each image's size, or None where the pixel metrics leave
    #: the image out (no maps, no ground_truth folder, no usable mask)
    masks: list
    #: anomaly maps at each image's size where ``masks`` has one, else None
    maps: list
    #: :func:`evaluation_metrics` of the images
    metrics: dict
    #: ``(path, reason)`` of the images that could not be read
    skipped: list
    #: ``(path, reason)`` of the defective images without a usable mask (in the
    #: image metrics only)
    no_pixel_metrics: list
    #: whether the model has maps (``score_type="fre"``)
    has_maps: bool
    #: whether the category has a ground_truth folder
    has_masks: bool


def _batches_of(reader) -> Callable[[list], Iterable]:
    """The files decoded in ``reader``'s (a transformer's or an exported model's)
    batch size and pixel limit."""
    from .._imaging.decode import read_image_files

    return lambda paths: read_image_files(
        paths, reader.batch_size, reader.max_image_pixels
    )


def _scoring_of(model):
    """``(reader, has_maps, maps_of, labels_of)`` of a Pipeline or an exported
    model: what reads the files (batch size, pixel limit), whether it has maps,
    its maps at each image's size, its labels from scores."""
    from .._deploy.runtime import ExportedModel

    if isinstance(model, ExportedModel):
        return (
            model,
            model.score_type_ == "fre",
            lambda images: model.anomaly_maps(images, size="image"),
            model.labels_from_scores,
        )
    from .._tools.maps import anomaly_maps
    from .._tools.model import split_model

    transformer, detector = split_model(model)
    return (
        transformer,
        detector.score_type == "fre",
        lambda images: anomaly_maps(model, images, size="image"),
        detector.labels_from_scores,
    )


def evaluate_mvtec(model, category_dir, *, batches=None) -> MVTecEvaluation:
    """Score a category in the MVTec AD layout and compute its metrics.

    Every file of ``<category>/test`` is decoded once, one batch at a time:
    scores and labels of each readable image and, for an ``fre`` model, its
    anomaly map at the image's size (one backbone pass). Image metrics take
    every readable image; pixel metrics the ones with a ground-truth mask. A
    category without a ``ground_truth`` folder is evaluated on images only; with
    one, a defective image whose mask is missing, unreadable or of another size
    is left out of the pixel metrics only (listed in ``no_pixel_metrics``).
    Unreadable images are left out and listed in ``skipped``.

    Parameters
    ----------
    model : Pipeline or ExportedModel
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)``, or an
        exported one (:class:`~skdfm.ExportedModel`: its own scores, labels at
        its exported threshold and maps, run by onnxruntime or OpenVINO).
    category_dir : str or path-like
        The category folder (see :func:`~skdfm.load_mvtec`).
    batches : callable, default=None
        ``batches(paths)`` yields the files decoded, as
        :func:`~skdfm._imaging.decode.read_image_files` does (``paths``,
        ``images`` and ``failed`` of each batch), e.g. to show progress; None:
        ``read_image_files`` in the transformer's (or the exported model's)
        batch size and pixel limit.

    Returns
    -------
    evaluation : MVTecEvaluation
        Per-image scores, labels, masks and maps, the metrics
        (:func:`evaluation_metrics`) and what was left out and why.

    Raises
    ------
    FileNotFoundError, ValueError
        ``category_dir`` is not a category (see :func:`~skdfm.load_mvtec`), or
        none of its images can be read.
    """
    from .._deploy.results import AnomalyMaps
    from .._imaging.decode import original_size
    from .datasets import load_mvtec, read_mvtec_mask

    reader, has_maps, maps_of, labels_of = _scoring_of(model)
    data = load_mvtec(category_dir, load_masks=False, missing_masks="none")
    has_masks = (Path(category_dir) / "ground_truth").is_dir()
    read = batches if batches is not None else _batches_of(reader)
    position = {path: i for i, path in enumerate(data.paths)}
    index, scores, labels, masks, maps, skipped, unmasked = [], [], [], [], [], [], []
    for batch in read(data.paths):
        skipped.extend(batch.failed)
        if not batch.images:
            continue
        if has_maps:
            result = maps_of(batch.images)
        else:
            batch_scores = model.score_samples(batch.images)
            result = AnomalyMaps(None, batch_scores, labels_of(batch_scores))
        for j, (path, image) in enumerate(zip(batch.paths, batch.images, strict=True)):
            i = position[path]
            index.append(i)
            mask = None
            if has_maps and has_masks:
                try:
                    mask = read_mvtec_mask(data, i, original_size(image))
                except ValueError as error:
                    unmasked.append((path, str(error)))
            masks.append(mask)
            maps.append(None if mask is None else result.maps[j])
        scores.append(result.score_samples)
        labels.append(result.labels)
    if not index:
        raise ValueError(f"no readable images in {category_dir}")
    index = np.asarray(index, np.intp)
    y, scores, labels = data.y[index], np.concatenate(scores), np.concatenate(labels)
    kinds = [data.defect_type[i] for i in index]
    metrics = evaluation_metrics(y, scores, labels, kinds, masks, maps)
    return MVTecEvaluation(
        data, index, y, scores, labels, kinds, masks, maps, metrics, skipped,
        unmasked, has_maps, has_masks,
    )  # fmt: skip


class ValidationCalibration(NamedTuple):
    """Result of :func:`calibrate_on_validation`: what set the thresholds."""

    #: :func:`~skdfm.validation_images`' listing of the validation images
    data: object
    #: readable good images the image threshold was taken from
    n_good: int
    #: readable defective images the image threshold was taken from
    n_defective: int
    #: images whose masks set the pixel threshold by F1 (good ones included); 0
    #: when it is the quantile of the good images' maps, or the model has no maps
    n_masks: int
    #: ``(path, reason)`` of the images that could not be read
    skipped: list
    #: ``(path, reason)`` of the defective images left out of the pixel threshold
    #: (no usable mask)
    no_pixel_masks: list


def calibrate_on_validation(
    model, validation, *, batches=None, pixel_contamination=0.001
) -> ValidationCalibration:
    """Set a fitted model's thresholds by F1 on labelled validation images.

    The images of an MVTec AD test split (:func:`~skdfm.validation_images`),
    decoded once, one batch at a time, are passed through the backbone once; then
    the image threshold is anomalib's F1-adaptive one over their labels
    (:func:`~skdfm.calibrate_threshold` with ``method="f1"``:
    ``threshold_method_ == "f1"``) and, for an ``fre`` model, the pixel threshold
    is the F1-adaptive one over the pixels of the masks of ``ground_truth/``
    (:func:`~skdfm._tools.thresholds.calibrate_pixel_threshold_from_features`,
    maps and masks at the model's input size: ``pixel_threshold_method_ ==
    "f1"``). Without masks (no ``ground_truth`` folder, or no usable mask with a
    defective pixel) the pixel threshold is the ``1 - pixel_contamination``
    quantile of the good images' maps (``"contamination"``). Defective images
    without a usable mask are left out of the pixel threshold only. A failure
    leaves the detector as it was.

    Parameters
    ----------
    model : Pipeline
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)``, not fitted on
        the validation images.
    validation : str, path-like or Bunch
        A category or a test split (see :func:`~skdfm.validation_images`), or
        that function's result.
    batches : callable, default=None
        ``batches(paths)`` yields the files decoded, as in
        :func:`evaluate_mvtec`.
    pixel_contamination : float in (0, 1), default=0.001
        Share of good pixels above the pixel threshold, without masks.

    Returns
    -------
    calibration : ValidationCalibration

    Raises
    ------
    FileNotFoundError, ValueError
        ``validation`` is not a labelled set with good and defective images, or
        too few of them can be read.
    """
    import os

    from .._core.persistence import keep_state_on_error
    from .._imaging.decode import original_size
    from .._imaging.features import with_feature_shape
    from .._tools.model import split_model
    from .._tools.thresholds import (
        calibrate_pixel_threshold_from_features,
        calibrate_threshold,
        masks_at_input_size,
    )
    from .datasets import read_mvtec_mask, validation_images

    transformer, detector = split_model(model)
    if isinstance(validation, (str, os.PathLike)):
        validation = validation_images(validation)
    data = validation
    has_maps = detector.score_type == "fre"
    read = batches if batches is not None else _batches_of(transformer)
    position = {path: i for i, path in enumerate(data.paths)}
    parts, y, masks, skipped, unmasked = [], [], [], [], []
    for batch in read(data.paths):
        skipped.extend(batch.failed)
        if not batch.images:
            continue
        parts.append(transformer.transform(batch.images))
        for path, image in zip(batch.paths, batch.images, strict=True):
            i = position[path]
            y.append(data.y[i])
            mask = None
            if has_maps and data.has_masks:
                size = original_size(image)
                try:
                    mask = read_mvtec_mask(data, i, size)
                except ValueError as error:
                    unmasked.append((path, str(error)))
                else:
                    (mask,) = masks_at_input_size(
                        [mask], [size], transformer.input_size_
                    )
            masks.append(mask)
    y = np.asarray(y, int)
    n_good, n_defective = int(np.sum(y == 1)), int(np.sum(y == -1))
    if not n_good or not n_defective:
        raise ValueError(
            f"{n_good} good and {n_defective} defective validation images could be "
            "read: the F1 threshold needs both"
        )
    if hasattr(parts[0], "device"):  # torch rows (the transformer's output="torch")
        import torch

        rows = torch.cat(parts)
    else:
        rows = np.concatenate(parts)
    rows = with_feature_shape(rows, transformer.feature_shape_)
    n_masks = 0
    with keep_state_on_error(detector):
        calibrate_threshold(detector, rows, y, method="f1")
        if has_maps:
            masked = [i for i, mask in enumerate(masks) if mask is not None]
            if any(masks[i].any() for i in masked):
                calibrate_pixel_threshold_from_features(
                    model, rows[np.asarray(masked)], [masks[i] for i in masked]
                )
                n_masks = len(masked)
            else:
                calibrate_pixel_threshold_from_features(
                    model,
                    rows[np.flatnonzero(y == 1)],
                    pixel_contamination=pixel_contamination,
                )
    return ValidationCalibration(data, n_good, n_defective, n_masks, skipped, unmasked)
