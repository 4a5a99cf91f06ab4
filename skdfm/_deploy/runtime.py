"""ExportedModel: score with an exported skdfm model; onnxruntime or OpenVINO, no torch.

This module and everything it imports (numpy, Pillow and skdfm's torch-free
modules) load without torch, timm or scikit-learn: a line-side PC needs only
``pip install 'skdfm[onnx]'`` (or ``[openvino]``) and the exported file.
"""

from __future__ import annotations

import json
import os
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
    "ExportedModel",
    "file_sha256",
    "first_line",
    "prepare_images",
    "require",
]

RUNTIMES = ("auto", "onnxruntime", "openvino")
_METADATA_KEY = "skdfm"
#: Limits on a file's declared input size (16384 px a side, 64 MP): what a model can
#: take, and no 12 GiB batch from a forged header.
_MAX_SIDE, _MAX_INPUT_PIXELS = 2**14, 2**26
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


def require(module: str, extra: str):
    """Import an optional runtime, or raise ImportError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed: pip install 'skdfm[{extra}]'"
        ) from error


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error from a runtime (theirs run long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def file_sha256(path) -> str:
    """SHA-256 of a file, read a MiB at a time."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        "input_size": list, "offset": float, "score_range": list, "score_type": str,
        "precision": str, "outputs": list, "feature_shape": list,
    }  # fmt: skip
    for key, kind in required.items():
        if not isinstance(metadata, dict) or not isinstance(metadata.get(key), kind):
            raise ModelFileError(path, f"has skdfm metadata without a valid {key!r}.")
    size, score_range = metadata["input_size"], metadata["score_range"]

    def number(value) -> bool:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and bool(np.isfinite(value))
        )

    if not (
        len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        and all(0 < s <= _MAX_SIDE for s in size)
        and size[0] * size[1] <= _MAX_INPUT_PIXELS
        and len(score_range) == 2
        and all(number(v) for v in score_range)
        and number(metadata["offset"])
        and metadata["score_type"] in ("fre", "nll")
    ):
        raise ModelFileError(path, "has skdfm metadata with invalid sizes or scores.")
    return metadata


def _check_graph(path, metadata: dict, inputs, outputs) -> None:
    """The graph must be the one the metadata describes: one input ``images`` of
    (N, 3, H, W) at the input size, the outputs of its score type."""
    expected = 4 if metadata["score_type"] == "fre" else 2
    height, width = metadata["input_size"]
    if len(inputs) != 1 or len(outputs) != expected:
        raise ModelFileError(
            path, f"has a graph with {len(inputs)} input(s) and {len(outputs)} "
            f"output(s); its skdfm metadata describes 1 and {expected}."
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
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(
                os.fspath(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception classes
            raise ModelFileError(
                path, f"cannot be loaded by onnxruntime: {first_line(error)}"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = _check_metadata(path, meta.get(_METADATA_KEY))
        _check_graph(
            path,
            self.metadata,
            [(i.name, i.shape) for i in self.session.get_inputs()],
            self.session.get_outputs(),
        )
        self.path = path

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(None, {"images": batch})
        except Exception as error:  # onnxruntime's own classes
            raise ModelFileError(
                self.path, f"failed in onnxruntime: {first_line(error)}"
            ) from None


class _OpenVinoRuntime:
    name = "openvino"

    def __init__(self, path: Path):
        ov = require("openvino", "openvino")
        core = ov.Core()
        try:
            model = core.read_model(os.fspath(path))
        except Exception as error:  # OpenVINO raises RuntimeError and its own
            raise ModelFileError(
                path, f"cannot be read by OpenVINO: {first_line(error)}"
            ) from None
        text = None
        if model.has_rt_info([_METADATA_KEY]):
            text = model.get_rt_info([_METADATA_KEY]).astype(str)
        elif path.suffix.lower() == ".onnx":
            text = _onnx_metadata(path)
        self.metadata = _check_metadata(path, text)
        _check_openvino_weights(path, self.metadata)
        _check_graph(
            path,
            self.metadata,
            [(i.get_any_name() if i.get_names() else "", _dims(i.get_partial_shape()))
             for i in model.inputs],
            model.outputs,
        )  # fmt: skip
        hint = _OPENVINO_HINTS.get(self.metadata["precision"], "f32")
        try:
            self.compiled = core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": hint}
            )
        except Exception as error:
            raise ModelFileError(
                path, f"cannot be compiled by OpenVINO: {first_line(error)}"
            ) from None
        self.path = path

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        try:
            result = self.compiled(batch)
        except Exception as error:  # OpenVINO's own classes
            raise ModelFileError(
                self.path, f"failed in OpenVINO: {first_line(error)}"
            ) from None
        return [result[output] for output in self.compiled.outputs]


def _dims(shape) -> list:
    """An OpenVINO partial shape as ints, -1 for dynamic dimensions."""
    return [d.get_length() if d.is_static else -1 for d in shape]


def _check_openvino_weights(path: Path, metadata: dict) -> None:
    """The .bin must be the one the .xml was saved with (a pair half-replaced by an
    interrupted export would otherwise load new weights under old metadata)."""
    expected = metadata.get("weights_sha256")
    if path.suffix.lower() != ".xml" or expected is None:
        return
    if file_sha256(path.with_suffix(".bin")) != expected:
        raise ModelFileError(
            path, f"does not match its weights {path.with_suffix('.bin').name}: they "
            "belong to another export (re-export the model)."
        )  # fmt: skip


def _onnx_metadata(path: Path):
    onnx = require("onnx", "onnx")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as error:
        raise ModelFileError(
            path, f"is not a readable ONNX file: {first_line(error)}"
        ) from None
    for entry in proto.metadata_props:
        if entry.key == _METADATA_KEY:
            return entry.value
    return None


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
        Images decoded and scored at a time.
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
        pixel = metadata.get("pixel_threshold")
        if pixel is not None:
            if (
                isinstance(pixel, bool)
                or not isinstance(pixel, (int, float))
                or not (np.isfinite(pixel) and pixel >= 0)
            ):
                raise ModelFileError(path, "has an invalid pixel_threshold.")
            self.pixel_threshold_ = float(pixel)

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
        scores, grids, sizes = [], [], []
        for start in range(0, len(items), self.batch_size):
            batch, batch_sizes = _prepare_items(
                items[start : start + self.batch_size],
                self.input_size_,
                self.max_image_pixels,
                start,
            )
            outputs = self._engine(batch)
            scores.append(np.asarray(outputs[0], dtype=np.float64))
            if maps:
                grids.append(np.asarray(outputs[3], dtype=np.float64))
            sizes.extend(batch_sizes)
        score_samples = np.concatenate(scores)
        return score_samples, (np.concatenate(grids) if maps else None), sizes

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
