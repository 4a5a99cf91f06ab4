"""The ``skdfm`` command: demo, fit, score and evaluate from a shell.

Exit codes: 0 done; 1 failed (a message says why; no model or score table is
written, though ``score --maps`` keeps the overlays of the batches done before);
2 bad command line; 3 done, but some images could not be read and were skipped
(each is listed on stderr); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): files
being written are removed, the ones they would replace are left as they were.

Model files are ``.skdfm`` files (:func:`skdfm.save`): data that loading parses and
checks, never code. A joblib/pickle model runs whatever code it holds when loaded,
so the command loads one only with ``--allow-pickle``, for files you trust.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ._core.files import Terminated, atomic_write, terminate_as_exception
from ._imaging.decode import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
#: Share of the good images' map pixels above the pixel threshold ``skdfm fit`` sets.
PIXEL_CONTAMINATION = 0.001
PICKLE_SUFFIXES = frozenset({".joblib", ".pkl", ".pickle"})
EXPORTED_SUFFIXES = frozenset({".onnx", ".xml"})


class CommandError(Exception):
    """A failure to report in one line (exit code 1)."""


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _collect_images(targets: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named, or found (recursively, sorted) in named folders, and
    ``(target, reason)`` for folders without any (listed on stderr).

    Everything with an image suffix is kept, also dangling or looping symlinks and
    named files that do not exist: decoding skips them with the reason, so they are
    listed instead of silently dropped, and the other images are still processed.
    """
    files, problems = [], []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            found = sorted(
                os.fspath(p)
                for p in path.rglob("*")
                # files, and symlinks even when broken (listed when unreadable);
                # never pipes or devices, which would block the reading
                if p.suffix.lower() in IMAGE_SUFFIXES
                and (p.is_symlink() or p.is_file())
            )
            if not found:
                problems.append((target, "no image files in this folder"))
            files.extend(found)
        else:
            files.append(os.fspath(path))
    for target, reason in problems:
        _say(f"skdfm: skipped {target}: {reason}")
    return files, problems


