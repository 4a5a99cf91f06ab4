"""Anomaly maps over images: a numpy overlay (no extra needed), a matplotlib figure."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["anomaly_map_grid", "overlay_anomaly_map", "plot_anomaly_maps"]


def _heat(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map of values in [0, 1]: (..., 3) floats in [0, 1]."""
    t = np.clip(values, 0, 1)[..., None] * 4
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks
    return np.clip(1.5 - np.abs(t - centres), 0, 1)


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # (C, H, W)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype == np.uint8:
        image = image / 255.0
    elif image.dtype.kind == "u" and image.dtype.itemsize == 2:  # 16-bit, any order
        image = image / 65535.0
    image = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    return np.broadcast_to(image, (*image.shape[:2], 3))


def overlay_anomaly_map(image, anomaly_map, *, vmin=None, vmax=None, alpha=0.5):
    """Blend a colour-coded anomaly map over an image.

    Parameters
    ----------
    image : array of shape (H, W), (H, W, 3) or (3, H, W)
        uint8, uint16, or floats in [0, 1].
    anomaly_map : array of shape (H, W)
        Higher = more anomalous, at the image's size (see
        :func:`~skdfm.anomaly_maps`).
    vmin, vmax : float, default=None
        Map values shown as the coldest and hottest colour; default the map's own
        range. Pass the same values for several images to compare them.
    alpha : float, default=0.5
        Weight of the colour map.

    Returns
    -------
    overlay : ndarray of shape (H, W, 3), uint8

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import overlay_anomaly_map
    >>> overlay_anomaly_map(np.zeros((4, 4, 3), np.uint8), np.eye(4)).shape
    (4, 4, 3)
    """
    rgb = _as_rgb(image)
    amap = np.asarray(anomaly_map, dtype=np.float64)
    if amap.shape != rgb.shape[:2]:
        raise ValueError(
            f"The anomaly map has shape {amap.shape} but the image is "
            f"{rgb.shape[:2]}; compute maps at the image size (size='image')."
        )
    low = amap.min() if vmin is None else vmin
    high = amap.max() if vmax is None else vmax
    scaled = (amap - low) / (high - low) if high > low else np.zeros_like(amap)
    blended = (1 - alpha) * rgb + alpha * _heat(scaled)
    return np.round(blended * 255).astype(np.uint8)


def _shared_range(maps, vmin, vmax) -> tuple[float, float]:
    """One colour scale for all maps: the given limits, else the range of all."""
    low = min(m.min() for m in maps) if vmin is None else vmin
    high = max(m.max() for m in maps) if vmax is None else vmax
    return low, high


def _outline(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def anomaly_map_grid(images, maps, *, masks=None, vmin=None, vmax=None):
    """One picture of images (top row) over their map overlays (bottom row).

    Defect masks, when given, are outlined in green on the overlays. All maps
    share one colour scale (``vmin``/``vmax``, default the range of all maps), so
    a hot normal image and a hot defect look alike. Images must share one size.

    Returns
    -------
    grid : ndarray of shape (2 * H, n * W, 3), uint8
    """
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    low, high = _shared_range(maps, vmin, vmax)
    top, bottom = [], []
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        rgb = np.round(_as_rgb(image) * 255).astype(np.uint8)
        overlay = overlay_anomaly_map(image, amap, vmin=low, vmax=high)
        if masks is not None:
            overlay[_outline(masks[i])] = (0, 255, 0)
        top.append(rgb)
        bottom.append(overlay)
    return np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)


def plot_anomaly_maps(
    images, maps, *, masks=None, titles=None, vmin=None, vmax=None, ncols=4
):
    """A matplotlib figure of images with their anomaly maps overlaid.

    Needs matplotlib (``pip install "skdfm[plot]"``). One panel per image: the map
    blended over the image on a shared colour scale, the defect mask outlined in
    green when given, and a title (e.g. the score).

    Parameters
    ----------
    images : sequence of images (H, W[, 3])
    maps : sequence of 2-D arrays
        Maps at each image's size (``anomaly_maps(model, X).maps``).
    masks : sequence of 2-D bool arrays, default=None
    titles : sequence of str, default=None
    vmin, vmax : float, default=None
        Shared colour scale; default the range of all maps.
    ncols : int, default=4

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            'plot_anomaly_maps needs matplotlib: pip install "skdfm[plot]" (or '
            "use overlay_anomaly_map, which needs nothing extra)."
        ) from None
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    low, high = _shared_range(maps, vmin, vmax)
    n = len(maps)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    figure, axes = plt.subplots(
        nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        ax = axes.ravel()[i]
        ax.imshow(overlay_anomaly_map(image, amap, vmin=low, vmax=high))
        if masks is not None:
            ax.contour(np.asarray(masks[i], float), levels=[0.5], colors="lime")
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    figure.tight_layout()
    return figure
