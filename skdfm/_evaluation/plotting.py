"""Anomaly maps over images: a numpy overlay (no extra needed), a matplotlib figure."""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

__all__ = [
    "anomaly_map_grid",
    "colour_bar",
    "overlay_anomaly_map",
    "plot_anomaly_maps",
]


def _heat(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map of values in [0, 1]: (..., 3) floats in [0, 1]."""
    t = np.clip(values, 0, 1)[..., None] * 4
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks
    return np.clip(1.5 - np.abs(t - centres), 0, 1)


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):  # a file, as anomaly_maps reads it
        from .._imaging.decode import decode_image_file

        image = decode_image_file(image)
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
    image : array of shape (H, W), (H, W, 3) or (3, H, W), PIL image, or path
        uint8, uint16, or floats in [0, 1]; a file is decoded as
        :func:`~skdfm.anomaly_maps` decodes it.
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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def colour_bar(width: int, scale, caption: str | None = None):
    """A legend strip ``width`` pixels wide (a PIL image): ``caption``, and the
    colour bar of ``scale`` = ``(low, high, threshold)`` with those values marked
    (``threshold`` may be None), or a note that each image has its own scale when
    ``scale`` is None."""
    from PIL import Image, ImageDraw

    size = max(10, min(16, width // 24))
    bar_height = size
    strip = Image.new("RGB", (width, 3 * size + bar_height + 8), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, 2), caption or "", fill="black", font=_font(size))
    top = size + 6
    gradient = np.tile(np.linspace(0.0, 1.0, width), (bar_height, 1))
    colours = overlay_anomaly_map(
        np.ones((bar_height, width, 3)), gradient, vmin=0.0, vmax=1.0, alpha=1.0
    )
    strip.paste(Image.fromarray(colours), (0, top))
    y = top + bar_height + 1
    if scale is None:
        draw.text((4, y), "colours: this image's own range", fill="black",
                  font=_font(size))  # fmt: skip
        return strip
    low, high, threshold = scale
    ticks = [(low, f"{low:.3g}"), (high, f"{high:.3g}")]
    if threshold is not None:
        ticks.insert(1, (threshold, f"pixel threshold {threshold:.3g}"))
    for value, text in ticks:
        x = int(round((value - low) / (high - low) * (width - 1))) if high > low else 0
        draw.line([(x, top), (x, top + bar_height)], fill="black", width=1)
        length = draw.textlength(text, font=_font(size))
        draw.text(
            (min(max(0, x - length / 2), width - length), y),
            text, fill="black", font=_font(size),
        )  # fmt: skip
    return strip


def _shared_range(maps, vmin, vmax) -> tuple[float, float]:
    """One colour scale for all maps: the given limits, else the range of all."""
    low = min(m.min() for m in maps) if vmin is None else vmin
    high = max(m.max() for m in maps) if vmax is None else vmax
    return low, high


def _outline(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def anomaly_map_grid(
    images, maps, *, masks=None, vmin=None, vmax=None, titles=None, threshold=None
):
    """One picture of images (top row) over their map overlays (bottom row).

    Defect masks, when given, are outlined in green on the overlays. All maps
    share one colour scale (``vmin``/``vmax``, default the range of all maps), so
    a hot normal image and a hot defect look alike. Images must share one size.
    With ``titles``, each column gets its title above it (a line break splits it)
    and a colour bar of the scale goes under the picture, ``threshold`` (a
    pixel threshold, map units) marked on it.

    Returns
    -------
    grid : ndarray of shape (2 * H, n * W, 3), uint8
        Taller by the title band and the colour bar with ``titles``.
    """
    from PIL import Image, ImageDraw

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
    grid = np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)
    if titles is None:
        return grid
    width, column = grid.shape[1], top[0].shape[1]
    size = max(10, min(14, column // 10))
    lines = max(str(t).count("\n") + 1 for t in titles)
    band = Image.new("RGB", (width, lines * (size + 3) + 6), "white")
    draw = ImageDraw.Draw(band)
    for i, title in enumerate(titles):
        draw.multiline_text(
            (i * column + 4, 3), str(title), fill="black", font=_font(size),
            spacing=3,
        )  # fmt: skip
    legend = colour_bar(width, (low, high, threshold))
    return np.concatenate([np.asarray(band), grid, np.asarray(legend)], 0)


def plot_anomaly_maps(
    images, maps, *, masks=None, titles=None, vmin=None, vmax=None, ncols=4
):
    """A matplotlib figure of images with their anomaly maps overlaid.

    Needs matplotlib (``pip install "skdfm[plot]"``). One panel per image: the map
    blended over the image on a shared colour scale, the defect mask outlined in
    green when given, and a title (e.g. the score).

    Parameters
    ----------
    images : sequence of images (H, W[, 3]) or of image file paths
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
