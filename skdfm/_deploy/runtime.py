"""ExportedModel: score with an exported skdfm model; onnxruntime or OpenVINO, no torch.

This module and everything it imports (numpy, Pillow and skdfm's torch-free
modules) load without torch, timm, scikit-learn, scipy or the onnx package: a
line-side PC needs only ``skdfm-runtime[onnxruntime]`` (or ``[openvino]``, see
``docs/deploying.rst``) and the exported file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from numbers import Integral
from pathlib import Path

import numpy as np
from PIL import Image

from .._core.files import ModelFileError
from .._imaging.decode import (
    LAYOUT_HELP,
    MAX_IMAGE_PIXELS,
    NUMPY_SCALES,
    batch_channel_axis,
    channel_axis,
    decode_image_file,
    original_size,
    pil_pixels,
)
from .results import (
    AnomalyMaps,
    bilinear_resize,
    normalize_scores,
    predicted_masks,
    target_sizes,
)

__all__ = [
    "RUNTIMES",
    "RUNTIME_DISTRIBUTION",
    "RUNTIME_EXTRAS",
    "TRAINING_PACKAGES",
    "ExportedModel",
    "OnnxContents",
    "distribution",
    "error_reason",
    "file_sha256",
    "first_line",
    "foreign_operators",
    "install_hint",
    "needs_full_install",
    "prepare_images",
    "require",
    "seal_export",
    "weights_backups",
]

RUNTIMES = ("auto", "onnxruntime", "openvino")
_METADATA_KEY = "skdfm"
#: Key of the export's SHA-256 digest beside its metadata (ONNX metadata_props,
#: OpenVINO rt_info).
DIGEST_KEY = "skdfm_sha256"
#: Metadata format: 2 carries the digest; 1 (skdfm exports before it) loads unverified.
FORMAT_VERSION = 2
#: Limits on a file's declared input size (16384 px a side, 16 MP, e.g. 4096 x 4096):
#: what a model can take, and no 13 GiB batch from a forged header.
_MAX_SIDE, _MAX_INPUT_PIXELS = 2**14, 2**24
#: Bytes a batch's input and its backbone's first activations may take: larger inputs
#: are scored fewer at a time. ~140 bytes per input pixel (see the transformer's
#: memory check) plus the float32 RGB input.
_BATCH_BYTES, _BYTES_PER_PIXEL = 2**30, 140 + 12
#: Labels from the graph and from the metadata's threshold may differ only for scores
#: this close (relative to the threshold) to it: the graph compares at the threshold
#: rounded to its own precision.
_LABEL_TOLERANCE = {"bfloat16": 2**-6}
_DEFAULT_LABEL_TOLERANCE = 1e-4
#: OpenVINO's inference precision for each exported precision.
_OPENVINO_HINTS = {
    "float32": "f32",
    "float16": "f32",
    "int8": "f32",
    "bfloat16": "bf16",
}


# -- images in, as the Pipeline takes them -----------------------------------------


def _unit_float(pixels: np.ndarray, index: int) -> np.ndarray:
    """Pixels scaled to float32 [0, 1] as the Pipeline scales them."""
    dtype = pixels.dtype
    if dtype.kind == "c":
        raise ValueError(f"Complex data not supported: image {index} is {dtype}.")
    if dtype not in NUMPY_SCALES:
        allowed = ", ".join(str(d) for d in NUMPY_SCALES)
        raise ValueError(
            f"Image {index} has dtype {dtype}; images must be {allowed}. Integer "
            "images are read as 0..max of their dtype, float images must lie in "
            "[0, 1]."
        )
    scale = NUMPY_SCALES[dtype]
    if scale is not None:  # one pass, into a C-ordered array (the graph's layout)
        out = np.empty(pixels.shape, np.float32)
        return np.divide(pixels, np.float32(scale), out=out, dtype=np.float32)
    pixels = pixels.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise ValueError(f"Image {index} has NaN or infinite pixel values.")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 1):
        raise ValueError(
            f"Image {index} has pixel values outside [0, 1]; float images must lie "
            "in [0, 1] (divide 8-bit images by 255, or pass them as uint8)."
        )
    return pixels


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float32 resized like the Pipeline (bilinear, antialiased, in
    float): Pillow's float images resample as torch's antialiased bilinear does."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    height, width = size
    return np.stack(
        [
            np.asarray(
                Image.fromarray(channel, mode="F").resize(
                    (width, height), Image.Resampling.BILINEAR
                )
            )
            for channel in image
        ]
    )


def _items(X):
    """The images of ``X``: an (N, C, H, W) array view for batch arrays, else a list
    of paths, PIL images or single-image arrays."""
    if isinstance(X, (str, os.PathLike, Image.Image)):
        raise ValueError(
            "X is one image; pass a list of images (or a batch array), e.g. [X]."
        )
    if hasattr(X, "__array__") and not isinstance(X, (list, tuple)):
        array = np.asarray(X)
        if array.dtype.kind in "OUS" and array.ndim == 1:  # paths (a Series, ...)
            return _nonempty(array.tolist())
        if array.ndim in (3, 4) and len(array) == 0:
            raise ValueError("X holds no image.")
        axis = batch_channel_axis(tuple(array.shape))  # the Pipeline's rules
        if axis is None:
            return array[:, None]
        return array if axis == 1 else np.moveaxis(array, 3, 1)
    try:
        items = list(X)
    except TypeError:
        raise ValueError(
            f"X must be images: an array, or a list of paths, PIL images or "
            f"arrays; got {type(X).__name__}."
        ) from None
    return _nonempty(items)


def _nonempty(items: list) -> list:
    if not items:
        raise ValueError("X holds no image.")
    return items


def _to_input(image: np.ndarray, size, index: int) -> np.ndarray:
    """(C, H, W) pixels as float32 (3, H, W) in [0, 1] at ``size``."""
    if min(image.shape) == 0:
        raise ValueError(f"Image {index} is empty (shape {image.shape}).")
    image = _resized(_unit_float(image, index), size)
    return np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image


def _prepare(item, index: int, size, max_pixels):
    """(3, H, W) float32 at ``size`` and the image's original (height, width)."""
    if isinstance(item, (str, os.PathLike)):
        item = decode_image_file(item, max_pixels)
    if isinstance(item, Image.Image):
        original = original_size(item)
        pixels = pil_pixels(item)
    elif hasattr(item, "__array__"):
        pixels = np.asarray(item)
        original = None
    else:
        raise ValueError(
            f"Image {index} is a {type(item).__name__}; images are arrays, paths or "
            "PIL images."
        )
    if pixels.ndim == 2:
        pixels = pixels[None]
    elif pixels.ndim == 3:
        if channel_axis(tuple(pixels.shape), (0, 2), "image") == 2:
            pixels = np.moveaxis(pixels, 2, 0)
    else:
        raise ValueError(f"Image {index} has shape {pixels.shape}. {LAYOUT_HELP}")
    if original is None:
        original = tuple(pixels.shape[1:])
    return _to_input(pixels, size, index), original


