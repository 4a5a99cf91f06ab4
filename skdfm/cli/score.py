"""``skdfm score``: score images with a saved or exported model; maps and
predicted masks on request; on one machine or on a Dask cluster."""

from __future__ import annotations

import csv
import os
import sys

from .._core.files import atomic_write
from .._imaging.decode import is_out_of_memory
from .common import (
    check_image_arguments,
    cluster_errors,
    collect_images,
    connect,
    file_batches,
    is_exported,
    list_images,
    load_exported,
    load_model,
    maps_root,
    spreadsheet_safe,
)
from .options import (
    EXIT_OK,
    EXIT_SKIPPED,
    CommandError,
    add_allow_pickle,
    add_overwrite,
    add_runtime,
    add_scheduler,
    check_device,
    check_exported_runtime,
    say,
)

__all__ = ["add_parser", "check", "run"]


def add_parser(commands) -> None:
    score = commands.add_parser(
        "score",
        help="score images with a saved model",
        description="Print, for each image, its anomaly score (FRE or NLL), the "
        "score normalised to [0, 1] with 0.5 at the threshold, and its label.",
    )
    score.add_argument(
        "model",
        metavar="MODEL",
        help="model file from 'skdfm fit', or an exported .onnx / OpenVINO .xml "
        "from 'skdfm export' (run without torch)",
    )
    add_allow_pickle(score)
    score.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files, or folders searched recursively for images",
    )
    score.add_argument(
        "--csv",
        metavar="FILE",
        help="also write the table as CSV (a path starting with = + - @, a tab or "
        "a carriage return gets a leading ' so that spreadsheets show it as text, "
        "never run it as a formula)",
    )
    score.add_argument(
        "--maps",
        metavar="DIR",
        help="write anomaly-map overlays here, mirroring the folders of the images "
        "(test/crack/000.png -> DIR/crack/000.png_map.png)",
    )
    add_overwrite(score, "the --csv file, map and mask files")
    score.add_argument(
        "--masks",
        metavar="DIR",
        help="write predicted defect masks here (white = map at or above the "
        "model's pixel threshold), named as --maps names overlays",
    )
    add_runtime(score)
    add_scheduler(score)
    score.set_defaults(func=run, check=check)


def check(parser, args) -> None:
    check_image_arguments(parser, args.images, "IMAGE_OR_DIR")
    if not is_exported(args.model):
        check_device(parser, args.device)
    elif args.scheduler:  # exported models run on the CPU, without torch
        parser.error(
            "argument --scheduler: it runs .skdfm models; score an exported model "
            "without it"
        )
    else:
        check_exported_runtime(parser, args.model, args.device)
    if args.scheduler and args.masks:
        parser.error("argument --masks: written on one machine, not with --scheduler")
    if args.timeout is not None and not args.scheduler:
        parser.error("argument --timeout: bounds a cluster's work; give --scheduler")
    for flag, folder in (("--maps", args.maps), ("--masks", args.masks)):
        if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
            parser.error(f"argument {flag}: {folder} is a file, not a folder")
    flag, target = _existing_map_file(args)
    if target is not None:
        parser.error(
            f"argument {flag}: {target} exists (from an earlier run?): pass "
            "--overwrite to replace such files, or write to another folder"
        )


def run(args) -> int:
    exported = is_exported(args.model)
    model = load_exported(args) if exported else load_model(args.model, args)
    files, problems = collect_images(args.images)
    detector = model if exported else model[-1]
    score_type = model.score_type_ if exported else detector.score_type
    if args.maps and score_type != "fre":
        raise CommandError(
            "--maps needs a model with score_type 'fre' (nll has no maps)"
        )
    if args.masks and getattr(detector, "pixel_threshold_", None) is None:
        raise CommandError(
            "--masks needs a model with a pixel threshold (skdfm fit sets one; in "
            "Python: skdfm.calibrate_pixel_threshold; int8 exports carry none)"
        )
    if args.scheduler:
        if not files:
            raise CommandError("no readable images to score")
        return _score_on_cluster(args, model, files, problems)
    reader = model if exported else model[0]  # its batch size and pixel limit
    root = maps_root(args.images)
    rows, skipped = [], list(problems)
    for batch in file_batches(files, reader, progress=not args.no_progress):
        skipped.extend(batch.failed)
        if batch.images:
            rows.extend(_score_batch(args, model, root, batch, skipped))
    return _print_scores(args, rows, skipped)


def _score_batch(args, model, root: str, batch, skipped: list) -> list:
    """The table rows of one batch. When memory runs out, its images are scored
    one by one, and one that still does not fit is skipped (named, with the
    reason) instead of failing the run."""
    try:
        return _score_images(args, model, root, batch.paths, batch.images)
    except Exception as error:
        if not is_out_of_memory(error) or len(batch.paths) == 1:
            _skip_if_out_of_memory(error, batch.paths[0], skipped)
            return []
    rows = []
    for path, image in zip(batch.paths, batch.images, strict=True):
        try:
            rows.extend(_score_images(args, model, root, [path], [image]))
        except Exception as error:
            _skip_if_out_of_memory(error, path, skipped)
    return rows


def _skip_if_out_of_memory(error: Exception, path: str, skipped: list) -> None:
    if not is_out_of_memory(error):
        raise error
    reason = (
        f"out of memory while scoring it ({type(error).__name__}); lower "
        "--max-image-pixels to refuse such files up front, or --batch-size"
    )
    say(f"skdfm: skipped {path}: {reason}")
    skipped.append((path, reason))


