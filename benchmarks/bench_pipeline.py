"""End to end: images/s of a skdfm Pipeline, anomalib's path and the bare backbone.

For each backbone (layer3, pooling 4, 256 px input, anomalib's defaults), on the same
PNG files (``--file-size`` px parts from ``make_defect_images``, written to a
temporary folder), in one process, interleaved, median of ``--repeats``:

- ``skdfm``: ``Pipeline(DeepFeatureTransformer(...), DFMDetector(pca_level=k))``
  with skdfm's defaults (``channels_last=True``): ``fit`` on the training files,
  ``score_samples`` on the test files (decoding, resizing, backbone, pooling, PCA,
  scores: everything);
- ``anomalib``: anomalib's path reproduced without anomalib: each image decoded with
  Pillow and transformed on its own (``to_image``, ``to_dtype(scale=True)``,
  ``Resize(256, antialias=True)``, ``Normalize``), batches of 32, the same timm
  ``features_only`` backbone in NCHW float32, ``avg_pool2d``, float64 SVD of the
  centred features, FRE with two GEMMs; k is anomalib's rule, and skdfm is given
  that same k so the scores can be compared;
- ``bare``: the truncated backbone alone (same weights, batch size, memory format and
  precision as skdfm) on already decoded, resized and normalised batches of the same
  images: the compute floor.

Each (method, repeat) runs in a fresh process after a warm-up: skdfm tunes glibc malloc
for the whole process on its first CPU transform, and the anomalib reference must run
with glibc's defaults (``SKDFM_KEEP_FREED_MEMORY=0`` in its process), as anomalib
does. Prints images/s of fit + score, the ratios skdfm / anomalib and skdfm / bare,
and the largest relative difference between skdfm's and anomalib's scores. With
``--precision bfloat16`` (or ``float16`` on a GPU) skdfm and bare run in that
precision, anomalib in float32, and the image AUROC of skdfm on the demo data set
(``skdfm demo``'s images and backbone) is printed for float32 and that precision.

    python benchmarks/bench_pipeline.py
    python benchmarks/bench_pipeline.py --backbones resnet18 --images 32 --repeats 3
    python benchmarks/bench_pipeline.py --device cuda --precision float16
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.pipeline import Pipeline
from torchvision.transforms import v2

from skdfm import DeepFeatureTransformer, DFMDetector, image_auroc, make_defect_images
from skdfm._imaging.allocator import keep_freed_memory

SIZE = 256


def write_files(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    images, _, _ = make_defect_images(
        n_normal=n, n_anomalous=0, image_size=size, random_state=seed
    )
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{seed}_{i:04d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


class AnomalibPath:
    """anomalib's DFM, reproduced from its description (see module docstring)."""

    def __init__(self, backbone: torch.nn.Module, mean, std, pool: int, device):
        self.model = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
        self.pool, self.device = pool, device
        self.transform = v2.Compose(
            [
                v2.Resize((SIZE, SIZE), antialias=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )

    def prepare(self, path) -> torch.Tensor:
        """One image: decoded, to float in [0, 1], resized, normalised (C, H, W)."""
        with Image.open(path) as image:
            x = v2.functional.to_image(image.convert("RGB"))
        return self.transform(v2.functional.to_dtype(x, torch.float32, scale=True))

    def features(self, paths):
        rows = []
        with torch.inference_mode():
            for start in range(0, len(paths), 32):
                batch = [self.prepare(path) for path in paths[start : start + 32]]
                x = torch.stack(batch).to(self.device)
                f = F.avg_pool2d(self.model(x)[0], self.pool)
                rows.append(f.flatten(1))
        return torch.cat(rows)

    def fit(self, paths, level=0.97):
        X = self.features(paths)
        self.mean = X.mean(dim=0)
        _, sig, v_h = torch.linalg.svd((X - self.mean).double(), full_matrices=False)
        ratios = torch.cumsum(sig * sig, dim=0) / torch.sum(sig * sig)
        self.k = int(torch.nonzero(ratios >= level)[0])
        self.V = v_h[: self.k].T.float()
        return self

    def score(self, paths):
        x = self.features(paths) - self.mean
        residual = x - (x @ self.V) @ self.V.T
        return torch.sum(residual * residual, dim=1).cpu().numpy()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def demo_auroc(precision: str, device: str) -> float:
    """Image AUROC of skdfm on ``skdfm demo``'s data and backbone (random init)."""
    images, y, _ = make_defect_images(160, 30, image_size=256, shuffle=False)
    normal, defect = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    test = np.r_[normal[100 + 20 :], defect[10:]]
    model = Pipeline(
        [
            (
                "features",
                DeepFeatureTransformer(
                    backbone="resnet18",
                    layer="layer2",
                    pooling_kernel_size=2,
                    pretrained=False,
                    random_state=0,
                    device=device,
                    precision=precision,
                ),
            ),
            ("dfm", DFMDetector(device=device)),
        ]
    ).fit(images[normal[:100]])
    return image_auroc(y[test], model.score_samples(images[test]))


def _child(method, name, folder, k, args) -> dict:
    """One timed fit + score of one method, in this (fresh) process."""
    device = torch.device(args.device)
    train = sorted(Path(folder).glob("1_*.png"))
    test = sorted(Path(folder).glob("2_*.png"))
    transformer = DeepFeatureTransformer(
        backbone=name,
        layer="layer3",
        pretrained=False,
        random_state=0,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        output="torch" if device.type == "cuda" else "numpy",
    ).fit(train[:1])
    anomalib = AnomalibPath(
        transformer.backbone_,
        transformer.image_mean_,
        transformer.image_std_,
        transformer.pooling_kernel_size,
        device,
    )
    if method == "anomalib":
        anomalib.features(train[:2])  # warm-up
        start = time.perf_counter()
        anomalib.fit(train)
        scores = anomalib.score(test)
        sync(device)
        return dict(seconds=time.perf_counter() - start, k=anomalib.k, scores=scores)
    if method == "skdfm":
        transformer.transform(train[:2])  # warm-up
        start = time.perf_counter()
        model = Pipeline([("features", transformer), ("dfm", DFMDetector(pca_level=k))])
        model.fit(train)
        scores = -model.score_samples(test)
        sync(device)
        return dict(seconds=time.perf_counter() - start, scores=scores)
    # bare: the truncated backbone on decoded, resized, normalised batches
    keep_freed_memory()  # as skdfm runs it
    prepared = [anomalib.prepare(path).to(device) for path in train + test]
    batches = [
        torch.stack(prepared[i : i + args.batch_size]).contiguous(
            memory_format=torch.channels_last
        )
        for i in range(0, len(prepared), args.batch_size)
    ]
    dtype = getattr(torch, args.precision)
    autocast = dict(device_type=device.type, dtype=dtype)
    with (
        torch.inference_mode(),
        torch.autocast(**autocast, enabled=dtype != torch.float32),
    ):
        model = transformer.backbone_
        model(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for x in batches:
            model(x)
        sync(device)
    return dict(seconds=time.perf_counter() - start)


def _spawn(method, name, folder, k, args, tmp) -> dict:
    out = os.path.join(tmp, f"{method}.pkl")
    env = dict(os.environ)
    if method == "anomalib":  # glibc's defaults, as anomalib runs
        env["SKDFM_KEEP_FREED_MEMORY"] = "0"
    command = [sys.executable, __file__, "--child", method, name, folder, str(k), out]
    command += ["--batch-size", str(args.batch_size), "--device", args.device]
    command += ["--precision", args.precision]
    subprocess.run(command, check=True, env=env)
    with open(out, "rb") as f:
        return pickle.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--images", type=int, default=48, help="train = test = this")
    parser.add_argument("--file-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", default="float32", choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, name, folder, k, out = args.child
        with open(out, "wb") as f:
            pickle.dump(_child(method, name, folder, int(k), args), f)
        return
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"load average {os.getloadavg()[0]:.2f}; {args.images} train + "
        f"{args.images} test PNGs of {args.file_size} px, batch {args.batch_size}, "
        f"skdfm precision {args.precision}, median of {args.repeats}, each run in "
        "a fresh process"
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), args.images, args.file_size, seed=1)
        write_files(Path(tmp), args.images, args.file_size, seed=2)
        for name in args.backbones:
            times = {"skdfm": [], "anomalib": [], "bare": []}
            results = {}
            for _ in range(args.repeats):
                results["anomalib"] = _spawn("anomalib", name, tmp, 0, args, tmp)
                k = results["anomalib"]["k"]
                for method in times:
                    if method != "anomalib":
                        results[method] = _spawn(method, name, tmp, k, args, tmp)
                    times[method].append(results[method]["seconds"])
            rate = {m: 2 * args.images / statistics.median(v) for m, v in times.items()}
            reference = results["anomalib"]["scores"]
            diff = np.max(np.abs(results["skdfm"]["scores"] / reference - 1))
            print(
                f"{name:>9}: skdfm {rate['skdfm']:6.1f} img/s | anomalib "
                f"{rate['anomalib']:6.1f} img/s | bare backbone {rate['bare']:6.1f} "
                f"img/s | skdfm/anomalib {rate['skdfm'] / rate['anomalib']:.2f}x | "
                f"skdfm/bare {rate['skdfm'] / rate['bare']:.2f} | k {k} | "
                f"max rel score diff {diff:.1e}",
                flush=True,
            )
    if args.precision != "float32":
        fp32 = demo_auroc("float32", args.device)
        reduced = demo_auroc(args.precision, args.device)
        print(
            f"demo data set image AUROC: float32 {fp32:.4f}, {args.precision} "
            f"{reduced:.4f}, difference {reduced - fp32:+.4f}"
        )


if __name__ == "__main__":
    main()
