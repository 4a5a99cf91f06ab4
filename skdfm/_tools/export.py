"""Export a fitted Pipeline(DeepFeatureTransformer, DFMDetector) to ONNX or OpenVINO.

One graph from images to what the Python model computes:

* input ``images``: float32 ``(N, 3, H, W)`` RGB in [0, 1] at the model's input
  size (``input_size_``), N dynamic. Decoding, grayscale-to-RGB and the resize stay
  outside the graph, where :class:`~skdfm.ExportedModel` does them as the Pipeline
  does (antialiased bilinear resize in float, so no 8-bit rounding on the way);
  the backbone's mean/std normalisation is inside;
* outputs ``score_samples`` ``(N,)`` (equal to ``model.score_samples``, higher =
  more normal), ``label`` ``(N,)`` int64 (+1 / -1 at the model's ``offset_``) and,
  for ``"fre"`` models, ``anomaly_map`` ``(N, H, W)`` at the input size (anomalib's
  map) and ``grid_map`` ``(N, h, w)`` on the feature grid (from which
  :class:`~skdfm.ExportedModel` brings maps to each image's own size).

The DFM head runs in float32 in the graph and computes the residual explicitly
(``xc - (xc V) V^T``), which keeps FRE's relative error at float32 rounding even
when the FRE is a small part of ``||xc||^2``.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import tempfile
from pathlib import Path

import numpy as np

from .._deploy.runtime import (
    DIGEST_KEY,
    FORMAT_VERSION,
    UNSEALED,
    error_reason,
    file_sha256,
    foreign_operators,
    output_names,
    require,
    seal_export,
    weights_backups,
)

__all__ = ["FORMATS", "PRECISIONS", "export", "metadata_of"]

FORMATS = ("onnx", "openvino")
PRECISIONS = ("float32", "float16", "bfloat16", "int8")
#: Key of the JSON metadata in the ONNX file's metadata_props and in OpenVINO's
#: rt_info.
METADATA_KEY = "skdfm"
_OPSET = 18


def _graph(transformer, detector, offset: float):
    """The torch module the exported graph is traced from, on the CPU (a copy of
    the backbone: the model itself stays where it is), labelling at ``offset``."""
    import copy

    import torch
    import torch.nn.functional as F

    from .._kernels.scores import gaussian_variances
    from .._transformer import pool_feature_maps

    kernel = transformer.feature_params_["pooling_kernel_size"]
    channels, rows, cols = transformer.feature_shape_
    height, width = transformer.input_size_
    score_type, image_score = detector.score_type_, detector.image_score_
    backbone = copy.deepcopy(transformer.backbone_).cpu().float()
    backbone = backbone.to(memory_format=torch.contiguous_format)

    class DFMGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.register_buffer(
                "image_mean", torch.tensor(transformer.image_mean_).view(1, 3, 1, 1)
            )
            self.register_buffer(
                "image_std", torch.tensor(transformer.image_std_).view(1, 3, 1, 1)
            )
            self.register_buffer("mean", torch.from_numpy(detector.mean_).float())
            self.register_buffer(
                "components", torch.from_numpy(detector.components_).float()
            )
            variances = gaussian_variances(
                torch.from_numpy(detector.singular_values_), detector.n_samples_
            )
            self.register_buffer("variances", variances.float())
            self.register_buffer("log_det", variances.log().sum().float())

        def forward(self, images):
            x = (images - self.image_mean) / self.image_std
            features = pool_feature_maps(self.backbone(x), kernel).flatten(1)
            xc = features - self.mean
            z = xc @ self.components.T
            if score_type == "nll":
                score = (z * z / self.variances).sum(1) + self.log_det
                score_samples = -score
                label = torch.where(score_samples - offset >= 0, 1, -1)
                return score_samples, label
            residual = xc - z @ self.components
            grid = (residual * residual).reshape(-1, channels, rows, cols).sum(1)
            cells = grid.flatten(1)
            if image_score == "sum":
                score = cells.sum(1)
            elif image_score == "max":
                score = cells.amax(1)
            else:
                score = cells.topk(int(image_score), dim=1).values.mean(1)
            score_samples = -score
            label = torch.where(score_samples - offset >= 0, 1, -1)
            anomaly_map = F.interpolate(
                grid[:, None], size=(height, width), mode="bilinear",
                align_corners=False,
            )[:, 0]  # fmt: skip
            return score_samples, label, anomaly_map, grid

    return DFMGraph().eval()


def metadata_of(transformer, detector, *, format: str, precision: str) -> dict:
    """What an exported file says about itself (stored as JSON in the file)."""
    from .. import __version__

    layer = transformer.layer_
    return {
        "format_version": FORMAT_VERSION,
        "skdfm_version": __version__,
        "format": format,
        "precision": precision,
        "backbone": transformer.feature_params_["backbone"],
        "layer": layer if isinstance(layer, str) else list(layer),
        "input_size": list(transformer.input_size_),
        "image_mean": list(transformer.image_mean_),
        "image_std": list(transformer.image_std_),
        "pooling_kernel_size": int(transformer.feature_params_["pooling_kernel_size"]),
        "feature_shape": list(transformer.feature_shape_),
        "score_type": detector.score_type_,
        "image_score": detector.image_score_,
        "offset": float(detector.offset_),
        "threshold_method": detector.threshold_method_,
        "score_range": [float(v) for v in detector.score_range_],
        "n_components": int(detector.n_components_),
        # named in the report's header; exports made before skdfm recorded them
        # lack them (the report then says "not recorded")
        "pca_level": (
            int(detector.pca_level)
            if isinstance(detector.pca_level, numbers.Integral)
            else float(detector.pca_level)
        ),
        "weights_source": str(
            getattr(transformer, "weights_source_", None) or "not recorded"
        ),
        **(
            {"pixel_threshold_method": str(detector.pixel_threshold_method_)}
            if getattr(detector, "pixel_threshold_method_", None) is not None
            and getattr(detector, "pixel_threshold_", None) is not None
            and precision != "int8"
            else {}
        ),
        # float maps only: int8 moves map values, and so where a threshold falls
        **(
            {"pixel_threshold": float(detector.pixel_threshold_)}
            if getattr(detector, "pixel_threshold_", None) is not None
            and precision != "int8"
            else {}
        ),
        "input": {
            "name": "images",
            "dtype": "float32",
            "layout": "NCHW",
            "range": [0.0, 1.0],
        },  # fmt: skip
        "outputs": output_names(detector.score_type_),
    }


def _fitted_parts(model):
    """(transformer, detector) of a fitted Pipeline, or a clear error."""
    from sklearn.utils.validation import check_is_fitted

    from .._detector import DFMDetector
    from .._transformer import DeepFeatureTransformer
    from .model import split_model

    if isinstance(model, DFMDetector):
        raise ValueError(
            "export needs the images-to-scores model: a Pipeline(DeepFeatureTransformer"
            ", DFMDetector). A bare DFMDetector scores feature rows and has no "
            "backbone to export."
        )
    transformer, detector = split_model(model)
    if not isinstance(transformer, DeepFeatureTransformer):
        raise ValueError(
            "export needs a Pipeline(DeepFeatureTransformer, DFMDetector); got "
            f"{type(model).__name__}."
        )
    check_is_fitted(transformer)
    check_is_fitted(detector)
    if "offset_" not in vars(detector):
        raise ValueError(
            "The detector has no threshold offset_ (fitted by partial_fit): set it "
            "with skdfm.calibrate_threshold before exporting."
        )
    return transformer, detector


def _export_onnx(graph, transformer, destination: Path) -> None:
    import torch

    height, width = transformer.input_size_
    example = torch.rand(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1)
    names = output_names("fre" if len(graph(example)) == 4 else "nll")
    # The exporter reports its progress on stdout: not ours to print.
    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        try:
            program = _torch_export(graph, example, names, batch)
        except Exception as error:  # torch.export raises many classes
            raise ValueError(
                f"torch could not export this model to ONNX: {error_reason(error)}"
            ) from None
    program.save(os.fspath(destination))


def _check_loadable(path: Path, transformer) -> None:
    """Refuse, at export, a graph :class:`ExportedModel` would refuse at load: one
    holding operators outside the reviewed list (a backbone skdfm has not seen)."""
    import onnx

    foreign = foreign_operators(onnx.load(os.fspath(path), load_external_data=False))
    if foreign:
        raise ValueError(
            f"Cannot export {transformer.backbone!r}: its graph holds operators "
            f"exported models may not hold ({', '.join(foreign)}); ExportedModel "
            "loads only the operators skdfm has reviewed "
            "(skdfm._deploy.runtime.ONNX_OPERATORS; control flow never)."
        )


def _torch_export(graph, example, names, batch):
    import torch

    return torch.onnx.export(
        graph,
        (example,),
        input_names=["images"],
        output_names=names,
        dynamic_shapes={"images": {0: batch}},
        opset_version=_OPSET,
        dynamo=True,
        external_data=False,
        optimize=True,
    )


def _set_onnx_metadata(path: Path, metadata: dict) -> None:
    import onnx

    proto = onnx.load(os.fspath(path))
    del proto.metadata_props[:]
    for key, value in ((METADATA_KEY, json.dumps(metadata)), (DIGEST_KEY, UNSEALED)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, os.fspath(path))


def _quantize_int8(source: Path, destination: Path, calibration: np.ndarray) -> None:
    """Static int8 quantisation (QDQ: uint8 activations, int8 per-channel weights,
    the fast path of x86 VNNI) of the backbone's convolutions, calibrated on
    ``calibration``; the DFM head stays float."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i : i + 8]}
                                 for i in range(0, len(calibration), 8)])  # fmt: skip

        def get_next(self):
            return next(self.batches, None)

    prepared = destination.with_name("prepared.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's advice goes to the root logger
    try:
        quant_pre_process(os.fspath(source), os.fspath(prepared))
        quantize_static(
            os.fspath(prepared),
            os.fspath(destination),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            per_channel=True,
        )
    except Exception as error:  # the quantiser raises many classes
        raise ValueError(f"int8 quantisation failed: {error_reason(error)}") from None
    finally:
        root.setLevel(level)


def _int8_scores(path: Path, calibration: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(None, {"images": calibration[i : i + 16]})[0]
            for i in range(0, len(calibration), 16)
        ]  # fmt: skip
    ).astype(np.float64)