def _file_batches(paths: list[str], transformer, *, progress: bool):
    """Each file decoded once, a batch at a time (one batch ahead), in the
    transformer's batch size and pixel limit; the files that cannot be read are
    listed on stderr as they come and left out."""
    from tqdm.auto import tqdm

    from ._imaging.decode import read_image_files

    batch_size = transformer.batch_size
    batches = tqdm(
        read_image_files(paths, batch_size, transformer.max_image_pixels),
        total=-(-len(paths) // batch_size),
        desc="images",
        unit="batch",
        # a bar only on a terminal: in a log file its carriage returns are noise
        disable=not progress or not sys.stderr.isatty(),
    )
    for batch in batches:
        for path, reason in batch.failed:
            _say(f"skdfm: skipped {path}: {reason}")
        yield batch


def _looks_like_pickle(path: str) -> bool:
    """A pickle suffix, or the first byte of a pickle (protocol 2+) or of the
    compressed files joblib writes (zlib, gzip, bz2, xz, lz4)."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        head = handle.read(6)
    return head[:1] in (b"\x80", b"x") or head.startswith(
        (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x04\x22\x4d\x18")
    )


def _read_model(path: str, *, allow_pickle: bool):
    """A model from an .skdfm file, or from a pickle only when allowed."""
    from ._tools.saving import ModelFileError, is_model_file, load

    if not Path(path).is_file():
        raise CommandError(f"no such model file: {path}")
    if is_model_file(path) or not _looks_like_pickle(path):
        try:  # a damaged .skdfm file gets load's reason, not advice on pickles
            return load(path)
        except ModelFileError as error:
            raise CommandError(str(error)) from error
    if not allow_pickle:
        raise CommandError(
            f"{path} is not an .skdfm model file. If it is a joblib/pickle model you "
            "trust, pass --allow-pickle: loading a pickle runs any code it holds. "
            "Better, re-save it with skdfm.save(joblib.load(path), 'model.skdfm')."
        )
    import joblib

    try:
        return joblib.load(path)
    except Exception as error:  # a pickle can fail in many ways
        raise CommandError(f"cannot load model {path}: {error}") from error


def _load_model(path: str, args):
    from ._core.model import move_model, split_model

    model = _read_model(path, allow_pickle=args.allow_pickle)
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
    if args.max_image_pixels is not None:
        transformer.set_params(max_image_pixels=_max_pixels(args))
    # the command shows one bar of its own; on a GPU, features go to the detector
    # without a host copy
    transformer.set_params(progress=False, output="torch")
    return model


def _max_pixels(args) -> int | None:
    """--max-image-pixels: the default when not given, None (no limit) for 0."""
    if args.max_image_pixels is None:
        return MAX_IMAGE_PIXELS
    return args.max_image_pixels or None


def _build_pipeline(args, *, progress: bool = False):
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
        progress=progress,
        random_state=0,
        max_image_pixels=_max_pixels(args),
        output="torch",  # on a GPU, features go to the detector without a host copy
    )
    detector = DFMDetector(
        pca_level=args.pca_level,
        score_type=args.score_type,
        image_score=args.image_score,
        device=args.device or "auto",
    )
    return make_pipeline(transformer, detector)


def _fit_transformer(transformer, X, *, allow_random: bool) -> None:
    """Build the backbone; offline without weights, fall back to random init or
    fail. Nothing is computed before this fails."""
    try:
        transformer.fit(X)
        return
    except FileNotFoundError:  # a missing checkpoint: not a download issue
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
    transformer.fit(X)


def _features_of_files(transformer, files, *, progress: bool, check=None):
    """Fit the transformer on the first readable batch and return the feature rows
    of every readable file, the files they belong to and the skipped ones.
    ``check()`` runs once the transformer is fitted, before the other batches."""
    import torch

    parts, used, skipped = [], [], []
    for batch in _file_batches(files, transformer, progress=progress):
        skipped.extend(batch.failed)
        if not batch.images:
            continue
        if not parts:
            _fit_transformer(transformer, batch.images, allow_random=False)
            if check is not None:
                check()
        parts.append(transformer.transform(batch.images))
        used.extend(batch.paths)
    if not parts:
        return None, used, skipped
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts), used, skipped
    return np.concatenate(parts), used, skipped


def _write_maps(folder: str, root: str, paths, images, result, detector) -> None:
    """Overlays on the model's one colour scale, each saying its score and label."""
    from ._evaluation.map_files import (
        colour_scale,
        map_caption,
        map_file,
        write_map_overlay,
    )

    scale = colour_scale(detector)
    for path, image, amap, score, label in zip(
        paths, images, result.maps, result.score_samples, result.labels, strict=True
    ):
        write_map_overlay(
            map_file(folder, path, root),
            image,
            amap,
            scale=scale,
            caption=map_caption(score, label, detector.offset_),
        )


def _write_masks(folder: str, root: str, paths, masks) -> None:
    from ._evaluation.map_files import mask_file, write_mask

    for path, mask in zip(paths, masks, strict=True):
        write_mask(mask_file(folder, path, root), mask)


def _refuse_overwriting(args, files) -> None:
    """Maps and masks never replace files silently: one that exists (an earlier
    run's) stops the command before any image is read, unless --overwrite."""
    from ._evaluation.map_files import map_file, mask_file

    if args.overwrite:
        return
    root = _maps_root(args.images)
    for folder, name in ((args.maps, map_file), (args.masks, mask_file)):
        if not folder:
            continue
        for path in files:
            target = name(folder, path, root)
            if target.exists():
                raise CommandError(
                    f"{target} exists (from an earlier run?): pass --overwrite to "
                    "replace such files, or write to another folder"
                )


def _maps_root(arguments) -> str:
    """The folder the map tree mirrors: the deepest one holding every argument
    (a folder argument itself, a file argument's folder)."""
    folders = [
        os.path.abspath(a) if os.path.isdir(a) else os.path.dirname(os.path.abspath(a))
        for a in arguments
    ]
    return os.path.commonpath(folders)


def _scores_and_maps(model, images, *, maps: bool):
    """Scores and labels (and maps at the images' size when ``maps``), one pass."""
    from . import AnomalyMaps, anomaly_maps

    if maps:
        return anomaly_maps(model, images, size="image")
    scores = model.score_samples(images)
    return AnomalyMaps(None, scores, model[-1].labels_from_scores(scores))


# -- commands ------------------------------------------------------------------


def _demo_split(args):
    """Synthetic parts and the fit / calibrate / test split of the demo."""
    from . import make_defect_images

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


def _demo_report(truth, masks, result) -> None:
    from sklearn.metrics import f1_score

    from . import aupro, image_auroc, pixel_auroc

    f1 = f1_score(truth == -1, result.labels == -1)
    print(f"image AUROC: {image_auroc(truth, result.score_samples):.3f}")
    print(f"pixel AUROC: {pixel_auroc(masks, result.maps):.3f}")
    print(f"AUPRO (FPR <= 0.3): {aupro(masks, result.maps):.3f}")
    print(f"F1 at the threshold calibrated on the validation images: {f1:.3f}")


def _demo_picture(path: Path, images, truth, masks, result, threshold) -> None:
    from PIL import Image

    from ._evaluation.plotting import anomaly_map_grid

    show = np.r_[np.flatnonzero(truth == 1)[:3], np.flatnonzero(truth == -1)[:5]]
    titles = [
        f"{'good part' if truth[i] == 1 else 'defective part'}\n"
        f"score {-result.score_samples[i]:.3g}: "
        f"{'FLAGGED' if result.labels[i] == -1 else 'passed'}"
        for i in show
    ]
    picture = anomaly_map_grid(
        images[show],
        result.maps[show],
        masks=masks[show],
        vmin=0.0,  # the model's scale: the pixel threshold in the middle
        vmax=2.0 * threshold,
        titles=titles,
        threshold=threshold,
    )
    with atomic_write(path) as handle:
        Image.fromarray(picture).save(handle, format="PNG")


def cmd_demo(args) -> int:
    from . import anomaly_maps, calibrate_pixel_threshold, calibrate_threshold, save

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, y, masks, train, val, test = _demo_split(args)
    model = _build_pipeline(args, progress=not args.no_progress)
    transformer, detector = model[0], model[1]
    t = time.perf_counter()
    _fit_transformer(transformer, images[train], allow_random=True)
    detector.fit(transformer.transform(images[train]))
    weights = "pretrained" if transformer.pretrained else "random init"
    print(
        f"fit: {transformer.backbone} ({weights}) {_layer_text(transformer.layer_)}, "
        f"{detector.n_features_in_} features, {detector.n_components_} components, "
        f"{time.perf_counter() - t:.1f} s on {transformer.device_}"
    )
    calibrate_threshold(model, images[val], y[val], method="f1")
    calibrate_pixel_threshold(model, images[val], masks[val])
    result = anomaly_maps(model, images[test])
    _demo_report(y[test], masks[test], result)
    model_path = out / "model.skdfm"
    model[0].set_params(output="numpy")  # saved as a Python user builds it
    save(model, model_path)
    picture_path = out / "anomaly_maps.png"
    _demo_picture(
        picture_path, images[test], y[test], masks[test], result,
        detector.pixel_threshold_,
    )  # fmt: skip
    print(f"saved {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    print(
        f"saved {picture_path} (columns: held-out good then defective parts, "
        "each titled with its score and verdict; top: images; bottom: anomaly "
        "maps on one colour scale, pixel threshold in the middle, true defects "
        "outlined in green)"
    )
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def cmd_fit(args) -> int:
    from ._imaging.features import with_feature_shape
    from ._kernels.scores import check_image_score

    files, problems = _collect_images([args.normal_images])
    model = _build_pipeline(args)
    transformer, detector = model[0], model[1]
    t = time.perf_counter()

    def check_image_score_fits():  # a K beyond the grid: said before the long part
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
    held, train = _holdout_split(len(files), args.holdout)
    try:  # rows picked out of the batches: say their grid again
        detector.fit(with_feature_shape(features[train], transformer.feature_shape_))
    except ValueError as error:
        raise CommandError(str(error)) from error
    _say_fitted(model, len(train), time.perf_counter() - t)
    if len(held):
        held_scores = detector.score_samples(features[held])
        detector.set_threshold(held_scores, contamination=args.contamination)
    if detector.score_type == "fre":
        rows = features[held] if len(held) else features[train]
        _set_pixel_threshold(
            model, with_feature_shape(rows, transformer.feature_shape_)
        )
        _say_pixel_threshold(detector, len(held))
    return _save_fitted(args, model, len(held), skipped)


def _pixel_threshold_from_files(model, files, most: int = 256) -> None:
    """The pixel threshold of a cluster fit, from the maps of at most ``most`` of
    ``files`` (an even spread), computed here; unreadable ones are left out."""
    from ._imaging.decode import read_image_files
    from ._imaging.features import with_feature_shape

    transformer = model[0]
    index = np.linspace(0, len(files) - 1, min(most, len(files))).astype(int)
    picked = [files[i] for i in index]
    rows = []
    size, limit = transformer.batch_size, transformer.max_image_pixels
    for batch in read_image_files(picked, size, limit):
        if batch.images:
            features = transformer.transform(batch.images)
            if hasattr(features, "cpu"):  # the command's torch output, maybe on a GPU
                features = features.cpu().numpy()
            rows.append(np.asarray(features))
    if rows:
        rows = with_feature_shape(np.concatenate(rows), transformer.feature_shape_)
        _set_pixel_threshold(model, rows)


def _say_pixel_threshold(detector, n_held: int) -> None:
    where = f"{n_held} held-out" if n_held else "the training"
    print(
        f"pixel threshold: {detector.pixel_threshold_:.4g}, the "
        f"{1 - PIXEL_CONTAMINATION:.1%} quantile of the maps of {where} images "
        "(their predicted masks, the overlays' colour scale)"
        + ("" if n_held else "; in-sample: expect more false pixels")
    )


def _set_pixel_threshold(model, rows) -> None:
    """The pixel threshold from the maps (at the input size: images may differ in
    size, the values are on one scale) of normal feature rows."""
    from ._tools.maps import upsample
    from ._tools.thresholds import pixel_threshold_of

    transformer, detector = model[0], model[-1]
    maps = []  # float32: 256 KiB an image at 256 px
    for start in range(0, len(rows), 64):
        _, grid = detector.score_samples_with_grid(rows[start : start + 64])
        maps.extend(upsample(grid, transformer.input_size_).float().cpu().numpy())
    threshold, method = pixel_threshold_of(
        maps, pixel_contamination=PIXEL_CONTAMINATION
    )
    detector.set_pixel_threshold(threshold, method=method)


def _save_fitted(args, model, n_held: int, skipped) -> int:
    """Say how the threshold was set, save the model, and the exit code."""
    from . import save

    if n_held and n_held * args.contamination < 1:
        _say(
            f"skdfm: warning: the {args.contamination:.0%} quantile of {n_held} "
            "held-out images is just their most anomalous score; hold out at least "
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
    # Saved as a Python user builds it: numpy features (the command's own torch
    # output only saves a host copy on a GPU), the progress bar as asked.
    model[0].set_params(progress=not args.no_progress, output="numpy")
    save(model, args.output)
    print(f"saved {args.output}")
    return EXIT_SKIPPED if skipped else EXIT_OK


def _holdout_split(n: int, holdout: float):
    """``(held, train)`` indices, sorted: a fixed random ``holdout`` share held out."""
    order = np.random.default_rng(0).permutation(n)
    n_hold = int(round(holdout * n))
    if n_hold and n - n_hold < 2:
        raise CommandError("--holdout leaves fewer than 2 images to fit on")
    return np.sort(order[:n_hold]), np.sort(order[n_hold:])


def _say_fitted(model, n_images: int, seconds: float) -> None:
    transformer, detector = model[0], model[1]
    print(
        f"fitted on {n_images} images in {seconds:.1f} s: "
        f"{transformer.backbone} {_layer_text(transformer.layer_)}, "
        f"{detector.n_features_in_} features, {detector.n_components_} components, "
        f"image score {detector.image_score_}"
    )
    if not transformer.pretrained:
        print(
            "weights: random init (--random-init): scores are illustrative only; "
            "pass --checkpoint FILE to use pretrained weights offline"
        )


def _connect(address: str):
    """A client of the Dask scheduler at ``address``; a clear error when it cannot
    be had (no dask installed, nothing listening)."""
    try:
        import dask
        from distributed import Client
    except ImportError as error:
        raise CommandError(
            "--scheduler needs dask: pip install 'skdfm[dask]'"
        ) from error
    try:  # Dask's own connect timeout (distributed.comm.timeouts.connect)
        return Client(
            address, timeout=dask.config.get("distributed.comm.timeouts.connect")
        )
    except (OSError, TimeoutError, ValueError) as error:
        raise CommandError(
            f"cannot reach the Dask scheduler at {address}: {error}"
        ) from error


@contextmanager
def _cluster_errors():
    """Failures of the cluster itself (a worker killed too often, a lost
    connection) as a CommandError naming the cause, not a traceback."""
    try:
        yield
    except (CommandError, OSError, ValueError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # dask's own: KilledWorker, CancelledError, ...
        module = type(error).__module__.split(".")[0]
        if module not in ("distributed", "dask", "concurrent", "asyncio", "tornado"):
            raise
        raise CommandError(
            f"the Dask cluster failed: {type(error).__name__}: {error}"
        ) from error


def _cluster_skipped(caught, given: dict) -> list:
    """``(path, reason)`` of the SkippedImagesWarnings caught, each file said once
    on stderr by the name it was given as (``given``: absolute path -> name);
    other warnings are shown as usual."""
    import warnings

    from .distributed import SkippedImagesWarning

    skipped, said = [], set()
    for record in caught:
        if isinstance(record.message, SkippedImagesWarning):
            for path, reason in record.message.skipped:
                path = given.get(path, path)
                if path not in said:  # --holdout 0 reads the files twice
                    said.add(path)
                    _say(f"skdfm: skipped {path}: {reason}")
                    skipped.append((path, reason))
        else:
            warnings.showwarning(
                record.message, record.category, record.filename, record.lineno
            )
    return skipped


def _fit_on_cluster(args, model, files, problems, check) -> int:
    """``skdfm fit --scheduler``: the same fit, its backbone passes on the cluster.

    The hold-out split is drawn over the files found (the one-machine fit draws it
    over the readable ones), its threshold pass runs on the cluster too."""
    import warnings

    from .distributed import fit, image_bag

    transformer, detector = model[0], model[1]
    if len(files) < 3:
        raise CommandError(
            f"{len(files)} images in {args.normal_images}; at least 3 needed"
        )
    # Offline weights are settled (or refused) here, before the cluster works.
    _fit_transformer(
        transformer, np.zeros((1, 32, 32, 3), np.uint8), allow_random=False
    )
    check()
    held, train = _holdout_split(len(files), args.holdout)
    train, held = [files[i] for i in train], [files[i] for i in held]
    client = _connect(args.scheduler)
    t = time.perf_counter()
    # The workers read the files: absolute paths, whatever their working folder.
    # Without a held-out set the threshold is the in-sample one of fit(), at the
    # detector's contamination, as on one machine.
    try:
        with warnings.catch_warnings(record=True) as caught, _cluster_errors():
            warnings.simplefilter("always")
            fit(
                model,
                image_bag([os.path.abspath(p) for p in train]),
                client=client,
                threshold_images=image_bag([os.path.abspath(p) for p in held or train]),
                contamination=args.contamination if held else detector.contamination,
            )
    finally:
        client.close()
    given = {os.path.abspath(p): p for p in files}  # said as they were given
    skipped = list(problems) + _cluster_skipped(caught, given)
    _say_fitted(model, detector.n_samples_seen_, time.perf_counter() - t)
    print(f"cluster: {args.scheduler}")
    if detector.score_type == "fre":  # on the client, from a few normal images
        _pixel_threshold_from_files(model, held or train)
        _say_pixel_threshold(detector, len(held))
    return _save_fitted(args, model, len(held), skipped)


def _score_on_cluster(args, model, files, problems) -> int:
    """``skdfm score --scheduler``: the table computed on the cluster, printed as
    the one-machine command prints it."""
    from .distributed import image_bag, score

    client = _connect(args.scheduler)
    try:
        with _cluster_errors():
            table = score(
                model,
                image_bag([os.path.abspath(p) for p in files]),  # read by workers
                client=client,
                maps_dir=args.maps,
                root=_maps_root(args.images),
            )
            frame = client.compute(table).result()
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
            _say(f"skdfm: skipped {path}: {error}")
            skipped.append((path, error))
        else:
            rows.append((path, value, norm, "anomalous" if label == -1 else "normal"))
    return _print_scores(args, rows, skipped)


def _is_exported(path: str) -> bool:
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def _load_exported(args):
    """An exported model (.onnx / .xml): run by onnxruntime or OpenVINO, no torch."""
    from ._deploy.runtime import ExportedModel
    from ._tools.saving import ModelFileError

    if args.device not in (None, "cpu"):
        raise CommandError(
            f"--device {args.device}: exported models run on the CPU (onnxruntime or "
            "OpenVINO); --device is for .skdfm models"
        )
    try:
        return ExportedModel(
            args.model,
            batch_size=args.batch_size or 16,
            max_image_pixels=_max_pixels(args),
        )
    except (ModelFileError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error
    except ImportError as error:
        raise CommandError(f"cannot run {args.model}: {error}") from error


def cmd_score(args) -> int:
    from ._deploy.results import AnomalyMaps, normalize_scores

    exported = _is_exported(args.model)
    model = _load_exported(args) if exported else _load_model(args.model, args)
    files, problems = _collect_images(args.images)
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
    _refuse_overwriting(args, files)
    if args.scheduler:
        if args.masks:
            raise CommandError("--masks is written on one machine, not --scheduler")
        if not files:
            raise CommandError("no readable images to score")
        return _score_on_cluster(args, model, files, problems)
    reader = model if exported else model[0]  # its batch size and pixel limit
    root = _maps_root(args.images)
    rows, skipped = [], list(problems)
    for batch in _file_batches(files, reader, progress=not args.no_progress):
        skipped.extend(batch.failed)
        if not batch.images:
            continue
        if not exported:
            result = _scores_and_maps(
                model, batch.images, maps=bool(args.maps or args.masks)
            )
        elif args.maps or args.masks:
            result = model.anomaly_maps(batch.images)
        else:
            scores = model.score_samples(batch.images)
            result = AnomalyMaps(None, scores, model.labels_from_scores(scores))
        if args.maps:  # written as each batch finishes: no map is kept
            _write_maps(args.maps, root, batch.paths, batch.images, result, detector)
        if args.masks:
            _write_masks(args.masks, root, batch.paths, result.masks)
        normalized = normalize_scores(
            result.score_samples, detector.offset_, detector.score_range_
        )
        rows.extend(
            (path, -score, norm, "anomalous" if label == -1 else "normal")
            for path, score, norm, label in zip(
                batch.paths,
                result.score_samples,
                normalized,
                result.labels,
                strict=True,
            )
        )
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
            out.writerows(rows)
    _say(
        f"skdfm: scored {len(rows)} images, {flagged} anomalous, {len(skipped)} skipped"
    )
    return EXIT_SKIPPED if skipped else EXIT_OK


def _validation_set(folder: str):
    """Paths and labels of --validation: an MVTec-style category (labels from
    test/<defect>/) or a folder of images (labels unknown)."""
    from ._evaluation.datasets import load_mvtec

    root = Path(folder)
    if (root / "test").is_dir():
        data = load_mvtec(root, load_masks=False, missing_masks="none")
        return data.paths, data.y
    files, _ = _collect_images([folder])
    if not files:
        raise CommandError(f"--validation {folder}: no images")
    return files, None


def cmd_export(args) -> int:
    from . import export
    from ._deploy.runtime import ExportedModel
    from ._evaluation.metrics import image_auroc

    model = _load_model(args.model, args)
    calibration, skipped = None, []
    if args.precision == "int8":
        if args.calibration is None:
            raise CommandError(
                "--precision int8 needs --calibration DIR: normal images to calibrate "
                "the activations' int8 ranges on (16-64 are enough)"
            )
        files, problems = _collect_images([args.calibration])
        _, calibration, failed = _decoded(files, model[0])
        skipped += problems + failed
        if not calibration:
            raise CommandError(f"--calibration {args.calibration}: no readable images")
    elif args.calibration is not None:
        raise CommandError("--calibration is only for --precision int8")
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


def _decoded(paths, reader):
    """The readable files among ``paths``, their decoded images, and the others
    (listed on stderr)."""
    used, images, failed = [], [], []
    for batch in _file_batches(paths, reader, progress=False):
        used += batch.paths
        images += batch.images
        failed += batch.failed
    return used, images, failed


def _mask_for(data, i: int, image):
    """The ground-truth mask of image ``i`` (all False for good images), or the
    reason it cannot be had (a missing, unreadable or wrong-sized mask file)."""
    from ._evaluation.datasets import read_mask
    from ._imaging.images import original_size

    size = original_size(image)
    if data.y[i] == 1:
        return np.zeros(size, bool)
    if data.mask_paths[i] is None:
        return "no ground-truth mask (expected ground_truth/<defect>/<name>_mask.png)"
    try:
        mask = read_mask(data.mask_paths[i])
    except (OSError, ValueError) as error:
        return f"unreadable mask: {error}"
    if mask.shape != size:
        return (
            f"its mask {data.mask_paths[i]} is {mask.shape[0]}x{mask.shape[1]}, the "
            f"image {size[0]}x{size[1]}"
        )
    return mask


def cmd_evaluate(args) -> int:
    import json

    from . import load_mvtec
    from ._deploy.results import normalize_scores
    from ._evaluation.evaluation import evaluation_metrics

    model = _load_model(args.model, args)
    try:
        data = load_mvtec(args.category, load_masks=False, missing_masks="none")
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    detector = model[-1]
    has_maps = detector.score_type == "fre"
    # Without a ground_truth folder the evaluation is of images only (no message);
    # with one, a defective image whose mask is missing or unusable is left out of
    # the pixel metrics only, and said.
    has_masks = (Path(args.category) / "ground_truth").is_dir()
    index = {path: i for i, path in enumerate(data.paths)}
    keep, scores, labels, masks, maps, skipped = [], [], [], [], [], []
    unmasked = []  # defective images without a usable mask: image metrics only
    for batch in _file_batches(data.paths, model[0], progress=not args.no_progress):
        skipped.extend(batch.failed)
        if not batch.images:
            continue
        result = _scores_and_maps(model, batch.images, maps=has_maps)
        for j, (path, image) in enumerate(zip(batch.paths, batch.images, strict=True)):
            keep.append(index[path])
            mask = None
            if has_maps and has_masks:
                mask = _mask_for(data, index[path], image)
                if isinstance(mask, str):
                    _say(f"skdfm: no pixel metrics for {path}: {mask}")
                    unmasked.append((path, mask))
                    mask = None
            masks.append(mask)
            maps.append(None if mask is None else result.maps[j])
        scores.append(result.score_samples)
        labels.append(result.labels)
    if not keep:
        raise CommandError(f"no readable images in {args.category}")
    y, scores, labels = data.y[keep], np.concatenate(scores), np.concatenate(labels)
    kinds = [data.defect_type[i] for i in keep]
    metrics = evaluation_metrics(y, scores, labels, kinds, masks, maps)
    if not has_maps:
        pixel_note = "n/a (score_type 'nll' has no anomaly maps)"
    elif not has_masks:
        pixel_note = f"n/a (no ground_truth folder in {args.category})"
    else:
        pixel_note = "n/a (no usable masks with defective pixels)"
    _print_evaluation(metrics, detector.threshold_method_, pixel_note)
    if args.json:
        report = {
            "model": os.path.abspath(args.model),
            "category": os.path.abspath(args.category),
            "threshold_method": detector.threshold_method_,
            **metrics,
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "no_pixel_metrics": [{"path": p, "reason": r} for p, r in unmasked],
        }
        with atomic_write(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.csv:
        normalized = normalize_scores(scores, detector.offset_, detector.score_range_)
        with atomic_write(args.csv, "w") as handle:
            out = csv.writer(handle)
            out.writerow(
                ["path", "defect_type", "truth", "anomaly_score", "normalized",
                 "label"]
            )  # fmt: skip
            for i, k in enumerate(keep):
                out.writerow(
                    [data.paths[k], kinds[i],
                     "defective" if y[i] == -1 else "good", f"{-scores[i]:.6g}",
                     f"{normalized[i]:.4f}",
                     "anomalous" if labels[i] == -1 else "normal"]
                )  # fmt: skip
    if args.report:  # last: the numbers are written whatever happens to it
        _write_evaluation_report(
            args, model, data, keep, (y, scores, labels, kinds), metrics, masks
        )
    return EXIT_SKIPPED if skipped else EXIT_OK


def _write_evaluation_report(args, model, data, keep, results, metrics, masks):
    """``--report DIR``: the HTML page, with the worst mistakes drawn again (one
    small second pass over at most 8 images)."""
    from . import anomaly_maps
    from ._evaluation.map_files import colour_scale, overlay_picture
    from ._evaluation.report import write_report

    y, scores, labels, kinds = results
    detector = model[-1]
    anomaly = -scores
    good, bad = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    flagged_good = good[labels[good] == -1]
    passed_bad = bad[labels[bad] == 1]

    def worst(pool, fallback, key):  # the mistakes, else the closest calls
        pool = pool if len(pool) else fallback
        return pool[np.argsort(key(pool), kind="stable")][:4]

    worst_fp = worst(flagged_good, good, lambda p: -anomaly[p])
    worst_fn = worst(passed_bad, bad, lambda p: anomaly[p])
    picked = [*worst_fp, *worst_fn]
    paths = [data.paths[keep[i]] for i in picked]
    pictures = []
    if picked and detector.score_type == "fre":
        result = anomaly_maps(model, paths, size="image")
        scale = colour_scale(detector)
        for j, i in enumerate(picked):
            caption = (
                f"{kinds[i]}: anomaly score {anomaly[i]:.4g} "
                f"({'flagged' if labels[i] == -1 else 'passed'})"
            )
            picture = overlay_picture(
                paths[j], result.maps[j], scale=scale, caption=caption,
                mask=masks[i] if masks[i] is not None and masks[i].any() else None,
            )  # fmt: skip
            pictures.append((np.asarray(picture), f"{paths[j]}"))
    else:  # nll: no maps to draw, the files and scores still say which
        pictures = [
            (None, f"{paths[j]}: {kinds[i]}, anomaly score {anomaly[i]:.4g} "
                   f"({'flagged' if labels[i] == -1 else 'passed'})")
            for j, i in enumerate(picked)
        ]  # fmt: skip
    cases = pictures
    notes = [
        f"Model: {os.path.abspath(args.model)}; category: "
        f"{os.path.abspath(args.category)}.",
        f"Threshold: {-detector.offset_:.4g} ({detector.threshold_method_}); maps on "
        "one colour scale, the pixel threshold in its middle, true defects "
        "outlined in green.",
    ]
    path = write_report(
        args.report,
        title=f"skdfm evaluation: {os.path.basename(os.path.abspath(args.category))}",
        metrics=metrics,
        y=y,
        scores=scores,
        offset=detector.offset_,
        false_positives=cases[: len(worst_fp)],
        false_negatives=cases[len(worst_fp) :],
        notes=notes,
    )
    print(f"report: {path}")


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


# -- argument parsing --------------------------------------------------------------


# -- argument types: a bad value is a usage error (exit 2) naming the flag ------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _share(low: float, high: float, *, low_closed: bool, high_closed: bool):
    """A float in an interval, e.g. [0, 1) for --holdout."""
    shown = (
        f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
    )

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{value:g} must be in {shown}")
        return value

    return parse


def _pca_level(text: str):
    """An integer >= 2 is a number of components (as anomalib's rule ends with), a
    float in (0, 1] a share of the variance; "1" is refused as ambiguous."""
    if text.strip() == "1":
        raise argparse.ArgumentTypeError(
            "1 is ambiguous: write 1.0 to keep all the variance; an integer >= 2 "
            "is a number of components"
        )
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        if text.strip().lstrip("+-").isdigit():
            raise
    return _share(0.0, 1.0, low_closed=False, high_closed=True)(text)


def _pixel_limit(text: str) -> int:
    """A positive number of pixels, or 0 for no limit."""
    return 0 if text.strip() == "0" else _positive_int(text)


def _layer(text: str):
    """A layer name or its index in the backbone's feature_info; a comma-separated
    list of them for several layers."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a layer name or index, or a comma-separated list of them"
        )
    layers = [int(item) if item.isdigit() else item for item in items]
    return layers[0] if len(layers) == 1 else layers


def _image_score(text: str):
    """'sum', 'max' or a positive number of cells."""
    if text in ("sum", "max"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not 'sum', 'max' or a positive number of cells"
    )


def _layer_text(layer) -> str:
    return layer if isinstance(layer, str) else "+".join(layer)


def _check_output(parser, output, *, flag="-o/--output", model=True) -> None:
    path = Path(output)
    if model and path.suffix.lower() in PICKLE_SUFFIXES:
        parser.error(
            f"argument {flag}: {output}: the command writes .skdfm model files "
            "(data, safe to load), not pickles; name it e.g. model.skdfm"
        )
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        parser.error(f"argument {flag}: {output} is a folder")
    if not folder.is_dir():
        parser.error(f"argument {flag}: no folder {folder} to write {path.name} in")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"argument {flag}: folder {folder} is not writable")


def _check_report(parser, folder: str) -> None:
    """--report: matplotlib importable and the folder writable, said before any
    image is read."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        parser.error(
            "argument --report: the report draws its plots with matplotlib: pip "
            "install 'skdfm[plot]'"
        )
    path = Path(folder)
    if path.exists() and not path.is_dir():
        parser.error(f"argument --report: {folder} is a file, not a folder")
    parent = path if path.is_dir() else path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"argument --report: cannot write a folder in {parent}")


def _check_device(parser, device) -> None:
    if device is not None:
        from ._core.device import resolve_device

        try:
            resolve_device(device)
        except ValueError as error:
            parser.error(f"argument --device: {error}")


def _add_runtime(parser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device", help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available)"
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="images per backbone batch (default: the model's, 16 for a new one)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument(
        "--max-image-pixels",
        type=_pixel_limit,
        metavar="N",
        help="image files with more pixels are skipped, a guard against "
        f"decompression bombs (default {MAX_IMAGE_PIXELS:,} = 16384 x 16384; "
        "0 = no limit)",
    )


def _add_scheduler(parser) -> None:
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the backbone passes on the Dask cluster whose scheduler is at "
        "ADDRESS (e.g. tcp://10.0.0.5:8786; needs skdfm[dask]); the files must be "
        "readable by the workers at the same paths",
    )


def _add_model_options(parser, *, backbone: str, layer: str, pooling: int) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone", default=backbone, help=f"timm model (default {backbone})"
    )
    group.add_argument(
        "--layer",
        type=_layer,
        default=layer,
        help=f"feature layer, by name or index, or several separated by commas "
        f"(layer2,layer3: one pass, one grid; default {layer})",
    )
    group.add_argument(
        "--pca-level",
        type=_pca_level,
        default=0.97,
        metavar="LEVEL",
        help="share of the variance kept, in (0, 1], or a number of components "
        "(an integer, e.g. the one anomalib ends with; default 0.97)",
    )
    group.add_argument(
        "--pooling-kernel-size",
        type=_positive_int,
        default=pooling,
        metavar="K",
        help=f"average-pooling kernel (default {pooling})",
    )
    group.add_argument(
        "--input-size",
        type=_positive_int,
        default=256,
        metavar="PX",
        help="images are resized to PX x PX (default 256)",
    )
    group.add_argument("--score-type", choices=["fre", "nll"], default="fre")
    group.add_argument(
        "--image-score",
        type=_image_score,
        default="sum",
        metavar="{sum,max,K}",
        help="image score of an fre model: the anomaly map's sum (anomalib's FRE, "
        "default), its largest cell (max) or the mean of its K largest cells",
    )
    group.add_argument(
        "--checkpoint", metavar="FILE", help="local weights file (offline machines)"
    )
    group.add_argument(
        "--random-init", action="store_true", help="random weights (testing only)"
    )


def _add_allow_pickle(parser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load a joblib/pickle MODEL; only for files you trust: loading a "
        "pickle runs any code it holds",
    )


def _add_demo(commands) -> None:
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
        type=_positive_int,
        default=100,
        help="good parts to fit on (default 100)",
    )
    demo.add_argument(
        "--image-size", type=_positive_int, default=256, help="default 256"
    )
    demo.add_argument(
        "--texture", choices=["woven", "brushed", "grain"], default="woven"
    )
    demo.add_argument("--random-state", type=int, default=0)
    _add_model_options(demo, backbone="resnet18", layer="layer2", pooling=2)
    _add_runtime(demo)
    demo.set_defaults(func=cmd_demo)


