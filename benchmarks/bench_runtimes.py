"""Scoring speed of exported models against the torch Pipeline, with their accuracy.

On the ``make_defect_images`` demo set (256 px images, the model's input size, so
no resize), for each backbone (random init): the torch Pipeline at float32 and
bfloat16 (autocast), and ``skdfm.ExportedModel`` on each exported format, runtime
and precision. Prints images/s of ``score_samples`` (median of ``--repeats``, the
runs interleaved), the speed ratio to torch float32, the largest score deviation
from torch float32 (relative to the largest score) and image AUROC and its change.

    python benchmarks/bench_runtimes.py
    python benchmarks/bench_runtimes.py --backbones resnet18 --repeats 5

Needs ``pip install -e ".[onnx,openvino]"``.
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
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    ExportedModel,
    export,
    image_auroc,
    make_defect_images,
)

#: (label, format, file suffix, runtime, precision)
EXPORTS = (
    ("onnxruntime float32", "onnx", ".onnx", "onnxruntime", "float32"),
    ("OpenVINO float32 (.onnx)", "onnx", ".onnx", "openvino", "float32"),
    ("OpenVINO float32", "openvino", ".xml", "openvino", "float32"),
    ("OpenVINO float16 weights", "openvino", ".xml", "openvino", "float16"),
    ("OpenVINO bfloat16", "openvino", ".xml", "openvino", "bfloat16"),
    ("onnxruntime int8", "onnx", ".onnx", "onnxruntime", "int8"),
    ("OpenVINO int8", "openvino", ".xml", "openvino", "int8"),
)


def pipeline(backbone, precision="float32"):
    return make_pipeline(
        DeepFeatureTransformer(
            backbone=backbone,
            pretrained=False,
            input_size=256,
            device="cpu",
            random_state=0,
            precision=precision,
        ),
        DFMDetector(device="cpu"),
    )


def run(backbone, train, test, y, calibration, folder, repeats):
    reference_model = pipeline(backbone).fit(train)
    bf16_model = (
        clone(reference_model)
        .set_params(deepfeaturetransformer__precision="bfloat16")
        .fit(train)
    )
    candidates = {"torch float32": reference_model, "torch bfloat16": bf16_model}
    for label, fmt, suffix, runtime, precision in EXPORTS:
        path = Path(folder) / f"{backbone}-{fmt}-{precision}{suffix}"
        if not path.exists():
            export(
                reference_model,
                path,
                format=fmt,
                precision=precision,
                calibration_images=calibration if precision == "int8" else None,
            )
        candidates[label] = ExportedModel(path, runtime=runtime)
    times = {label: [] for label in candidates}
    scores = {}
    for label, model in candidates.items():  # warm up, and the scores
        scores[label] = model.score_samples(test)
    for _ in range(repeats):
        for label, model in candidates.items():
            start = time.perf_counter()
            model.score_samples(test)
            times[label].append(time.perf_counter() - start)
    reference = scores["torch float32"]
    base_speed = len(test) / statistics.median(times["torch float32"])
    base_auroc = image_auroc(y, reference)
    print(f"\n{backbone} (random init), {len(test)} images of 256 px, "
          f"median of {repeats}")  # fmt: skip
    print("| runtime, precision | img/s | x torch fp32 | score deviation | "
          "image AUROC | change |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label in candidates:
        speed = len(test) / statistics.median(times[label])
        deviation = np.abs(scores[label] - reference).max() / np.abs(reference).max()
        auroc = image_auroc(y, scores[label])
        print(
            f"| {label} | {speed:.1f} | {speed / base_speed:.2f} | {deviation:.1e} | "
            f"{auroc:.4f} | {auroc - base_auroc:+.4f} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=64)
    args = parser.parse_args(argv)
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, flags: {cpu_flags()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    n_test_bad = args.n_test // 2
    images, y, _ = make_defect_images(
        60 + args.n_test - n_test_bad, n_test_bad, image_size=256, shuffle=False,
        random_state=0,
    )  # fmt: skip
    train, test, y_test = images[:60], images[60:], y[60:]
    calibration = train[:32]
    with tempfile.TemporaryDirectory() as folder:
        for backbone in args.backbones:
            run(backbone, train, test, y_test, calibration, folder, args.repeats)


if __name__ == "__main__":
    main()
