"""Exported files are run only as skdfm wrote them: digest, metadata values, outputs
by name, the graph's labels, its operators, the OpenVINO pair's replacement and
OpenVINO's errors; all on real exports run by onnxruntime and OpenVINO."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from skdfm import ExportedModel, ModelFileError, export, make_defect_images
from skdfm._deploy.runtime import DIGEST_KEY, UNSEALED, error_reason, seal_export

from .conftest import SMALL_BACKBONE
from .test_export import HAS_OPENVINO, RUNTIMES, _fit, needs_openvino

onnx = pytest.importorskip("onnx")
#: the exported model's architecture with other weights (a .bin of the same size)
OTHER_WEIGHTS = dict(SMALL_BACKBONE, layer="layer2", random_state=1)


@pytest.fixture(scope="module")
def data():
    images, y, _ = make_defect_images(30, 10, image_size=64, random_state=0)
    return images, y


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


def _rewrite_onnx(source, target, *, metadata=None, graph=None, seal=True):
    """A copy of an exported .onnx with its metadata and graph edited by ``metadata``
    (dict -> dict or str) and ``graph`` (GraphProto, edited in place); sealed again
    (as a forger who recomputes the digest would) unless ``seal`` is False."""
    proto = onnx.load(source)
    properties = {p.key: p.value for p in proto.metadata_props}
    text = properties["skdfm"]
    if metadata is not None:
        text = metadata(json.loads(text))
        text = text if isinstance(text, str) else json.dumps(text)
    if graph is not None:
        graph(proto.graph)
    del proto.metadata_props[:]
    entries = [("skdfm", text)] + [(DIGEST_KEY, UNSEALED)] * seal
    for key, value in entries:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, target)
    if seal:
        seal_export(target)
    return target


def _rewrite_xml(source, target, metadata):
    """A copy of an exported OpenVINO pair with its metadata edited, sealed again."""
    import openvino as ov

    model = ov.Core().read_model(source)
    text = json.dumps(metadata(json.loads(model.get_rt_info(["skdfm"]).astype(str))))
    model.set_rt_info(text, ["skdfm"])
    model.set_rt_info(UNSEALED, [DIGEST_KEY])
    ov.save_model(model, target, compress_to_fp16=False)
    seal_export(target)
    return target


def _flip_bit(content: bytes, at: int) -> bytes:
    return content[:at] + bytes([content[at] ^ 1]) + content[at + 1 :]


def test_a_flipped_bit_or_an_edited_character_is_refused(exported, tmp_path):
    source = exported["onnx"]
    data = source.read_bytes()
    largest = max(onnx.load(source).graph.initializer, key=lambda t: len(t.raw_data))
    weights_at = data.find(largest.raw_data[:64]) + 100
    offset = json.loads(
        {p.key: p.value for p in onnx.load(source).metadata_props}["skdfm"]
    )["offset"]
    text = f'"offset": {offset!r}'.encode()
    edited = text[:-1] + (b"1" if text[-1:] != b"1" else b"2")  # its last digit
    damaged = {
        "a weight bit": _flip_bit(data, weights_at),
        "a metadata character": data.replace(text, edited, 1),
    }
    assert all(changed != data for changed in damaged.values())
    for what, changed in damaged.items():
        path = tmp_path / "damaged.onnx"
        path.write_bytes(changed)
        for runtime in RUNTIMES:
            with pytest.raises(ModelFileError, match="SHA-256 digest"):
                ExportedModel(path, runtime=runtime)
                pytest.fail(what)
    ExportedModel(source)  # the file itself is verified


@needs_openvino
def test_a_flipped_bit_in_either_openvino_file_is_refused(exported, tmp_path):
    xml = exported["openvino"]
    for damaged in (".xml", ".bin"):
        for suffix in (".xml", ".bin"):
            data = xml.with_suffix(suffix).read_bytes()
            if suffix == damaged:
                data = _flip_bit(data, len(data) // 2 if suffix == ".bin" else 200)
            (tmp_path / f"m{suffix}").write_bytes(data)
        with pytest.raises(ModelFileError, match="SHA-256 digest|cannot be read"):
            ExportedModel(tmp_path / "m.xml")


def test_files_without_a_digest(exported, fre_model, data, tmp_path):
    """Format 1 (skdfm's exports before the digest) loads unverified, with a
    warning; a format 2 file without its digest is refused."""
    images, _ = data
    legacy = _rewrite_onnx(
        exported["onnx"], tmp_path / "legacy.onnx",
        metadata=lambda m: {**m, "format_version": 1}, seal=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="without digests"):
        runner = ExportedModel(legacy)
    np.testing.assert_allclose(
        runner.score_samples(images[:4]), fre_model.score_samples(images[:4]),
        rtol=1e-5,
    )  # fmt: skip
    stripped = _rewrite_onnx(exported["onnx"], tmp_path / "nodigest.onnx", seal=False)
    with pytest.raises(ModelFileError, match="has no skdfm digest"):
        ExportedModel(stripped)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: {**m, "offset": -1e30}, "invalid offset"),
        (lambda m: {**m, "offset": "NaN"}, "valid 'offset'"),
        (lambda m: {**m, "pixel_threshold": 1e300}, "invalid pixel_threshold"),
        (lambda m: {**m, "pixel_threshold": -1.0}, "invalid pixel_threshold"),
        (lambda m: {**m, "score_range": m["score_range"][::-1]}, "invalid score_range"),
        (lambda m: {**m, "score_range": [0, 1, 2]}, "invalid score_range"),
        (lambda m: {**m, "score_range": [0, 1e400]}, "invalid score_range"),
        (lambda m: {**m, "input_size": [16384, 4096]}, "invalid input_size"),
        (lambda m: {**m, "input_size": [0, 64]}, "invalid input_size"),
        (lambda m: {**m, "format_version": 99}, "upgrade skdfm"),
    ],
)
def test_metadata_values_no_fitted_model_has_are_refused(
    exported, tmp_path, change, message
):
    forged = _rewrite_onnx(exported["onnx"], tmp_path / "m.onnx", metadata=change)
    for runtime in RUNTIMES:
        with pytest.raises(ModelFileError, match=message) as error:
            ExportedModel(forged, runtime=runtime)
        assert str(error.value).strip()


def test_a_huge_declared_input_size_is_refused_before_any_allocation(
    exported, tmp_path
):
    """The trial's forged export: input_size 16384 x 4096 in the metadata and in the
    graph's input reached 7.1 GB, then printed an empty error."""

    def input_shape(graph):
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value, dims[3].dim_value = 16384, 4096

    forged = _rewrite_onnx(
        exported["onnx"], tmp_path / "m.onnx",
        metadata=lambda m: {**m, "input_size": [16384, 4096]}, graph=input_shape,
    )  # fmt: skip
    with pytest.raises(ModelFileError, match=r"invalid input_size \[16384, 4096\]"):
        ExportedModel(forged)


def test_outputs_are_read_by_name(exported, fre_model, data, tmp_path):
    images, _ = data

    def swap(graph):  # the same outputs, listed in another order
        outputs = list(graph.output)
        outputs[0], outputs[1] = outputs[1], outputs[0]
        del graph.output[:]
        graph.output.extend(outputs)

    swapped = _rewrite_onnx(exported["onnx"], tmp_path / "m.onnx", graph=swap)
    assert onnx.load(swapped).graph.output[0].name == "label"
    expected = fre_model.score_samples(images[:6])
    for runtime in RUNTIMES:
        runner = ExportedModel(swapped, runtime=runtime)
        np.testing.assert_allclose(runner.score_samples(images[:6]), expected, 1e-5)
        maps = runner.anomaly_maps(images[:2], size="grid").maps
        assert maps.shape == (2, *fre_model[0].feature_shape_[1:])


def _moved_offset(fre_model, images):
    """The metadata's offset moved to the median score: half the labels flip."""
    scores = fre_model.score_samples(images)
    return lambda m: {**m, "offset": float(np.median(scores))}


def test_a_graph_labelling_at_another_threshold_is_refused(
    exported, fre_model, data, tmp_path
):
    images, _ = data
    change = _moved_offset(fre_model, images)
    forged = {"onnx": _rewrite_onnx(exported["onnx"], tmp_path / "m.onnx",
                                    metadata=change)}  # fmt: skip
    if HAS_OPENVINO:
        forged["openvino"] = _rewrite_xml(exported["openvino"], tmp_path / "m.xml",
                                          change)  # fmt: skip
    for path in forged.values():
        runner = ExportedModel(path)  # the metadata alone is plausible
        with pytest.raises(ModelFileError, match="graph and metadata disagree"):
            runner.predict(images)


def _with_loop(graph, trip_count):
    """The graph's ``label`` passed through a Loop of ``trip_count`` iterations."""
    from onnx import TensorProto, helper

    producer = next(n for n in graph.node if "label" in n.output)
    producer.output[list(producer.output).index("label")] = "label_before_loop"
    body = helper.make_graph(
        [helper.make_node("Identity", ["condition_in"], ["condition_out"]),
         helper.make_node("Identity", ["value_in"], ["value_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("value_in", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("value_out", TensorProto.INT64, None)],
    )  # fmt: skip
    graph.initializer.append(
        helper.make_tensor("trip_count", TensorProto.INT64, [], [trip_count])
    )
    graph.node.append(
        helper.make_node(
            "Loop", ["trip_count", "", "label_before_loop"], ["label"], body=body
        )
    )


def test_control_flow_is_refused_before_it_runs(exported, fre_model, data, tmp_path):
    """A Loop of 2**62 iterations would never end: graphs are refused at load when
    they hold operators skdfm's exports never hold. (Three iterations here, so that
    a version without the check runs the test to its end.)"""
    images, _ = data
    looped = _rewrite_onnx(
        exported["onnx"], tmp_path / "m.onnx", graph=lambda g: _with_loop(g, 3)
    )
    for runtime in RUNTIMES:
        with pytest.raises(ModelFileError, match="Loop"):
            ExportedModel(looped, runtime=runtime).predict(images[:2])

    def custom(graph):
        graph.node[0].domain = "com.example"

    foreign = _rewrite_onnx(exported["onnx"], tmp_path / "c.onnx", graph=custom)
    with pytest.raises(ModelFileError, match="com.example"):
        ExportedModel(foreign)


@needs_openvino
def test_control_flow_in_an_openvino_file_is_refused(exported, tmp_path):
    import openvino as ov

    looped = _rewrite_onnx(
        exported["onnx"], tmp_path / "m.onnx", graph=lambda g: _with_loop(g, 3),
        seal=False,
    )  # fmt: skip
    model = ov.convert_model(str(looped))
    metadata = onnx.load(looped).metadata_props[0].value
    model.set_rt_info(metadata, ["skdfm"])
    model.set_rt_info(UNSEALED, [DIGEST_KEY])
    ov.save_model(model, tmp_path / "m.xml")
    seal_export(tmp_path / "m.xml")
    with pytest.raises(ModelFileError, match="Loop|TensorIterator"):
        ExportedModel(tmp_path / "m.xml")


@needs_openvino
def test_openvino_errors_say_why(exported, tmp_path):
    xml = exported["openvino"]
    # as skdfm's exports before the digest wrote them (a digest would refuse first)
    text = re.sub(rb'\s*<skdfm_sha256 value="[0-9a-f]+" />', b"", xml.read_bytes())
    text = text.replace(
        b"&quot;format_version&quot;: 2", b"&quot;format_version&quot;: 1"
    )
    (tmp_path / "m.xml").write_bytes(text)
    (tmp_path / "m.bin").write_bytes(xml.with_suffix(".bin").read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="Incorrect weights in bin file") as error:
        ExportedModel(tmp_path / "m.xml")
    assert "Exception from" not in str(error.value)
    (tmp_path / "noise.xml").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ModelFileError, match="Unable to read the model") as error:
        ExportedModel(tmp_path / "noise.xml")
    assert len(str(error.value)) < 500
    assert error_reason(RuntimeError("\n\n")) == "RuntimeError"
    assert len(error_reason(RuntimeError("x" * 5000))) == 300


#: Replaces the OpenVINO pair argv[2] (.xml) by argv[1], SIGKILLed at the
#: argv[3]-th rename; imports no torch.
KILLED_REPLACE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from skdfm._tools.export import replace_openvino_pair

    rename, calls = os.replace, []

    def replace(*args):
        calls.append(1)
        if len(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        rename(*args)

    os.replace = replace
    replace_openvino_pair(Path(sys.argv[1]), Path(sys.argv[2]))
    """
)


@needs_openvino
def test_a_killed_openvino_export_leaves_a_loadable_pair(
    exported, fre_model, data, tmp_path
):
    """Killed before, between and after the three renames (previous .bin to a
    backup, new .bin, new .xml): the previous pair or the new one loads."""
    images, y = data
    other = _fit(images, y, backbone=OTHER_WEIGHTS)
    new = export(other, tmp_path / "new.xml", format="openvino")
    previous = exported["openvino"]
    expected = {
        "previous": fre_model.score_samples(images[:4]),
        "new": other.score_samples(images[:4]),
    }
    script = tmp_path / "replace.py"
    script.write_text(KILLED_REPLACE)
    for kill_at, which in ((1, "previous"), (2, "previous"), (3, "previous"),
                           (4, "new")):  # fmt: skip
        folder = tmp_path / f"kill{kill_at}"
        folder.mkdir()
        for suffix in (".xml", ".bin"):
            shutil.copy(previous.with_suffix(suffix), folder / f"m{suffix}")
            shutil.copy(new.with_suffix(suffix), folder / f"source{suffix}")
        done = subprocess.run(
            [sys.executable, str(script), str(folder / "source.xml"),
             str(folder / "m.xml"), str(kill_at)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == (-9 if kill_at < 4 else 0), done.stderr
        with (
            pytest.warns(UserWarning, match="interrupted")
            if kill_at in (2, 3)
            else _no_warning()
        ):
            runner = ExportedModel(folder / "m.xml")
        np.testing.assert_allclose(
            runner.score_samples(images[:4]), expected[which], rtol=1e-5
        )
        if kill_at == 4:
            assert sorted(p.name for p in folder.iterdir()) == ["m.bin", "m.xml"]


class _no_warning:
    def __enter__(self):
        import warnings

        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self.catcher.__exit__(*exc)


@needs_openvino
def test_an_exception_between_the_renames_restores_the_previous_pair(
    exported, fre_model, data, tmp_path, monkeypatch
):
    import os

    from skdfm._tools.export import replace_openvino_pair

    images, y = data
    new = export(
        _fit(images, y, backbone=OTHER_WEIGHTS), tmp_path / "new.xml", format="openvino"
    )
    folder = tmp_path / "target"
    folder.mkdir()
    for suffix in (".xml", ".bin"):
        shutil.copy(exported["openvino"].with_suffix(suffix), folder / f"m{suffix}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rename, calls = os.replace, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # after the new .bin, before the new .xml
            raise KeyboardInterrupt
        rename(*args)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_openvino_pair(new, folder / "m.xml")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    np.testing.assert_allclose(
        ExportedModel(folder / "m.xml").score_samples(images[:3]),
        fre_model.score_samples(images[:3]), rtol=1e-5,
    )  # fmt: skip


def test_a_graph_the_loader_would_refuse_is_refused_at_export(
    fre_model, tmp_path, monkeypatch
):
    # A backbone whose graph holds an operator off the reviewed list: the export
    # fails and says which, instead of writing a file no ExportedModel loads.
    import skdfm._deploy.runtime

    reviewed = skdfm._deploy.runtime.ONNX_OPERATORS
    monkeypatch.setattr(skdfm._deploy.runtime, "ONNX_OPERATORS", reviewed - {"Relu"})
    target = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"Cannot export 'test_resnet'.*\(Relu\)"):
        export(fre_model, target)
    assert list(tmp_path.iterdir()) == []
