"""Anomaly maps: where in the image the feature reconstruction error comes from."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._deploy.results import AnomalyMaps, predicted_masks, target_sizes
from .._kernels.scores import check_has_grid
from .model import split_model

__all__ = ["AnomalyMaps", "anomaly_maps", "upsample"]


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=False``, as anomalib's map."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    upsampled = F.interpolate(
        grid[:, None], size=size, mode="bilinear", align_corners=False
    )
    return upsampled[:, 0]


def anomaly_maps(model, X, *, size="image", feature_shape=None) -> AnomalyMaps:
    """Pixel anomaly maps, image scores and labels, from one backbone pass.

    For each image, the squared residual of its feature row after projection on
    the principal subspace is summed over channels on the pooled feature grid and
    upsampled bilinearly (``align_corners=False``), as anomalib's DFM computes its
    anomaly map. Higher = more anomalous; on the grid, a map sums to the image's
    FRE, which is ``-score_samples`` for the default ``image_score="sum"`` (with
    ``"max"``, ``-score_samples`` is the grid map's largest cell).

    Parameters
    ----------
    model : Pipeline or DFMDetector
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)`` with
        ``score_type="fre"`` (images in), or a fitted ``DFMDetector`` (feature rows
        in; ``size`` is then ``"grid"`` or a tuple).
    X : images or array-like of shape (n_samples, n_features)
        What ``model.score_samples`` takes.
    size : {"image", "input", "grid"} or tuple of (int, int), default="image"
        ``"image"``: each image's own size, so maps line up with the original
        pixels and masks (upsampled from the grid in one step). ``"input"``: the
        model input size (anomalib's output). ``"grid"``: the pooled feature grid,
        no upsampling. A ``(height, width)`` tuple: that size.
    feature_shape : tuple of (int, int, int), default=None
        ``(channels, rows, columns)`` of the feature rows; only for a bare
        detector that was not fitted with one (a Pipeline knows it, and so does a
        detector whose ``feature_shape_`` is set).

    Returns
    -------
    result : AnomalyMaps
        ``maps`` (an (n, H, W) float64 array, or a list of 2-D arrays when images
        differ in size), ``score_samples`` (equal to ``model.score_samples(X)``),
        ``labels`` (equal to ``model.predict(X)``) and ``masks``, the predicted
        defect masks ``maps >= pixel_threshold_`` (None until the detector has a
        pixel threshold: :func:`~skdfm.calibrate_pixel_threshold`).

    Raises
    ------
    ValueError
        For ``score_type="nll"``: its score has no per-location decomposition.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from skdfm import (DeepFeatureTransformer, DFMDetector, anomaly_maps,
    ...                    make_defect_images)
    >>> images, y, masks = make_defect_images(12, 2, image_size=64, random_state=0)
    >>> model = make_pipeline(
    ...     DeepFeatureTransformer(backbone="resnet18", pretrained=False,
    ...                            input_size=64, device="cpu", random_state=0),
    ...     DFMDetector(pca_level=0.9, device="cpu"),
    ... ).fit(images[y == 1])
    >>> result = anomaly_maps(model, images[y == -1])
    >>> result.maps.shape
    (2, 64, 64)
    >>> np.allclose(result.score_samples, model.score_samples(images[y == -1]))
    True
    """
    transformer, detector = split_model(model)
    check_has_grid(detector.score_type)  # before the backbone runs
    if transformer is not None:
        if feature_shape is not None:
            raise ValueError("feature_shape is only for a bare DFMDetector.")
        if size == "image":
            features, image_sizes = transformer.transform_with_sizes(X)
        else:
            features, image_sizes = transformer.transform(X), None
        feature_shape = transformer.feature_shape_
    else:
        if feature_shape is None and detector.feature_shape_ is None:
            raise ValueError(
                "A bare DFMDetector does not know where its features come from: pass "
                "feature_shape=(channels, rows, columns), or pass the Pipeline."
            )
        if isinstance(size, str) and size != "grid":
            raise ValueError(
                f"size={size!r} needs the images; with a bare DFMDetector use "
                "size='grid' or a (height, width) tuple."
            )
        features, image_sizes = X, None
    score_samples, grid = detector.score_samples_with_grid(features, feature_shape)
    input_size = transformer.input_size_ if transformer is not None else None
    targets = target_sizes(size, input_size, image_sizes, len(grid))
    if targets is None:
        maps = grid.cpu().numpy()
    elif len(set(targets)) == 1:
        maps = upsample(grid, targets[0]).cpu().numpy()
    else:
        maps = [None] * len(grid)
        for target in set(targets):
            index = [i for i, t in enumerate(targets) if t == target]
            for i, m in zip(index, upsample(grid[index], target).cpu(), strict=True):
                maps[i] = m.numpy()
    labels = detector.labels_from_scores(score_samples)
    threshold = getattr(detector, "pixel_threshold_", None)
    return AnomalyMaps(maps, score_samples, labels, predicted_masks(maps, threshold))
