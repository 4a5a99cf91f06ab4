"""Where anomaly-map pictures go, and how they are written: one rule for every writer.

The command (``skdfm score --maps``) and the workers of :mod:`skdfm.distributed` name
a map after the image it belongs to by mirroring the image's place under a root
folder: ``root/test/crack/000.png`` gives ``maps/test/crack/000.png_map.png``. The
image's whole file name is kept (``000.png`` and ``000.jpg`` of one folder get two
maps), so two images never share a map file. An image outside the root (or with no
root) mirrors its absolute path. Files are written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._files import atomic_write

__all__ = ["map_file", "write_map_overlay"]

MAP_SUFFIX = "_map.png"


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


def write_map_overlay(target, image, anomaly_map) -> None:
    """Write ``anomaly_map`` blended over ``image`` (a PIL image or an array) as a
    PNG at ``target`` (its folders made), atomically; a map of another size than
    the image (a file decoded at a reduced scale) is resized to it first."""
    from PIL import Image

    from ._plotting import overlay_anomaly_map

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
    overlay = Image.fromarray(overlay_anomaly_map(pixels, amap))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        overlay.save(handle, format="PNG")
