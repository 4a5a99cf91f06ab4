"""The ``skdfm`` command: demo, fit, score and evaluate from a shell.

Exit codes: 0 done; 1 failed (a message says why, nothing written); 2 bad
command line; 3 done, but some images could not be read and were skipped
(each is listed on stderr).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

from ._images import IMAGE_SUFFIXES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


class CommandError(Exception):
    """A failure to report in one line (exit code 1)."""


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _collect_images(targets: list[str]) -> list[str]:
    """Image files named, or found (recursively, sorted) in named folders."""
    files = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            found = sorted(
                os.fspath(p)
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CommandError(f"no image files in folder {target}")
            files.extend(found)
        elif path.is_file():
            files.append(os.fspath(path))
        else:
            raise CommandError(f"no such file or folder: {target}")
    return files


def _readable(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split paths into images that decode and ``(path, reason)`` for the rest."""
    from ._images import _read_file

    good, skipped = [], []
    for path in paths:
        try:
            _read_file(path)
        except (OSError, ValueError) as error:
            skipped.append((path, str(error)))
        else:
            good.append(path)
    for path, reason in skipped:
        _say(f"skdfm: skipped {path}: {reason}")
    return good, skipped


def _load_model(path: str, args):
    import joblib

    from ._pipeline import move_model, split_model

    if not Path(path).is_file():
        raise CommandError(f"no such model file: {path}")
    try:
        model = joblib.load(path)
    except Exception as error:  # a pickle can fail in many ways
        raise CommandError(f"cannot load model {path}: {error}") from error
    try:
        transformer, _ = split_model(model)
    except ValueError as error:
        raise CommandError(f"{path} is not an skdfm model: {error}") from error
    if transformer is None:
        raise CommandError(
            f"{path} holds a bare DFMDetector; the command needs a Pipeline of a "
            "DeepFeatureTransformer and a DFMDetector (images in)."
        )
    if args.device is not None:
        move_model(model, args.device)
    if args.batch_size is not None:
        transformer.set_params(batch_size=args.batch_size)
    transformer.set_params(progress=not args.no_progress)
    return model


def _build_pipeline(args):
    from sklearn.pipeline import make_pipeline

    from . import DeepFeatureTransformer, DFMDetector

    transformer = DeepFeatureTransformer(
        backbone=args.backbone,
        layer=args.layer,
        pretrained=not args.random_init,
        checkpoint_path=args.checkpoint,
        pooling_kernel_size=args.pooling_kernel_size,
        input_size=args.input_size,
        batch_size=args.batch_size or 16,
        device=args.device or "auto",
        progress=not args.no_progress,
        random_state=0,
        output="torch",  # on a GPU, features go to the detector without a host copy
    )
    detector = DFMDetector(
        pca_level=args.pca_level,
        score_type=args.score_type,
        device=args.device or "auto",
    )
    return make_pipeline(transformer, detector)


def _fit_with_fallback(model, X, *, allow_random: bool):
    """Fit; offline without weights, either fall back to random init or fail."""
    transformer = model[0]
    try:  # the transformer fits first: no feature is computed before this fails
        return model.fit(X)
    except FileNotFoundError:  # a missing checkpoint or image: not a download issue
        raise
    except OSError as error:
        if not allow_random:
            raise CommandError(
                f"pretrained weights of {transformer.backbone} are neither cached "
                "nor downloadable here: pass --checkpoint FILE (a local copy of the "
                "weights, e.g. model.safetensors) or --random-init"
            ) from error
        _say(
            f"skdfm: pretrained weights of {transformer.backbone} cannot be had here "
            "(offline); using random init. Results are illustrative only; pass "
            "--checkpoint to use a local copy of the weights."
        )
        transformer.set_params(pretrained=False, checkpoint_path=None)
    return model.fit(X)


def _write_maps(folder: str, paths, maps) -> None:
    from PIL import Image

    from ._images import _read_file
    from ._plotting import overlay_anomaly_map

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for path, amap in zip(paths, maps, strict=True):
        image = _read_file(path).permute(1, 2, 0).numpy()
        Image.fromarray(overlay_anomaly_map(image, amap)).save(
            out / f"{Path(path).stem}_map.png"
        )


def _scores_and_maps(model, files, *, maps: bool):
    """Scores and labels (and maps at the images' size when ``maps``), one pass."""
    from . import AnomalyMaps, anomaly_maps

    if maps:
        return anomaly_maps(model, files, size="image")
    scores = model.score_samples(files)
    return AnomalyMaps(None, scores, model[-1]._labels(scores))


# -- commands ------------------------------------------------------------------


