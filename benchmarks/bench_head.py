"""Head fit/score: DFMDetector against anomalib's method and scikit-learn's PCA(0.97).

Methods, each fitted on the same realistic feature rows (pooled resnet18 layer3
features of generated parts, see ``features.py``):

- ``skdfm``: ``DFMDetector(pca_level=0.97, device="cpu")``;
- ``anomalib``: anomalib's DFM head re-implemented from its description (not its
  code): float32 mean, float64 full SVD of the centred N x D matrix
  (``torch.linalg.svd(full_matrices=False)``), anomalib's k rule, FRE as
  ``||x - mu - (x - mu) V V^T||^2`` with float32 V;
- ``sk-full`` / ``sk-cov``: ``sklearn.decomposition.PCA(0.97, svd_solver="full")``
  and ``svd_solver="covariance_eigh"``, FRE from their components in float64.

Every (method, size, repeat) runs in a fresh subprocess, so the peak memory it
reports is that run's alone: "extra GiB" is the peak resident memory minus the
resident memory once the features are loaded. Repeats are interleaved and medians
are printed, with each reference's time divided by skdfm's (measured in this run).
"max rel diff" is the largest relative difference, over 256 held-out rows (half of
them defective), between a method's FRE and the FRE computed in float64 from
anomalib's SVD at skdfm's k (anomalib itself keeps one component fewer; its own
scores at its own k are not comparable). Runs whose estimated time or memory is out
of reach of this machine are skipped and say so.

    python benchmarks/bench_head.py                      # the full grid (~40 min)
    python benchmarks/bench_head.py --sizes 4096x16384 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = ("skdfm", "anomalib", "sk-full", "sk-cov")
SIZES = [f"{n}x{d}" for d in (4096, 16384) for n in (256, 1024, 4096, 16384)]
LEVEL = 0.97
GIB = 2**30


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


def _load(n: int, d: int):
    import features

    train = features.feature_rows(n, d)
    offset, path = train.offset, train.filename
    del train
    X = np.fromfile(path, dtype=np.float32, count=n * d, offset=offset).reshape(n, d)
    return X, features.test_rows(d)


def _fre64(X, mean, V):
    xc = X.astype(np.float64) - mean
    z = xc @ V
    return np.einsum("ij,ij->i", xc, xc) - np.einsum("ij,ij->i", z, z)


def _run_child(method: str, n: int, d: int, k_ref: int, out: str) -> None:
    import torch

    X, X_test = _load(n, d)
    base = _rss_bytes()
    result = {}
    if method == "skdfm":
        from skdfm import DFMDetector

        start = time.perf_counter()
        det = DFMDetector(pca_level=LEVEL, device="cpu").fit(X)
        result["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = -det.score_samples(X_test)
        result["score_s"] = time.perf_counter() - start
        result["k"] = int(det.n_components_)
    elif method == "anomalib":
        start = time.perf_counter()
        features = torch.from_numpy(X)
        mean = features.mean(dim=0)
        _, sig, v_h = torch.linalg.svd((features - mean).double(), full_matrices=False)
        ratios = torch.cumsum(sig * sig, dim=0) / torch.sum(sig * sig)
        k = int(torch.nonzero(ratios >= LEVEL)[0])
        V = v_h[:k].T.float()
        result["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        x = torch.from_numpy(X_test) - mean
        residual = x - (x @ V) @ V.T
        torch.sum(residual * residual, dim=1)
        result["score_s"] = time.perf_counter() - start
        result["k"] = k
        # The reference: float64 FRE from this SVD at skdfm's k.
        reference = _fre64(X_test, mean.double().numpy(), v_h[:k_ref].T.numpy())
        np.save(out + ".ref.npy", reference)
        scores = reference
    else:
        from sklearn.decomposition import PCA

        solver = {"sk-full": "full", "sk-cov": "covariance_eigh"}[method]
        start = time.perf_counter()
        pca = PCA(n_components=LEVEL, svd_solver=solver).fit(X)
        result["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        residual = X_test - pca.inverse_transform(pca.transform(X_test))
        np.einsum("ij,ij->i", residual, residual)
        result["score_s"] = time.perf_counter() - start
        result["k"] = int(pca.n_components_)
        scores = _fre64(X_test, pca.mean_, pca.components_.T.astype(np.float64))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["extra_gib"] = max(0, peak - base) / GIB
    np.save(out + ".scores.npy", scores)
    with open(out + ".json", "w") as f:
        json.dump(result, f)


def _skip_reason(method: str, n: int, d: int) -> str | None:
    """Runs this 2-core, 24 GiB machine cannot finish in reasonable time or memory."""
    m, big = min(n, d), max(n, d)
    if method in ("anomalib", "sk-full"):
        flops = 6 * big * m * m + 20 * m**3  # full SVD of an N x D matrix
        if flops > 2e13 or 9 * n * d * 4 > 16 * GIB:
            return f"~{flops / 3e10 / 60:.0f} min"
    if method == "sk-cov" and d > 4096:
        return "D x D eigh, ~10 min"
    return None


def _spawn(method, n, d, k_ref, tmp):
    out = os.path.join(tmp, f"{method}-{n}-{d}")
    subprocess.run(
        [sys.executable, __file__, "--child", method, str(n), str(d), str(k_ref), out],
        check=True,
    )
    with open(out + ".json") as f:
        result = json.load(f)
    result["scores"] = np.load(out + ".scores.npy")
    if os.path.exists(out + ".ref.npy"):
        result["reference"] = np.load(out + ".ref.npy")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, n, d, k_ref, out = args.child
        _run_child(method, int(n), int(d), int(k_ref), out)
        return

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}; median of {args.repeats} "
        "interleaved runs, each in a fresh process"
    )
    print(
        f"{'N':>6} {'D':>6} {'method':>8} {'k':>5} {'fit s':>8} {'score ms':>8} "
        f"{'extra GiB':>9} {'fit vs skdfm':>12} {'max rel diff':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n, d = (int(v) for v in size.split("x"))
            _load(n, d)  # make and cache the features before timing anything
            runs = {m: [] for m in args.methods}
            k_ref = 0
            for _ in range(args.repeats):
                for method in args.methods:
                    if _skip_reason(method, n, d) or (method != "skdfm" and not k_ref):
                        continue
                    runs[method].append(_spawn(method, n, d, k_ref, tmp))
                    if method == "skdfm":
                        k_ref = runs[method][-1]["k"]
            reference = next(
                (r[0]["reference"] for r in runs.values() if r and "reference" in r[0]),
                None,
            )
            skdfm_fit = (
                statistics.median(r["fit_s"] for r in runs["skdfm"])
                if runs.get("skdfm")
                else float("nan")
            )
            for method in args.methods:
                if not runs[method]:
                    reason = _skip_reason(method, n, d) or "no skdfm run"
                    print(f"{n:>6} {d:>6} {method:>8}  skipped ({reason})")
                    continue
                fit = statistics.median(r["fit_s"] for r in runs[method])
                score = statistics.median(r["score_s"] for r in runs[method])
                extra = statistics.median(r["extra_gib"] for r in runs[method])
                diff = (
                    np.max(np.abs(runs[method][0]["scores"] / reference - 1))
                    if reference is not None
                    else float("nan")
                )
                print(
                    f"{n:>6} {d:>6} {method:>8} {runs[method][0]['k']:>5} "
                    f"{fit:>8.2f} {score * 1e3:>8.1f} {extra:>9.2f} "
                    f"{fit / skdfm_fit:>11.1f}x {diff:>12.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
