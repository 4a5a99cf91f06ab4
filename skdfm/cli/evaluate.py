"""``skdfm evaluate``: image and pixel metrics of a saved model on an MVTec-style
category, printed, and written as JSON, CSV and an HTML report on request."""

from __future__ import annotations

import csv
import os

from .._core.files import atomic_write
from .common import (
    file_batches,
    is_exported,
    load_exported,
    load_model,
    spreadsheet_safe,
)
from .options import (
    EXIT_OK,
    EXIT_SKIPPED,
    CommandError,
    add_allow_pickle,
    add_overwrite,
    add_runtime,
    check_device,
    check_exported_runtime,
    say,
)

__all__ = ["add_parser", "check", "run"]


def add_parser(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="image/pixel AUROC and AUPR, AUPRO and F1 on an MVTec-style category",
        description="Evaluate a saved or exported model on <category>/test: image "
        "metrics of every readable image, pixel metrics where "
        "<category>/ground_truth has masks, overall and per defect type.",
    )
    evaluate.add_argument(
        "model",
        metavar="MODEL",
        help="model file from 'skdfm fit', or an exported .onnx / OpenVINO .xml "
        "from 'skdfm export' (run without torch: the exported model's own scores)",
    )
    add_allow_pickle(evaluate)
    evaluate.add_argument(
        "category",
        metavar="CATEGORY_DIR",
        help="a category in the MVTec AD layout: test/<defect>/*.png (good for "
        "normal images) and, for pixel metrics, ground_truth/<defect>/*_mask.png",
    )
    evaluate.add_argument(
        "--json",
        metavar="FILE",
        help="also write every metric, overall and per defect type, as JSON",
    )
    evaluate.add_argument(
        "--csv",
        metavar="FILE",
        help="also write each image's score and label as CSV (a path or defect "
        "type starting with = + - @, a tab or a carriage return gets a leading ' "
        "so that spreadsheets show it as text, never run it as a formula)",
    )
    evaluate.add_argument(
        "--report",
        metavar="DIR",
        help="also write DIR/report.html: one self-contained page with the metrics, "
        "ROC and precision-recall curves, the score histogram with the threshold "
        "and the worst mistakes over their maps (needs matplotlib)",
    )
    add_overwrite(evaluate, "the --json and --csv files and the --report page")
    add_runtime(evaluate)
    evaluate.set_defaults(func=run, check=check)


def check(parser, args) -> None:
    from .._evaluation.datasets import load_mvtec

    if is_exported(args.model):
        check_exported_runtime(parser, args.model, args.device)
    else:
        check_device(parser, args.device)
    try:  # file names only, nothing decoded
        load_mvtec(args.category, load_masks=False, missing_masks="none")
    except (OSError, ValueError) as error:
        parser.error(f"argument CATEGORY_DIR: {error}")


def run(args) -> int:
    from .._evaluation.evaluation import evaluate_mvtec

    exported = is_exported(args.model)
    model = load_exported(args) if exported else load_model(args.model, args)
    # what holds the thresholds, and what reads the files (batch size, pixel limit)
    detector, reader = (model, model) if exported else (model[-1], model[0])
    threshold_method = (
        model.metadata_.get("threshold_method", "unknown")
        if exported
        else detector.threshold_method_
    )
    progress = not args.no_progress
    try:
        result = evaluate_mvtec(
            model,
            args.category,
            batches=lambda paths: file_batches(paths, reader, progress=progress),
        )
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    for path, reason in result.no_pixel_metrics:
        say(f"skdfm: no pixel metrics for {path}: {reason}")
    if not result.has_maps:
        pixel_note = "n/a (score_type 'nll' has no anomaly maps)"
    elif not result.has_masks:
        pixel_note = f"n/a (no ground_truth folder in {args.category})"
    else:
        pixel_note = "n/a (no usable masks with defective pixels)"
    _print_evaluation(result.metrics, threshold_method, pixel_note)
    if args.json:
        _write_json(args, threshold_method, result)
    if args.csv:
        _write_csv(args.csv, detector, result)
    if args.report:  # last: the numbers are written whatever happens to it
        _write_report(args, model, result)
    return EXIT_SKIPPED if result.skipped else EXIT_OK


def _print_evaluation(metrics, threshold_method: str, pixel_note: str) -> None:
    """The metrics as a person reads them: overall, then one line per defect."""

    def number(values, name):
        return f"{values[name]:.4f}" if name in values else "n/a"

    overall = metrics["overall"]
    print(f"images: {overall['images']} ({overall['defective']} defective)")
    print(f"image AUROC: {number(overall, 'image_auroc')}")
    print(f"image AUPR: {number(overall, 'image_aupr')}")
    if "pixel_auroc" in overall:
        print(
            f"pixel AUROC: {overall['pixel_auroc']:.4f} (over "
            f"{overall['pixel_images']} images with masks)"
        )
        print(f"pixel AUPR: {overall['pixel_aupr']:.4f}")
        print(f"AUPRO (FPR <= 0.3): {overall['aupro']:.4f}")
    else:
        print(f"pixel AUROC, pixel AUPR, AUPRO: {pixel_note}")
    print(
        f"image F1 at the model's threshold ({threshold_method}): "
        f"{overall['f1']:.4f} (precision {overall['precision']:.4f}, recall "
        f"{overall['recall']:.4f}, {overall['flagged']} flagged)"
    )
    if not metrics["per_defect"]:
        return
    print("per defect type (each against the good images):")
    header = ["defect", "images", "image AUROC", "image AUPR", "recall"]
    header += ["pixel AUROC", "AUPRO"]
    rows = [
        [kind, str(m["defective"]), number(m, "image_auroc"),
         number(m, "image_aupr"), f"{m['recall']:.4f}",
         number(m, "pixel_auroc"), number(m, "aupro")]
        for kind, m in metrics["per_defect"].items()
    ]  # fmt: skip
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _write_json(args, threshold_method: str, result) -> None:
    import json

    report = {
        "model": os.path.abspath(args.model),
        "category": os.path.abspath(args.category),
        "threshold_method": threshold_method,
        **result.metrics,
        "skipped": [{"path": p, "reason": r} for p, r in result.skipped],
        "no_pixel_metrics": [
            {"path": p, "reason": r} for p, r in result.no_pixel_metrics
        ],
    }
    with atomic_write(args.json, "w") as handle:
        json.dump(report, handle, indent=2)


def _write_csv(target, detector, result) -> None:
    from .._deploy.results import normalize_scores

    scores, labels = result.score_samples, result.labels
    normalized = normalize_scores(scores, detector.offset_, detector.score_range_)
    with atomic_write(target, "w") as handle:
        out = csv.writer(handle)
        out.writerow(
            ["path", "defect_type", "truth", "anomaly_score", "normalized", "label"]
        )
        for i, k in enumerate(result.index):
            out.writerow(
                [spreadsheet_safe(result.data.paths[k]),
                 spreadsheet_safe(result.defect_types[i]),
                 "defective" if result.y[i] == -1 else "good", f"{-scores[i]:.6g}",
                 f"{normalized[i]:.4f}",
                 "anomalous" if labels[i] == -1 else "normal"]
            )  # fmt: skip


def _write_report(args, model, result) -> None:
    """``--report DIR``: the HTML page (a Pipeline or an exported model; the worst
    mistakes drawn again in one small second pass)."""
    from .._evaluation.report import write_report

    path = write_report(
        args.report, model, result, model_file=args.model, category=args.category
    )
    print(f"report: {path}")