def cmd_demo(args) -> int:
    import joblib
    from PIL import Image
    from sklearn.metrics import f1_score

    from . import (
        anomaly_maps,
        aupro,
        calibrate_threshold,
        image_auroc,
        make_defect_images,
        pixel_auroc,
    )
    from ._plotting import anomaly_map_grid

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    model = _build_pipeline(args)
    t = time.perf_counter()
    _fit_with_fallback(model, images[train], allow_random=True)
    transformer, detector = model[0], model[1]
    weights = "pretrained" if transformer.pretrained else "random init"
    print(
        f"fit: {transformer.backbone} ({weights}) {transformer.layer_}, "
        f"{detector.n_features_in_} features, {detector.n_components_} components, "
        f"{time.perf_counter() - t:.1f} s on {transformer.device_}"
    )
    calibrate_threshold(model, images[val], y[val], method="f1")
    result = anomaly_maps(model, images[test])
    truth = y[test]
    f1 = f1_score(truth == -1, result.labels == -1)
    print(f"image AUROC: {image_auroc(truth, result.score_samples):.3f}")
    print(f"pixel AUROC: {pixel_auroc(masks[test], result.maps):.3f}")
    print(f"AUPRO (FPR <= 0.3): {aupro(masks[test], result.maps):.3f}")
    print(f"F1 at the threshold calibrated on the validation images: {f1:.3f}")
    model_path = out / "model.joblib"
    joblib.dump(model, model_path)
    show = np.r_[np.flatnonzero(truth == 1)[:3], np.flatnonzero(truth == -1)[:5]]
    picture = anomaly_map_grid(
        images[test][show],
        result.maps[show],
        masks=masks[test][show],
        vmax=float(np.percentile(result.maps, 99.9)),  # one hot defect sets no scale
    )
    picture_path = out / "anomaly_maps.png"
    Image.fromarray(picture).save(picture_path)
    print(f"saved {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    print(
        f"saved {picture_path} (top: images; bottom: anomaly maps, defects "
        "outlined in green)"
    )
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def cmd_fit(args) -> int:
    import joblib

    from . import calibrate_threshold

    files, skipped = _readable(_collect_images([args.normal_images]))
    if len(files) < 3:
        raise CommandError(
            f"{len(files)} readable images in {args.normal_images}; at least 3 needed"
        )
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    n_hold = int(round(args.holdout * len(files)))
    if n_hold and len(files) - n_hold < 2:
        raise CommandError("--holdout leaves fewer than 2 images to fit on")
    held = [files[i] for i in sorted(order[:n_hold])]
    train = [files[i] for i in sorted(order[n_hold:])]
    model = _build_pipeline(args)
    t = time.perf_counter()
    try:
        _fit_with_fallback(model, train, allow_random=False)
    except ValueError as error:
        raise CommandError(str(error)) from error
    transformer, detector = model[0], model[1]
    print(
        f"fitted on {len(train)} images in {time.perf_counter() - t:.1f} s: "
        f"{transformer.backbone} {transformer.layer_}, {detector.n_features_in_} "
        f"features, {detector.n_components_} components"
    )
    if held:
        calibrate_threshold(
            model, held, method="contamination", contamination=args.contamination
        )
        print(
            f"threshold: {args.contamination:.0%} quantile of {len(held)} held-out "
            "normal images (--holdout)"
        )
    else:
        print("threshold: in-sample (--holdout 0); expect more false alarms")
    joblib.dump(model, args.output)
    print(f"saved {args.output}")
    return EXIT_SKIPPED if skipped else EXIT_OK


def cmd_score(args) -> int:
    from ._thresholds import normalize

    model = _load_model(args.model, args)
    files, skipped = _readable(_collect_images(args.images))
    if not files:
        raise CommandError("no readable images to score")
    if args.maps and model[-1].score_type != "fre":
        raise CommandError(
            "--maps needs a model with score_type 'fre' (nll has no maps)"
        )
    result = _scores_and_maps(model, files, maps=bool(args.maps))
    normalized = normalize(model[-1], result.score_samples)
    rows = [
        (path, -score, norm, "anomalous" if label == -1 else "normal")
        for path, score, norm, label in zip(
            files, result.score_samples, normalized, result.labels, strict=True
        )
    ]
    writer = csv.writer(sys.stdout, delimiter="\t")
    writer.writerow(["path", "anomaly_score", "normalized", "label"])
    for path, score, norm, label in rows:
        writer.writerow([path, f"{score:.6g}", f"{norm:.4f}", label])
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["path", "anomaly_score", "normalized", "label"])
            out.writerows(rows)
    if args.maps:
        _write_maps(args.maps, files, result.maps)
    flagged = int(np.sum(result.labels == -1))
    _say(
        f"skdfm: scored {len(files)} images, {flagged} anomalous, "
        f"{len(skipped)} skipped"
    )
    return EXIT_SKIPPED if skipped else EXIT_OK


