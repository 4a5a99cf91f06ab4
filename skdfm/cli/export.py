"""``skdfm export``: a saved model to ONNX or OpenVINO, checked against the
model on validation images when asked."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import collect_images, file_batches, is_exported, load_model
from .options import (
    EXIT_OK,
    EXIT_SKIPPED,
    CommandError,
    add_allow_pickle,
    add_overwrite,
    add_runtime,
    check_device,
    check_folder,
    check_output,
    refuse_existing,
)

__all__ = ["FORMAT_OF_SUFFIX", "add_parser", "check", "run"]

#: The format OUT's suffix names.
FORMAT_OF_SUFFIX = {".onnx": "onnx", ".xml": "openvino"}


def add_parser(commands) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to ONNX or OpenVINO (scored without torch)",
        description="Write one graph from images to scores, labels and anomaly maps, "
        "for onnxruntime or OpenVINO; 'skdfm score' and skdfm.ExportedModel run it "
        "without torch. Input: float32 (N, 3, H, W) RGB in [0, 1] at the model's "
        "input size.",
    )
    export.add_argument("model", metavar="MODEL", help="model file from 'skdfm fit'")
    export.add_argument(
        "out",
        metavar="OUT",
        help="the file to write: model.onnx (ONNX), or model.xml (OpenVINO, its "
        "weights in model.bin beside it)",
    )
    add_allow_pickle(export)
    export.add_argument(
        "--format",
        choices=["onnx", "openvino"],
        help="default: the one OUT's suffix names (.onnx: onnx, .xml: openvino)",
    )
    add_overwrite(export, "OUT (and the .bin beside an .xml)")
    export.add_argument(
        "--precision",
        choices=["float32", "float16", "bfloat16", "int8"],
        default="float32",
        help="float32 (default: the model's scores to float32 rounding); bfloat16 "
        "(computed in bfloat16 on CPUs with bf16 units) and float16 (weights "
        "stored in half precision): openvino only; int8: quantised convolutions, "
        "needs --calibration",
    )
    export.add_argument(
        "--calibration", metavar="DIR", help="normal images to calibrate int8 on"
    )
    export.add_argument(
        "--validation",
        metavar="DIR",
        help="images (or an MVTec-style category) to compare the export with the "
        "model on: score deviation, and image AUROC change when labels are known",
    )
    add_runtime(export)
    export.set_defaults(func=run, check=check)


def check(parser, args) -> None:
    """The format (from OUT's suffix), the precision, calibration and validation
    folders, the packages the format needs, and OUT: all before anything is read."""
    import importlib.util

    check_device(parser, args.device)
    if is_exported(args.model):
        parser.error(
            f"argument MODEL: {args.model} is an exported model; export takes the "
            ".skdfm model file 'skdfm fit' wrote"
        )
    named = FORMAT_OF_SUFFIX.get(Path(args.out).suffix.lower())
    if args.format is None:
        if named is None:
            parser.error(
                f"argument OUT: {args.out}: name it *.onnx (ONNX) or *.xml "
                "(OpenVINO); the format follows the suffix"
            )
        args.format = named
    elif named != args.format:
        suffix = {v: k for k, v in FORMAT_OF_SUFFIX.items()}[args.format]
        parser.error(
            f"argument --format: {args.format} writes a {suffix} file, not {args.out}"
        )
    if args.precision in ("bfloat16", "float16") and args.format != "openvino":
        parser.error(
            f"argument --precision: {args.precision} needs --format openvino (an "
            f".xml OUT): onnxruntime's CPU has no {args.precision} convolutions; "
            "--precision int8 makes a smaller, faster ONNX file"
        )
    if args.precision == "int8":
        if args.calibration is None:
            parser.error(
                "argument --precision: int8 needs --calibration DIR: normal images "
                "to calibrate the activations' int8 ranges on (16-64 are enough)"
            )
        check_folder(parser, args.calibration, "--calibration")
    elif args.calibration is not None:
        parser.error("argument --calibration: only for --precision int8")
    if args.validation is not None:
        check_folder(parser, args.validation, "--validation")
    needed = {"onnx": "onnx"}  # the conversion goes through ONNX
    if args.format == "openvino":
        needed["openvino"] = "openvino"
    if args.precision == "int8":
        needed["onnxruntime"] = "onnx"  # its quantiser
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        from .._deploy.runtime import install_hint

        extras = ",".join(sorted({needed[name] for name in missing}))
        parser.error(
            f"argument --format: {args.format} at {args.precision} needs "
            f"{' and '.join(missing)}: {install_hint(missing[0], extras)}"
        )
    check_output(parser, args.out, flag="OUT", model=False, overwrite=args.overwrite)
    if args.format == "openvino":
        weights = Path(args.out).with_suffix(".bin")
        refuse_existing(parser, "OUT", weights, args.overwrite)


def _decoded(paths, reader):
    """The readable files among ``paths``, their decoded images, and the others
    (listed on stderr)."""
    used, images, failed = [], [], []
    for batch in file_batches(paths, reader, progress=False):
        used += batch.paths
        images += batch.images
        failed += batch.failed
    return used, images, failed


def _validation_set(folder: str):
    """Paths and labels of --validation: an MVTec-style category (labels from
    test/<defect>/) or a folder of images (labels unknown)."""
    from .._evaluation.datasets import load_mvtec

    root = Path(folder)
    if (root / "test").is_dir():
        data = load_mvtec(root, load_masks=False, missing_masks="none")
        return data.paths, data.y
    files, _ = collect_images([folder])
    if not files:
        raise CommandError(f"--validation {folder}: no images")
    return files, None


def run(args) -> int:
    from .. import export
    from .._deploy.runtime import ExportedModel
    from .._evaluation.metrics import image_auroc

    model = load_model(args.model, args)
    calibration, skipped = None, []
    if args.precision == "int8":  # --calibration given: checked
        files, problems = collect_images([args.calibration])
        _, calibration, failed = _decoded(files, model[0])
        skipped += problems + failed
        if not calibration:
            raise CommandError(f"--calibration {args.calibration}: no readable images")
    t = time.perf_counter()
    try:
        path = export(
            model,
            args.out,
            format=args.format,
            precision=args.precision,
            calibration_images=calibration,
        )
    except ImportError as error:
        raise CommandError(str(error)) from error
    files = [Path(path)]
    if args.format == "openvino":
        files.append(Path(path).with_suffix(".bin"))
    size = sum(f.stat().st_size for f in files)
    print(
        f"exported {path} ({args.format}, {args.precision}, {size / 1e6:.1f} MB) in "
        f"{time.perf_counter() - t:.1f} s"
    )
    if args.validation is None:
        return EXIT_SKIPPED if skipped else EXIT_OK
    paths, y = _validation_set(args.validation)
    label_of = dict(zip(paths, y if y is not None else [0] * len(paths), strict=True))
    paths, images, failed = _decoded(paths, model[0])
    skipped += failed
    if not images:
        raise CommandError(f"--validation {args.validation}: no readable images")
    y = None if y is None else np.array([label_of[p] for p in paths])
    reference = model.score_samples(images)
    exported = ExportedModel(path)
    scores = exported.score_samples(images)
    deviation = np.abs(scores - reference).max() / np.abs(reference).max()
    agree = np.mean(
        model[-1].labels_from_scores(reference) == exported.labels_from_scores(scores)
    )
    print(
        f"validation on {len(paths)} images: largest score deviation from the "
        f"Python model (float32) {deviation:.2e} of the largest score; labels "
        f"agree on {100 * agree:.1f} %"
    )
    if y is not None and len(set(y)) == 2:
        before, after = image_auroc(y, reference), image_auroc(y, scores)
        print(
            f"image AUROC {after:.4f} exported, {before:.4f} Python model "
            f"(change {after - before:+.4f})"
        )
    return EXIT_SKIPPED if skipped else EXIT_OK
