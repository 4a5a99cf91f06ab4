"""``skdfm demo``: fit and evaluate on built-in synthetic parts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .._core.files import atomic_write
from .common import build_pipeline, fit_transformer, layer_text
from .options import (
    EXIT_OK,
    add_model_options,
    add_overwrite,
    add_runtime,
    check_model_options,
    positive_int,
    refuse_existing,
)

__all__ = ["add_parser", "check", "run"]


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="fit and evaluate on built-in synthetic parts, save model and picture",
        description="Generate synthetic textured parts with defects, fit a DFM "
        "Pipeline on the good ones, calibrate its threshold, print image and pixel "
        "AUROC, AUPRO and F1 on held-out parts, and save the model and a picture "
        "of anomaly maps. Falls back to random weights when pretrained ones "
        "cannot be downloaded.",
    )
    demo.add_argument(
        "--out", default="skdfm-demo", help="output folder (default skdfm-demo)"
    )
    demo.add_argument(
        "--n-train",
        type=positive_int,
        default=100,
        help="good parts to fit on (default 100)",
    )
    demo.add_argument(
        "--image-size", type=positive_int, default=256, help="default 256"
    )
    demo.add_argument(
        "--texture", choices=["woven", "brushed", "grain"], default="woven"
    )
    demo.add_argument("--random-state", type=int, default=0)
    add_overwrite(demo, "the model and picture in --out")
    add_model_options(demo)
    add_runtime(demo)
    demo.set_defaults(func=run, check=check)


def check(parser, args) -> None:
    check_model_options(parser, args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {args.out} is a file, not a folder")
    for name in ("model.skdfm", "anomaly_maps.png"):  # what run writes there
        refuse_existing(parser, "--out", out / name, args.overwrite)


def _split(args):
    """Synthetic parts and the fit / calibrate / test split of the demo."""
    from .. import make_defect_images

    n_train, n_val, n_test = args.n_train, 20, 40
    images, y, masks = make_defect_images(
        n_train + n_val + n_test,
        (n_val + n_test) // 2,
        image_size=args.image_size,
        texture=args.texture,
        shuffle=False,
        random_state=args.random_state,
    )
    normal, defect = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    train = normal[:n_train]
    val = np.r_[normal[n_train : n_train + n_val], defect[: n_val // 2]]
    test = np.r_[normal[n_train + n_val :], defect[n_val // 2 :]]
    print(
        f"data: {len(images)} synthetic {args.texture} parts of {args.image_size} px "
        f"(make_defect_images, random_state={args.random_state}): {len(train)} "
        f"normal to fit, {len(val)} to calibrate, {len(test)} to test "
        f"({(y[test] == -1).sum()} with defects)"
    )
    return images, y, masks, train, val, test


def _report(truth, masks, result) -> None:
    from sklearn.metrics import f1_score

    from .. import aupro, image_auroc, pixel_auroc

    f1 = f1_score(truth == -1, result.labels == -1)
    print(f"image AUROC: {image_auroc(truth, result.score_samples):.3f}")
    print(f"pixel AUROC: {pixel_auroc(masks, result.maps):.3f}")
    print(f"AUPRO (FPR <= 0.3): {aupro(masks, result.maps):.3f}")
    print(f"F1 at the threshold calibrated on the validation images: {f1:.3f}")


def verdict(truth: int, label: int) -> str:
    """What the threshold did, in the words of a known truth: a good part is
    passed or FLAGGED (a false reject), a defective one found or MISSED."""
    if truth == 1:
        return "FLAGGED" if label == -1 else "passed"
    return "found" if label == -1 else "MISSED"


def picture_titles(truth, score_samples, labels, offset) -> list[str]:
    """Each column's title: the part, the verdict, and its image score against
    the image threshold (``-offset``)."""
    titles = []
    for t, score, label in zip(truth, score_samples, labels, strict=True):
        titles.append(
            f"{'good part' if t == 1 else 'defective part'}: {verdict(t, label)}\n"
            f"image score {-score:.4g} {'>=' if label == -1 else '<'} {-offset:.4g}"
        )
    return titles


def picture_legend(offset: float, threshold: float) -> str:
    """What the titles and the colour bar show: two thresholds, two scales."""
    return (
        f"Titles: each part's image score against the image threshold "
        f"{-offset:.4g} (at or above: flagged). Colours: the anomaly map, pixel by "
        f"pixel, on its own scale; the mark is the pixel threshold {threshold:.4g}. "
        "Green: the true defect."
    )


def _picture(path: Path, images, truth, masks, result, offset, threshold) -> None:
    from PIL import Image

    from .._evaluation.plotting import anomaly_map_grid

    show = np.r_[np.flatnonzero(truth == 1)[:3], np.flatnonzero(truth == -1)[:5]]
    picture = anomaly_map_grid(
        images[show],
        result.maps[show],
        masks=masks[show],
        vmin=0.0,  # the model's scale: the pixel threshold in the middle
        vmax=2.0 * threshold,
        titles=picture_titles(
            truth[show], result.score_samples[show], result.labels[show], offset
        ),
        threshold=threshold,
        legend=picture_legend(offset, threshold),
    )
    with atomic_write(path) as handle:
        Image.fromarray(picture).save(handle, format="PNG")


def run(args) -> int:
    from .. import anomaly_maps, calibrate_pixel_threshold, calibrate_threshold, save

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, y, masks, train, val, test = _split(args)
    model = build_pipeline(args, progress=not args.no_progress, allow_random=True)
    transformer, detector = model[0], model[1]
    t = time.perf_counter()
    fit_transformer(transformer, images[train], allow_random=True)
    detector.fit(transformer.transform(images[train]))
    print(
        f"fit: {transformer.backbone} {layer_text(transformer.layer_)}, "
        f"{detector.n_features_in_} features, {detector.n_components_} components, "
        f"{time.perf_counter() - t:.1f} s on {transformer.device_}"
    )
    calibrate_threshold(model, images[val], y[val], method="f1")
    calibrate_pixel_threshold(model, images[val], masks[val])
    result = anomaly_maps(model, images[test])
    _report(y[test], masks[test], result)
    model_path = out / "model.skdfm"
    model[0].set_params(output="numpy")  # saved as a Python user builds it
    save(model, model_path)
    picture_path = out / "anomaly_maps.png"
    _picture(
        picture_path, images[test], y[test], masks[test], result, detector.offset_,
        detector.pixel_threshold_,
    )  # fmt: skip
    print(f"saved {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    print(
        f"saved {picture_path} (columns: held-out good then defective parts, "
        "each titled with its image score against the image threshold and the "
        "verdict: good parts passed or FLAGGED, defective ones found or MISSED; "
        "top: images; bottom: anomaly maps on one colour scale, the pixel "
        "threshold marked on the colour bar, true defects outlined in green)"
    )
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return EXIT_OK
