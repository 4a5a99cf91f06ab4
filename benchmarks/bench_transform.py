"""Images per second of DeepFeatureTransformer.transform against bare backbones.

For each backbone, on the same batches of 256 px images, in one process, interleaved:

- ``transform``: DeepFeatureTransformer.transform on uint8 (N, 256, 256, 3) images
  (conversion to float, normalisation, truncated backbone, pooling, copy to numpy);
- ``truncated``: the bare truncated backbone (timm ``features_only``, cut after
  ``layer``) on already-normalised float32 NCHW batches, forward only;
- ``full``: the full untruncated timm network (all stages and the classifier) on the
  same normalised batches.

Weights are random (pretrained ones cannot be downloaded here; speed does not depend
on them). Prints medians of ``--repeats`` runs and the ratios of the medians.

    python benchmarks/bench_transform.py
    python benchmarks/bench_transform.py --backbones resnet18 --images 64 --repeats 7
    python benchmarks/bench_transform.py --channels-last --precision bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import timm
import torch
from machine import cpu_flags

from skdfm import DeepFeatureTransformer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--precision", default="float32", choices=["float32", "bfloat16", "float16"]
    )
    args = parser.parse_args()

    print(f"CPU flags: {cpu_flags()}")
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{args.images} images of {args.size} px, batch {args.batch_size}, "
        f"layer {args.layer}, channels_last={args.channels_last}, "
        f"precision={args.precision}, median of {args.repeats}"
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), np.uint8)
    device = torch.device(args.device)

    for name in args.backbones:
        tr = DeepFeatureTransformer(
            backbone=name,
            layer=args.layer,
            pretrained=False,
            input_size=args.size,
            batch_size=args.batch_size,
            device=args.device,
            channels_last=args.channels_last,
            precision=args.precision,
            random_state=0,
        ).fit(images[:1])
        full = timm.create_model(name, pretrained=False).eval().to(device)
        memory_format = (
            torch.channels_last if args.channels_last else torch.contiguous_format
        )
        full = full.to(memory_format=memory_format)
        mean = torch.tensor(tr.image_mean_)[:, None, None]
        std = torch.tensor(tr.image_std_)[:, None, None]
        batches = [
            (
                (
                    torch.from_numpy(images[i : i + args.batch_size]).permute(
                        0, 3, 1, 2
                    )
                    / 255.0
                    - mean
                )
                / std
            )
            .to(device)
            .contiguous(memory_format=memory_format)
            for i in range(0, args.images, args.batch_size)
        ]
        autocast = dict(
            device_type=device.type,
            dtype=getattr(torch, args.precision),
            enabled=args.precision != "float32",
        )

        def bare(model, batches=batches, autocast=autocast):
            with torch.inference_mode(), torch.autocast(**autocast):
                for x in batches:
                    model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def transform(tr=tr):
            tr.transform(images)
            if device.type == "cuda":
                torch.cuda.synchronize()

        methods = {
            "transform": transform,
            "truncated": lambda model=tr.backbone_: bare(model),
            "full": lambda model=full: bare(model),
        }
        for method in methods.values():  # warm-up
            method()
        times = {key: [] for key in methods}
        for _ in range(args.repeats):
            for key, method in methods.items():
                times[key].append(timed(method))
        median = {key: statistics.median(values) for key, values in times.items()}
        rate = {key: args.images / value for key, value in median.items()}
        print(
            f"{name}: transform {rate['transform']:.1f} img/s, bare truncated "
            f"backbone {rate['truncated']:.1f} img/s, full network "
            f"{rate['full']:.1f} img/s | transform / truncated = "
            f"{rate['transform'] / rate['truncated']:.3f}, transform / full = "
            f"{rate['transform'] / rate['full']:.3f}"
        )


if __name__ == "__main__":
    main()