def _add_fit(commands) -> None:
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
        "-o",
        "--output",
        required=True,
        metavar="MODEL",
        help="model file to write (.skdfm: data, safe to load; see 'skdfm.save')",
    )
    fit.add_argument(
        "--holdout",
        type=_share(0.0, 1.0, low_closed=True, high_closed=False),
        default=0.2,
        help="share of images held out to set the threshold (default 0.2; 0 = "
        "in-sample threshold)",
    )
    fit.add_argument(
        "--contamination",
        type=_share(0.0, 0.5, low_closed=False, high_closed=True),
        default=0.01,
        help="share of held-out good images allowed above the threshold (default "
        "0.01, for a production line; DFMDetector's own default, 0.1, is "
        "scikit-learn's; --holdout 0 uses it). A held-out set needs at least "
        "1/contamination images for the quantile to mean more than its maximum",
    )
    _add_model_options(fit, backbone="resnet50", layer="layer3", pooling=4)
    _add_runtime(fit)
    _add_scheduler(fit)
    fit.set_defaults(func=cmd_fit)


def _add_score(commands) -> None:
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
    _add_allow_pickle(score)
    score.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files, or folders searched recursively for images",
    )
    score.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    score.add_argument(
        "--maps",
        metavar="DIR",
        help="write anomaly-map overlays here, mirroring the folders of the images "
        "(test/crack/000.png -> DIR/crack/000.png_map.png)",
    )
    score.add_argument(
        "--overwrite",
        action="store_true",
        help="replace map and mask files of an earlier run (without it, an "
        "existing one stops the command before any image is read)",
    )
    score.add_argument(
        "--masks",
        metavar="DIR",
        help="write predicted defect masks here (white = map at or above the "
        "model's pixel threshold), named as --maps names overlays",
    )
    _add_runtime(score)
    _add_scheduler(score)
    score.set_defaults(func=cmd_score)


