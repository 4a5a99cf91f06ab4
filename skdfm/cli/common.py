"""Helpers the commands share: finding and reading image files, loading and
building models, the Dask client. I/O and messages only; the work is the
library's."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .._imaging.decode import file_kind, image_files_below
from .options import (
    EXPORTED_SUFFIXES,
    PICKLE_SUFFIXES,
    CommandError,
    max_pixels,
    say,
)

__all__ = [
    "build_pipeline",
    "check_image_arguments",
    "cluster_errors",
    "collect_images",
    "connect",
    "file_batches",
    "fit_transformer",
    "is_exported",
    "layer_text",
    "list_images",
    "load_exported",
    "load_model",
    "maps_root",
    "read_model",
    "spreadsheet_safe",
]


def collect_images(targets: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """:func:`list_images`, its problems said on stderr."""
    files, problems = list_images(targets)
    for target, reason in problems:
        say(f"skdfm: skipped {target}: {reason}")
    return files, problems


def list_images(targets: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named, or found (recursively, sorted) in named folders, and
    ``(target, reason)`` for folders without any or that cannot be listed. File
    names only: nothing is opened.

    Symlinked folders are followed, each real folder searched once
    (:func:`~skdfm._imaging.decode.image_files_below`). Everything with an image
    suffix is kept, also dangling or looping symlinks, FIFOs and devices, and
    named files that do not exist: decoding skips them with the reason (a FIFO or
    a device is never opened), so they are listed instead of silently dropped, and
    the other images are still processed.
    """
    files, problems = [], []
    for target in targets:
        if os.path.isdir(target):
            found, unlisted = image_files_below(target)
            problems.extend(unlisted)
            if not found and not unlisted:
                problems.append((target, "no image files in this folder"))
            files.extend(found)
        else:
            files.append(os.fspath(target))
    return files, problems


#: The first characters that make a spreadsheet read a CSV cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """A text cell of a CSV file that a spreadsheet shows as text, never runs:
    one starting with ``= + - @``, a tab or a carriage return (a file named
    ``=HYPERLINK(...).png``) gets a leading single quote, as OWASP recommends
    against CSV injection. Numbers are written as they are."""
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell


def check_image_arguments(parser, targets: list[str], flag: str) -> None:
    """A FIFO, device or socket named on the command line (also through a
    symlink) is refused before anything is read: reading one can block forever.
    Missing files are not refused here: they are listed as skipped."""
    for target in targets:
        kind = file_kind(target)
        if kind is not None and kind != "a folder":
            parser.error(
                f"argument {flag}: {target} is {kind}, not an image file or a "
                "folder: not read"
            )


def file_batches(paths: list[str], reader, *, progress: bool):
    """Each file decoded once, a batch at a time (one batch ahead), in the
    reader's (a transformer's or an exported model's) batch size and pixel limit;
    the files that cannot be read are listed on stderr as they come and left out."""
    import importlib.util

    from .._imaging.decode import read_image_files

    batch_size = reader.batch_size
    batches = read_image_files(paths, batch_size, reader.max_image_pixels)
    # a bar only on a terminal (in a log file its carriage returns are noise) and
    # where tqdm is installed (skdfm-runtime, which scores exported models, has none)
    if progress and sys.stderr.isatty() and importlib.util.find_spec("tqdm"):
        from tqdm.auto import tqdm

        total = -(-len(paths) // batch_size)
        batches = tqdm(batches, total=total, desc="images", unit="batch")
    for batch in batches:
        for path, reason in batch.failed:
            say(f"skdfm: skipped {path}: {reason}")
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


def read_model(path: str, *, allow_pickle: bool):
    """A model from an .skdfm file, or from a pickle only when allowed."""
    from .._tools.saving import ModelFileError, is_model_file, load

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


def load_model(path: str, args):
    """A saved Pipeline (images in), with the command line's runtime options."""
    from .._tools.model import move_model, split_model

    model = read_model(path, allow_pickle=args.allow_pickle)
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
        transformer.set_params(max_image_pixels=max_pixels(args))
    # the command shows one bar of its own; on a GPU, features go to the detector
    # without a host copy
    transformer.set_params(progress=False, output="torch")
    return model


