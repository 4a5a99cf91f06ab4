"""skdfm.export and skdfm.ExportedModel, run for real by onnxruntime and OpenVINO."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

import skdfm
from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    ExportedModel,
    ModelFileError,
    anomaly_maps,
    export,
    make_defect_images,
    normalized_scores,
)
from skdfm._deploy.runtime import prepare_images

from .conftest import SMALL_BACKBONE

pytest.importorskip("onnxruntime")

#: OpenVINO is optional: only the tests that run it skip without it
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs OpenVINO")
#: the runtimes installed here
RUNTIMES = ("onnxruntime", "openvino") if HAS_OPENVINO else ("onnxruntime",)

#: (format, suffix, runtime) of every way an export is run
ROUTES = [
    ("onnx", ".onnx", "onnxruntime"),
    pytest.param("onnx", ".onnx", "openvino", marks=needs_openvino),
    pytest.param("openvino", ".xml", "openvino", marks=needs_openvino),
]
RTOL = 1e-5  # the bar: scores and maps within 1e-5 relative


@pytest.fixture(scope="module")
def data():
    images, y, masks = make_defect_images(30, 10, image_size=64, random_state=0)
    return images, y


def _fit(images, y, *, backbone=SMALL_BACKBONE, **detector):
    return make_pipeline(
        DeepFeatureTransformer(**backbone),
        DFMDetector(pca_level=0.9, device="cpu", **detector),
    ).fit(images[y == 1][:20])


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def fre_model(data):
    return _fit(*data, backbone=dict(SMALL_BACKBONE, layer="layer2"))


@pytest.fixture(scope="module")
def exported(fre_model, tmp_path_factory):
    """The model exported in every format whose tools are installed here."""
    folder = tmp_path_factory.mktemp("exported")
    formats = [("onnx", ".onnx")] + [("openvino", ".xml")] * HAS_OPENVINO
    return {
        fmt: export(fre_model, folder / f"model{suffix}", format=fmt)
        for fmt, suffix in formats
    }


@pytest.mark.parametrize("fmt, suffix, runtime", ROUTES)
@pytest.mark.parametrize(
    "backbone, detector",
    [  # the plain case in the fast loop, the variants in the full run
        (dict(SMALL_BACKBONE, layer="layer2"), {}),
        pytest.param(dict(SMALL_BACKBONE, layer=["layer2", "layer3"]),
                     {"image_score": "max"}, marks=pytest.mark.slow),
        pytest.param(dict(SMALL_BACKBONE, layer="layer3"), {"image_score": 2},
                     marks=pytest.mark.slow),
        pytest.param(dict(SMALL_BACKBONE, layer="layer2"), {"score_type": "nll"},
                     marks=pytest.mark.slow),
        pytest.param(
            dict(SMALL_BACKBONE, backbone="resnet18", layer="layer3",
                 pooling_kernel_size=1),
            {},
            marks=pytest.mark.slow,
        ),
    ],
)  # fmt: skip
def test_exported_scores_and_maps_equal_the_pipeline(
    data, tmp_path, fmt, suffix, runtime, backbone, detector
):
    images, y = data
    model = _fit(images, y, backbone=backbone, **detector)
    path = export(model, tmp_path / f"m{suffix}", format=fmt)
    runner = ExportedModel(path, runtime=runtime)
    assert runner.runtime_ == runtime
    # 64 px arrays (the input size), 80 px PIL images and paths (resized)
    big = [Image.fromarray(np.kron(im, np.ones((5, 5, 1), np.uint8))[:80, :72])
           for im in images[:6]]  # fmt: skip
    files = []
    for i, image in enumerate(big[:3]):
        image.save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    for X in (images, big, files):
        expected = model.score_samples(X)
        assert _relative(runner.score_samples(X), expected) < RTOL
        np.testing.assert_array_equal(runner.predict(X), model.predict(X))
        np.testing.assert_allclose(
            runner.decision_function(X), model.decision_function(X),
            rtol=RTOL, atol=RTOL * np.abs(expected).max(),
        )  # fmt: skip
        np.testing.assert_allclose(
            runner.normalized_scores(X), normalized_scores(model, X), atol=1e-5
        )
    if model[-1].score_type == "nll":
        with pytest.raises(ValueError, match="score_type='fre'"):
            runner.anomaly_maps(images)
        return
    for size in ("image", "input", "grid", (50, 40)):
        for X in (images[:5], big):
            result, reference = runner.anomaly_maps(X, size=size), None
            reference = anomaly_maps(model, X, size=size)
            for got, want in zip(result.maps, reference.maps, strict=True):
                assert got.shape == want.shape
                assert _relative(got, want) < RTOL
            assert _relative(result.score_samples, reference.score_samples) < RTOL
            np.testing.assert_array_equal(result.labels, reference.labels)


def test_batches_of_any_size_run(fre_model, exported, data):
    images, _ = data
    for path in exported.values():
        runner = ExportedModel(path, batch_size=3)
        expected = fre_model.score_samples(images[:7])
        assert _relative(runner.score_samples(images[:7]), expected) < RTOL
        assert runner.score_samples(images[:1]).shape == (1,)


def test_the_file_says_what_it_holds(fre_model, exported):
    transformer, detector = fre_model[0], fre_model[1]
    for fmt, path in exported.items():
        meta = ExportedModel(path).metadata_
        assert meta["skdfm_version"] == skdfm.__version__
        assert meta["format"] == fmt and meta["precision"] == "float32"
        assert meta["backbone"] == "test_resnet" and meta["layer"] == "layer2"
        assert tuple(meta["input_size"]) == transformer.input_size_
        assert tuple(meta["image_mean"]) == transformer.image_mean_
        assert tuple(meta["image_std"]) == transformer.image_std_
        assert meta["offset"] == detector.offset_
        assert tuple(meta["score_range"]) == detector.score_range_
        assert meta["score_type"] == "fre" and meta["image_score"] == "sum"
        assert meta["input"]["layout"] == "NCHW"
    if "openvino" in exported:
        suffixes = {p.suffix for p in exported["openvino"].parent.iterdir()}
        assert suffixes >= {".xml", ".bin"}


@needs_openvino
@pytest.mark.parametrize(
    "precision",
    ["bfloat16", pytest.param("float16", marks=pytest.mark.slow),
     pytest.param("int8", marks=pytest.mark.slow)],
)  # fmt: skip
def test_reduced_precisions_stay_close(fre_model, data, tmp_path, precision):
    images, y = data
    calibration = images[y == 1][:16] if precision == "int8" else None
    path = export(
        fre_model, tmp_path / "m.xml", format="openvino", precision=precision,
        calibration_images=calibration,
    )  # fmt: skip
    runner = ExportedModel(path)
    assert runner.metadata_["precision"] == precision
    scores = runner.score_samples(images)
    expected = fre_model.score_samples(images)
    from skdfm import image_auroc

    assert abs(image_auroc(y, scores) - image_auroc(y, expected)) <= 0.05
    if precision != "int8":
        assert _relative(scores, expected) < 0.05
    else:  # its threshold is in int8 units, carried from float32's
        assert runner.offset_ != fre_model[-1].offset_
        assert "int8" in runner.metadata_["threshold_note"]
        agree = np.mean(runner.predict(images) == fre_model.predict(images))
        assert agree >= 0.75


@pytest.mark.slow
def test_int8_onnx_runs_in_onnxruntime(fre_model, data, tmp_path):
    images, y = data
    path = export(fre_model, tmp_path / "q.onnx", precision="int8",
                  calibration_images=list(images[y == 1][:8]))  # fmt: skip
    scores = ExportedModel(path, runtime="onnxruntime").score_samples(images)
    assert np.isfinite(scores).all() and scores.shape == (len(images),)
    assert os.path.getsize(path) < os.path.getsize(
        export(fre_model, tmp_path / "f.onnx")
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(format="tflite"), ValueError, "format='tflite'"),
        (dict(precision="int4"), ValueError, "precision='int4'"),
        (dict(precision="bfloat16"), ValueError, "needs format='openvino'"),
        (dict(precision="float16"), ValueError, "needs format='openvino'"),
        (dict(precision="int8"), ValueError, "calibration_images"),
        (dict(calibration_images=[np.zeros((8, 8, 3))]), ValueError, "only for"),
        (dict(format="openvino"), ValueError, "writes a .xml file"),
    ],
)
def test_bad_export_requests_are_clear_errors(
    fre_model, tmp_path, kwargs, error, message
):
    with pytest.raises(error, match=message):
        export(fre_model, tmp_path / "m.onnx", **kwargs)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_what_cannot_be_exported_is_refused(fre_model, data, tmp_path):
    from sklearn.exceptions import NotFittedError

    images, y = data
    with pytest.raises(ValueError, match="bare DFMDetector"):
        export(fre_model[-1], tmp_path / "m.onnx")
    with pytest.raises(NotFittedError):
        export(clone(fre_model), tmp_path / "m.onnx")
    streamed = clone(fre_model)
    streamed[0].fit(images[:2])
    streamed[1].partial_fit(streamed[0].transform(images[y == 1]))
    with pytest.raises(ValueError, match="no threshold offset_"):
        export(streamed, tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="no folder"):
        export(fre_model, tmp_path / "missing" / "m.onnx")


def test_a_missing_runtime_names_its_extra(fre_model, exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ImportError, match=r"skdfm\[openvino\]"):
        export(fre_model, tmp_path / "m.xml", format="openvino")
    xml = tmp_path / "m.xml"  # the runtime is looked for before the file is read
    xml.write_text("<net/>")
    with pytest.raises(ImportError, match=r"skdfm\[openvino\]"):
        ExportedModel(xml)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    # .onnx with runtime="auto" falls back to OpenVINO, which is missing too
    with pytest.raises(ImportError, match=r"skdfm\[openvino\]"):
        ExportedModel(exported["onnx"])
    with pytest.raises(ImportError, match=r"skdfm\[onnx\]"):
        ExportedModel(exported["onnx"], runtime="onnxruntime")


def test_damaged_and_foreign_files_are_clear_errors(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exported["onnx"].read_bytes()[:2000])
    noise = tmp_path / "noise.xml"
    noise.write_bytes(os.urandom(3000))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["out"])],
        "foreign",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), foreign)
    forged = _forge(
        exported["onnx"], tmp_path / "forged.onnx",
        lambda m: json.dumps({"input_size": "big"}),
    )  # fmt: skip
    cases = [
        (broken, "onnxruntime", "cannot be loaded by onnxruntime"),
        (broken, "openvino", "cannot be read by OpenVINO"),
        (noise, "openvino", "cannot be read by OpenVINO"),
        (foreign, "onnxruntime", "not an skdfm export"),
        (foreign, "openvino", "not an skdfm export"),
        (forged, "onnxruntime", "without a valid 'input_size'"),
    ]
    cases = [case for case in cases if case[1] in RUNTIMES]
    for path, runtime, message in cases:
        with pytest.raises(ModelFileError, match=message):
            ExportedModel(path, runtime=runtime)
    with pytest.raises(FileNotFoundError):
        ExportedModel(tmp_path / "absent.onnx")
    text = tmp_path / "model.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="not an exported model"):
        ExportedModel(text)
    with pytest.raises(ValueError, match="cannot run an OpenVINO .xml"):
        ExportedModel(noise, runtime="onnxruntime")


def test_bad_images_are_clear_errors(exported):
    runner = ExportedModel(exported["onnx"])
    bad = [
        (np.full((2, 64, 64, 3), np.nan, np.float32), "NaN or infinite"),
        (np.full((2, 64, 64, 3), 2.0, np.float32), "outside \\[0, 1\\]"),
        (np.zeros((2, 64, 64, 3), np.int32), "dtype int32"),
        (np.zeros((2, 64, 64, 4), np.uint8), "2 or 4 channels"),
        (np.zeros((64, 64, 3), np.uint8), "Ambiguous"),
        (np.zeros(5, np.uint8), "shape"),
        ([], "holds no image"),
        (["/nonexistent.png"], "not found"),
        (42, "must be images"),
    ]
    for X, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            runner.score_samples(X)


def test_an_interrupted_export_keeps_the_previous_file(
    fre_model, tmp_path, monkeypatch
):
    import skdfm._tools.export

    path = export(fre_model, tmp_path / "m.onnx")
    before = path.read_bytes()

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(skdfm._tools.export, "_set_onnx_metadata", fail)
    with pytest.raises(KeyboardInterrupt):
        export(fre_model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


#: A process whose import system refuses torch, timm and scikit-learn.
WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "timm", "sklearn", "torchvision"):
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import skdfm

    images = np.load(sys.argv[1])
    for path, runtime in zip(sys.argv[2::2], sys.argv[3::2]):
        model = skdfm.ExportedModel(path, runtime=runtime)
        result = model.anomaly_maps(images)
        np.save(path + ".scores.npy", result.score_samples)
        np.save(path + ".maps.npy", result.maps)
    loaded = sorted(m for m in sys.modules
                    if m.split(".")[0] in ("torch", "timm", "sklearn"))
    print("loaded:", loaded)
    """
)


