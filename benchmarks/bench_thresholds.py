"""Do thresholds hold on new images? The share of unseen good parts each one flags.

The demo set (``make_defect_images``: woven texture, 256 px), resnet18 layer2 with
pooling 2 (the ``skdfm demo`` model, random weights here). The backbone runs once;
detectors are fitted on the rows of ``--train`` good images and their threshold is
set four ways:

* in-sample (``fit``'s default, scikit-learn's rule);
* cross-fitted, ``threshold_cv`` = 5, 10, 20 (no extra images);
* held out: fit on 80 % of the training images, threshold from the other 20 % (what
  ``skdfm fit --holdout 0.2`` does).

Each is applied to ``--new`` good images the model never saw; the flagged share
should be close to ``contamination``. Also prints the fit time of each.

    python benchmarks/bench_thresholds.py                 # ~3 min on 2 cores
    python benchmarks/bench_thresholds.py --train 200 --new 400
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from machine import cpu_flags

from skdfm import DeepFeatureTransformer, DFMDetector, make_defect_images


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--new", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}")
    transformer = DeepFeatureTransformer(
        backbone="resnet18",
        pretrained=False,
        layer="layer2",
        input_size=args.size,
        pooling_kernel_size=2,
        device="cpu",
        random_state=0,
        progress=False,
    )
    rows = {}
    for seed in range(args.seeds):
        images, _, _ = make_defect_images(
            args.train + args.new, 0, image_size=args.size, random_state=seed
        )
        rows[seed] = transformer.fit(images).transform(images)
    d = rows[0].shape[1]
    print(
        f"demo set, {args.size} px, resnet18 layer2 (random weights), D = {d}; "
        f"fit on {args.train} good images, flagged share of {args.new} new good "
        f"images; {args.seeds} draws of the images\n"
    )
    ways = ["in-sample", "threshold_cv=5", "threshold_cv=10", "threshold_cv=20"]
    ways.append("held out 20 %")
    for contamination in (0.1, 0.01):
        print(f"contamination = {contamination}")
        for way in ways:
            shares, times = [], []
            for seed in range(args.seeds):
                train, new = rows[seed][: args.train], rows[seed][args.train :]
                start = time.perf_counter()
                if way == "held out 20 %":
                    n_fit = int(round(0.8 * args.train))
                    det = DFMDetector(device="cpu", contamination=contamination)
                    det.fit(train[:n_fit])
                    det.set_threshold(
                        det.score_samples(train[n_fit:]), contamination=contamination
                    )
                else:
                    cv = None if way == "in-sample" else int(way.split("=")[1])
                    det = DFMDetector(
                        device="cpu", contamination=contamination, threshold_cv=cv
                    ).fit(train)
                times.append(time.perf_counter() - start)
                shares.append(float(np.mean(det.predict(new) == -1)))
            print(
                f"  {way:16s} flagged {np.mean(shares):6.1%} "
                f"(draws: {', '.join(f'{s:.1%}' for s in shares)}), "
                f"fit {np.median(times):.2f} s, k = {det.n_components_}"
            )


if __name__ == "__main__":
    main()
