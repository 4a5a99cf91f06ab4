"""Image scores and layers: image AUROC, pixel AUROC and AUPRO of each option.

Data sets (deterministic, built by this script):

- ``demo``: ``skdfm.make_defect_images`` (woven texture, scratch/crack/stain/hole);
- ``brick``, ``grass``, ``gravel``: MVTec-style folders cut from scikit-image's
  photographs of those textures (``skimage.data``, shipped with the package):
  crops of one photograph, with pasted patches (a rotated piece of the same
  photograph), scratches and stains, and their masks, written as
  ``<set>/train/good``, ``<set>/test/<kind>``, ``<set>/ground_truth/<kind>`` and
  read back with :func:`skdfm.load_mvtec`.

Options, each on the same features (one forward pass per backbone and image):

- ``sum``, ``max``, ``top2``, ``top4``: ``DFMDetector(image_score=...)`` on layer3;
- ``max, blurred``: the image-size map of layer3 blurred with a Gaussian (sigma
  4 px at the 256 px input, anomalib's map blur), then its maximum; its pixel
  metrics use the blurred maps;
- ``l2+l3 sum`` / ``l2+l3 max``: ``layer=["layer2", "layer3"]`` (one pass, one
  grid);
- ``union sum``: ``FeatureUnion`` of a layer2 and a layer3 transformer (two
  passes, each pooled by 4; no common grid, so no maps and no max).

Random-init backbones (pretrained weights cannot be downloaded here), pooling 4,
``pca_level=0.97``, float32. Also prints images/s of the one-pass two-layer
transformer against the two-transformer FeatureUnion (median of ``--repeats``).

    python benchmarks/bench_image_scores.py                 # resnet18 and resnet50
    python benchmarks/bench_image_scores.py --backbones resnet18 --sets demo brick
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
from machine import cpu_flags  # benchmarks/machine.py
from scipy import ndimage
from sklearn.pipeline import FeatureUnion

from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    anomaly_maps,
    aupro,
    image_auroc,
    load_mvtec,
    make_defect_images,
    pixel_auroc,
)
from skdfm._evaluation.textures import TEXTURES, write_texture_set

INPUT_SIZE = 256  # the model resizes every crop to it


# -- data sets -------------------------------------------------------------------


def load_set(root: Path, name: str, seed: int, crop: int):
    """(train images, test images, y, masks) of one data set."""
    if name == "demo":
        images, y, masks = make_defect_images(
            110, 60, image_size=crop, shuffle=False, random_state=seed
        )
        return images[:60], images[60:], y[60:], list(masks[60:])
    folder = write_texture_set(root, name, seed, crop)
    train = load_mvtec(folder, split="train", load_masks=False)
    test = load_mvtec(folder)
    return train.paths, test.paths, test.y, test.masks


# -- features and options -----------------------------------------------------------


def transformer(backbone, layer, **kwargs):
    return DeepFeatureTransformer(
        backbone=backbone,
        layer=layer,
        pretrained=False,
        input_size=INPUT_SIZE,
        pooling_kernel_size=4,
        device="cpu",
        random_state=0,
        **kwargs,
    )


def layer3_part(features, transformer_two):
    """The layer3 block of two-layer rows, with its grid: layer3's own features."""
    channels, rows, cols = transformer_two.feature_shape_
    _, layer3_channels = transformer_two.backbone_.feature_info.channels()
    start = (channels - layer3_channels) * rows * cols
    return np.ascontiguousarray(features[:, start:]), (layer3_channels, rows, cols)


def evaluate(train, test, y, masks, shape, pca_level, image_score="sum", blur=False):
    det = DFMDetector(
        pca_level=pca_level, image_score=image_score, feature_shape=shape, device="cpu"
    ).fit(train)
    size = masks[0].shape
    result = anomaly_maps(det, test, size=size)
    scores = det.score_samples(test)
    assert np.array_equal(scores, result.score_samples)
    maps = result.maps
    if blur:  # anomalib's sigma=4 at input size, in pixels of the image
        sigma = 4.0 * size[0] / INPUT_SIZE
        maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
        scores = -maps.reshape(len(maps), -1).max(1)
    return (
        image_auroc(y, scores),
        pixel_auroc(masks, maps),
        aupro(masks, maps),
        scores,
    )