def prepare_images(X, input_size, max_pixels=MAX_IMAGE_PIXELS):
    """``X`` as the exported graph's input: float32 (N, 3, H, W) in [0, 1] at
    ``input_size``, and each image's original ``(height, width)``."""
    return _prepare_items(_items(X), input_size, max_pixels, 0)


def _prepare_items(items, input_size, max_pixels, first_index: int):
    """:func:`prepare_images` of what :func:`_items` returned (or a slice of it)."""
    size = tuple(input_size)
    if isinstance(items, np.ndarray):  # a batch array: (N, C, H, W)
        sizes = [tuple(items.shape[2:])] * len(items)
        if tuple(items.shape[2:]) == size and min(items.shape) > 0:
            if items.dtype.kind == "f":
                for i in range(len(items)):  # checked image by image, named
                    _unit_float(items[i], first_index + i)
            batch = _unit_float(items, first_index)
            if batch.shape[1] == 1:
                batch = np.repeat(batch, 3, axis=1)
            return np.ascontiguousarray(batch, dtype=np.float32), sizes
        images = [_to_input(items[i], size, first_index + i) for i in range(len(items))]
        return np.stack(images).astype(np.float32, copy=False), sizes
    prepared = [
        _prepare(item, first_index + i, size, max_pixels)
        for i, item in enumerate(items)
    ]
    batch = np.stack([image for image, _ in prepared]).astype(np.float32, copy=False)
    return batch, [original for _, original in prepared]


# -- runtimes -------------------------------------------------------------------------


#: The distribution built from this repository for scoring machines
#: (``tools/build_runtime_wheel.py``): the same package, no torch, timm or
#: scikit-learn, and one runtime by extra.
RUNTIME_DISTRIBUTION = "skdfm-runtime"
#: The extras of skdfm-runtime: the runtime each installs.
RUNTIME_EXTRAS = ("onnxruntime", "openvino")


