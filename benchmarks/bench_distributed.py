"""One process against a 2-worker Dask LocalCluster: fit and score, and what moves.

Three measurements, each printed as a ratio to a reference taken in the same run:

1. **Images/s of fit and score** on N image files (random-weight resnet18, layer3,
   pooling 2 at 224 px by default): ``stream_fit`` and ``score_samples`` in this
   process against ``skdfm.distributed.fit`` and ``score(...).compute()`` on a
   ``LocalCluster(n_workers=2, threads_per_worker=1)`` of worker processes on
   loopback. The workers run one torch thread each (Dask sets OMP_NUM_THREADS=1 in
   its workers), the one process runs torch's default (every core): on a 2-core
   machine both use the same 2 cores, so the ratio shows Dask's overhead, not a
   gain; the gain comes from more machines.
2. **Bytes per reduction**: the statistics one partition sends (its rows while it
   has no more images than features, else the packed D x D lower triangle), and
   their total over the tree; the D x D sizes of common backbones.
3. **The small-data route** (``stream_fit`` on few images with long rows): N = 60
   rows at D = 8192, ``fit`` (Gram route), ``stream_fit`` (now the same route) and
   ``fit(solver="covariance")``, the D x D eigenproblem ``stream_fit`` used to
   solve whatever the number of rows.

Run alone (the machine is shared: nothing else heavy at the same time):

    pip install -e ".[dask]"
    python benchmarks/bench_distributed.py                  # ~10 min on 2 cores
    python benchmarks/bench_distributed.py --images 64 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time

import numpy as np
import torch
from machine import cpu_flags
from PIL import Image
from sklearn.pipeline import make_pipeline

from skdfm import DeepFeatureTransformer, DFMDetector, make_defect_images, stream_fit


def pipeline(args):
    return make_pipeline(
        DeepFeatureTransformer(
            backbone="resnet18",
            pretrained=False,
            layer=args.layer,
            input_size=args.size,
            pooling_kernel_size=2,
            device="cpu",
            random_state=0,
            batch_size=16,
            progress=False,
        ),
        DFMDetector(pca_level=0.97, device="cpu"),
    )


def median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def write_images(folder, n, size):
    images, _, _ = make_defect_images(n, 0, image_size=size, random_state=0)
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(folder, f"{i:05d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-small-data", action="store_true")
    parser.add_argument("--only-small-data", action="store_true")
    args = parser.parse_args()

    import dask
    import distributed

    from skdfm.distributed import fit, image_bag, score

    print(
        f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads here); dask {dask.__version__}"
    )
    if not args.only_small_data:
        images_and_bytes(args, fit, image_bag, score, distributed)
    if not args.skip_small_data:
        small_data()


def images_and_bytes(args, fit, image_bag, score, distributed):
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(folder, args.images, args.size)
        print(
            f"\n1. {args.images} PNG files, {args.size} px, resnet18 {args.layer} "
            f"(random weights), {args.partitions} partitions, median of "
            f"{args.repeats}"
        )
        local_fit, fits, model = median_time(
            lambda: stream_fit(pipeline(args), paths), args.repeats
        )
        local_score, scores, want = median_time(
            lambda: model.score_samples(paths), args.repeats
        )
        model[-1].set_threshold(want, contamination=0.1)  # score() labels too
        d = model[-1].n_features_in_
        with (
            distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            client.run(lambda: __import__("skdfm.distributed"))  # warm imports
            bag = image_bag(paths, npartitions=args.partitions)
            cluster_fit, cfits, remote = median_time(
                lambda: fit(pipeline(args), bag, client=client), args.repeats
            )
            cluster_score, cscores, table = median_time(
                lambda: client.compute(score(model, bag, client=client)).result(),
                args.repeats,
            )
        got = -table["anomaly_score"].to_numpy()
        deviation = float(np.max(np.abs(got - want) / np.abs(want)))
        same = remote.score_samples(paths[:16])
        fit_deviation = float(np.max(np.abs(same - want[:16]) / np.abs(want[:16])))
        n = args.images
        print(f"   D = {d}, solver {remote[-1].solver_}")
        print(
            f"   fit   one process {n / local_fit:6.1f} img/s  2 workers "
            f"{n / cluster_fit:6.1f} img/s  ratio {local_fit / cluster_fit:.2f}x  "
            f"(s: {[round(t, 1) for t in fits]} vs {[round(t, 1) for t in cfits]})"
        )
        print(
            f"   score one process {n / local_score:6.1f} img/s  2 workers "
            f"{n / cluster_score:6.1f} img/s  ratio {local_score / cluster_score:.2f}x"
            f"  (s: {[round(t, 1) for t in scores]} vs "
            f"{[round(t, 1) for t in cscores]})"
        )
        print(
            f"   largest relative deviation: scores {deviation:.1e}, "
            f"distributed fit vs one-process fit {fit_deviation:.1e}"
        )

        print("\n2. bytes per reduction")
        det = DFMDetector(device="cpu")
        rows = model[0].transform(paths[: n // args.partitions])
        part = det.partial_fit(rows).streaming_statistics()
        print(
            f"   one partition of {len(rows)} images at D = {d}: {part.route} route, "
            f"{part.nbytes / 2**20:.1f} MiB ({len(pickle.dumps(part)) / 2**20:.1f} "
            f"MiB pickled); the tree of {args.partitions} partitions moves at most "
            f"{args.partitions - 1} of these"
        )
        for name, dim in [("resnet18 layer3 (256 px, pool 4)", 4096),
                          ("wide_resnet50 / resnet50 layer2 (pool 8)", 8192),
                          ("resnet50 layer3 (256 px, pool 4)", 16384)]:  # fmt: skip
            packed = 8 * (dim * (dim + 1) // 2 + dim)
            print(
                f"   {name}: D = {dim}, D x D float64 {8 * dim * dim / 2**30:.2f} GiB,"
                f" packed lower triangle {packed / 2**30:.2f} GiB"
            )


def small_data():
    print(
        "\n3. small data: N = 60 rows, D = 8192 (median of 3; the covariance "
        "route once)"
    )
    rng = np.random.default_rng(0)
    X = np.maximum(
        rng.normal(size=(60, 64)) @ rng.normal(size=(64, 8192)) / 8 + 0.05, 0
    ).astype(np.float32)
    timings = {}
    for name, run, repeats in [
        ("fit (Gram)", lambda: DFMDetector(device="cpu").fit(X), 3),
        (
            "stream_fit, 6 batches",
            lambda: stream_fit(DFMDetector(device="cpu"), np.array_split(X, 6)),
            3,
        ),
        (
            "fit(solver='covariance') (old stream_fit route)",
            lambda: DFMDetector(device="cpu", solver="covariance").fit(X),
            1,
        ),
    ]:
        timings[name], _, det = median_time(run, repeats)
        print(f"   {name:50s} {timings[name]:7.3f} s  solver {det.solver_}")
    base = timings["fit (Gram)"]
    for name, seconds in timings.items():
        print(f"   {name:50s} {seconds / base:7.1f}x fit")


if __name__ == "__main__":
    main()