def test_exported_models_run_where_torch_sklearn_and_timm_cannot_be_imported(
    fre_model, exported, data, tmp_path
):
    images, _ = data
    np.save(tmp_path / "images.npy", images[:6])
    routes = [
        (exported["onnx"], "onnxruntime"),
        (exported["onnx"], "openvino"),
        (exported.get("openvino"), "openvino"),
    ]
    routes = [(path, runtime) for path, runtime in routes if runtime in RUNTIMES]
    script = tmp_path / "run.py"
    script.write_text(WITHOUT_TORCH)
    arguments = [str(a) for route in routes for a in route]
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "images.npy"), *arguments],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout
    reference = anomaly_maps(fre_model, images[:6])
    for path, _ in routes:
        scores = np.load(str(path) + ".scores.npy")
        maps = np.load(str(path) + ".maps.npy")
        assert _relative(scores, reference.score_samples) < RTOL
        assert _relative(maps, reference.maps) < RTOL


def test_import_skdfm_is_cheap():
    code = (
        "import sys, skdfm; "
        "heavy = [m for m in ('torch', 'timm', 'sklearn', 'scipy') "
        "if m in sys.modules]; "
        "print(heavy); "
        "skdfm.DFMDetector; print('torch' in sys.modules); "
        "print(sorted(set(skdfm.__all__) - set(dir(skdfm))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["[]", "True", "[]"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        skdfm.nothing  # noqa: B018


def _forge(source, target, change):
    """A copy of an exported .onnx whose skdfm metadata ``change`` edits, its digest
    recomputed (as a forger would): the checks after the digest's are tested."""
    import onnx

    from skdfm._deploy.runtime import UNSEALED, seal_export

    proto = onnx.load(source)
    metadata = json.loads(proto.metadata_props[0].value)
    proto.metadata_props[0].value = change(metadata)
    proto.metadata_props[1].value = UNSEALED
    onnx.save(proto, target)
    seal_export(target)
    return target


def test_metadata_that_does_not_fit_the_graph_is_refused(
    data, fre_model, exported, tmp_path
):
    images, y = data
    nll = export(_fit(images, y, score_type="nll"), tmp_path / "nll.onnx")
    cases = {
        "fre metadata on an nll graph": (
            nll, lambda m: json.dumps({**m, "score_type": "fre"}), "output"),
        "another input size": (
            exported["onnx"], lambda m: json.dumps({**m, "input_size": [32, 32]}),
            "graph input"),
        "a huge input size": (
            exported["onnx"],
            lambda m: json.dumps({**m, "input_size": [32768, 32768]}), "invalid"),
        "a NaN score range": (
            exported["onnx"], lambda m: json.dumps({**m, "score_range": [0, "NaN"]}),
            "invalid"),
        "deeply nested JSON": (
            exported["onnx"], lambda m: "[" * 100_000 + "]" * 100_000, "nested"),
        "an unknown score type": (
            exported["onnx"], lambda m: json.dumps({**m, "score_type": "lof"}),
            "invalid"),
    }  # fmt: skip
    for what, (source, change, message) in cases.items():
        path = _forge(source, tmp_path / "forged.onnx", change)
        for runtime in RUNTIMES:
            with pytest.raises(ModelFileError, match=message):
                ExportedModel(path, runtime=runtime)
                pytest.fail(what)


@needs_openvino
@pytest.mark.slow
def test_an_xml_with_another_exports_weights_is_refused(data, tmp_path):
    images, y = data

    def model(seed):  # one architecture and size, other weights
        return make_pipeline(
            DeepFeatureTransformer(**dict(SMALL_BACKBONE, random_state=seed)),
            DFMDetector(pca_level=5, device="cpu"),
        ).fit(images[y == 1][:20])

    first = export(model(0), tmp_path / "first.xml", format="openvino")
    second = export(model(1), tmp_path / "second.xml", format="openvino")
    assert first.with_suffix(".bin").stat().st_size == (
        second.with_suffix(".bin").stat().st_size
    )
    (tmp_path / "mixed.xml").write_bytes(first.read_bytes())
    (tmp_path / "mixed.bin").write_bytes(second.with_suffix(".bin").read_bytes())
    with pytest.raises(ModelFileError, match="does not match its SHA-256 digest"):
        ExportedModel(tmp_path / "mixed.xml")


def test_every_kind_of_image_scores_as_in_the_pipeline(
    fre_model, exported, data, tmp_path
):
    pandas = pytest.importorskip("pandas")
    images, _ = data
    runner = ExportedModel(exported["onnx"])
    gray16 = images[:4, ..., 0].astype(np.uint16) * 257
    paths = []
    for i, image in enumerate(gray16):
        Image.fromarray(image).save(tmp_path / f"g{i}.png")  # 16-bit grayscale PNG
        paths.append(str(tmp_path / f"g{i}.png"))
    inputs = {
        "uint8 NHWC": images[:4],
        "uint8 NCHW": images[:4].transpose(0, 3, 1, 2),
        "float NHWC": images[:4] / 255.0,
        "grayscale uint8": images[:4, ..., 0],
        "grayscale uint16": gray16,
        "16-bit grayscale files": paths,
        "paths as a Series": pandas.Series(paths),
        "mixed sizes": [images[0], images[1, :40, :50], images[2, :, :, 0]],
        "upscaled": [im[:32, :40] for im in images[:3]],
    }
    for what, X in inputs.items():
        expected = fre_model.score_samples(X)
        assert _relative(runner.score_samples(X), expected) < RTOL, what
    with pytest.raises(ValueError, match="holds no image"):
        runner.score_samples(np.zeros((0, 64, 64, 3), np.uint8))


def test_several_layers_on_an_uneven_grid_export(data, tmp_path):
    images, y = data  # 72 px: layer3 5x5, layer2 9x9, pooled by adaptive averaging
    model = _fit(images, y, backbone=dict(SMALL_BACKBONE, input_size=72,
                                          layer=["layer2", "layer3"]))  # fmt: skip
    runner = ExportedModel(export(model, tmp_path / "m.onnx"))
    assert _relative(runner.score_samples(images), model.score_samples(images)) < RTOL


def test_int8_labels_in_the_graph_and_the_runtime_agree(fre_model, data, tmp_path):
    import onnxruntime as ort

    images, y = data
    normal = images[y == 1]
    path = export(fre_model, tmp_path / "q.onnx", precision="int8",
                  calibration_images=normal[:16])  # fmt: skip
    runner = ExportedModel(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = prepare_images(images, runner.input_size_)[0]
    graph_scores, graph_labels = session.run(None, {"images": batch})[:2]
    np.testing.assert_array_equal(graph_labels, runner.predict(images))
    # the threshold keeps its rank among the calibration images
    reference = fre_model.score_samples(normal[:16])
    share = np.mean(reference < fre_model[-1].offset_)
    flagged = np.mean(runner.score_samples(normal[:16]) < runner.offset_)
    assert abs(flagged - share) <= 1 / 16 + 1e-9
    assert "rank" in runner.metadata_["threshold_note"]


def test_an_autocast_transformer_exports_with_a_warning(data, tmp_path):
    images, y = data
    model = _fit(images, y, backbone=dict(SMALL_BACKBONE, precision="bfloat16"))
    with pytest.warns(UserWarning, match="precision='bfloat16'"):
        export(model, tmp_path / "m.onnx")


@needs_openvino
@pytest.mark.slow
def test_an_interrupted_openvino_export_keeps_the_previous_pair(
    fre_model, tmp_path, monkeypatch
):
    import openvino

    path = export(fre_model, tmp_path / "m.xml", format="openvino")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    save = openvino.save_model
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(openvino, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(fre_model, path, format="openvino")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    ExportedModel(path)  # still loads


@pytest.mark.cuda
def test_a_model_on_cuda_exports(data, tmp_path):
    images, y = data
    model = _fit(images, y, backbone=dict(SMALL_BACKBONE, device="cuda"))
    runner = ExportedModel(export(model, tmp_path / "m.onnx"))
    assert _relative(runner.score_samples(images), model.score_samples(images)) < 1e-4
    assert model[0].device_.startswith("cuda")  # the model itself did not move


@pytest.mark.parametrize(
    "fmt", ["onnx", pytest.param("openvino", marks=needs_openvino)]
)
def test_the_command_scores_an_exported_file_without_torch(
    exported, data, tmp_path, fmt
):
    images, _ = data
    for i, image in enumerate(images[:3]):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    code = WITHOUT_TORCH.split("import numpy as np")[0] + textwrap.dedent(
        """
        from skdfm.cli import main
        code = main(["score", sys.argv[1], sys.argv[2], "--no-progress",
                     "--device", "cpu", "--maps", sys.argv[3]])
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("torch", "timm", "sklearn"))
        print("loaded:", loaded, "code:", code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(exported[fmt]), str(tmp_path),
         str(tmp_path / "maps")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded: [] code: 0" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1 + 3 + 1  # header, rows, status
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 3


def test_the_pixel_threshold_travels_with_float_exports(fre_model, data, tmp_path):
    import copy

    from skdfm import ExportedModel, anomaly_maps, calibrate_pixel_threshold

    images, _, masks = make_defect_images(30, 10, image_size=64, random_state=0)
    np.testing.assert_array_equal(images, data[0])  # the images the model knows
    model = copy.deepcopy(fre_model)
    calibrate_pixel_threshold(model, images[20:], masks[20:])
    threshold = model[-1].pixel_threshold_
    run = ExportedModel(export(model, tmp_path / "m.onnx"))
    assert run.pixel_threshold_ == threshold
    got, want = run.anomaly_maps(images[:6]), anomaly_maps(model, images[:6])
    np.testing.assert_array_equal(got.masks, got.maps >= threshold)
    assert np.mean(got.masks == want.masks) > 0.999  # maps equal to ~1e-6
    # without one there are no masks
    plain = ExportedModel(export(fre_model, tmp_path / "plain.onnx"))
    assert not hasattr(plain, "pixel_threshold_")
    assert plain.anomaly_maps(images[:2]).masks is None