def _int8_threshold(metadata: dict, reference: np.ndarray, quantized: np.ndarray):
    """The float32 threshold and score range carried to the int8 graph's scores.

    Quantisation adds its own error to every score, so the float32 ``offset_``
    would flag other images. The threshold keeps its rank among the calibration
    images (the share of them it flags) when it falls inside their scores; outside,
    and for the score range, a least-squares line between the two scorings carries
    it. The metadata says which, and how well the line fits (R^2).
    """
    offset = metadata["offset"]
    slope, intercept = 1.0, float(np.mean(quantized - reference))
    r2 = float("nan")
    if len(reference) >= 2 and np.ptp(reference) > 0:
        fitted_slope, fitted_intercept = np.polyfit(reference, quantized, 1)
        if np.isfinite(fitted_slope) and fitted_slope > 0:
            slope, intercept = float(fitted_slope), float(fitted_intercept)
        residual = quantized - (slope * reference + intercept)
        r2 = float(1 - residual.var() / quantized.var()) if quantized.var() else r2
    share = float(np.mean(reference < offset))
    if reference.min() < offset < reference.max():
        mapped, how = float(np.quantile(quantized, share)), "rank"
    else:
        mapped, how = slope * offset + intercept, "line"
    metadata["float32_offset"] = offset
    metadata["offset"] = mapped
    metadata["score_range"] = [float(slope * v + intercept)
                               for v in metadata["score_range"]]  # fmt: skip
    metadata["threshold_note"] = (
        f"float32 threshold carried to int8 scores by its {how} among "
        f"{len(reference)} calibration images (line fit R^2 {r2:.3f})"
    )


