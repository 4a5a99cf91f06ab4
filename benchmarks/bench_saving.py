"""Model files: size and time of skdfm.save / skdfm.load against joblib, same run.

For each backbone (random weights: nothing is downloaded; layer3, pooling 4, 256 px),
a fitted Pipeline on 64 generated parts is saved and loaded ``--repeats`` times with
``skdfm.save``/``skdfm.load`` (safetensors + JSON, SHA-256 digest, layout and weight
checks) and with ``joblib.dump``/``joblib.load`` (a pickle, no checks), in a
temporary folder; medians and the ratio skdfm / joblib are printed, and whether the
loaded models score identically.

    python benchmarks/bench_saving.py
    python benchmarks/bench_saving.py --backbones resnet18 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from machine import cpu_flags  # benchmarks/machine.py
from sklearn.pipeline import make_pipeline

import skdfm
from skdfm import DeepFeatureTransformer, DFMDetector, make_defect_images


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, images, repeats: int) -> str:
    model = make_pipeline(
        DeepFeatureTransformer(backbone=name, pretrained=False, device="cpu"),
        DFMDetector(device="cpu"),
    ).fit(images)
    expected = model.score_samples(images[:8])
    with tempfile.TemporaryDirectory() as folder:
        safe, pickle = Path(folder) / "m.skdfm", Path(folder) / "m.joblib"
        t_save = timed(lambda: skdfm.save(model, safe), repeats)
        t_dump = timed(lambda: joblib.dump(model, pickle), repeats)
        t_load = timed(lambda: skdfm.load(safe), repeats)
        t_jload = timed(lambda: joblib.load(pickle), repeats)
        same = np.array_equal(skdfm.load(safe).score_samples(images[:8]), expected)
        return (
            f"{name}: .skdfm {safe.stat().st_size / 1e6:.1f} MB, joblib "
            f"{pickle.stat().st_size / 1e6:.1f} MB; save {t_save:.2f} s vs dump "
            f"{t_dump:.2f} s ({t_save / t_dump:.2f}x); load {t_load:.2f} s vs "
            f"joblib.load {t_jload:.2f} s ({t_load / t_jload:.2f}x); "
            f"identical scores: {same}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}")
    images, _, _ = make_defect_images(64, 0, image_size=256, random_state=0)
    for name in args.backbones:
        print(measure(name, images, args.repeats), flush=True)


if __name__ == "__main__":
    main()