def _add_export(commands) -> None:
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
        "out", metavar="OUT", help="the file to write: model.onnx, or model.xml"
    )
    _add_allow_pickle(export)
    export.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    export.add_argument(
        "--precision",
        choices=["float32", "float16", "bfloat16", "int8"],
        default="float32",
        help="float32 (default, equal scores); bfloat16 and float16 (weights): "
        "openvino only; int8: quantised convolutions, needs --calibration",
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
    _add_runtime(export)
    export.set_defaults(func=cmd_export)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="image/pixel AUROC and AUPR, AUPRO and F1 on an MVTec-style category",
        description="Evaluate a saved model on <category>/test: image metrics of "
        "every readable image, pixel metrics where <category>/ground_truth has "
        "masks, overall and per defect type.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="model file from 'skdfm fit'")
    _add_allow_pickle(evaluate)
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
        "--csv", metavar="FILE", help="also write each image's score and label as CSV"
    )
    evaluate.add_argument(
        "--report",
        metavar="DIR",
        help="also write DIR/report.html: one self-contained page with the metrics, "
        "ROC and precision-recall curves, the score histogram with the threshold "
        "and the worst mistakes over their maps (needs matplotlib)",
    )
    _add_runtime(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="skdfm",
        description="Deep Feature Modeling (DFM) anomaly detection: fit on images "
        "of good parts, score new ones, localise defects.",
        epilog="Exit codes: 0 done; 1 failed; 2 bad command line; 3 done, some "
        "images skipped (listed on stderr); 130 interrupted; 143 terminated. Model "
        "files are .skdfm (data, checked when loaded); pickles only with "
        "--allow-pickle.",
    )
    parser.add_argument("--version", action="version", version=f"skdfm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_fit, _add_score, _add_export, _add_evaluate):
        add(commands)
    return parser


def main(argv=None) -> int:
    """Run the ``skdfm`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Everything the command line decides is checked before any image is read.
    if getattr(args, "output", None) is not None:
        _check_output(parser, args.output)
    if getattr(args, "csv", None) is not None:
        _check_output(parser, args.csv, flag="--csv", model=False)
    if getattr(args, "json", None) is not None:
        _check_output(parser, args.json, flag="--json", model=False)
    if getattr(args, "report", None) is not None:
        _check_report(parser, args.report)
    exported_model = args.command == "score" and _is_exported(args.model)
    if not exported_model:  # exported models run on the CPU, without torch
        _check_device(parser, getattr(args, "device", None))
    elif args.scheduler:
        parser.error(
            "argument --scheduler: it runs .skdfm models; score an exported model "
            "without it"
        )
    if args.command == "export":
        suffix = ".xml" if args.format == "openvino" else ".onnx"
        if Path(args.out).suffix.lower() != suffix:
            parser.error(
                f"argument OUT: --format {args.format} writes a {suffix} file, not "
                f"{args.out}"
            )
        _check_output(parser, args.out, flag="OUT", model=False)
    image_score = getattr(args, "image_score", "sum")
    if image_score != "sum" and args.score_type != "fre":
        parser.error(
            f"argument --image-score: {image_score} needs --score-type fre (the nll "
            "score does not split over image locations)"
        )
    try:
        with terminate_as_exception():
            return args.func(args)
    except CommandError as error:
        _say(f"skdfm: error: {error}")
    except (OSError, ValueError, MemoryError) as error:
        _say(f"skdfm: error: {error}")
    except KeyboardInterrupt:
        _say("skdfm: interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        _say("skdfm: terminated")
        return EXIT_TERMINATED
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
