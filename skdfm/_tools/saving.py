"""Model files that are data, never code: :func:`save` and :func:`load`.

A ``.skdfm`` file is a `safetensors <https://github.com/huggingface/safetensors>`_
file: an 8-byte little-endian header length, a JSON header naming each array (dtype,
shape, byte range), then the arrays' bytes. Its ``__metadata__`` holds

* ``format`` = ``"skdfm-model"``;
* ``skdfm``: a JSON document with the format version, the creation time (UTC), the
  versions of skdfm, torch, timm, scikit-learn, numpy and Python that wrote it, the
  backbone's name, layer and weights digest, and the model: each estimator as its
  class name (from a fixed allow-list) and its state (parameters and fitted
  attributes: JSON values, or references to arrays);
* ``sha256``: a SHA-256 digest of that document and of every array's name, dtype,
  shape and bytes.

Loading parses; it never unpickles, imports or calls anything named by the file.
Before any array is read, the header's declared sizes are checked against the file's
length; then the digest is checked, so a changed byte anywhere is an error rather
than a different model; then only allow-listed classes are rebuilt, through the
same ``__setstate__`` contract as a pickle (version warnings, a device that does not
exist here becomes the CPU). The digest is no signature: whoever forges a file can
recompute it, so every value is checked as if hostile, and a value no fit makes
(non-finite weights, a zero ``image_std_``, a feature grid the backbone does not
give, a reversed ``score_range_``, a guard against decompression bombs turned off)
is refused at load, never left to fail or mislead later.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import warnings
from pathlib import Path

import numpy as np

from .._core.files import ModelFileError, atomic_write
from .._imaging.decode import MAX_IMAGE_PIXELS

__all__ = [
    "MAX_FILE_IMAGE_PIXELS",
    "SUFFIX",
    "ModelFileError",
    "is_model_file",
    "load",
    "save",
]

#: The suffix the command line gives model files.
SUFFIX = ".skdfm"
_FORMAT = "skdfm-model"
_FORMAT_VERSION = 1
# Far above any model's header (resnet50's is ~40 kB, 16384 feature names ~0.5 MB),
# far below safetensors' own 100 MB: parsing a header costs a small multiple of it.
_MAX_HEADER_BYTES = 8 * 2**20
_MAX_DIMENSIONS, _MAX_EXTENT = 8, 2**48
_MAX_DEPTH = 16  # JSON nesting of a saved value (a dict of tuples is 3)
#: The largest ``max_image_pixels`` a file may carry (32768 x 32768, 4 x the default):
#: a file never lifts the decompression-bomb guard; code after loading may.
MAX_FILE_IMAGE_PIXELS = 4 * MAX_IMAGE_PIXELS
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _allowed_classes() -> dict:
    from sklearn.pipeline import Pipeline

    from .._detector import DFMDetector
    from .._transformer import DeepFeatureTransformer

    return {
        "skdfm.DFMDetector": DFMDetector,
        "skdfm.DeepFeatureTransformer": DeepFeatureTransformer,
        "sklearn.pipeline.Pipeline": Pipeline,
    }


def _fitted_names(name: str) -> frozenset:
    """The fitted attributes the allow-listed class ``name`` may have in a model
    file (besides its parameters): those of its table."""
    from .._detector import DETECTOR_ATTRIBUTES
    from .._transformer import TRANSFORMER_ATTRIBUTES

    table = {
        "skdfm.DFMDetector": DETECTOR_ATTRIBUTES,
        "skdfm.DeepFeatureTransformer": TRANSFORMER_ATTRIBUTES,
    }[name]
    return frozenset(row.name for row in table)


def _class_name(model) -> str:
    for name, cls in _allowed_classes().items():
        if type(model) is cls:
            return name
    raise TypeError(
        f"skdfm.save stores a DFMDetector, a DeepFeatureTransformer or a Pipeline of "
        f"them, not a {type(model).__module__}.{type(model).__name__}."
    )


# -- writing -------------------------------------------------------------------------


class _Encoder:
    """Estimator state to JSON values; arrays to named tensors."""

    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}
        #: max_image_pixels values above what a file holds (saved capped)
        self.lowered_limits: list = []

    def value(self, value, key: str):
        import torch

        from .._cache import FeatureCache

        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, tuple):
            return {
                "__tuple__": [self.value(v, f"{key}/{i}") for i, v in enumerate(value)]
            }
        if isinstance(value, list):
            return [self.value(v, f"{key}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "OUS":
                if value.ndim != 1 or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"Cannot save {key}: not a 1-D array of strings.")
                return {"__strings__": [str(v) for v in value]}
            if np.dtype(value.dtype).newbyteorder("<") not in {
                np.dtype(d).newbyteorder("<") for d in _DTYPES.values()
            }:
                raise ValueError(f"Cannot save {key}: dtype {value.dtype}.")
            if key in self.tensors:
                raise ValueError(f"Cannot save {key}: two arrays would share a name.")
            self.tensors[key] = np.asarray(value, order="C")  # keeps 0-d arrays 0-d
            return {"__tensor__": key}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise ValueError(f"Cannot save {key}: a dict with non-string keys.")
            return {
                "__dict__": {k: self.value(v, f"{key}/{k}") for k, v in value.items()}
            }
        if isinstance(value, torch.device):
            return str(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, FeatureCache):  # its rows are never saved
            return {"__feature_cache__": value.max_bytes}
        raise ValueError(
            f"Cannot save {key}: a {type(value).__name__} is not data a model file "
            "holds (set it to an int, a string or None first)."
        )

    def model(self, model, prefix: str) -> dict:
        from sklearn.pipeline import Pipeline
        from sklearn.utils.validation import check_is_fitted

        name = _class_name(model)
        if isinstance(model, Pipeline):
            if prefix:
                raise TypeError("skdfm.save stores no Pipeline inside a Pipeline.")
            _check_pipeline(model)
            if model.memory is not None or getattr(model, "transform_input", None):
                raise ValueError(
                    "skdfm.save stores Pipelines without memory or transform_input."
                )
            steps = []
            for step_name, step in model.steps:
                if step is None or (isinstance(step, str) and step == "passthrough"):
                    steps.append([step_name, step])
                else:
                    steps.append([step_name, self.model(step, f"{prefix}{step_name}/")])
            return {"class": name, "steps": steps, "verbose": bool(model.verbose)}
        check_is_fitted(model)
        state = model.__getstate__()
        limit = state.get("max_image_pixels", 1)
        if limit is None or (isinstance(limit, int) and limit > MAX_FILE_IMAGE_PIXELS):
            state["max_image_pixels"] = MAX_FILE_IMAGE_PIXELS
            self.lowered_limits.append(limit)
        return {
            "class": name,
            "state": {k: self.value(v, f"{prefix}{k}") for k, v in state.items()},
        }


def _digest(document: str, tensors: dict) -> str:
    digest = hashlib.sha256(b"skdfm-model\0")
    digest.update(document.encode("utf-8"))
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.reshape(-1).view(np.uint8))  # no copy; empty arrays too
    return digest.hexdigest()


def _check_pipeline(pipeline) -> None:
    """A saved Pipeline is a DFM model: a transformer and a detector, fitted, with
    plain unique step names, the detector last (ValueError otherwise)."""
    from .._detector import DFMDetector
    from .model import split_model

    names = [name for name, _ in pipeline.steps]
    plain = all(isinstance(n, str) and n and "__" not in n for n in names)
    if not plain or len(set(names)) != len(names):
        raise ValueError(f"Pipeline step names must be unique plain strings: {names}.")
    for name, step in pipeline.steps:
        if step is None:
            raise ValueError(
                f"Pipeline step {name!r} is None: drop it, or make it 'passthrough'."
            )
    split_model(pipeline)
    if not isinstance(pipeline.steps[-1][1], DFMDetector):
        raise ValueError(
            f"the Pipeline's last step, {names[-1]!r}, is not its DFMDetector: the "
            "Pipeline would have no score_samples."
        )


def _check_pixel_limit(limit, path) -> None:
    """A file's ``max_image_pixels``: a number of pixels, never None (no guard)."""
    import reprlib

    if isinstance(limit, bool) or not (
        isinstance(limit, int) and 1 <= limit <= MAX_FILE_IMAGE_PIXELS
    ):
        raise ModelFileError(
            path,
            f"holds max_image_pixels={reprlib.repr(limit)}; a model file holds an "
            f"int from 1 to {MAX_FILE_IMAGE_PIXELS:,}: it never turns the "
            "decompression-bomb guard off (set max_image_pixels=None in code after "
            "loading to do that).",
        )