def distribution() -> str:
    """The distribution this skdfm was installed as: ``"skdfm-runtime"`` (scores
    exported models only) or ``"skdfm"``."""
    from importlib import metadata

    try:
        metadata.distribution(RUNTIME_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "skdfm"
    return RUNTIME_DISTRIBUTION


def install_hint(module: str, extra: str) -> str:
    """How to install ``module``, skdfm's extra ``extra``, for this installation."""
    if distribution() == "skdfm":
        return f"pip install 'skdfm[{extra}]'"
    if module in RUNTIME_EXTRAS:
        return f"pip install {module} (the [{module}] extra of {RUNTIME_DISTRIBUTION})"
    return (
        f"{RUNTIME_DISTRIBUTION} scores exported models only; this needs the full "
        f"skdfm with its [{extra}] extra, in another environment"
    )


#: What fitting, exporting and evaluating need beyond an exported model's runtime:
#: skdfm-runtime installs none of them.
TRAINING_PACKAGES = frozenset(
    "torch torchvision timm sklearn scipy joblib safetensors tqdm onnx".split()
)


def needs_full_install(what: str, error: ModuleNotFoundError) -> ImportError | None:
    """The ImportError to raise when ``what`` (``"skdfm.DFMDetector"``, ``"skdfm
    fit"``) failed with ``error`` because a package of the training side is not
    installed, saying which and what to install; None for any other missing
    module."""
    missing = (error.name or "").split(".")[0]
    if missing not in TRAINING_PACKAGES:
        return None
    if distribution() == RUNTIME_DISTRIBUTION:
        reason = (
            f"{RUNTIME_DISTRIBUTION} scores exported models only "
            "(skdfm.ExportedModel, 'skdfm score model.onnx'); fit, export and "
            "evaluate with the full skdfm, installed in another environment"
        )
    else:
        reason = "reinstall skdfm with its dependencies (not with --no-deps)"
    return ImportError(
        f"{what} needs {missing}, which is not installed: {reason}.", name=missing
    )


def require(module: str, extra: str):
    """Import an optional runtime, or raise ImportError saying how to install it
    (skdfm's extra ``extra``, or skdfm-runtime's)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed: {install_hint(module, extra)}"
        ) from error


#: Lines of a runtime's error that say where, not why: OpenVINO's "Exception from
#: src/...cpp:84:" and "Check '...' failed at src/...:" head every message.
_WHERE_LINE = re.compile(r"^(Exception from \S+:\d+:?|Check '.*' failed at \S+:?)$")


def error_reason(error: BaseException, limit: int = 300) -> str:
    """What a runtime's error says went wrong, on one line of at most ``limit``
    characters: its lines without OpenVINO's source locations, joined."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = " ".join(line for line in lines if not _WHERE_LINE.match(line))
    reason = reason or (lines[-1] if lines else type(error).__name__)
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


#: The name the package used for :func:`error_reason`.
first_line = error_reason


def file_sha256(path) -> str:
    """SHA-256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the export's digest -----------------------------------------------------------

#: How the digest sits in a file's bytes: in an ONNX file, a StringStringEntryProto
#: (key field, then a 64-byte value field); in OpenVINO's .xml, an rt_info attribute.
_DIGEST_MARKS = {
    ".onnx": b"\x0a\x0c" + DIGEST_KEY.encode() + b"\x12\x40",
    ".xml": b"<" + DIGEST_KEY.encode() + b' value="',
}
#: The digest's value while the digest is computed (written by export, then replaced).
UNSEALED = "0" * 64


def _digest_span(path: Path, data: bytes) -> slice | None:
    """Where the 64 hex digits of the digest lie in ``data``, None if it has none."""
    mark = _DIGEST_MARKS[path.suffix.lower()]
    start = data.find(mark)
    if start < 0:
        return None
    if data.find(mark, start + 1) >= 0:
        raise ModelFileError(path, "holds more than one skdfm digest: it was forged.")
    start += len(mark)
    return slice(start, start + 64)


def _digest_of(data: bytes, span: slice, weights: bytes | None) -> str:
    """SHA-256 of an export's graph file (its digest read as :data:`UNSEALED`) and of
    its weights file (OpenVINO's .bin) when it has one."""
    digest = hashlib.sha256(b"skdfm-export\0")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data[: span.start])
    digest.update(UNSEALED.encode())
    digest.update(data[span.stop :])
    if weights is not None:
        digest.update(weights)
    return digest.hexdigest()


def seal_export(path) -> str:
    """Write the digest into an exported file whose digest is :data:`UNSEALED`.

    The digest covers every byte of the ``.onnx`` or ``.xml`` file (graph, weights,
    metadata) and, for OpenVINO, of its ``.bin``. It detects damage and edits made
    without skdfm, not a forger who recomputes it. Rewrites ``path`` in place: call
    it on a file being written (:func:`skdfm.export` seals in its scratch folder).

    Returns
    -------
    digest : str
        The 64 hex digits written.
    """
    path = Path(path)
    data = path.read_bytes()
    span = _digest_span(path, data)
    if span is None or data[span] != UNSEALED.encode():
        raise ValueError(f"{path} has no unsealed skdfm digest to set.")
    weights = path.with_suffix(".bin").read_bytes() if path.suffix == ".xml" else None
    digest = _digest_of(data, span, weights)
    path.write_bytes(data[: span.start] + digest.encode() + data[span.stop :])
    return digest


def weights_backups(weights: Path) -> list[Path]:
    """The previous weights an OpenVINO export keeps while it replaces a pair
    (``.model.bin.<16 hex>`` beside ``model.bin``), newest first."""
    pattern = re.compile(re.escape(f".{weights.name}.") + "[0-9a-f]{16}")
    try:
        found = [p for p in weights.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:8]


def _unverified(path, metadata: dict, stacklevel: int = 5) -> None:
    """A file without a digest: skdfm's exports before it (format 1) load with a
    warning; a newer one has lost its digest."""
    if metadata.get("format_version") != 1:
        raise ModelFileError(
            path, "has no skdfm digest although its metadata needs one: it was "
            "changed or damaged after export (re-export the model).",
        )  # fmt: skip
    warnings.warn(
        f"{os.fspath(path)!r} was exported by an skdfm without digests: damage to "
        "it cannot be detected. Re-export the model to verify it when loaded.",
        UserWarning,
        stacklevel=stacklevel,
    )


def _check_digest(path, data: bytes, span, recorded, weights=None) -> None:
    """The digest in ``data`` (at ``span``) is the file's (and ``weights``') and the
    one its metadata records (``recorded``); else the file was changed."""
    if recorded is None:
        raise ModelFileError(path, "has a damaged skdfm digest.")
    if recorded != data[span].decode("ascii", "replace") or recorded != _digest_of(
        data, span, weights
    ):
        raise ModelFileError(
            path, "does not match its SHA-256 digest: it was changed or damaged after "
            "export (re-export the model).",
        )  # fmt: skip


# -- what a file may hold ----------------------------------------------------------

#: ONNX operators of skdfm's exports (default domain): those the exporter emits for
#: ResNets, EfficientNet(-Lite), MobileNetV3, ConvNeXt and RegNet backbones, several
#: layers on uneven grids (adaptive pooling: GatherND), every image score and int8
#: (Q/DQ), and their activation and normalisation relatives.
#: No control flow (Loop, Scan, If) and no custom domains: a file with other
#: operators was not written by skdfm.export.
ONNX_OPERATORS = frozenset(
    """Abs Add AveragePool BatchNormalization Cast Clip Concat Constant Conv Div
    DequantizeLinear Elu Equal Erf Exp Flatten Gather GatherElements GatherND Gelu
    Gemm GlobalAveragePool
    GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish
    Identity InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log
    MatMul Max MaxPool Mean Min Mish Mul Neg Not PRelu Pad Pow QuantizeLinear
    Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape Resize
    Selu Shape Sigmoid Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh TopK
    Transpose Unsqueeze Where""".split()
)
#: The same operators as OpenVINO's own (its .xml and the ONNX files it reads).
OPENVINO_OPERATORS = frozenset(
    """Abs Add AvgPool BatchNormInference Ceiling Clamp Concat Constant Convert
    Convolution Divide Elu Equal Erf Exp FakeQuantize Floor Gather GatherElements
    GatherND Gelu Greater
    GreaterEqual GroupConvolution GroupNormalization HSigmoid HSwish HardSigmoid
    Interpolate Less LessEqual Log LogicalNot MVN MatMul MaxPool Maximum Minimum Mish
    Multiply Negative NormalizeL2 PRelu Pad Parameter Power ReduceL2 ReduceMax
    ReduceMean ReduceMin ReduceSum Relu Reshape Result Select Selu ShapeOf Sigmoid
    Slice SoftMax Softmax SoftPlus Split Sqrt Squeeze StridedSlice Subtract Swish Tanh
    TopK Transpose Unsqueeze VariadicSplit""".split()
)


def _check_operators(path, found, allowed) -> None:
    """Refuse a graph with operators skdfm's exports never hold (a Loop of 2**62
    iterations would run forever)."""
    foreign = sorted(set(found) - allowed)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ModelFileError(
            path, f"holds operators skdfm's exports never hold ({shown}): refused, "
            "it was not written by skdfm.export.",
        )  # fmt: skip


# -- reading an ONNX file without the onnx package ---------------------------------
#
# The few fields the checks need, read from protobuf's wire format: no onnx or
# protobuf package, so onnxruntime-only and OpenVINO-only machines check a file as
# skdfm's own machine does. Field numbers are onnx.proto's (ModelProto, GraphProto,
# NodeProto, AttributeProto, StringStringEntryProto); every other field is skipped by
# its length, never decoded. Repeated and singular message fields concatenate as
# protobuf merges them (a graph given in two pieces has the nodes of both).

_MODEL_GRAPH, _MODEL_METADATA, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 14, 20, 25
_GRAPH_NODE = 1
_NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 4, 5, 7
_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS, _ATTRIBUTE_TYPE = 6, 11, 20
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
#: AttributeProto.AttributeType GRAPH and GRAPHS
_GRAPH_TYPES = (5, 10)


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _fields(data: memoryview):
    """(field number, value) of each field of a protobuf message: an int for
    varints and fixed-width fields, a memoryview for length-delimited ones."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("a field numbered 0")
        if wire == 0:
            value, position = _varint(data, position)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if position + width > len(data):
                raise ValueError("a truncated field")
            value = int.from_bytes(data[position : position + width], "little")
            position += width
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("a field longer than the file")
            value = data[position : position + length]
            position += length
        else:  # groups (3, 4) are not in onnx.proto; 6, 7 are not wire types
            raise ValueError(f"wire type {wire}")
        yield number, value


def _message(value, what: str) -> memoryview:
    if not isinstance(value, memoryview):
        raise ValueError(f"{what} is not a message")
    return value


def _text(value, what: str) -> str:
    try:
        return bytes(_message(value, what)).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None


class OnnxContents:
    """What the load checks read from an ONNX file, read without the onnx package.

    Attributes
    ----------
    properties : dict of str to str
        The model's ``metadata_props`` (the last value of a repeated key, as a dict
        built from ``onnx`` gives).
    operators : set of str
        The operators of the main graph's nodes, ``domain.Op`` outside the default
        domain (as :func:`foreign_operators` names them).
    subgraphs : bool
        Whether a node has a graph attribute (control flow) or the model holds
        training graphs.
    functions : bool
        Whether the model defines functions.
    """

    def __init__(self, data: bytes):
        self.properties: dict[str, str] = {}
        self.operators: set[str] = set()
        self.subgraphs = self.functions = False
        for number, value in _fields(memoryview(data)):
            if number == _MODEL_GRAPH:
                self._read_graph(_message(value, "the graph"))
            elif number == _MODEL_METADATA:
                self._read_entry(_message(value, "a metadata entry"))
            elif number == _MODEL_TRAINING:
                self.subgraphs = True
            elif number == _MODEL_FUNCTIONS:
                self.functions = True

    def _read_entry(self, entry: memoryview) -> None:
        key = value = ""
        for number, field in _fields(entry):
            if number == _ENTRY_KEY:
                key = _text(field, "a metadata key")
            elif number == _ENTRY_VALUE:
                value = _text(field, "a metadata value")
        self.properties[key] = value

    def _read_graph(self, graph: memoryview) -> None:
        for number, value in _fields(graph):
            if number == _GRAPH_NODE:
                self._read_node(_message(value, "a node"))

    def _read_node(self, node: memoryview) -> None:
        op_type, domain = "", ""
        for number, value in _fields(node):
            if number == _NODE_OP_TYPE:
                op_type = _text(value, "an operator name")
            elif number == _NODE_DOMAIN:
                domain = _text(value, "an operator domain")
            elif number == _NODE_ATTRIBUTE:
                for field, content in _fields(_message(value, "an attribute")):
                    if field in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS) or (
                        field == _ATTRIBUTE_TYPE and content in _GRAPH_TYPES
                    ):
                        self.subgraphs = True
        self.operators.add(
            op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"
        )


def _foreign(operators, subgraphs: bool, functions: bool) -> list[str]:
    """The rule of :func:`foreign_operators`, on what a file holds."""
    foreign = sorted(set(operators) - ONNX_OPERATORS)
    return foreign + ["subgraph"] * subgraphs + ["function"] * functions


def foreign_operators(proto) -> list[str]:
    """The operators of an ONNX model that exported files may not hold: those
    outside :data:`ONNX_OPERATORS` (custom domains as ``domain.Op``), and
    ``"subgraph"`` / ``"function"`` where it holds either.

    ``proto`` is an ``onnx.ModelProto``, or the bytes of an ONNX file (read without
    the onnx package, as :class:`ExportedModel` reads it). Empty for every graph
    :func:`skdfm.export` writes."""
    if isinstance(proto, (bytes, bytearray, memoryview)):
        contents = OnnxContents(bytes(proto))
        return _foreign(contents.operators, contents.subgraphs, contents.functions)
    from onnx import AttributeProto

    found = {
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        for n in proto.graph.node
    }
    subgraphs = any(
        attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
        for node in proto.graph.node
        for attribute in node.attribute
    )
    return _foreign(found, subgraphs, len(proto.functions) > 0)


def _onnx_contents(path: Path, data: bytes, refusal: str) -> OnnxContents:
    """What the checks read in ``data``; ``refusal`` says who cannot load it."""
    try:
        return OnnxContents(data)
    except ValueError as error:
        raise ModelFileError(
            path, f"{refusal}: it is not a readable ONNX file ({error})"
        ) from None


def _check_onnx_operators(path: Path, contents: OnnxContents) -> None:
    foreign = _foreign(contents.operators, contents.subgraphs, contents.functions)
    structures = {"subgraph", "function"}
    _check_operators(path, set(foreign) - structures, frozenset())
    if structures & set(foreign):
        raise ModelFileError(
            path, "holds subgraphs or functions, which skdfm's exports never hold: "
            "refused, it was not written by skdfm.export.",
        )  # fmt: skip


def _read_onnx(path: Path, refusal: str) -> tuple[bytes, dict]:
    """The bytes of an exported ONNX file and its checked metadata: its digest, then
    its operators and metadata verified (the runtime then reads these bytes).
    Needs no onnx package: onnxruntime or OpenVINO alone check a file."""
    data = path.read_bytes()
    span = _digest_span(path, data)
    contents = _onnx_contents(path, data, refusal)
    properties = contents.properties
    if span is not None:
        _check_digest(path, data, span, properties.get(DIGEST_KEY))
    elif DIGEST_KEY in properties:
        raise ModelFileError(path, "has a damaged skdfm digest.")
    _check_onnx_operators(path, contents)
    metadata = _check_metadata(path, properties.get(_METADATA_KEY))
    if span is None:
        _unverified(path, metadata)
    return data, metadata


def _finite(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )


def _check_values(path, metadata: dict) -> None:
    """The numbers of the metadata are ones a fitted model has: positive sizes under
    the limits, a finite ordered score range, a threshold on its scale."""
    size, score_range = metadata["input_size"], metadata["score_range"]
    if not (
        len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        and all(0 < s <= _MAX_SIDE for s in size)
        and size[0] * size[1] <= _MAX_INPUT_PIXELS
    ):
        raise ModelFileError(
            path, f"has skdfm metadata with an invalid input_size {size!r:.80}: "
            f"(height, width) of positive ints, at most {_MAX_SIDE} a side and "
            f"{_MAX_INPUT_PIXELS} pixels.",
        )  # fmt: skip
    if not (
        len(score_range) == 2
        and all(_finite(v) for v in score_range)
        and score_range[0] <= score_range[1]
    ):
        raise ModelFileError(
            path, f"has skdfm metadata with an invalid score_range {score_range!r:.80}"
            ": (low, high) finite, low <= high.",
        )  # fmt: skip
    low, high = score_range
    offset = metadata["offset"]
    # Thresholds are taken among scores whose (min, max) is the score range; int8
    # carries both by a line, so allow some distance, on the scores' own scale.
    scale = max(high - low, abs(low), abs(high), np.finfo(np.float32).tiny)
    if not (_finite(offset) and low - 10 * scale <= offset <= high + 10 * scale):
        raise ModelFileError(
            path, f"has skdfm metadata with an invalid offset {offset!r:.40}: a "
            f"finite threshold near its score_range [{low:.6g}, {high:.6g}].",
        )  # fmt: skip
    pixel = metadata.get("pixel_threshold")
    # Map values are parts of image scores (grid cells, interpolated): far above the
    # scores' scale, a threshold would mark no pixel of any image.
    bound = 1e4 * max(scale, abs(offset))
    if pixel is not None and not (_finite(pixel) and 0 <= pixel <= bound):
        raise ModelFileError(
            path, f"has skdfm metadata with an invalid pixel_threshold {pixel!r:.40}: "
            f"finite, in [0, {bound:.3g}] for scores of this scale.",
        )  # fmt: skip
    version = metadata.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool)):
        raise ModelFileError(path, "has skdfm metadata without a valid format_version.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            path, f"was exported in format {version}; this skdfm reads formats up to "
            f"{FORMAT_VERSION} (upgrade skdfm).",
        )  # fmt: skip


def _check_metadata(path, text) -> dict:
    if not text:
        raise ModelFileError(
            path,
            "is not an skdfm export: it has no skdfm metadata (export models "
            "with skdfm.export or 'skdfm export').",
        )
    try:
        metadata = json.loads(text)
    except (TypeError, ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ModelFileError(path, f"has unreadable skdfm metadata: {reason}") from None
    required = {
        "input_size": list, "offset": (int, float), "score_range": list,
        "score_type": str, "precision": str, "outputs": list, "feature_shape": list,
    }  # fmt: skip
    for key, kind in required.items():
        if not isinstance(metadata, dict) or not isinstance(metadata.get(key), kind):
            raise ModelFileError(path, f"has skdfm metadata without a valid {key!r}.")
    if metadata["score_type"] not in ("fre", "nll"):
        raise ModelFileError(
            path, f"has skdfm metadata with an invalid score_type "
            f"{metadata['score_type']!r:.40}: 'fre' or 'nll'.",
        )  # fmt: skip
    _check_values(path, metadata)
    return metadata


def output_names(score_type: str) -> list[str]:
    """The outputs of an exported graph, by name, for its score type."""
    names = ["score_samples", "label"]
    return names + (["anomaly_map", "grid_map"] if score_type == "fre" else [])


def _check_graph(path, metadata: dict, inputs, outputs) -> None:
    """The graph must be the one the metadata describes: one input ``images`` of
    (N, 3, H, W) at the input size, the outputs of its score type by name."""
    expected = output_names(metadata["score_type"])
    height, width = metadata["input_size"]
    if len(inputs) != 1 or sorted(outputs) != sorted(expected):
        raise ModelFileError(
            path, f"has a graph with {len(inputs)} input(s) and outputs "
            f"{sorted(outputs)!r:.200}; its skdfm metadata describes 1 input and "
            f"outputs {sorted(expected)}.",
        )  # fmt: skip
    name, shape = inputs[0]
    fixed = [None if not isinstance(d, int) or d < 0 else d for d in shape]
    if name != "images" or len(shape) != 4 or fixed[1:] != [3, height, width]:
        raise ModelFileError(
            path, f"has a graph input {name!r} of shape {list(shape)}; its skdfm "
            f"metadata describes 'images' of (N, 3, {height}, {width})."
        )  # fmt: skip


class _OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path):
        ort = require("onnxruntime", "onnx")
        data, self.metadata = _read_onnx(path, "cannot be loaded by onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception classes
            raise ModelFileError(
                path, f"cannot be loaded by onnxruntime: {error_reason(error)}"
            ) from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        _check_graph(
            path,
            self.metadata,
            [(i.name, i.shape) for i in self.session.get_inputs()],
            self.outputs,
        )
        self.path = path

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self.outputs, {"images": batch})
        except Exception as error:  # onnxruntime's own classes
            if isinstance(error, MemoryError):
                raise
            raise ModelFileError(
                self.path, f"failed in onnxruntime: {error_reason(error)}"
            ) from None
        return dict(zip(self.outputs, results, strict=True))


class _OpenVinoRuntime:
    name = "openvino"

    def __init__(self, path: Path):
        ov = require("openvino", "openvino")
        core = ov.Core()
        if path.suffix.lower() == ".onnx":
            data, self.metadata = _read_onnx(path, "cannot be read by OpenVINO")
            model = self._read(path, core, data)
        else:
            model, self.metadata = self._read_ir(path, core, ov)
        _check_operators(
            path, {op.get_type_name() for op in model.get_ops()}, OPENVINO_OPERATORS
        )
        self.outputs = [_name(o) for o in model.outputs]
        _check_graph(
            path,
            self.metadata,
            [(_name(i), _dims(i.get_partial_shape())) for i in model.inputs],
            self.outputs,
        )
        hint = _OPENVINO_HINTS.get(self.metadata["precision"], "f32")
        try:
            self.compiled = core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": hint}
            )
        except Exception as error:
            raise ModelFileError(
                path, f"cannot be compiled by OpenVINO: {error_reason(error)}"
            ) from None
        self.path = path

    @staticmethod
    def _read(path: Path, core, data: bytes, weights=None):
        try:
            if weights is None:
                return core.read_model(data)
            return core.read_model(data, weights)
        except Exception as error:  # OpenVINO raises RuntimeError and its own
            raise ModelFileError(
                path, f"cannot be read by OpenVINO: {error_reason(error)}"
            ) from None

    def _read_ir(self, path: Path, core, ov):
        """An .xml and the weights its digest names: its .bin, or the previous
        weights an interrupted export kept (see :func:`weights_backups`)."""
        data = path.read_bytes()
        span = _digest_span(path, data)
        weights = path.with_suffix(".bin")
        # None: no weights file (OpenVINO says what it makes of the .xml alone)
        candidates = [weights] * weights.is_file() + weights_backups(weights) or [None]
        if span is None:
            return self._read_unsealed_ir(path, core, ov, data, candidates)
        sealed = data[span].decode("ascii", "replace")
        for candidate in candidates:
            blob = b"" if candidate is None else candidate.read_bytes()
            if _digest_of(data, span, blob) == sealed:
                break
        else:
            raise ModelFileError(
                path, f"does not match its SHA-256 digest: it or its weights "
                f"{weights.name} were changed or damaged after export, or they belong "
                "to different exports (re-export the model).",
            )  # fmt: skip
        model = self._read(path, core, data, _tensor(ov, blob))
        recorded = None
        if model.has_rt_info([DIGEST_KEY]):
            recorded = model.get_rt_info([DIGEST_KEY]).astype(str)
        _check_digest(path, data, span, recorded, blob)
        metadata = _check_metadata(path, _ir_metadata(model))
        if candidate not in (weights, None):
            warnings.warn(
                f"{weights.name} does not belong to {path.name} (an export to it was "
                f"interrupted); scoring with its own weights, kept in "
                f"{candidate.name}. Export the model again.",
                UserWarning,
                stacklevel=4,
            )
        return model, metadata

    def _read_unsealed_ir(self, path: Path, core, ov, data: bytes, candidates):
        """An .xml of skdfm's exports before the digest: the weights whose SHA-256 its
        metadata records (``weights_sha256``, when it does)."""
        for candidate in candidates:
            blob = b"" if candidate is None else candidate.read_bytes()
            try:
                model = self._read(path, core, data, _tensor(ov, blob))
            except ModelFileError:
                if candidate is candidates[-1]:
                    raise
                continue
            if model.has_rt_info([DIGEST_KEY]):
                raise ModelFileError(path, "has a damaged skdfm digest.")
            metadata = _check_metadata(path, _ir_metadata(model))
            digest = _sha256(blob)
            if metadata.get("weights_sha256", digest) == digest:
                break
        else:
            raise ModelFileError(
                path, f"does not match its weights {path.with_suffix('.bin').name}: "
                "they belong to another export (re-export the model).",
            )  # fmt: skip
        _unverified(path, metadata, stacklevel=6)
        return model, metadata

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            result = self.compiled(batch)
        except Exception as error:  # OpenVINO's own classes
            if isinstance(error, MemoryError):
                raise
            raise ModelFileError(
                self.path, f"failed in OpenVINO: {error_reason(error)}"
            ) from None
        return {
            name: result[output]
            for name, output in zip(self.outputs, self.compiled.outputs, strict=True)
        }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor(ov, blob: bytes):
    """An OpenVINO weights tensor of ``blob`` (None for no weights)."""
    return ov.Tensor(np.frombuffer(blob, np.uint8).copy()) if blob else None


def _ir_metadata(model):
    """The skdfm metadata text in an OpenVINO model's rt_info, or None."""
    if model.has_rt_info([_METADATA_KEY]):
        return model.get_rt_info([_METADATA_KEY]).astype(str)
    return None