def cmd_evaluate(args) -> int:
    from sklearn.metrics import f1_score

    from . import aupro, image_auroc, load_mvtec, pixel_auroc

    model = _load_model(args.model, args)
    try:
        data = load_mvtec(args.category)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    files, skipped = _readable(data.paths)
    readable = set(files)
    keep = [i for i, path in enumerate(data.paths) if path in readable]
    y = data.y[keep]
    masks = [data.masks[i] for i in keep]
    has_maps = model[-1].score_type == "fre"
    result = _scores_and_maps(model, files, maps=has_maps)
    f1 = f1_score(y == -1, result.labels == -1)
    print(f"images: {len(files)} ({int((y == -1).sum())} defective)")
    print(f"image AUROC: {image_auroc(y, result.score_samples):.4f}")
    if has_maps:
        print(f"pixel AUROC: {pixel_auroc(masks, result.maps):.4f}")
        print(f"AUPRO (FPR <= 0.3): {aupro(masks, result.maps):.4f}")
    else:
        print("pixel AUROC, AUPRO: n/a (score_type 'nll' has no anomaly maps)")
    print(
        f"image F1 at the model's threshold ({model[-1].threshold_method_}): {f1:.4f}"
    )
    return EXIT_SKIPPED if skipped else EXIT_OK


# -- argument parsing --------------------------------------------------------------


def _add_runtime(parser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device", help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available)"
    )
    group.add_argument(
        "--batch-size", type=int, metavar="N", help="images per backbone batch"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_model_options(parser, *, backbone: str, layer: str, pooling: int) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone", default=backbone, help=f"timm model (default {backbone})"
    )
    group.add_argument(
        "--layer", default=layer, help=f"feature layer (default {layer})"
    )
    group.add_argument(
        "--pca-level", type=float, default=0.97, help="variance kept (default 0.97)"
    )
    group.add_argument(
        "--pooling-kernel-size",
        type=int,
        default=pooling,
        metavar="K",
        help=f"average-pooling kernel (default {pooling})",
    )
    group.add_argument(
        "--input-size", type=int, default=256, metavar="PX", help="default 256"
    )
    group.add_argument("--score-type", choices=["fre", "nll"], default="fre")
    group.add_argument(
        "--checkpoint", metavar="FILE", help="local weights file (offline machines)"
    )
    group.add_argument(
        "--random-init", action="store_true", help="random weights (testing only)"
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="skdfm",
        description="Deep Feature Modeling (DFM) anomaly detection: fit on images "
        "of good parts, score new ones, localise defects.",
        epilog="Exit codes: 0 done; 1 failed; 2 bad command line; 3 done, some "
        "images skipped (listed on stderr).",
    )
    parser.add_argument("--version", action="version", version=f"skdfm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    demo.add_argument("--n-train", type=int, default=100, help="good parts to fit on")
    demo.add_argument("--image-size", type=int, default=256, help="default 256")
    demo.add_argument(
        "--texture", choices=["woven", "brushed", "grain"], default="woven"
    )
    demo.add_argument("--random-state", type=int, default=0)
    _add_model_options(demo, backbone="resnet18", layer="layer2", pooling=2)
    _add_runtime(demo)
    demo.set_defaults(func=cmd_demo)

    fit = commands.add_parser(
        "fit",
        help="fit a model on a folder of good images",
        description="Fit DeepFeatureTransformer + DFMDetector on the images in a "
        "folder (searched recursively) and save the Pipeline with joblib. A share "
        "of the images (--holdout) is kept back to set the threshold honestly.",
    )
    fit.add_argument(
        "normal_images", metavar="NORMAL_DIR", help="folder of good images"
    )
    fit.add_argument(
        "-o", "--output", required=True, metavar="MODEL", help="model file to write"
    )
    fit.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share of images held out to set the threshold (default 0.2; 0 = "
        "in-sample threshold)",
    )
    fit.add_argument(
        "--contamination",
        type=float,
        default=0.01,
        help="share of held-out good images allowed above the threshold (default 0.01)",
    )
    _add_model_options(fit, backbone="resnet50", layer="layer3", pooling=4)
    _add_runtime(fit)
    fit.set_defaults(func=cmd_fit)

    score = commands.add_parser(
        "score",
        help="score images with a saved model",
        description="Print, for each image, its anomaly score (FRE or NLL), the "
        "score normalised to [0, 1] with 0.5 at the threshold, and its label.",
    )
    score.add_argument("model", metavar="MODEL", help="model file from 'skdfm fit'")
    score.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    score.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    score.add_argument("--maps", metavar="DIR", help="write anomaly-map overlays here")
    _add_runtime(score)
    score.set_defaults(func=cmd_score)

    evaluate = commands.add_parser(
        "evaluate",
        help="image/pixel AUROC, AUPRO and F1 on an MVTec-style category",
        description="Evaluate a saved model on <category>/test and "
        "<category>/ground_truth (the MVTec AD layout).",
    )
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("category", metavar="CATEGORY_DIR")
    _add_runtime(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    """Run the ``skdfm`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        build_parser().error("--batch-size must be at least 1")
    try:
        return args.func(args)
    except CommandError as error:
        _say(f"skdfm: error: {error}")
    except (OSError, ValueError) as error:
        _say(f"skdfm: error: {error}")
    except KeyboardInterrupt:
        _say("skdfm: interrupted")
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
