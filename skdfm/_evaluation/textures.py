"""MVTec-style defect sets cut from real photographs (scikit-image's textures).

Crops of one photograph (``skimage.data.brick``, ``grass`` or ``gravel``: the
``bench`` extra) are the good parts; defects are pasted patches (a rotated piece of
the same photograph), scratches and stains, with their masks. Written as an
MVTec AD folder (``train/good``, ``test/<kind>``, ``ground_truth/<kind>``) and read
back with :func:`skdfm.load_mvtec`. The benchmarks and the regression tests on
real features use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["KINDS", "TEXTURES", "write_texture_set"]

TEXTURES = ("brick", "grass", "gravel")
KINDS = ("patch", "scratch", "stain")


def _crop(photo, rng, size):
    top, left = rng.integers(0, photo.shape[0] - size, 2)
    return photo[top : top + size, left : left + size].copy()


def _line_mask(rng, size):
    """A straight scratch 2-3 px wide and 32-77 px long."""
    length = rng.uniform(32, 77)
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.25, 0.75, 2) * size
    direction = np.array([np.sin(angle), np.cos(angle)])
    yy, xx = np.mgrid[:size, :size]
    offset = np.stack([yy - centre[0], xx - centre[1]], -1)
    along = offset @ direction
    across = np.abs(offset @ np.array([-direction[1], direction[0]]))
    return (np.abs(along) <= length / 2) & (across <= rng.uniform(1.0, 1.6))


def _defect(photo, image, rng, kind):
    """``image`` (float, [0, 1]) with one defect, and its mask. Defect sizes are in
    pixels of the photograph, whatever the crop size."""
    size = image.shape[0]
    out = image.copy()
    if kind == "patch":
        side = int(rng.integers(16, 33))
        piece = np.rot90(_crop(photo, rng, side), int(rng.integers(1, 4)))
        top, left = rng.integers(0, size - side, 2)
        mask = np.zeros((size, size), bool)
        mask[top : top + side, left : left + side] = True
        out[mask] = piece.ravel()
    elif kind == "scratch":
        mask = _line_mask(rng, size)
        value = 0.92 if rng.random() < 0.5 else 0.08
        out[mask] = 0.25 * out[mask] + 0.75 * value
    else:  # stain: a soft dark blob
        radius = rng.uniform(9, 18)
        centre = rng.uniform(0.2, 0.8, 2) * size
        yy, xx = np.mgrid[:size, :size]
        distance = np.hypot(yy - centre[0], xx - centre[1]) / radius
        alpha = np.clip(1.5 - distance, 0, 1) * rng.uniform(0.35, 0.5)
        out = out * (1 - alpha)
        mask = alpha > 0.1
    return out, mask


def write_texture_set(root: Path, texture: str, seed: int, crop: int, n_train=60,
                      n_good=50, n_each=20) -> Path:  # fmt: skip
    """An MVTec-style folder of ``crop`` px crops of scikit-image's ``texture``."""
    import skimage.data

    photo = getattr(skimage.data, texture)().astype(np.float64) / 255.0
    rng = np.random.default_rng([seed, TEXTURES.index(texture), crop])
    folder = root / f"{texture}-{crop}"

    def save(image, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
            path
        )

    for i in range(n_train):
        save(_crop(photo, rng, crop), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(_crop(photo, rng, crop), folder / "test" / "good" / f"{i:03d}.png")
    for kind in KINDS:
        for i in range(n_each):
            image, mask = _defect(photo, _crop(photo, rng, crop), rng, kind)
            save(image, folder / "test" / kind / f"{i:03d}.png")
            save(
                mask.astype(float), folder / "ground_truth" / kind / f"{i:03d}_mask.png"
            )
    return folder