def _reference_scores(graph, calibration: np.ndarray) -> np.ndarray:
    """The float32 graph's ``score_samples`` of the calibration images."""
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [
                graph(torch.from_numpy(calibration[i : i + 16]))[0].double().numpy()
                for i in range(0, len(calibration), 16)
            ]  # fmt: skip
        )


def _calibration_array(calibration_images, transformer) -> np.ndarray:
    if calibration_images is None:
        raise ValueError(
            "precision='int8' quantises activations, which needs images to "
            "calibrate on: pass calibration_images (e.g. 16-64 normal images)."
        )
    from .._deploy.runtime import prepare_images

    array = prepare_images(
        calibration_images, transformer.input_size_, transformer.max_image_pixels
    )[0]
    if len(array) == 0:
        raise ValueError("calibration_images holds no image.")
    return array


def export(model, path, *, format="onnx", precision="float32", calibration_images=None):
    """Export a fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)``.

    The file runs with :class:`~skdfm.ExportedModel` (no torch, timm or
    scikit-learn needed), or in any ONNX / OpenVINO runtime: one graph from a batch
    of images at the model's input size to the image scores, labels and (for
    ``"fre"``) anomaly maps. Written atomically: an interrupted export leaves no
    half-written file, and an OpenVINO pair killed while it is replaced leaves the
    previous pair loadable. The file carries a SHA-256 digest over its graph,
    weights (OpenVINO's ``.bin`` too) and metadata, checked when
    :class:`~skdfm.ExportedModel` loads it.

    Parameters
    ----------
    model : Pipeline
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)`` with a
        threshold (``offset_``).
    path : str or path-like
        Where to write: ``model.onnx``, or for OpenVINO ``model.xml`` (its weights
        go to ``model.bin`` beside it).
    format : {"onnx", "openvino"}, default="onnx"
        ``"onnx"`` needs ``pip install 'skdfm[onnx]'``, ``"openvino"``
        ``'skdfm[openvino]'`` (and the onnx extra, which the conversion goes
        through).
    precision : {"float32", "float16", "bfloat16", "int8"}, default="float32"
        ``"float32"``: scores equal the Python model's to float32 rounding.
        ``"bfloat16"`` (OpenVINO only): the file keeps float32 weights and
        OpenVINO runs it in bfloat16 on CPUs with bf16 units (AVX-512 BF16, AMX).
        ``"float16"`` (OpenVINO only): weights stored as float16 (half the file),
        computed in float32 by OpenVINO's CPU plugin.
        ``"int8"``: the backbone's convolutions quantised to int8 (static, QDQ,
        per channel, onnxruntime's quantiser) from ``calibration_images``; the DFM
        head stays float.
    calibration_images : images, default=None
        For ``"int8"``: what the Pipeline takes (arrays, paths, PIL images), e.g.
        16-64 normal images.

    Returns
    -------
    path : pathlib.Path
        The file written (the ``.xml`` for OpenVINO).

    Raises
    ------
    ValueError
        An unfitted model, a bare detector, an unknown format or precision, a
        precision the format cannot run, int8 without calibration images.
    ImportError
        The runtime the format needs is not installed; names the extra.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from sklearn.pipeline import make_pipeline
    >>> from skdfm import (DeepFeatureTransformer, DFMDetector, ExportedModel,
    ...                    export, make_defect_images)
    >>> images, y, _ = make_defect_images(12, 2, image_size=64, random_state=0)
    >>> model = make_pipeline(
    ...     DeepFeatureTransformer(backbone="resnet18", pretrained=False,
    ...                            input_size=64, device="cpu", random_state=0),
    ...     DFMDetector(pca_level=0.9, device="cpu"),
    ... ).fit(images[y == 1])
    >>> path = export(model, os.path.join(tempfile.mkdtemp(), "model.onnx"))
    >>> exported = ExportedModel(path)
    >>> bool(np.allclose(exported.score_samples(images), model.score_samples(images),
    ...                  rtol=1e-5))
    True
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}.")
    if precision in ("bfloat16", "float16") and format != "openvino":
        raise ValueError(
            f"precision={precision!r} needs format='openvino': onnxruntime's CPU "
            f"has no {precision} convolutions; use precision='int8' for a smaller, "
            "faster ONNX file."
        )
    if calibration_images is not None and precision != "int8":
        raise ValueError("calibration_images is only for precision='int8'.")
    path = Path(path)
    suffix = ".xml" if format == "openvino" else ".onnx"
    if path.suffix.lower() != suffix:
        raise ValueError(f"format={format!r} writes a {suffix} file; got {path}.")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot write {path}: no folder {folder}.")
    require("onnx", "onnx")
    if format == "openvino":
        ov = require("openvino", "openvino")
    if precision == "int8":
        require("onnxruntime", "onnx")
    transformer, detector = _fitted_parts(model)
    calibration = None
    if precision == "int8":
        calibration = _calibration_array(calibration_images, transformer)
    metadata = metadata_of(transformer, detector, format=format, precision=precision)
    _check_precision_of(transformer)
    graph = _graph(transformer, detector, float(detector.offset_))
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        _export_onnx(graph, transformer, onnx_path)
        if precision == "int8":
            quantized = Path(scratch) / "int8.onnx"
            _quantize_int8(onnx_path, quantized, calibration)
            _int8_threshold(
                metadata,
                _reference_scores(graph, calibration),
                _int8_scores(quantized, calibration),
            )
            # Again, with the graph's label at the int8 threshold (the same
            # calibration gives the same quantisation).
            graph = _graph(transformer, detector, metadata["offset"])
            _export_onnx(graph, transformer, onnx_path)
            _quantize_int8(onnx_path, quantized, calibration)
            onnx_path = quantized
        _check_loadable(onnx_path, transformer)
        if format == "onnx":
            _set_onnx_metadata(onnx_path, metadata)
            seal_export(onnx_path)
            os.replace(onnx_path, path)
            return path
        try:
            ov_model = ov.convert_model(os.fspath(onnx_path))
        except Exception as error:  # OpenVINO's own classes
            raise ValueError(
                f"OpenVINO could not convert the model: {error_reason(error)}"
            ) from None
        xml = Path(scratch) / "model.xml"
        compress = precision == "float16"
        ov.save_model(ov_model, os.fspath(xml), compress_to_fp16=compress)
        # Read by skdfm releases before the digest, which covers the .bin too.
        metadata["weights_sha256"] = file_sha256(xml.with_suffix(".bin"))
        ov_model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
        ov_model.set_rt_info(UNSEALED, [DIGEST_KEY])
        ov.save_model(ov_model, os.fspath(xml), compress_to_fp16=compress)
        if file_sha256(xml.with_suffix(".bin")) != metadata["weights_sha256"]:
            raise RuntimeError("OpenVINO wrote different weights twice.")
        seal_export(xml)
        replace_openvino_pair(xml, path)
    return path


def replace_openvino_pair(source: Path, path: Path) -> None:
    """Move the OpenVINO pair ``source`` (.xml and .bin, sealed) to ``path``, so
    that a process killed at any moment leaves a loadable pair: the previous one or
    the new one.

    Two renames cannot replace two files at once. The previous ``.bin`` is first
    renamed to a backup beside it (``.model.bin.<16 hex>``, see
    ``weights_backups`` in ``skdfm._deploy.runtime``), then the new ``.bin`` and the
    new ``.xml`` are renamed into place, then the backups are removed. In between,
    the previous ``.xml`` is still there and :class:`~skdfm.ExportedModel` finds its
    weights among the backups by its digest (with a warning). An exception in
    between (Ctrl-C, SIGTERM) puts the previous ``.bin`` back.
    """
    import secrets

    weights = path.with_suffix(".bin")
    backup = None
    try:
        if weights.exists():
            backup = weights.with_name(f".{weights.name}.{secrets.token_hex(8)}")
            os.replace(weights, backup)
        os.replace(source.with_suffix(".bin"), weights)
        os.replace(source, path)
    except BaseException:
        if backup is not None and source.exists():  # the new .xml is not in place
            with contextlib.suppress(OSError):
                os.replace(backup, weights)
        raise
    for stale in weights_backups(weights):
        with contextlib.suppress(OSError):
            stale.unlink()


def _check_precision_of(transformer) -> None:
    """Exported graphs compute the backbone in float32: say so for a transformer
    that ran under autocast."""
    import warnings

    precision = transformer.feature_params_["precision"]
    if precision != "float32":
        warnings.warn(
            f"The transformer computes features with precision={precision!r}; the "
            "exported graph computes them in float32 (use the export's own "
            "precision for speed), so its scores differ from the Python model's "
            "by that rounding.",
            UserWarning,
            stacklevel=3,
        )