def run_set(backbone, name, data, pca_level):
    train_images, test_images, y, masks = data
    two = transformer(backbone, ["layer2", "layer3"]).fit(train_images)
    train_two, test_two = two.transform(train_images), two.transform(test_images)
    train3, shape3 = layer3_part(train_two, two)
    test3, _ = layer3_part(test_two, two)
    rows = {}
    for label, score in (("sum", "sum"), ("max", "max"), ("top2", 2), ("top4", 4)):
        rows[label] = evaluate(train3, test3, y, masks, shape3, pca_level, score)
    rows["max, blurred"] = evaluate(
        train3, test3, y, masks, shape3, pca_level, "sum", blur=True
    )
    shape2 = two.feature_shape_
    rows["l2+l3 sum"] = evaluate(train_two, test_two, y, masks, shape2, pca_level)
    rows["l2+l3 max"] = evaluate(
        train_two, test_two, y, masks, shape2, pca_level, "max"
    )
    union = FeatureUnion(
        [
            ("l2", transformer(backbone, "layer2")),
            ("l3", transformer(backbone, "layer3")),
        ]
    ).fit(train_images)
    det = DFMDetector(pca_level=pca_level, device="cpu").fit(
        union.transform(train_images)
    )
    scores = det.score_samples(union.transform(test_images))
    rows["union sum"] = (image_auroc(y, scores), float("nan"), float("nan"), scores)
    return rows, np.asarray(y)


#: (option, reference) pairs whose image AUROC difference gets a confidence interval
COMPARISONS = (
    ("max", "sum"),
    ("top2", "sum"),
    ("top4", "sum"),
    ("max, blurred", "max"),
    ("l2+l3 sum", "sum"),
    ("l2+l3 max", "l2+l3 sum"),
    ("l2+l3 sum", "union sum"),
)


def paired_difference(y, scores, reference, n_boot=2000, seed=0):
    """AUROC(scores) - AUROC(reference) and its 95 % bootstrap interval (good and
    defective images resampled separately, both scores on the same draw)."""
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    labels = np.r_[np.ones(len(good)), -np.ones(len(bad))]
    draws = []
    for _ in range(n_boot):
        index = np.r_[rng.choice(good, len(good)), rng.choice(bad, len(bad))]
        draws.append(
            image_auroc(labels, scores[index]) - image_auroc(labels, reference[index])
        )
    low, high = np.percentile(draws, [2.5, 97.5])
    return image_auroc(y, scores) - image_auroc(y, reference), low, high


def time_layers(backbone, images, repeats):
    """images/s of one two-layer transformer and of a two-transformer union."""
    two = transformer(backbone, ["layer2", "layer3"]).fit(images)
    union = FeatureUnion(
        [
            ("l2", transformer(backbone, "layer2")),
            ("l3", transformer(backbone, "layer3")),
        ]
    ).fit(images)
    times = {"one pass": [], "FeatureUnion": []}
    for _ in range(repeats):  # interleaved
        for label, model in (("one pass", two), ("FeatureUnion", union)):
            start = time.perf_counter()
            model.transform(images)
            times[label].append(time.perf_counter() - start)
    return {label: len(images) / statistics.median(t) for label, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sets", nargs="+", default=["demo", *TEXTURES])
    parser.add_argument("--pca-level", type=float, default=0.97)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--crops",
        type=int,
        nargs="+",
        default=[128, 256],
        help="crop sizes of the photographs (defects keep their size in pixels)",
    )
    parser.add_argument("--data", help="keep the texture folders here")
    args = parser.parse_args(argv)
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, flags: {cpu_flags()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data or scratch)
        data = {
            (name, crop): load_set(root, name, args.seed, crop)
            for crop in args.crops
            for name in args.sets
        }
        for backbone in args.backbones:
            for crop in args.crops:
                results = {
                    name: run_set(backbone, name, data[name, crop], args.pca_level)
                    for name in args.sets
                }
                print_table(backbone, crop, args, results)
            images = data[args.sets[0], args.crops[0]][0][:32]
            speed = time_layers(backbone, images, args.repeats)
            print(
                f"\n{backbone} layer2+layer3 features of {len(images)} images: one "
                f"pass {speed['one pass']:.1f} img/s, FeatureUnion of two "
                f"transformers {speed['FeatureUnion']:.1f} img/s "
                f"({speed['one pass'] / speed['FeatureUnion']:.2f}x)"
            )


def print_table(backbone, crop, args, results):
    print(
        f"\n{backbone} (random init), {crop} px images resized to {INPUT_SIZE}, "
        f"layer3 unless noted, pooling 4, pca_level={args.pca_level}: "
        "image AUROC / pixel AUROC / AUPRO"
    )
    print("| option | " + " | ".join(args.sets) + " |")
    print("|---" * (len(args.sets) + 1) + "|")
    for option in results[args.sets[0]][0]:
        cells = []
        for name in args.sets:
            image, pixel, pro, _ = results[name][0][option]
            if np.isnan(pixel):
                cells.append(f"{image:.3f} / n/a / n/a")
            else:
                cells.append(f"{image:.3f} / {pixel:.3f} / {pro:.3f}")
        print(f"| {option} | " + " | ".join(cells) + " |")
    print("\nimage AUROC difference [95 % paired bootstrap interval]")
    print("| difference | " + " | ".join(args.sets) + " |")
    print("|---" * (len(args.sets) + 1) + "|")
    for option, reference in COMPARISONS:
        cells = []
        for name in args.sets:
            rows, y = results[name]
            diff, low, high = paired_difference(y, rows[option][3], rows[reference][3])
            cells.append(f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]")
        print(f"| {option} - {reference} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
