"""Streaming fit of N = 100 000 rows at D = 16384 in bounded memory.

Rows are made batch by batch (ReLU rows with a power-law spectrum, like pooled CNN
activations: a fixed 2048 x D mixing of decaying latent factors) and merged with
``DFMDetector.partial_fit``; no more than one batch is ever in memory. Prints the
time of the accumulation, of the eigendecomposition (on first use), of an optional
second, scoring pass that sets the threshold, k, and the peak resident memory of the
process (``ru_maxrss``). The D x D float64 statistics alone are 2 GiB at D = 16384.

    python benchmarks/bench_streaming.py                     # 100 000 x 16384
    python benchmarks/bench_streaming.py --rows 20000 --features 4096 --threshold-pass
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from skdfm import DFMDetector


def batches(n_rows, n_features, batch, seed=0, latent=2048):
    rng = np.random.default_rng(seed)
    mixing = torch.from_numpy(
        (rng.normal(size=(latent, n_features)) / np.sqrt(latent)).astype(np.float32)
    )
    scale = torch.arange(1, latent + 1, dtype=torch.float32) ** -0.5
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n_rows, batch):
        rows = min(batch, n_rows - start)
        z = torch.randn(rows, latent, generator=gen) * scale
        yield torch.relu(z @ mixing + 0.05)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--threshold-pass", action="store_true")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.rows} rows x {args.features} features, batches of {args.batch}"
    )
    det = DFMDetector(pca_level=0.97, device="cpu")
    start = time.perf_counter()
    for X in batches(args.rows, args.features, args.batch):
        det.partial_fit(X)
    accumulate = time.perf_counter() - start
    start = time.perf_counter()
    k = det.n_components_  # the components are computed on first use
    eigen = time.perf_counter() - start
    line = (
        f"n_samples_seen_ {det.n_samples_seen_}, k {k}: accumulate {accumulate:.0f} s, "
        f"eigendecomposition {eigen:.0f} s"
    )
    if args.threshold_pass:
        start = time.perf_counter()
        scores = np.concatenate(
            [det.score_samples(X) for X in batches(args.rows, args.features, 4000)]
        )
        det._set_threshold(scores, det.contamination, "contamination")
        line += f", threshold pass {time.perf_counter() - start:.0f} s"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{line}; peak resident memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