def is_exported(path: str) -> bool:
    """An exported model (.onnx / .xml), run without torch."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def load_exported(args):
    """An exported model (.onnx / .xml): run by onnxruntime or OpenVINO on the CPU,
    no torch; the command line's batch size and pixel limit."""
    from .._core.files import ModelFileError
    from .._deploy.runtime import ExportedModel

    try:
        return ExportedModel(
            args.model,
            batch_size=args.batch_size or 16,
            max_image_pixels=max_pixels(args),
        )
    except (ModelFileError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error
    except ImportError as error:
        raise CommandError(f"cannot run {args.model}: {error}") from error


def build_pipeline(args, *, progress: bool = False, allow_random: bool = False):
    """A new Pipeline from the model options, its weights chosen by ``--weights``
    (said on stdout); ``allow_random``: random weights as the last resort."""
    from sklearn.pipeline import make_pipeline

    from .. import DeepFeatureTransformer, DFMDetector
    from .._tools.recommended import choose_weights

    if args.checkpoint is not None:
        weights = dict(pretrained=True, checkpoint_path=args.checkpoint)
        why = f"checkpoint {args.checkpoint} (--checkpoint)"
    else:
        asked = "random" if args.random_init else args.weights
        try:
            weights, why = choose_weights(
                args.backbone, asked, allow_random=allow_random
            )
        except OSError as error:
            raise CommandError(f"{error}; or pass --checkpoint FILE") from None
    print(f"weights: {why}")
    transformer = DeepFeatureTransformer(
        backbone=args.backbone,
        layer=args.layer,
        **weights,
        pooling_kernel_size=args.pooling_kernel_size,
        input_size=args.input_size,
        batch_size=args.batch_size or 16,
        device=args.device or "auto",
        progress=progress,
        random_state=0,
        max_image_pixels=max_pixels(args),
        output="torch",  # on a GPU, features go to the detector without a host copy
    )
    detector = DFMDetector(
        pca_level=args.pca_level,
        score_type=args.score_type,
        image_score=args.image_score,
        device=args.device or "auto",
    )
    return make_pipeline(transformer, detector)


def fit_transformer(transformer, X, *, allow_random: bool) -> None:
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
        say(
            f"skdfm: pretrained weights of {transformer.backbone} cannot be had here "
            "(offline); using random init. Results are illustrative only; pass "
            "--checkpoint to use a local copy of the weights."
        )
    transformer.set_params(pretrained=False, checkpoint_path=None)
    transformer.fit(X)


def layer_text(layer) -> str:
    return layer if isinstance(layer, str) else "+".join(layer)


def maps_root(arguments) -> str:
    """The folder the map tree mirrors: the deepest one holding every argument
    (a folder argument itself, a file argument's folder)."""
    folders = [
        os.path.abspath(a) if os.path.isdir(a) else os.path.dirname(os.path.abspath(a))
        for a in arguments
    ]
    return os.path.commonpath(folders)


def connect(address: str):
    """A client of the Dask scheduler at ``address``; a clear error when it cannot
    be had (no dask installed, nothing listening, a server that stays silent or
    does not speak Dask's protocol), within Dask's connect timeout
    (``distributed.comm.timeouts.connect``, 30 s unless configured)."""
    try:
        import distributed  # noqa: F401 - only whether it is installed

        from ..distributed import connect as connect_client
    except ImportError as error:
        raise CommandError(
            "--scheduler needs dask: pip install 'skdfm[dask]'"
        ) from error
    try:  # the handshake too is bounded, in time and in size
        return connect_client(address)
    except (OSError, TimeoutError, ValueError) as error:
        raise CommandError(
            f"cannot reach the Dask scheduler at {address}: {error}"
        ) from error


@contextmanager
def cluster_errors():
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
