"""Fit time of DFMDetector against anomalib's method and scikit-learn's PCA(0.97).

anomalib's DFM head (re-implemented here from its description, not its code):
centre the N x D float32 feature matrix, take a full float64 SVD of it
(``torch.linalg.svd(..., full_matrices=False)``), keep the first k right singular
vectors. scikit-learn: ``PCA(n_components=0.97)`` with its default solver choice.

Each configuration runs every method ``--repeats`` times, interleaved, and prints
median seconds and the ratio of each reference to DFMDetector measured in this run,
plus the largest relative difference between DFMDetector's FRE and the FRE computed
in float64 from anomalib's SVD at the same number of components (held-out rows).

Features are ReLU rows with a power-law spectrum (like pooled CNN activations), made
in batches. Run on an otherwise idle machine:

    python benchmarks/bench_fit.py          # N in {1000, 4000} x D in {4096, 16384}
    python benchmarks/bench_fit.py --sizes 1000x4096 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.decomposition import PCA

from skdfm import DFMDetector


def make_features(n, d, seed=0, latent=2048, alpha=1.0, batch=1000):
    rng = np.random.default_rng(seed)
    mixing = (rng.normal(size=(latent, d)) / np.sqrt(latent)).astype(np.float32)
    scale = (np.arange(1, latent + 1) ** (-alpha / 2)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        z = rng.normal(size=(rows, latent)).astype(np.float32) * scale
        out[start : start + rows] = np.maximum(z @ mixing + 0.05, 0.0)
    return out


def anomalib_style_fit(X: np.ndarray, level: float):
    """Centred float64 full SVD of the N x D matrix; anomalib's k rule."""
    features = torch.from_numpy(X)
    mean = features.mean(dim=0)
    centred = (features - mean).double()
    _, sig, v_h = torch.linalg.svd(centred, full_matrices=False)
    ratios = torch.cumsum(sig * sig, dim=0) / torch.sum(sig * sig)
    k = int(torch.nonzero(ratios >= level)[0])
    return mean, v_h.T, k  # all right singular vectors, anomalib's k


def fre_float64(X, mean, V):
    xc = torch.from_numpy(X).double() - mean.double()
    r = xc - (xc @ V) @ V.T
    return (r * r).sum(dim=1).numpy()


def skdfm_fit(X, level):
    return DFMDetector(pca_level=level, device="cpu").fit(X)


def sklearn_fit(X, level):
    return PCA(n_components=level).fit(X)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["1000x4096", "1000x16384", "4000x4096", "4000x16384"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--level", type=float, default=0.97)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} interleaved runs"
    )
    header = (
        f"{'N':>5} {'D':>6} {'k':>5} {'skdfm s':>8} {'anomalib s':>10} "
        f"{'sklearn s':>9} {'anomalib/skdfm':>14} {'sklearn/skdfm':>13} "
        f"{'max rel diff':>12}"
    )
    print(header)
    for size in args.sizes:
        n, d = (int(v) for v in size.split("x"))
        X = make_features(n + 200, d, seed=n + d)
        X_train, X_test = X[:n], X[n:]
        times = {"skdfm": [], "anomalib": [], "sklearn": []}
        for _ in range(args.repeats):
            t, det = timed(skdfm_fit, X_train, args.level)
            times["skdfm"].append(t)
            t, (mean, V_all, _) = timed(anomalib_style_fit, X_train, args.level)
            times["anomalib"].append(t)
            t, _ = timed(sklearn_fit, X_train, args.level)
            times["sklearn"].append(t)
        k = det.n_components_
        reference = fre_float64(X_test, mean, V_all[:, :k])
        diff = np.max(np.abs(-det.score_samples(X_test) / reference - 1.0))
        med = {name: statistics.median(v) for name, v in times.items()}
        print(
            f"{n:>5} {d:>6} {k:>5} {med['skdfm']:>8.2f} {med['anomalib']:>10.2f} "
            f"{med['sklearn']:>9.2f} {med['anomalib'] / med['skdfm']:>14.1f} "
            f"{med['sklearn'] / med['skdfm']:>13.1f} {diff:>12.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
