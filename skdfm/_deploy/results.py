"""What scoring returns, without torch: the result of :func:`~skdfm.anomaly_maps`
and the rule that decides the size of its maps (shared with the runtime of exported
models, :class:`~skdfm.ExportedModel`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["AnomalyMaps", "bilinear_resize", "normalize_scores", "target_sizes"]


class AnomalyMaps(NamedTuple):
    """Result of :func:`anomaly_maps`."""

    #: (n, H, W) float64 array when every map has one size, else a list of 2-D arrays
    maps: np.ndarray | list[np.ndarray]
    #: (n,) float64, equal to ``model.score_samples(X)`` (higher = more normal)
    score_samples: np.ndarray
    #: (n,) int, equal to ``model.predict(X)`` (+1 normal, -1 anomalous)
    labels: np.ndarray
    #: predicted defect masks, ``maps >= pixel_threshold_`` (laid out as ``maps``),
    #: or None when the model has no pixel threshold
    masks: np.ndarray | list[np.ndarray] | None = None


def target_sizes(size, input_size, image_sizes, n: int):
    """The ``(height, width)`` each of ``n`` maps is brought to, or None for the grid.

    ``size`` is ``"image"`` (``image_sizes``, each image's own), ``"input"``
    (``input_size``), ``"grid"`` or a ``(height, width)`` tuple of positive ints.
    """
    if isinstance(size, str):
        if size == "grid":
            return None
        if size == "input":
            return [tuple(input_size)] * n
        if size == "image":
            return image_sizes
    elif (
        isinstance(size, tuple)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        return [size] * n
    raise ValueError(
        f"size={size!r} must be 'image' (each image's own size), 'input' (the "
        "model input size), 'grid' (the pooled feature grid) or (height, width)."
    )


def _axis_weights(n_in: int, n_out: int):
    """Source indices and weights of bilinear interpolation along one axis, as
    PyTorch's ``interpolate(mode="bilinear", align_corners=False)`` computes them."""
    scale = n_in / n_out
    source = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    source = np.maximum(source, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    weight = source - low
    return low, high, weight


def bilinear_resize(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) maps bilinearly resized to ``size`` (no antialiasing,
    ``align_corners=False``): :func:`skdfm._tools.maps.upsample` in numpy."""
    grids = np.asarray(grids, dtype=np.float64)
    if tuple(grids.shape[-2:]) == tuple(size):
        return grids
    r0, r1, wr = _axis_weights(grids.shape[1], size[0])
    c0, c1, wc = _axis_weights(grids.shape[2], size[1])
    rows = grids[:, r0] * (1 - wr)[None, :, None] + grids[:, r1] * wr[None, :, None]
    return rows[:, :, c0] * (1 - wc) + rows[:, :, c1] * wc


def normalize_scores(score_samples, offset: float, score_range) -> np.ndarray:
    """Scores in [0, 1], 0.5 at the threshold ``offset``, higher = more anomalous,
    scaled by the width of ``score_range`` (see :func:`~skdfm.normalized_scores`)."""
    low, high = score_range
    span = high - low if high > low else 1.0
    scores = np.asarray(score_samples, dtype=np.float64)
    return np.clip((offset - scores) / span + 0.5, 0.0, 1.0)


def predicted_masks(maps, threshold):
    """``maps >= threshold`` (bool, laid out as ``maps``: an array or a list of 2-D
    arrays), or None when there is no pixel threshold."""
    if threshold is None:
        return None
    if isinstance(maps, list):
        return [m >= threshold for m in maps]
    return maps >= threshold
