"""Streaming fit of N = 100 000 rows at D = 16384 in bounded memory.

Rows are made batch by batch (ReLU rows with a power-law spectrum, like pooled CNN
activations: a fixed 2048 x D mixing of decaying latent factors) and fitted with
``skdfm.stream_fit`` (``DFMDetector.partial_fit`` per batch); no more than one batch
is ever in memory. Prints the time of the accumulation, of the eigendecomposition, of
an optional second, scoring pass over the same rows that sets the threshold, k, and
the peak resident memory of the whole process (``ru_maxrss``, including ~0.65 GiB of
imported libraries). The D x D float64 statistics alone are 2 GiB at D = 16384.

    python benchmarks/bench_streaming.py                     # 100 000 x 16384
    python benchmarks/bench_streaming.py --rows 20000 --features 4096 --threshold-pass
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from skdfm import DFMDetector, stream_fit


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


class Timed:
    """Wrap an iterable; record when its first item is asked for and when it ends."""

    def __init__(self, iterable):
        self.iterable, self.start, self.stop = iterable, None, None

    def __iter__(self):
        self.start = time.perf_counter()
        yield from self.iterable
        self.stop = time.perf_counter()


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
    train = Timed(batches(args.rows, args.features, args.batch))
    again = Timed(batches(args.rows, args.features, args.batch))
    start = time.perf_counter()
    det = stream_fit(
        DFMDetector(pca_level=0.97, device="cpu"),
        train,
        threshold_batches=again if args.threshold_pass else None,
    )
    end = time.perf_counter()
    eigen_end = again.start if args.threshold_pass else end
    line = (
        f"n_samples_seen_ {det.n_samples_seen_}, k {det.n_components_}: accumulate "
        f"{train.stop - start:.0f} s, eigendecomposition {eigen_end - train.stop:.0f} s"
    )
    if args.threshold_pass:
        line += f", threshold pass {end - again.start:.0f} s"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{line}; peak resident memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