def _name(port) -> str:
    """The name of an OpenVINO input or output ("" when it has none)."""
    return port.get_any_name() if port.get_names() else ""


def _dims(shape) -> list:
    """An OpenVINO partial shape as ints, -1 for dynamic dimensions."""
    return [d.get_length() if d.is_static else -1 for d in shape]


class ExportedModel:
    """A model exported by :func:`skdfm.export`, scored without torch.

    Takes the images the Pipeline takes (a batch array, or a list of paths, PIL
    images or arrays of any size), decodes and resizes them as the Pipeline does,
    and runs the exported graph with onnxruntime or OpenVINO. Needs neither torch,
    timm nor scikit-learn (``import skdfm`` does not load them).

    Parameters
    ----------
    path : str or path-like
        An exported ``.onnx`` or OpenVINO ``.xml`` file.
    runtime : {"auto", "onnxruntime", "openvino"}, default="auto"
        ``"auto"``: onnxruntime for ``.onnx`` when installed, else OpenVINO (which
        also reads ``.onnx``); OpenVINO for ``.xml``. A file exported at
        ``"bfloat16"`` runs in bfloat16 on OpenVINO; every other precision runs
        with OpenVINO's ``INFERENCE_PRECISION_HINT`` set to f32 (its CPU plugin
        would otherwise choose bf16 on CPUs with AVX-512 BF16).
    batch_size : int, default=16
        Images decoded and scored at a time (at most: models with large input
        sizes score fewer, so that a batch takes about 1 GiB at most).
    max_image_pixels : int or None, default=2**28
        Image files with more pixels are refused before decoding (see
        :class:`~skdfm.DeepFeatureTransformer`).

    Attributes
    ----------
    runtime_ : str
        The runtime in use.
    metadata_ : dict
        What the file says about the model (skdfm version, backbone, layer, input
        size, normalisation, score type, threshold, precision).
    offset_, score_range_ : float, tuple of (float, float)
        The exported threshold and score range, as on the Python model.
    pixel_threshold_ : float
        The model's pixel threshold, when it had one (not in int8 exports): the
        ``masks`` of :meth:`anomaly_maps` and the command's overlay colours.
    input_size_ : tuple of (int, int)
        ``(height, width)`` images are resized to.

    Raises
    ------
    ModelFileError
        The file is not one skdfm exported as it was written: its SHA-256 digest
        (over the graph, its weights, OpenVINO's ``.bin`` and the metadata) does
        not match; its metadata holds values no fitted model has (sizes beyond the
        limits, non-finite or reversed score ranges, a threshold off the scores'
        scale); its graph's inputs or named outputs are not the metadata's; or it
        holds operators skdfm's exports never hold (control flow such as ``Loop``,
        custom domains). When scoring: the graph's own labels disagree with the
        metadata's threshold.

    Warns
    -----
    UserWarning
        The file was exported by an skdfm before exports carried a digest (format
        1): it loads unverified. Or an OpenVINO export to this path was interrupted
        and the ``.xml`` runs with the previous weights it kept.

    Notes
    -----
    The digest detects damage and edits made without skdfm (a flipped bit, an
    edited threshold); it is not a signature: whoever can write the file can
    recompute it. Outputs are read by name, and the graph's ``label`` output is
    checked against the labels the metadata's ``offset_`` gives on every batch.

    Examples
    --------
    See :func:`skdfm.export`.
    """

    def __init__(
        self, path, *, runtime="auto", batch_size=16, max_image_pixels=MAX_IMAGE_PIXELS
    ):
        path = Path(path)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r} must be one of {RUNTIMES}.")
        if not (isinstance(batch_size, Integral) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive int.")
        if not path.is_file():
            raise FileNotFoundError(f"No exported model file {os.fspath(path)!r}.")
        suffix = path.suffix.lower()
        if suffix not in (".onnx", ".xml"):
            raise ValueError(
                f"{os.fspath(path)!r} is not an exported model: expected a .onnx or "
                "an OpenVINO .xml file."
            )
        if runtime == "auto":
            runtime = "openvino" if suffix == ".xml" else "onnxruntime"
            if runtime == "onnxruntime":
                try:
                    import onnxruntime  # noqa: F401
                except ImportError:
                    runtime = "openvino"
        if runtime == "onnxruntime" and suffix == ".xml":
            raise ValueError("onnxruntime cannot run an OpenVINO .xml file.")
        engine = _OnnxRuntime(path) if runtime == "onnxruntime" else None
        self._engine = engine or _OpenVinoRuntime(path)
        self.path = path
        self.runtime_ = runtime
        self.batch_size = int(batch_size)
        self.max_image_pixels = max_image_pixels
        metadata = self.metadata_ = self._engine.metadata
        self.input_size_ = tuple(metadata["input_size"])
        self.offset_ = float(metadata["offset"])
        self.score_range_ = tuple(float(v) for v in metadata["score_range"])
        self.score_type_ = metadata["score_type"]
        if metadata.get("pixel_threshold") is not None:  # checked with the metadata
            self.pixel_threshold_ = float(metadata["pixel_threshold"])

    def __repr__(self):
        return f"ExportedModel({os.fspath(self.path)!r}, runtime={self.runtime_!r})"

    def _run(self, X, *, maps: bool):
        """Scores (and grid maps, original sizes) of every image, batch by batch."""
        if maps and self.score_type_ != "fre":
            raise ValueError(
                f"Anomaly maps need score_type='fre'; this model uses "
                f"{self.score_type_!r}, whose score does not split over image "
                "locations."
            )
        items = _items(X)
        height, width = self.input_size_
        # Large inputs are scored fewer at a time (a 4096 x 4096 model, one by one).
        per_image = _BYTES_PER_PIXEL * height * width
        step = min(self.batch_size, max(1, _BATCH_BYTES // per_image))
        scores, grids, sizes = [], [], []
        for start in range(0, len(items), step):
            try:
                batch, batch_sizes = _prepare_items(
                    items[start : start + step],
                    self.input_size_,
                    self.max_image_pixels,
                    start,
                )
                outputs = self._engine(batch)
            except MemoryError as error:  # numpy's says nothing
                reason = f" ({error})" if str(error).strip() else ""
                raise MemoryError(
                    f"Out of memory scoring {min(step, len(items) - start)} "
                    f"image(s) at {height}x{width} with {os.fspath(self.path)!r}"
                    f"{reason}: use a smaller batch_size, or a model with a smaller "
                    "input size."
                ) from None
            score_samples = np.asarray(outputs["score_samples"], dtype=np.float64)
            self._check_labels(score_samples, outputs["label"], start)
            scores.append(score_samples)
            if maps:
                grids.append(np.asarray(outputs["grid_map"], dtype=np.float64))
            sizes.extend(batch_sizes)
        score_samples = np.concatenate(scores)
        return score_samples, (np.concatenate(grids) if maps else None), sizes

    def _check_labels(self, score_samples, graph_labels, first_index: int) -> None:
        """The graph's own labels must be those of the metadata's threshold: a graph
        that labels at another threshold than the one it declares is refused, never
        trusted for either verdict."""
        graph_labels = np.asarray(graph_labels).reshape(-1)
        labels = self.labels_from_scores(score_samples)
        if graph_labels.shape != labels.shape:
            raise ModelFileError(
                self.path, f"returned {graph_labels.size} labels for "
                f"{labels.size} scores.",
            )  # fmt: skip
        tolerance = _LABEL_TOLERANCE.get(
            self.metadata_["precision"], _DEFAULT_LABEL_TOLERANCE
        )
        near = np.abs(score_samples - self.offset_) <= tolerance * max(
            abs(self.offset_), np.finfo(np.float32).tiny
        )
        wrong = np.flatnonzero((graph_labels != labels) & ~near)
        if len(wrong):
            i = wrong[0]
            raise ModelFileError(
                self.path, f"labels image {first_index + i} {int(graph_labels[i]):+d} "
                f"where its score {score_samples[i]:.6g} and the threshold "
                f"{self.offset_:.6g} of its metadata give {int(labels[i]):+d}: its "
                "graph and metadata disagree; refused (re-export the model).",
            )  # fmt: skip

    def score_samples(self, X) -> np.ndarray:
        """``model.score_samples``: higher = more normal, float64 (n_images,)."""
        return self._run(X, maps=False)[0]

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for anomalies."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 normal, -1 anomalous, at the exported threshold."""
        return self.labels_from_scores(self.score_samples(X))

    def labels_from_scores(self, score_samples) -> np.ndarray:
        """``predict`` from already computed ``score_samples``."""
        return np.where(np.asarray(score_samples) - self.offset_ >= 0, 1, -1)

    def normalized_scores(self, X) -> np.ndarray:
        """:func:`skdfm.normalized_scores`: [0, 1], 0.5 at the threshold."""
        return normalize_scores(self.score_samples(X), self.offset_, self.score_range_)

    def anomaly_maps(self, X, *, size="image") -> AnomalyMaps:
        """Maps, scores and labels, as :func:`skdfm.anomaly_maps` returns them.

        Parameters
        ----------
        X : images
        size : {"image", "input", "grid"} or tuple of (int, int), default="image"
            As in :func:`skdfm.anomaly_maps`: maps are brought from the feature
            grid to that size in one bilinear step.
        """
        score_samples, grids, sizes = self._run(X, maps=True)
        targets = target_sizes(size, self.input_size_, sizes, len(grids))
        if targets is None:
            maps = grids
        elif len(set(targets)) == 1:
            maps = bilinear_resize(grids, targets[0])
        else:
            maps = [bilinear_resize(grid[None], target)[0]
                    for grid, target in zip(grids, targets, strict=True)]  # fmt: skip
        labels = self.labels_from_scores(score_samples)
        masks = predicted_masks(maps, getattr(self, "pixel_threshold_", None))
        return AnomalyMaps(maps, score_samples, labels, masks)