def _score_images(args, model, root: str, paths, images) -> list:
    """Scores, labels and normalised scores of decoded images, as table rows; their
    maps and masks written (one at a time, at most MAX_MAP_PIXELS each)."""
    from .._deploy.results import normalize_scores

    exported = is_exported(args.model)
    detector = model if exported else model[-1]
    if args.maps or args.masks:
        scores, labels = _write_map_files(args, model, root, paths, images)
    else:
        scores = model.score_samples(images)
        labels = detector.labels_from_scores(scores)
    normalized = normalize_scores(scores, detector.offset_, detector.score_range_)
    return [
        (path, -score, norm, "anomalous" if label == -1 else "normal")
        for path, score, norm, label in zip(
            paths, scores, normalized, labels, strict=True
        )
    ]


def _write_map_files(args, model, root: str, paths, images):
    """Overlays (--maps) and predicted masks (--masks) of decoded images; their
    scores and labels, from the same backbone pass.

    The grid maps of the batch are computed at once, then each image's map is
    made at its own size, capped at MAX_MAP_PIXELS (the largest size of its
    aspect ratio within it), written and dropped: one full map at a time."""
    from .._deploy.results import predicted_masks
    from .._evaluation.map_files import (
        MAX_MAP_PIXELS,
        capped_size,
        colour_scale,
        map_caption,
        map_file,
        mask_file,
        write_map_overlay,
        write_mask,
    )
    from .._imaging.decode import original_size

    exported = is_exported(args.model)
    if exported:
        from .._deploy.results import bilinear_resize

        detector = model
        result = model.anomaly_maps(images, size="grid")

        def upsampled(grid, size):
            return bilinear_resize(grid[None], size)[0]
    else:
        import torch

        from .. import anomaly_maps
        from .._tools.maps import upsample

        detector = model[-1]
        result = anomaly_maps(model, images, size="grid")

        def upsampled(grid, size):
            return upsample(torch.from_numpy(grid[None]), size)[0].numpy()

    scale = colour_scale(detector)
    threshold = getattr(detector, "pixel_threshold_", None)
    for path, image, grid, score, label in zip(
        paths, images, result.maps, result.score_samples, result.labels, strict=True
    ):
        amap = upsampled(grid, capped_size(original_size(image), MAX_MAP_PIXELS))
        if args.maps:
            write_map_overlay(
                map_file(args.maps, path, root),
                image,
                amap,
                scale=scale,
                caption=map_caption(score, label, detector.offset_),
            )
        if args.masks:
            write_mask(
                mask_file(args.masks, path, root), predicted_masks(amap, threshold)
            )
    return result.score_samples, result.labels


def _existing_map_file(args):
    """``(flag, file)``: the first map or mask file of the images named that
    exists already (an earlier run's), ``(None, None)`` when none does or with
    --overwrite. File names only, nothing read: maps and masks never replace files
    silently."""
    from .._evaluation.map_files import map_file, mask_file

    if args.overwrite or not (args.maps or args.masks):
        return None, None
    files, _ = list_images(args.images)
    root = maps_root(args.images)
    for flag, folder, name in (
        ("--maps", args.maps, map_file),
        ("--masks", args.masks, mask_file),
    ):
        if not folder or not os.path.isdir(folder):
            continue
        for path in files:
            target = name(folder, path, root)
            if target.exists():
                return flag, target
    return None, None


def _score_on_cluster(args, model, files, problems) -> int:
    """``skdfm score --scheduler``: the table computed on the cluster, printed as
    the one-machine command prints it."""
    from ..distributed import image_bag, score

    client = connect(args.scheduler)
    try:
        with cluster_errors():
            table = score(
                model,
                image_bag([os.path.abspath(p) for p in files]),  # read by workers
                client=client,
                maps_dir=args.maps,
                root=maps_root(args.images),
                compute=True,
                timeout=args.timeout,
            )
            frame = table
    finally:
        client.close()
    skipped, rows = list(problems), []
    # One table row per file, in order: the paths are printed as they were given.
    for path, value, norm, label, error in zip(
        files,
        frame["anomaly_score"],
        frame["normalized"],
        frame["label"],
        frame["error"],
        strict=True,
    ):
        if isinstance(error, str):
            say(f"skdfm: skipped {path}: {error}")
            skipped.append((path, error))
        else:
            rows.append((path, value, norm, "anomalous" if label == -1 else "normal"))
    return _print_scores(args, rows, skipped)


def _print_scores(args, rows, skipped) -> int:
    """The score table on stdout (and in --csv), the summary on stderr."""
    if not rows:
        raise CommandError("no readable images to score")
    flagged = sum(label == "anomalous" for *_, label in rows)
    writer = csv.writer(sys.stdout, delimiter="\t")
    writer.writerow(["path", "anomaly_score", "normalized", "label"])
    for path, score, norm, label in rows:
        writer.writerow([path, f"{score:.6g}", f"{norm:.4f}", label])
    if args.csv:
        with atomic_write(args.csv, "w") as handle:
            out = csv.writer(handle)
            out.writerow(["path", "anomaly_score", "normalized", "label"])
            out.writerows((spreadsheet_safe(path), *rest) for path, *rest in rows)
    say(
        f"skdfm: scored {len(rows)} images, {flagged} anomalous, {len(skipped)} skipped"
    )
    return EXIT_SKIPPED if skipped else EXIT_OK
