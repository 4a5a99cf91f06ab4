"""skdfm.save / skdfm.load: model files that are data, checked before use."""

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

import skdfm
from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    FeatureCache,
    ModelFileError,
    SkdfmVersionWarning,
    stream_fit,
)
from skdfm._tools import saving as _saving

from .conftest import SMALL_BACKBONE, make_features


@pytest.fixture(scope="module")
def detector():
    X = make_features(60, 40)
    return DFMDetector(pca_level=0.9, device="cpu").fit(X), X


@pytest.fixture(scope="module")
def saved_detector(detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "det.skdfm"
    skdfm.save(detector[0], path)
    return path


def scores_in_a_fresh_process(jobs, tmp_path):
    """Load each ``(model_path, inputs_path)`` in one new interpreter and score the
    saved inputs there."""
    outs = [tmp_path / f"scores{i}.npy" for i in range(len(jobs))]
    triples = [(str(m), str(x), str(o)) for (m, x), o in zip(jobs, outs, strict=True)]
    code = textwrap.dedent(
        f"""
        import numpy as np, skdfm
        jobs = {triples!r}
        for model_path, inputs_path, out in jobs:
            model = skdfm.load(model_path)
            np.save(out, model.score_samples(np.load(inputs_path)))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    return [np.load(out) for out in outs]


def fitted_models(images, y):
    """(name, model, inputs): fre and nll detectors, Pipelines, streamed Pipelines."""
    for score_type in ("fre", "nll"):
        detector = DFMDetector(pca_level=0.9, score_type=score_type, device="cpu")
        transformer = DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2")
        X = make_features(50, 30)
        yield f"detector {score_type}", clone(detector).fit(X[:40]), X[40:]
        pipe = make_pipeline(clone(transformer), clone(detector))
        yield f"pipeline {score_type}", pipe.fit(images[y == 1][:20]), images[:12]
        batches = [images[y == 1][i : i + 8] for i in range(0, 24, 8)]
        streamed = stream_fit(
            make_pipeline(clone(transformer), clone(detector)),
            batches,
            threshold_batches=batches,
        )
        yield f"streamed {score_type}", streamed, images[:12]


@pytest.mark.slow
def test_round_trips_in_a_fresh_process_are_bit_identical(defect_images, tmp_path):
    images, y, _ = defect_images
    models = list(fitted_models(images, y))
    jobs = []
    for i, (_, model, inputs) in enumerate(models):
        path = skdfm.save(model, tmp_path / f"model{i}.skdfm")
        np.save(tmp_path / f"inputs{i}.npy", inputs)
        jobs.append((path, tmp_path / f"inputs{i}.npy"))
    fresh = scores_in_a_fresh_process(jobs, tmp_path)
    for (name, model, inputs), scores, (path, _) in zip(
        models, fresh, jobs, strict=True
    ):
        expected = model.score_samples(inputs)
        np.testing.assert_array_equal(scores, expected, err_msg=name)
        loaded = skdfm.load(path)
        np.testing.assert_array_equal(loaded.predict(inputs), model.predict(inputs))
        assert type(loaded) is type(model)
        assert (
            loaded.get_params(deep=False).keys() == model.get_params(deep=False).keys()
        )
    assert [name for name, _, _ in models] == [
        "detector fre", "pipeline fre", "streamed fre",
        "detector nll", "pipeline nll", "streamed nll",
    ]  # fmt: skip


def test_a_transformer_round_trips(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), np.uint8)
    cache = FeatureCache(max_bytes=10_000)
    tr = DeepFeatureTransformer(**SMALL_BACKBONE, cache=cache).fit(images)
    tr.transform(images)
    loaded = skdfm.load(skdfm.save(tr, tmp_path / "tr.skdfm"))
    # the cache's setting is kept, never its rows
    assert loaded.cache.max_bytes == 10_000 and len(loaded.cache) == 0
    np.testing.assert_array_equal(loaded.transform(images), tr.transform(images))
    assert loaded.weights_digest_ == tr.weights_digest_


def test_metadata_says_what_wrote_the_file(fitted_pipeline, tmp_path):
    path = skdfm.save(fitted_pipeline, tmp_path / "m.skdfm")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        metadata = json.loads(handle.read(length))["__metadata__"]
    document = json.loads(metadata["skdfm"])
    assert metadata["format"] == "skdfm-model" and len(metadata["sha256"]) == 64
    assert document["versions"]["skdfm"] == skdfm.__version__
    assert {"torch", "timm", "scikit-learn", "numpy", "python"} <= set(
        document["versions"]
    )
    assert document["backbone"] == {
        "name": "test_resnet",
        "layer": "layer2",
        "weights_digest": fitted_pipeline[0].weights_digest_,
    }
    assert document["created"].endswith("+00:00")
    assert document["model"]["class"] == "sklearn.pipeline.Pipeline"


def test_another_skdfm_version_warns(saved_detector, monkeypatch):
    monkeypatch.setattr(skdfm, "__version__", "99.0")
    with pytest.warns(SkdfmVersionWarning, match="99.0"):
        skdfm.load(saved_detector)


def test_every_changed_byte_is_a_clear_error(saved_detector, tmp_path):
    data = saved_detector.read_bytes()
    rng = np.random.default_rng(0)
    # the header, the metadata and the arrays: every byte of the first 4 kB and a
    # sample of the rest
    positions = sorted(
        set(range(min(4096, len(data)))) | set(rng.integers(0, len(data), 300).tolist())
    )
    target = tmp_path / "flipped.skdfm"
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        target.write_bytes(bytes(damaged))
        with pytest.raises(ModelFileError, match="flipped.skdfm"):
            skdfm.load(target)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -100, -1])
def test_truncated_files_are_refused(saved_detector, tmp_path, keep):
    data = saved_detector.read_bytes()
    target = tmp_path / "short.skdfm"
    target.write_bytes(data[:keep])
    with pytest.raises(ModelFileError, match="short.skdfm"):
        skdfm.load(target)


def test_foreign_files_are_refused(detector, tmp_path):
    import joblib
    from PIL import Image
    from safetensors.numpy import save_file

    random = tmp_path / "random.skdfm"
    random.write_bytes(np.random.default_rng(0).bytes(5000))
    png = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    pickle_file = tmp_path / "model.joblib"
    joblib.dump(detector[0], pickle_file)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3)}, plain)
    for path in (random, png, pickle_file, plain):
        with pytest.raises(ModelFileError, match=path.name):
            skdfm.load(path)
        assert not _saving.is_model_file(path)
    with pytest.raises(FileNotFoundError, match="No model file"):
        skdfm.load(tmp_path / "missing.skdfm")


def header_file(path, header: dict, data: bytes = b""):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path):
    metadata = {"format": "skdfm-model", "skdfm": "{}", "sha256": "0" * 64}
    huge = {
        "__metadata__": metadata,
        "x": {"dtype": "F64", "shape": [10**10, 10], "data_offsets": [0, 8 * 10**11]},
    }
    header_file(tmp_path / "huge.skdfm", huge, b"\0" * 900)
    oversized = tmp_path / "header.skdfm"
    oversized.write_bytes((10**12).to_bytes(8, "little") + b"{}" * 100)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="do not exactly fill|does not add up"):
            skdfm.load(tmp_path / "huge.skdfm")
        with pytest.raises(ModelFileError, match="declares a 1000000000000-byte"):
            skdfm.load(oversized)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing close to the declared 800 GB
    wrong = dict(huge, x={"dtype": "F64", "shape": [3], "data_offsets": [0, 16]})
    with pytest.raises(ModelFileError, match="does not add up"):
        skdfm.load(header_file(tmp_path / "wrong.skdfm", wrong, b"\0" * 16))


def write_document(path, document: dict, tensors: dict):
    """A well-formed file with a valid digest around any document (as an attacker
    who knows the format could write)."""
    from safetensors.numpy import save_file

    text = json.dumps(document)
    metadata = {
        "format": "skdfm-model",
        "skdfm": text,
        "sha256": _saving._digest(text, tensors),
    }
    save_file(tensors, path, metadata=metadata)
    return path


def saved_document(path):
    from safetensors import safe_open

    with safe_open(path, "np") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return json.loads(metadata["skdfm"]), tensors


def test_classes_outside_the_allow_list_are_refused(saved_detector, tmp_path):
    document, tensors = saved_document(saved_detector)
    for name in ("os.system", "builtins.eval", "sklearn.svm.OneClassSVM"):
        document["model"]["class"] = name
        path = write_document(tmp_path / "evil.skdfm", document, tensors)
        with pytest.raises(ModelFileError, match=f"names the class '{name}'"):
            skdfm.load(path)


def test_missing_and_extra_arrays_and_unknown_values_are_refused(
    saved_detector, tmp_path
):
    document, tensors = saved_document(saved_detector)
    path = tmp_path / "edited.skdfm"
    fewer = {k: v for k, v in tensors.items() if k != "components_"}
    with pytest.raises(ModelFileError, match="lacks the array 'components_'"):
        skdfm.load(write_document(path, document, fewer))
    more = dict(tensors, extra=np.zeros(2))
    with pytest.raises(ModelFileError, match="arrays no estimator uses"):
        skdfm.load(write_document(path, document, more))
    odd = json.loads(json.dumps(document))
    odd["model"]["state"]["offset_"] = {"__import__": "os"}
    with pytest.raises(ModelFileError, match="does not store"):
        skdfm.load(write_document(path, odd, tensors))
    odd = json.loads(json.dumps(document))
    odd["model"]["state"]["_scatter"] = 1
    with pytest.raises(ModelFileError, match="attribute '_scatter'"):
        skdfm.load(write_document(path, odd, tensors))
    odd = json.loads(json.dumps(document))
    odd["format_version"] = 2
    with pytest.raises(ModelFileError, match="format version 2"):
        skdfm.load(write_document(path, odd, tensors))


def test_backbone_weights_that_do_not_fit_are_a_clear_error(fitted_pipeline, tmp_path):
    path = skdfm.save(fitted_pipeline, tmp_path / "m.skdfm")
    document, tensors = saved_document(path)
    name = next(k for k in tensors if k.endswith("conv1.weight"))
    tensors[name] = tensors[name][:1]
    with pytest.raises(ModelFileError, match="cannot be rebuilt"):
        skdfm.load(write_document(path, document, tensors))


def test_what_cannot_be_saved_is_refused_before_writing(detector, tmp_path):
    path = tmp_path / "m.skdfm"
    with pytest.raises(TypeError, match="StandardScaler"):
        skdfm.save(StandardScaler().fit(detector[1]), path)
    with pytest.raises(ValueError, match="StandardScaler"):
        skdfm.save(Pipeline([("s", StandardScaler()), ("d", detector[0])]), path)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        skdfm.save(clone(detector[0]), path)
    images = np.zeros((2, 64, 64, 3), np.uint8)
    tr = DeepFeatureTransformer(
        **dict(SMALL_BACKBONE, random_state=np.random.RandomState(0))
    ).fit(images)
    with pytest.raises(ValueError, match="random_state: a RandomState"):
        skdfm.save(tr, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_one_flipped_exponent_bit_in_a_backbone_weight_is_caught(
    fitted_pipeline, tmp_path
):
    path = skdfm.save(fitted_pipeline, tmp_path / "m.skdfm")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    name = next(k for k in header if k.endswith("conv1.weight"))
    begin = 8 + length + header[name]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[begin + 3] ^= 0x40  # an exponent bit of the first float32 weight
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256"):
        skdfm.load(path)


def test_feature_names_round_trip(tmp_path):
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame(make_features(30, 6), columns=[f"f{i}" for i in range(6)])
    det = DFMDetector(pca_level=2, device="cpu").fit(X)
    loaded = skdfm.load(skdfm.save(det, tmp_path / "m.skdfm"))
    np.testing.assert_array_equal(loaded.feature_names_in_, det.feature_names_in_)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))


@pytest.mark.slow
def test_save_killed_mid_write_leaves_the_previous_model(tmp_path):
    """skdfm.save itself under SIGKILL: the file on disk always loads, and is
    either the first model or the second, never a mix or a stub."""
    target = tmp_path / "m.skdfm"
    code = textwrap.dedent(
        f"""
        import numpy as np, skdfm
        rng = np.random.default_rng(0)
        X = rng.normal(size=(80, 40000)).astype(np.float32)  # ~25 MB of components
        models = [skdfm.DFMDetector(pca_level=0.99, device="cpu").fit(X[i::2])
                  for i in range(2)]
        skdfm.save(models[0], {str(target)!r})
        print("ready", flush=True)
        i = 1
        while True:
            skdfm.save(models[i % 2], {str(target)!r})
            i += 1
        """
    )
    reference = np.random.default_rng(1).normal(size=(3, 40000))
    seen = set()
    for delay in (0.1, 0.37):
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.kill()
        process.wait(timeout=30)
        loaded = skdfm.load(target)  # never a ModelFileError
        seen.add(round(float(loaded.score_samples(reference)[0]), 3))
    assert 1 <= len(seen) <= 2


# -- crafted files (found by a review trying to break the loader) ------------------


def edited(saved_path, tmp_path, change, name="edited.skdfm"):
    """``saved_path`` with its document changed by ``change(document, tensors)``
    and a valid digest recomputed, as someone who knows the format could."""
    document, tensors = saved_document(saved_path)
    change(document, tensors)
    return write_document(tmp_path / name, document, tensors)


def state_of(document, step=None):
    model = document["model"]
    if step is not None:
        model = dict(model["steps"])[step]
    return model["state"]


def test_architectures_are_checked_on_the_meta_device_first(
    fitted_pipeline, tmp_path, monkeypatch
):
    import skdfm._imaging.backbone as backbone_module

    path = skdfm.save(fitted_pipeline, tmp_path / "m.skdfm")

    def bigger(document, tensors):  # a huge network named, small weights given
        state = state_of(document, "deepfeaturetransformer")
        state["backbone"] = "resnet152"
        state["feature_params_"]["__dict__"]["backbone"] = "resnet152"

    def refuse(*args, **kwargs):
        raise AssertionError("a real network was built")

    monkeypatch.setattr(backbone_module, "build_backbone", refuse)
    with pytest.raises(ModelFileError, match="saved weights do not fit 'resnet152'"):
        skdfm.load(edited(path, tmp_path, bigger))


@pytest.mark.parametrize(
    "header_value, message",
    [
        ([2**62] * 50_000, "badly"),  # many dimensions: refused before multiplying
        ([2**60, 2**60], "does not add up"),
        ([1e400], "badly"),
    ],
)
def test_absurd_shapes_are_refused_at_once(tmp_path, header_value, message):
    import time

    metadata = {"format": "skdfm-model", "skdfm": "{}", "sha256": "0" * 64}
    header = {
        "__metadata__": metadata,
        "x": {"dtype": "F64", "shape": header_value, "data_offsets": [0, 8]},
    }
    text = (
        json.dumps(header).replace('"Infinity"', "1e400").replace("Infinity", "1e400")
    )
    path = tmp_path / "absurd.skdfm"
    path.write_bytes(len(text).to_bytes(8, "little") + text.encode() + bytes(8))
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=message):
        skdfm.load(path)
    assert time.perf_counter() - start < 2


def test_malformed_json_never_escapes_as_another_error(saved_detector, tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    for body in (deep, '{"a": ' + "9" * 5000 + "}"):
        path = tmp_path / "odd.skdfm"
        path.write_bytes(len(body).to_bytes(8, "little") + body.encode())
        with pytest.raises(ModelFileError):
            skdfm.load(path)
        assert not _saving.is_model_file(path)

    def nest(document, tensors):
        value = 1
        for _ in range(200):
            value = {"__tuple__": [value]}
        document["model"]["state"]["offset_"] = value

    with pytest.raises(ModelFileError, match="nested too deeply"):
        skdfm.load(edited(saved_detector, tmp_path, nest))

    def huge_int(document, tensors):
        document["model"]["state"]["n_samples_"] = 10**400

    with pytest.raises(ModelFileError, match="cannot be rebuilt"):
        skdfm.load(edited(saved_detector, tmp_path, huge_int))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(whatever_=1), "attribute 'whatever_'"),
        (lambda s: s.update(n_features_in_="abc"), "cannot be rebuilt"),
        (lambda s: s.update(solver="svd"), "cannot be rebuilt"),
        (lambda s: s.update(offset_={"__float__": "nan"}), "offset_"),
        (lambda s: s.update(n_components_=2), "clash|shape"),
        (lambda s: [s.pop(k) for k in list(s) if k.endswith("_")], "cannot be rebuilt"),
        (lambda s: s.update(feature_shape_={"__tuple__": [1, 2, 3]}), "entries"),
        (lambda s: s.update(feature_shape_=[0, 1, 1]), "three positive ints"),
        (lambda s: s.update(image_score_="mean"), "not an image score"),
        (lambda s: s.update(image_score_=[1]), "not an image score"),
        (lambda s: s.update(image_score_=3), "needs the grid"),
        (lambda s: s.update(image_score=0), "cannot be rebuilt"),
    ],
)
def test_forged_detector_states_are_refused(saved_detector, tmp_path, change, message):
    path = edited(saved_detector, tmp_path, lambda d, t: change(d["model"]["state"]))
    with pytest.raises(ModelFileError, match=message):
        skdfm.load(path)


def test_forged_transformers_and_pipelines_are_refused(fitted_pipeline, tmp_path):
    path = skdfm.save(fitted_pipeline, tmp_path / "m.skdfm")

    def bad_batch(document, tensors):
        state_of(document, "deepfeaturetransformer")["batch_size"] = 0

    def wrong_digest(document, tensors):
        state_of(document, "deepfeaturetransformer")["weights_digest_"] = "0" * 32

    def swapped(document, tensors):
        document["model"]["steps"].reverse()

    def duplicate_names(document, tensors):
        steps = document["model"]["steps"]
        steps[1][0] = steps[0][0]

    def nested(document, tensors):
        inner = dict(document["model"])
        document["model"] = {
            "class": "sklearn.pipeline.Pipeline",
            "steps": [["inner", inner]],
            "verbose": False,
        }

    cases = [
        (bad_batch, "cannot be rebuilt"),
        (wrong_digest, "digest is not the recorded one"),
        (swapped, "holds no DFM model"),
        (duplicate_names, "holds no DFM model"),
        (nested, "only at the top"),
    ]
    for change, message in cases:
        with pytest.raises(ModelFileError, match=message):
            skdfm.load(edited(path, tmp_path, change))
    for version in (True, 1.0, "1"):

        def forge(document, tensors, version=version):
            document["format_version"] = version

        with pytest.raises(ModelFileError, match="format version"):
            skdfm.load(edited(path, tmp_path, forge))


def test_other_library_versions_warn(saved_detector, tmp_path):
    def older(document, tensors):
        document["versions"]["torch"] = "1.0.0"

    with pytest.warns(SkdfmVersionWarning, match="torch 1.0.0"):
        skdfm.load(edited(saved_detector, tmp_path, older))


def test_empty_arrays_and_colliding_names(detector, tmp_path):
    det = clone(detector[0]).fit(detector[1])
    path = tmp_path / "m.skdfm"
    det.empty_a_ = np.zeros((0, 3))
    det.empty_b_ = np.zeros(0)
    skdfm.save(det, path)  # saves (loading refuses the unknown attributes)
    with pytest.raises(ModelFileError, match="attribute 'empty_"):
        skdfm.load(path)
    inner = Pipeline([("b", detector[0])])
    with pytest.raises(ValueError, match="got \\['Pipeline', 'DFMDetector'\\]"):
        skdfm.save(Pipeline([("a", inner), ("c", detector[0])]), path)


def test_an_overwritten_file_keeps_its_permissions(detector, tmp_path):
    path = tmp_path / "m.skdfm"
    skdfm.save(detector[0], path)
    path.chmod(0o600)
    skdfm.save(detector[0], path)
    assert path.stat().st_mode & 0o777 == 0o600


def test_model_file_errors_pickle():
    import pickle

    error = ModelFileError("m.skdfm", "is damaged.")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.path == "m.skdfm"


def test_a_grid_saved_as_a_list_loads_as_the_tuple(saved_detector, tmp_path):
    def as_list(document, tensors):
        state = document["model"]["state"]
        state["feature_shape_"] = [state["n_features_in_"], 1, 1]

    loaded = skdfm.load(edited(saved_detector, tmp_path, as_list))
    assert loaded.feature_shape_ == (loaded.n_features_in_, 1, 1)
