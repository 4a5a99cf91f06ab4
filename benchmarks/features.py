"""Realistic feature matrices for the head benchmarks, cached on disk.

Rows are pooled resnet18 ``layer3`` features (random weights: pretrained ones cannot
be downloaded here) of 128 px parts made by :func:`skdfm.make_defect_images`: real
CNN activations of images of one product, so the spectrum (and so k) is that of a
backbone, not of white noise. ``pooling_kernel_size`` 1 gives D = 256 x 8 x 8 =
16384 and 2 gives D = 4096. Training rows are good parts; the held-out rows are half
good, half defective. Images are made and transformed in batches, so memory stays at
the size of the result (N x D float32).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from skdfm import DeepFeatureTransformer, make_defect_images

CACHE = Path(os.environ.get("SKDFM_BENCH_CACHE", "/tmp/skdfm-bench"))
_POOL = {16384: 1, 4096: 2}
_BATCH = 512


def _transformer(d: int) -> DeepFeatureTransformer:
    return DeepFeatureTransformer(
        backbone="resnet18",
        pretrained=False,
        layer="layer3",
        pooling_kernel_size=_POOL[d],
        input_size=128,
        channels_last=True,
        device="cpu",
        random_state=0,
    )


def _rows(tr, n_rows, out, seed, anomalous_share=0.0):
    for start in range(0, n_rows, _BATCH):
        rows = min(_BATCH, n_rows - start)
        n_bad = int(round(rows * anomalous_share))
        images, _, _ = make_defect_images(
            n_normal=rows - n_bad,
            n_anomalous=n_bad,
            image_size=128,
            random_state=seed + start,
        )
        if not hasattr(tr, "model_"):
            tr.fit(images)
        out[start : start + rows] = tr.transform(images)


def feature_rows(n: int, d: int) -> np.ndarray:
    """The first ``n`` training rows at width ``d`` (memory-mapped from the cache)."""
    path = CACHE / f"train_d{d}.npy"
    if path.exists():
        rows = np.load(path, mmap_mode="r")
        if len(rows) >= n:
            return rows[:n]
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    out = np.lib.format.open_memmap(
        path.with_suffix(".tmp.npy"), "w+", np.float32, (n, d)
    )
    _rows(_transformer(d), n, out, seed=1_000_000)
    out.flush()
    del out
    path.with_suffix(".tmp.npy").replace(path)
    print(f"# made {n} x {d} feature rows in {time.perf_counter() - start:.0f} s")
    return np.load(path, mmap_mode="r")[:n]


def test_rows(d: int, n: int = 256) -> np.ndarray:
    """Held-out rows: half good parts, half defective ones."""
    path = CACHE / f"test_d{d}_{n}.npy"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        out = np.empty((n, d), np.float32)
        _rows(_transformer(d), n, out, seed=7, anomalous_share=0.5)
        np.save(path, out)
    return np.load(path)
