"""End to end: images/s of a skdfm Pipeline, anomalib's path and the bare backbone.

For each backbone (layer3, pooling 4, 256 px input, anomalib's defaults), on the same
PNG files (``--file-size`` px parts from ``make_defect_images``, written to a
temporary folder), in one process, interleaved, median of ``--repeats``:

- ``skdfm``: ``Pipeline(DeepFeatureTransformer(channels_last=True, ...),
  DFMDetector(pca_level=k))``: ``fit`` on the training files, ``score_samples`` on the
  test files (decoding, resizing, backbone, pooling, PCA, scores: everything);
- ``anomalib``: anomalib's path reproduced without anomalib: each image decoded with
  Pillow and transformed on its own (``to_image``, ``to_dtype(scale=True)``,
  ``Resize(256, antialias=True)``, ``Normalize``), batches of 32, the same timm
  ``features_only`` backbone in NCHW float32, ``avg_pool2d``, float64 SVD of the
  centred features, FRE with two GEMMs; k is anomalib's rule, and skdfm is given
  that same k so the scores can be compared;
- ``bare``: the truncated backbone alone (same weights, batch size, memory format and
  precision as skdfm) on already decoded, resized and normalised batches of the same
  images: the compute floor.

Prints images/s of fit + score, the ratios skdfm / anomalib and skdfm / bare, and the
largest relative difference between skdfm's and anomalib's scores. With
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
import statistics
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
                    channels_last=True,
                ),
            ),
            ("dfm", DFMDetector(device=device)),
        ]
    ).fit(images[normal[:100]])
    return image_auroc(y[test], model.score_samples(images[test]))


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
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"load average {os.getloadavg()[0]:.2f}; {args.images} train + "
        f"{args.images} test PNGs of {args.file_size} px, batch {args.batch_size}, "
        f"skdfm precision {args.precision}, median of {args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        train = write_files(Path(tmp), args.images, args.file_size, seed=1)
        test = write_files(Path(tmp), args.images, args.file_size, seed=2)
        for name in args.backbones:
            transformer = DeepFeatureTransformer(
                backbone=name,
                layer="layer3",
                pretrained=False,
                random_state=0,
                batch_size=args.batch_size,
                device=args.device,
                channels_last=True,
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
            anomalib.fit(train)  # warm-up, and its k for skdfm
            skdfm = Pipeline(
                [("features", transformer), ("dfm", DFMDetector(pca_level=anomalib.k))]
            )
            prepared = [anomalib.prepare(path).to(device) for path in train + test]
            bare_batches = [
                torch.stack(prepared[i : i + args.batch_size]).contiguous(
                    memory_format=torch.channels_last
                )
                for i in range(0, len(prepared), args.batch_size)
            ]

            def run_skdfm(skdfm=skdfm):
                skdfm.fit(train)
                scores = skdfm.score_samples(test)
                sync(device)
                return -scores

            def run_anomalib(anomalib=anomalib):
                anomalib.fit(train)
                scores = anomalib.score(test)
                sync(device)
                return scores

            def run_bare(
                model=transformer.backbone_,
                batches=bare_batches,
            ):
                dtype = getattr(torch, args.precision)
                with (
                    torch.inference_mode(),
                    torch.autocast(
                        device.type, dtype=dtype, enabled=args.precision != "float32"
                    ),
                ):
                    for x in batches:
                        model(x)
                sync(device)

            methods = {"skdfm": run_skdfm, "anomalib": run_anomalib, "bare": run_bare}
            times = {key: [] for key in methods}
            results = {}
            for _ in range(args.repeats):
                for key, method in methods.items():
                    start = time.perf_counter()
                    results[key] = method()
                    times[key].append(time.perf_counter() - start)
            rate = {k: 2 * args.images / statistics.median(v) for k, v in times.items()}
            diff = np.max(np.abs(results["skdfm"] / results["anomalib"] - 1))
            print(
                f"{name:>9}: skdfm {rate['skdfm']:6.1f} img/s | anomalib "
                f"{rate['anomalib']:6.1f} img/s | bare backbone {rate['bare']:6.1f} "
                f"img/s | skdfm/anomalib {rate['skdfm'] / rate['anomalib']:.2f}x | "
                f"skdfm/bare {rate['skdfm'] / rate['bare']:.2f} | k {anomalib.k} | "
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
