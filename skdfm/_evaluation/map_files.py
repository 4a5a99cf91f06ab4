"""Where anomaly-map pictures go, and how they are written: one rule for every writer.

The command (``skdfm score --maps``) and the workers of :mod:`skdfm.distributed` name
a map after the image it belongs to by mirroring the image's place under a root
folder: ``root/test/crack/000.png`` gives ``maps/test/crack/000.png_map.png``. The
image's whole file name is kept (``000.png`` and ``000.jpg`` of one folder get two
maps), so two images never share a map file. An image outside the root (or with no
root) mirrors its absolute path. Files are written atomically.

Memory is bounded per image: maps and predicted masks are at most
:data:`MAX_MAP_PIXELS` (the image's own size up to it, else the largest size of the
image's aspect ratio within it), overlay pictures at most
:data:`MAX_OVERLAY_PIXELS` (their blending takes ~100 bytes a pixel), so a small
file declaring a huge image never needs gigabytes to draw.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .._core.files import atomic_write

__all__ = [
    "MAX_MAP_PIXELS",
    "MAX_OVERLAY_PIXELS",
    "capped_size",
    "colour_scale",
    "map_caption",
    "map_file",
    "mask_file",
    "overlay_picture",
    "write_map_overlay",
    "write_mask",
]

MAP_SUFFIX = "_map.png"
MASK_SUFFIX = "_mask.png"
#: Largest map or predicted mask written (4096 x 4096 = 16.8 MP: 134 MB as float64):
#: larger images get theirs at the largest size of their aspect ratio within it.
MAX_MAP_PIXELS = 2**24
#: Largest overlay picture drawn (2048 x 2048 = 4.2 MP): larger ones are scaled down.
MAX_OVERLAY_PIXELS = 2**22


def capped_size(size, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` of ``size``, or the largest size of its aspect ratio
    with at most ``max_pixels`` pixels (each side at least 1)."""
    height, width = (int(s) for s in size)
    if height * width <= max_pixels:
        return (height, width)
    scale = math.sqrt(max_pixels / (height * width))
    return (max(1, int(height * scale)), max(1, int(width * scale)))


def map_file(folder, image_path, root=None) -> Path:
    """The map file of ``image_path`` under ``folder``, mirroring its place under
    ``root`` (its absolute path when it is outside ``root`` or ``root`` is None)."""
    path = Path(os.path.abspath(image_path))
    relative = None
    if root is not None:
        try:
            relative = path.relative_to(os.path.abspath(root))
        except ValueError:
            relative = None
    if relative is None:
        relative = path.relative_to(path.anchor)
    return Path(folder) / relative.parent / (relative.name + MAP_SUFFIX)


def mask_file(folder, image_path, root=None) -> Path:
    """The predicted-mask file of ``image_path``: as :func:`map_file`, ending in
    ``_mask.png``."""
    path = map_file(folder, image_path, root)
    return path.with_name(path.name[: -len(MAP_SUFFIX)] + MASK_SUFFIX)


def overlay_picture(image, anomaly_map, *, scale=None, caption=None, mask=None):
    """``anomaly_map`` blended over ``image`` (a PIL image or an array) with a
    legend under it, as a PIL image; see :func:`write_map_overlay`. ``mask`` (the
    true defect, when known) is outlined in green."""
    from PIL import Image

    from .plotting import anomaly_map_grid, colour_bar, overlay_anomaly_map

    if isinstance(image, (str, os.PathLike)):
        from .._imaging.decode import decode_image_file

        image = decode_image_file(image)
    if isinstance(image, Image.Image):
        height, width = capped_size((image.height, image.width), MAX_OVERLAY_PIXELS)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    height, width = (
        (image.height, image.width) if isinstance(image, Image.Image) else None
    ) or pixels.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != (height, width):
        amap = np.asarray(
            Image.fromarray(amap, mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
    if mask is not None and np.shape(mask) != (height, width):  # a scaled picture
        mask = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
        mask = np.asarray(mask.resize((width, height), Image.Resampling.NEAREST)) > 0
    low, high = (None, None) if scale is None else scale[:2]
    if mask is None:
        blended = overlay_anomaly_map(pixels, amap, vmin=low, vmax=high)
    else:  # the bottom row of a one-image grid: the overlay with the outline
        grid = anomaly_map_grid([pixels], [amap], masks=[mask], vmin=low, vmax=high)
        blended = grid[height:]
    legend = colour_bar(width, scale, caption)
    picture = Image.new("RGB", (width, height + legend.height), "white")
    picture.paste(Image.fromarray(blended), (0, 0))
    picture.paste(legend, (0, height))
    return picture


def write_map_overlay(target, image, anomaly_map, *, scale=None, caption=None) -> None:
    """Write ``anomaly_map`` blended over ``image`` (a PIL image or an array) as a
    PNG at ``target`` (its folders made), atomically, with a legend under it.

    ``scale`` is ``(low, high, threshold)``: the map values drawn coldest and
    hottest, the same for every image of a model so that colours compare, and the
    pixel threshold marked on the colour bar; None scales each image to its own
    range (and says so). ``caption`` (e.g. the image score and label) is written
    above the colour bar, wrapped to the picture's width (the font shrinks for
    narrow pictures, so that the whole caption shows at any size). A map of
    another size than the image (a file decoded at a reduced scale) is resized to
    it first; a PIL image above
    :data:`MAX_OVERLAY_PIXELS` is drawn scaled down to it.
    """
    picture = overlay_picture(image, anomaly_map, scale=scale, caption=caption)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        picture.save(handle, format="PNG")


def write_mask(target, mask) -> None:
    """A predicted mask as a black-and-white PNG (255 = defective), atomically."""
    from PIL import Image

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(
            handle, format="PNG"
        )


def map_caption(score: float, label: int, offset: float) -> str:
    """What an overlay says: the image's anomaly score against the image
    threshold, the label (``score`` and ``offset`` in ``score_samples`` units).
    The colour bar under it shows the map's own scale and pixel threshold."""
    verdict = "ANOMALOUS" if label == -1 else "normal"
    return f"anomaly score {-score:.4g} (image threshold {-offset:.4g}): {verdict}"


def colour_scale(detector):
    """The one colour scale of a model's overlays, ``(0, 2 t, t)`` around its pixel
    threshold ``t`` (a defect's pixels are red, good ones blue to green), or None
    without a pixel threshold."""
    threshold = getattr(detector, "pixel_threshold_", None)
    if threshold is None or threshold <= 0:
        return None
    return (0.0, 2.0 * threshold, threshold)
