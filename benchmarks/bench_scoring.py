"""Scoring a fitted head: scores alone, scores + residual grids, against references.

On pooled-feature-like rows (ReLU of a random low-rank mix, D = C x h x w), one
process, interleaved, median of ``--repeats``:

- ``score_samples``: ``DFMDetector.score_samples`` (one centring + projection per
  chunk, FRE as ||xc||^2 - ||z||^2);
- ``scores+grid``: ``DFMDetector.score_samples_with_grid`` (what ``anomaly_maps``
  runs: the same pass also forms the residual and its channel sums);
- ``two passes``: the same two results computed the way ``anomaly_maps`` did before
  the kernels were merged: ``score_samples``, then a second centring and projection
  for the grid;
- ``anomalib``: anomalib's formula in torch float64: explicit reconstruction
  ``(xc V) V^T``, squared residual summed over channels (the map) and over all
  features (the score).

Prints times, ratios to ``scores+grid`` and the largest relative score difference.

    python benchmarks/bench_scoring.py
    python benchmarks/bench_scoring.py --rows 1024 --shape 1024 4 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from machine import cpu_flags  # benchmarks/machine.py

from skdfm import DFMDetector


def two_passes(det, X, shape):
    scores = det.score_samples(X)
    Xt = torch.from_numpy(X)
    mean = torch.from_numpy(det.mean_)
    V = torch.from_numpy(det.components_).T
    xc = Xt.to(torch.float64) - mean
    residual = xc - (xc @ V) @ V.T
    return scores, residual.square_().reshape(-1, *shape).sum(1)


def anomalib_formula(det, X, shape):
    Xt = torch.from_numpy(X).to(torch.float64)
    mean = torch.from_numpy(det.mean_)
    V = torch.from_numpy(det.components_).T
    reconstructed = ((Xt - mean) @ V) @ V.T + mean
    squared = (Xt - reconstructed) ** 2
    return -squared.sum(1).numpy(), squared.reshape(-1, *shape).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--rows", type=int, default=256, help="rows to score")
    parser.add_argument("--shape", type=int, nargs=3, default=[1024, 4, 4])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    shape = tuple(args.shape)
    d = int(np.prod(shape))
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(300, d)).astype(np.float32) / 17
    X = np.maximum(rng.normal(size=(args.train + args.rows, 300)).astype("f4") @ mix, 0)
    det = DFMDetector(pca_level=0.97, device="cpu").fit(X[: args.train])
    test = X[args.train :]
    print(
        f"CPU flags: {cpu_flags()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{args.rows} rows of D = {d} {shape}, k = {det.n_components_}")
    methods = {
        "score_samples": lambda: det.score_samples(test),
        "scores+grid": lambda: det.score_samples_with_grid(test, shape),
        "two passes": lambda: two_passes(det, test, shape),
        "anomalib": lambda: anomalib_formula(det, test, shape),
    }
    times = {name: [] for name in methods}
    for method in methods.values():
        method()  # warm-up
    for _ in range(args.repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["scores+grid"])
    scores, grid = det.score_samples_with_grid(test, shape)
    ref_scores, ref_grid = anomalib_formula(det, test, shape)
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / reference
        print(f"{name:14s} {median * 1e3:8.1f} ms  ({ratio:.2f}x scores+grid)")
    score_diff = np.max(np.abs(scores - ref_scores) / np.abs(ref_scores))
    grid_diff = float((grid - ref_grid).abs().max() / ref_grid.abs().max())
    print(
        f"max rel diff vs anomalib's formula: scores {score_diff:.1e}, "
        f"grids {grid_diff:.1e} (of the largest cell)"
    )


if __name__ == "__main__":
    main()
