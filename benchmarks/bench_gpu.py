"""What skdfm does on a CUDA device: speed per precision, agreement with the CPU.

Run by ``benchmarks/gpu_check.sh`` on a lent GPU machine (random weights: nothing is
downloaded). In one process, for each backbone (layer3, pooling 4, 256 px input,
anomalib's defaults):

- ``transform``: images/s of ``DeepFeatureTransformer.transform`` on uint8 images
  already in memory (resize, normalise, backbone, pooling), float32 and each
  ``--precisions`` autocast, median of ``--repeats``, with the ratio to float32 on
  the same device;
- ``head``: seconds of ``DFMDetector.fit`` on the fitted features, on the device and
  on the CPU (ratio CPU / device), and the largest relative difference of their
  scores;
- ``scores``: the largest relative difference between the device Pipeline's scores
  and the same Pipeline moved to the CPU (float32), and the image AUROC of each
  precision on ``make_defect_images`` parts against float32's.

``--device cpu --quick`` runs the same code on a CPU in seconds (to check the script
itself where no GPU is lent).

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import numpy as np
import torch
from sklearn.pipeline import make_pipeline

from skdfm import DeepFeatureTransformer, DFMDetector, image_auroc, make_defect_images
from skdfm._tools.model import move_model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def max_relative(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def describe(device: str) -> str:
    torch_info = f"torch {torch.__version__}"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        memory = props.total_memory / 2**30
        cuda = f"CUDA {torch.version.cuda}"
        return f"{props.name}, {memory:.0f} GiB, {cuda}, {torch_info}"
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
        flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in text)
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({flags or 'no bf16 flags'}), {torch_info}"


def run_backbone(name, args, train, test, y_test, results):
    size = args.size
    params = dict(
        backbone=name,
        pretrained=False,
        layer="layer3",
        input_size=size,
        pooling_kernel_size=4,
        batch_size=args.batch_size,
        device=args.device,
        random_state=0,
    )
    fp32 = make_pipeline(
        DeepFeatureTransformer(**params, output="torch"),
        DFMDetector(pca_level=0.97, device=args.device),
    ).fit(train)
    transformer = fp32[0]
    # transform speed per precision
    speeds = {}
    for precision in ["float32", *args.precisions]:
        tr = copy.deepcopy(transformer).set_params(precision=precision)
        tr.transform(test[: args.batch_size])  # warm-up (cuDNN autotuning, kernels)
        times = timed(lambda tr=tr: tr.transform(test), args.device, args.repeats)
        speeds[precision] = len(test) / statistics.median(times)
    for precision, speed in speeds.items():
        results.append(
            f"{name:9s} transform {precision:8s} {speed:9.1f} img/s "
            f"({speed / speeds['float32']:.2f}x float32)"
        )
    # head on the device vs on the CPU
    features = transformer.transform(train)
    head_device = DFMDetector(pca_level=0.97, device=args.device)
    head_cpu = DFMDetector(pca_level=0.97, device="cpu")
    features_cpu = features.cpu()
    t_device = statistics.median(
        timed(lambda: head_device.fit(features), args.device, args.repeats)
    )
    t_cpu = statistics.median(timed(lambda: head_cpu.fit(features_cpu), "cpu", 1))
    test_features = transformer.transform(test)
    diff = max_relative(
        head_device.score_samples(test_features),
        head_cpu.score_samples(test_features.cpu()),
    )
    n, d = features.shape
    results.append(
        f"{name:9s} head fit  {n}x{d} k={head_device.n_components_}: "
        f"{t_device:.3f} s on {args.device}, {t_cpu:.3f} s on cpu "
        f"({t_cpu / t_device:.1f}x), max rel score diff {diff:.1e}"
    )
    # the device Pipeline against itself moved to the CPU, and AUROC per precision
    scores = fp32.score_samples(test)
    on_cpu = copy.deepcopy(fp32)
    move_model(on_cpu, "cpu")
    diff = max_relative(scores, on_cpu.score_samples(test))
    auroc = image_auroc(y_test, scores)
    results.append(
        f"{name:9s} pipeline  {args.device} vs cpu float32: max rel score diff "
        f"{diff:.1e}; image AUROC float32 {auroc:.3f}"
    )
    for precision in args.precisions:
        model = copy.deepcopy(fp32)
        model[0].set_params(precision=precision)
        model.fit(train)
        low = model.score_samples(test)
        results.append(
            f"{name:9s} pipeline  {precision:8s} image AUROC "
            f"{image_auroc(y_test, low):.3f} "
            f"(delta {image_auroc(y_test, low) - auroc:+.3f} vs float32)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument(
        "--precisions", nargs="*", default=["bfloat16", "float16"], help="autocast"
    )
    parser.add_argument("--train", type=int, default=256, help="good parts to fit on")
    parser.add_argument("--test", type=int, default=128, help="parts to score")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU check)")
    args = parser.parse_args()
    if args.quick:
        args.backbones, args.train, args.test, args.size = ["resnet18"], 24, 16, 64
        args.batch_size, args.repeats = 8, 1
        args.precisions = [p for p in args.precisions if p != "float16"]
    print(f"device: {args.device}: {describe(args.device)}")
    images, y, _ = make_defect_images(
        args.train + args.test // 2,
        args.test // 2,
        image_size=args.size,
        shuffle=False,
        random_state=0,
    )
    train = images[: args.train]
    test, y_test = images[args.train :], y[args.train :]
    print(
        f"data: {len(train)} good parts to fit, {len(test)} to score "
        f"({int((y_test == -1).sum())} defective), {args.size} px, random weights"
    )
    results = []
    for name in args.backbones:
        start = time.perf_counter()
        run_backbone(name, args, train, test, y_test, results)
        print("\n".join(results[-(len(args.precisions) * 2 + 3) :]), flush=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