def _versions() -> dict:
    import sklearn
    import torch

    from .. import __version__

    versions = {
        "skdfm": __version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return versions


def _transformer_of(model):
    """The DeepFeatureTransformer of a model (alone or in its Pipeline), or None."""
    from sklearn.pipeline import Pipeline

    from .._transformer import DeepFeatureTransformer

    steps = [s for _, s in model.steps] if isinstance(model, Pipeline) else [model]
    found = [s for s in steps if isinstance(s, DeepFeatureTransformer)]
    return found[0] if found else None


def _backbone_info(model) -> dict | None:
    transformer = _transformer_of(model)
    if transformer is None:
        return None
    return {
        "name": transformer.feature_params_["backbone"],
        "layer": transformer.layer_,
        "weights_digest": transformer.weights_digest_,
    }


def save(model, path) -> Path:
    """Save a fitted model to a file that loading parses and never executes.

    The file holds every array in `safetensors`_ form (the backbone's weights, the
    components, ...) and, as JSON, the parameters, the fitted scalars, the versions
    that wrote it, the backbone's name and weights digest, the creation time and a
    SHA-256 digest of all of it. It is written to a temporary file beside ``path``
    and renamed into place: a crash leaves the old file or the new one, never a
    partial file. See :doc:`/persistence` for the format and what loading checks.

    .. _safetensors: https://github.com/huggingface/safetensors

    Parameters
    ----------
    model : DFMDetector, DeepFeatureTransformer or Pipeline
        Fitted; a Pipeline may hold only these two, the detector last
        (``"passthrough"`` steps aside; a ``None`` step is refused). A
        ``FeatureCache`` is not saved (a loaded model gets an empty one), a
        pending ``partial_fit`` is finished first, as pickling does. A
        ``max_image_pixels`` of None (no limit) or above
        ``MAX_FILE_IMAGE_PIXELS`` (32768 x 32768) is saved as that bound, with
        a ``UserWarning``: a model file never lifts the decompression-bomb
        guard; set it again after :func:`load`.
    path : str or path-like
        Where to write; the suffix is up to you (the command uses ``.skdfm``).

    Returns
    -------
    path : pathlib.Path

    Examples
    --------
    >>> import numpy as np, skdfm, tempfile, os
    >>> X = np.random.default_rng(0).normal(size=(50, 8))
    >>> det = skdfm.DFMDetector(pca_level=3, device="cpu").fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "det.skdfm")
    >>> _ = skdfm.save(det, path)
    >>> np.array_equal(skdfm.load(path).score_samples(X), det.score_samples(X))
    True
    """
    from safetensors.numpy import save as save_tensors

    encoder = _Encoder()
    document = {
        "format_version": _FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": _versions(),
        "backbone": _backbone_info(model),
        "model": encoder.model(model, ""),
    }
    text = json.dumps(document, sort_keys=True, allow_nan=False)
    metadata = {
        "format": _FORMAT,
        "skdfm": text,
        "sha256": _digest(text, encoder.tensors),
    }
    for limit in encoder.lowered_limits:
        warnings.warn(
            f"max_image_pixels={limit!r} is saved as {MAX_FILE_IMAGE_PIXELS:,} "
            "(32768 x 32768): a model file never lifts the decompression-bomb "
            "guard further. Set max_image_pixels again after skdfm.load if you "
            "trust the images.",
            UserWarning,
            stacklevel=2,
        )
    data = save_tensors(encoder.tensors, metadata=metadata)
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(data)
    return path


# -- reading -------------------------------------------------------------------------


def _header(handle, size: int, path) -> tuple[dict, int]:
    """The parsed JSON header and its length, after checking it against the file."""
    head = handle.read(8)
    if len(head) < 8:
        raise ModelFileError(path, f"has {size} bytes: too short for a model file.")
    length = int.from_bytes(head, "little")
    if length > min(size - 8, _MAX_HEADER_BYTES):
        raise ModelFileError(
            path,
            f"declares a {length}-byte header but has {size} bytes: it is truncated "
            "or not an skdfm model file.",
        )
    try:
        header = json.loads(handle.read(length).decode("utf-8"))
    except (ValueError, RecursionError, OverflowError):  # incl. JSON and UTF-8 errors
        raise ModelFileError(
            path, "has no readable header: not an skdfm model file."
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "has no readable header: not an skdfm model file.")
    return header, length


def _check_layout(header: dict, data_bytes: int, path) -> None:
    """Every declared array must fit the file exactly: nothing is allocated before."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list)):
                raise TypeError
            if len(shape) > _MAX_DIMENSIONS or len(offsets) != 2:
                raise ValueError
            shape = [int(s) for s in shape]
            begin, end = (int(o) for o in offsets)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ModelFileError(path, f"declares array {name!r} badly.") from None
        if (
            any(not 0 <= s <= _MAX_EXTENT for s in shape)
            or math.prod(shape) * dtype.itemsize != end - begin
        ):
            raise ModelFileError(
                path, f"declares array {name!r} with a size that does not add up."
            )
        spans.append((begin, end))
    filled = [span for span in spans if span[0] != span[1]]  # empty arrays share
    position = 0
    for begin, end in sorted(filled):
        if begin != position:
            break
        position = end
    empty_outside = any(not 0 <= b <= data_bytes for b, e in spans if b == e)
    if position != data_bytes or len(filled) != len(set(filled)) or empty_outside:
        raise ModelFileError(
            path,
            f"declares arrays that do not exactly fill its {data_bytes} data bytes: "
            "it is truncated, padded or damaged.",
        )


def is_model_file(path) -> bool:
    """Whether ``path`` starts like an skdfm model file (header only; cheap)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header, _ = _header(handle, size, path)
    except (OSError, ModelFileError):
        return False
    metadata = header.get("__metadata__")
    return isinstance(metadata, dict) and metadata.get("format") == _FORMAT


class _Decoder:
    """JSON values back to state; only the tags the encoder writes are accepted."""

    def __init__(self, tensors: dict, path):
        self.tensors = tensors
        self.used: set[str] = set()
        self.path = path

    def refuse(self, value):
        try:
            shown = json.dumps(value)[:80]
        except (ValueError, RecursionError):
            shown = type(value).__name__
        return ModelFileError(self.path, f"holds a value skdfm does not store: {shown}")

    def value(self, value, depth: int = 0):
        from .._cache import FeatureCache

        if depth > _MAX_DEPTH:
            raise ModelFileError(self.path, "holds values nested too deeply.")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.value(v, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) != 1:
            raise self.refuse(value)
        ((tag, content),) = value.items()
        if tag == "__tuple__" and isinstance(content, list):
            return tuple(self.value(v, depth + 1) for v in content)
        if tag == "__tensor__" and isinstance(content, str):
            if content not in self.tensors:
                raise ModelFileError(self.path, f"lacks the array {content!r}.")
            if content in self.used:
                raise ModelFileError(self.path, f"uses the array {content!r} twice.")
            self.used.add(content)
            return self.tensors[content]
        if tag == "__dict__" and isinstance(content, dict):
            return {str(k): self.value(v, depth + 1) for k, v in content.items()}
        if tag == "__strings__" and isinstance(content, list):
            if all(isinstance(v, str) for v in content):
                return np.asarray(content, dtype=object)
        if tag == "__float__" and content in ("nan", "inf", "-inf"):
            return float(content)
        if tag == "__feature_cache__" and (
            content is None or (type(content) is int and content >= 0)
        ):
            return FeatureCache(max_bytes=content)
        raise self.refuse(value)

    def model(self, node, *, inside_pipeline: bool = False):
        from sklearn.pipeline import Pipeline
        from sklearn.utils.validation import check_is_fitted

        if not isinstance(node, dict) or not isinstance(node.get("class"), str):
            raise self.refuse(node)
        name = node["class"]
        allowed = _allowed_classes()
        if name not in allowed or (inside_pipeline and allowed[name] is Pipeline):
            raise ModelFileError(
                self.path,
                f"names the class {name!r}; only {', '.join(sorted(allowed))} are "
                "loaded (a Pipeline only at the top).",
            )
        cls = allowed[name]
        if cls is Pipeline:
            return self.pipeline(node)
        state = node.get("state")
        if not isinstance(state, dict):
            raise self.refuse(node)
        parameters = set(cls().get_params(deep=False))
        for key in state:
            if key not in parameters | _fitted_names(name) | {"_skdfm_version"}:
                raise ModelFileError(
                    self.path, f"holds an attribute {key!r} that {name} does not have."
                )
        state = {key: self.value(value) for key, value in state.items()}
        if "max_image_pixels" in state:
            _check_pixel_limit(state["max_image_pixels"], self.path)
        estimator = cls.__new__(cls)
        try:
            # Validates the parameters and the fitted state, and rebuilds the
            # backbone (its architecture checked against the arrays first).
            estimator.__setstate__(state)
            check_is_fitted(estimator)
        except Exception as error:  # whatever the state makes fail: not loadable
            raise ModelFileError(
                self.path, f"holds a {name} that cannot be rebuilt: {error}"
            ) from error
        return estimator

    def pipeline(self, node):
        from sklearn.pipeline import Pipeline

        steps = node.get("steps")
        if not isinstance(steps, list):
            raise self.refuse(node)
        built = []
        for item in steps:
            if not (isinstance(item, list) and len(item) == 2):
                raise self.refuse(item)
            step_name, step = item
            if step is not None and step != "passthrough":
                step = self.model(step, inside_pipeline=True)
            built.append((step_name, step))
        pipeline = Pipeline(built, verbose=node.get("verbose") is True)
        try:
            _check_pipeline(pipeline)
        except (TypeError, ValueError) as error:
            raise ModelFileError(self.path, f"holds no DFM model: {error}") from None
        return pipeline


def _compare_versions(saved: dict) -> None:
    """Warn when another torch, timm, scikit-learn or numpy wrote the file (skdfm's
    own version is compared by the estimators, as for pickles)."""
    from .._core.persistence import SkdfmVersionWarning

    if not isinstance(saved, dict):
        return
    here = _versions()
    for package in ("torch", "timm", "scikit-learn", "numpy"):
        then, now = saved.get(package), here.get(package)
        if isinstance(then, str) and now and then.split(".")[:2] != now.split(".")[:2]:
            warnings.warn(
                f"This model was written with {package} {then} and is loaded with "
                f"{now}; scores may differ slightly. Refit it, or load it with the "
                "versions that wrote it.",
                SkdfmVersionWarning,
                stacklevel=3,
            )


def _check_backbone(transformer, path) -> None:
    """The rebuilt backbone has the weights its recorded digest says, all finite
    (variances >= 0), and gives the recorded feature grid at the recorded input
    size: checked by a forward pass on the meta device (shapes only, no memory)."""
    import torch
    from torch.func import functional_call

    from .._cache import weights_digest
    from .._transformer import pool_feature_maps

    backbone = transformer.backbone_
    if weights_digest(backbone) != transformer.weights_digest_:
        raise ModelFileError(
            path, "holds backbone weights whose digest is not the recorded one."
        )
    state = backbone.state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(
                path, f"holds backbone weights {name!r} with NaN or infinity."
            )
        if name.endswith("running_var") and bool((tensor < 0).any()):
            raise ModelFileError(
                path, f"holds backbone variances {name!r} below 0: no fit makes them."
            )
    meta = {name: torch.empty_like(t, device="meta") for name, t in state.items()}
    probe = torch.empty((1, 3, *transformer.input_size_), device="meta")
    kernel = transformer.feature_params_["pooling_kernel_size"]
    try:
        with torch.no_grad():
            maps = functional_call(backbone, meta, (probe,))
            grid = tuple(pool_feature_maps(maps, kernel).shape[1:])
    except NotImplementedError:  # an operation without shapes on meta: not checkable
        return
    except RuntimeError as error:  # too small for the network or the kernel
        grid = f"no grid ({str(error).splitlines()[0]})"
    if grid != transformer.feature_shape_:
        raise ModelFileError(
            path,
            f"holds a DeepFeatureTransformer whose feature_shape_ "
            f"{transformer.feature_shape_} is not what its backbone gives at "
            f"input_size_={transformer.input_size_} with pooling_kernel_size="
            f"{kernel}: {grid}.",
        )


def _check_model(model, path) -> None:
    """What holds across the estimators of a loaded model: the backbone (see
    :func:`_check_backbone`), and a detector fitted on that backbone's rows."""
    from sklearn.pipeline import Pipeline

    transformer = _transformer_of(model)
    if transformer is None:
        return
    _check_backbone(transformer, path)
    if not isinstance(model, Pipeline):
        return
    detector = model.steps[-1][1]
    shape = transformer.feature_shape_
    if detector.n_features_in_ != math.prod(shape) or detector.feature_shape_ not in (
        None,
        shape,
    ):
        raise ModelFileError(
            path,
            f"holds a DFMDetector fitted on {detector.n_features_in_} features "
            f"(grid {detector.feature_shape_}) after a DeepFeatureTransformer that "
            f"makes {math.prod(shape)} (grid {shape}).",
        )


def load(path):
    """Load a model written by :func:`save`, checking it first; nothing is executed.

    Checks, in order: the header's declared array sizes against the file's length
    (before anything is allocated), the SHA-256 digest of the whole content, the
    class names against a fixed allow-list (``DFMDetector``,
    ``DeepFeatureTransformer``, scikit-learn's ``Pipeline``), every value's kind,
    then every value as if forged (the digest is no signature): parameters as
    ``fit`` validates them, fitted values a fit could make (finite weights and
    arrays, a positive ``image_std_``, an ordered ``score_range_``, ...), the
    feature grid the backbone gives at ``input_size_`` equal to the recorded one
    and to the detector's, a Pipeline of a transformer then its detector, and a
    ``max_image_pixels`` in ``[1, MAX_FILE_IMAGE_PIXELS]``: a file never turns the
    decompression-bomb guard off (``max_image_pixels=None`` may be set after
    loading). The model loads on the CPU when its device does not exist here (with a
    :class:`~skdfm.DeviceWarning`), without network, and warns
    (:class:`~skdfm.SkdfmVersionWarning`) when another skdfm version wrote it.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    model : DFMDetector, DeepFeatureTransformer or Pipeline

    Raises
    ------
    ModelFileError
        A ``ValueError`` naming the file: damaged (any changed byte), truncated,
        foreign (not written by :func:`save`), or naming a class or value skdfm
        does not load.
    FileNotFoundError
        When there is no such file.
    """
    from safetensors.numpy import load as load_tensors

    path = Path(path)
    try:
        size = path.stat().st_size
        handle = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"No model file {os.fspath(path)!r}.") from None
    with handle:
        header, length = _header(handle, size, path)
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
            raise ModelFileError(path, "is not an skdfm model file (no skdfm header).")
        _check_layout(header, size - 8 - length, path)
        handle.seek(0)
        raw = handle.read()
    if len(raw) != size:
        raise ModelFileError(path, "changed while it was being read.")
    try:
        tensors = load_tensors(raw)
    except Exception as error:  # safetensors' own checks: any failure is damage
        raise ModelFileError(path, f"has unreadable arrays: {error}") from None
    del raw
    text, expected = metadata.get("skdfm"), metadata.get("sha256")
    if not isinstance(text, str) or not isinstance(expected, str):
        raise ModelFileError(path, "lacks its document or digest.")
    if _digest(text, tensors) != expected:
        raise ModelFileError(
            path,
            "does not match its SHA-256 digest: it was changed or damaged after it "
            "was written. Use an intact copy.",
        )
    try:
        document = json.loads(text)
    except (ValueError, RecursionError, OverflowError):
        raise ModelFileError(path, "has an unreadable document.") from None
    version = document.get("format_version") if isinstance(document, dict) else None
    if type(version) is not int or version != _FORMAT_VERSION:
        raise ModelFileError(
            path,
            f"has format version {version!r}; this skdfm reads version "
            f"{_FORMAT_VERSION}.",
        )
    _compare_versions(document.get("versions"))
    decoder = _Decoder(tensors, path)
    try:
        model = decoder.model(document.get("model"))
    except RecursionError:
        raise ModelFileError(path, "holds values nested too deeply.") from None
    unused = set(tensors) - decoder.used
    if unused:
        raise ModelFileError(path, f"holds arrays no estimator uses: {sorted(unused)}.")
    _check_model(model, path)
    return model
