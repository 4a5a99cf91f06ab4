"""Exported files scored without skdfm: the scripts of docs/deploying.rst, run by
plain onnxruntime and OpenVINO; and skdfm's own reading of .onnx files without the
onnx package (OpenVINO alone scores them)."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skdfm import ExportedModel, ModelFileError, calibrate_pixel_threshold, export
from skdfm._deploy import runtime as deploy_runtime

from .test_export import HAS_OPENVINO, RTOL, _fit, _relative, needs_openvino

pytest.importorskip("onnxruntime")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploying.rst"
#: what a process that "has no skdfm" cannot import
NO_SKDFM = ("skdfm", "torch", "timm", "sklearn", "scipy", "onnx")
REFUSE = textwrap.dedent(
    """
    import importlib.abc, sys

    class Gate(importlib.abc.MetaPathFinder):  # refused modules are not found
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path, target=None):
            if name.split(".")[0] not in {refused!r}:
                for finder in self.finders:
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        return spec
            return None

    sys.meta_path[:] = [Gate(list(sys.meta_path))]
    """
)


def docs_script(caption: str) -> str:
    """The code block of docs/deploying.rst captioned ``caption``."""
    lines = DOCS.read_text().splitlines()
    start = lines.index(f"    :caption: {caption}") + 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


@pytest.fixture(scope="module")
def model():
    from skdfm import make_defect_images

    from .conftest import SMALL_BACKBONE

    images, y, masks = make_defect_images(30, 10, image_size=64, random_state=0)
    fitted = _fit(images, y, backbone=dict(SMALL_BACKBONE, layer="layer2"))
    calibrate_pixel_threshold(fitted, images, masks)
    return fitted


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """8-bit files as a line camera writes them: RGB and grayscale, of other sizes
    than the model's input (so that the resize rule is tested)."""
    from skdfm import make_defect_images

    folder = tmp_path_factory.mktemp("images")
    images, _, _ = make_defect_images(3, 3, image_size=96, random_state=1)
    paths = []
    for i, image in enumerate(images):
        picture = Image.fromarray(image)
        if i % 3 == 1:
            picture = picture.convert("L")
        if i % 3 == 2:
            picture = picture.resize((80, 56))
        paths.append(folder / f"{i}.png")
        picture.save(paths[-1])
    return [str(p) for p in paths]


def _run_plain(script: str, model_path, paths, tmp_path, refused=NO_SKDFM):
    """The docs' script, imported in a process that cannot import ``refused``; its
    ``score(paths)`` saved, its own output printed."""
    (tmp_path / "plain.py").write_text(script)
    harness = REFUSE.format(refused=refused) + textwrap.dedent(
        """
        import runpy
        import numpy as np

        script, out = sys.argv[1:3]
        sys.argv = [script, *sys.argv[3:]]  # plain.py MODEL IMAGE...
        namespace = runpy.run_path(script, run_name="__main__")  # prints
        np.savez(out, **namespace["score"](sys.argv[2:]))
        loaded = sorted({m.split(".")[0] for m in sys.modules} & set(REFUSED))
        print("loaded:", loaded)
        """
    ).replace("REFUSED", repr(refused))
    done = subprocess.run(
        [sys.executable, "-c", harness, str(tmp_path / "plain.py"),
         str(tmp_path / "out.npz"), str(model_path), *paths],
        capture_output=True, text=True, timeout=300,
        cwd=tmp_path,  # the repository's skdfm/ is not on the path
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded: []"
    return dict(np.load(tmp_path / "out.npz")), done.stdout.splitlines()[:-1]


@pytest.mark.parametrize(
    "caption, fmt, runtime",
    [
        ("plain_onnxruntime.py", "onnx", "onnxruntime"),
        pytest.param("plain_openvino.py", "openvino", "openvino",
                     marks=needs_openvino),
    ],
)  # fmt: skip
def test_the_docs_scripts_score_as_exported_model_and_the_pipeline(
    model, image_files, tmp_path, caption, fmt, runtime
):
    suffix = ".onnx" if fmt == "onnx" else ".xml"
    path = export(model, tmp_path / f"model{suffix}", format=fmt)
    outputs, printed = _run_plain(docs_script(caption), path, image_files, tmp_path)
    assert sorted(outputs) == ["anomaly_map", "grid_map", "label", "score_samples"]
    assert outputs["score_samples"].dtype == np.float32
    assert outputs["anomaly_map"].shape == (len(image_files), 64, 64)

    exported = ExportedModel(path, runtime=runtime)
    reference = exported.anomaly_maps(image_files, size="input")
    # the same graph and the same input: the same numbers
    assert _relative(outputs["score_samples"], reference.score_samples) < 1e-6
    assert (outputs["label"] == reference.labels).all()
    assert _relative(outputs["anomaly_map"], reference.maps) < RTOL
    masks = outputs["anomaly_map"] >= exported.pixel_threshold_
    assert np.mean(masks != reference.masks) < 1e-3  # pixels at the threshold
    assert _relative(outputs["score_samples"], model.score_samples(image_files)) < RTOL
    assert (outputs["label"] == model.predict(image_files)).all()
    # what it prints: the command's anomaly score and verdict
    for line, path_, score, label in zip(
        printed, image_files, reference.score_samples, reference.labels, strict=True
    ):
        shown, value, verdict = line.split("\t")
        assert shown == path_ and verdict == ("normal" if label == 1 else "anomalous")
        assert float(value) == pytest.approx(-score, rel=1e-5)


def test_the_docs_describe_the_graph_and_metadata_the_export_writes(model, tmp_path):
    import onnxruntime as ort

    path = export(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["skdfm"])
    (given,) = session.get_inputs()
    assert (given.name, given.type, given.shape[1:]) == ("images", "tensor(float)",
                                                         [3, 64, 64])  # fmt: skip
    assert metadata["input"] == {
        "name": "images", "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0]
    }  # fmt: skip
    outputs = {o.name: o.type for o in session.get_outputs()}
    assert outputs == {
        "score_samples": "tensor(float)", "label": "tensor(int64)",
        "anomaly_map": "tensor(float)", "grid_map": "tensor(float)",
    }  # fmt: skip
    text = DOCS.read_text()
    for key in ("input_size", "image_mean", "image_std", "offset", "score_range",
                "pixel_threshold", "feature_shape", "precision"):  # fmt: skip
        assert key in metadata and f"``{key}``" in text, key


# -- ExportedModel on OpenVINO (or onnxruntime) alone: no onnx package -----------------

WITHOUT_ONNX = REFUSE.format(refused=("onnx",)) + textwrap.dedent(
    """
    import json
    import numpy as np
    import skdfm

    paths, results = sys.argv[3:], {}
    for route in sys.argv[1].split(","):
        runtime, path = route.split("=")
        try:
            model = skdfm.ExportedModel(path, runtime=runtime)
            maps = model.anomaly_maps(paths, size="input")
            results[route] = [maps.score_samples.tolist(), maps.maps.tolist()]
        except skdfm.ModelFileError as error:
            results[route] = str(error)
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)
    print("onnx loaded:", "onnx" in sys.modules)
    """
)


def _forged(source: Path, target: Path, change) -> Path:
    """A copy of an export whose graph ``change`` edits, sealed again (as a forger
    who recomputes the digest would)."""
    import onnx

    from skdfm._deploy.runtime import DIGEST_KEY, UNSEALED, seal_export

    proto = onnx.load(source)
    change(proto)
    for entry in proto.metadata_props:
        if entry.key == DIGEST_KEY:
            entry.value = UNSEALED
    onnx.save(proto, target)
    seal_export(target)
    return target


def _loop(proto):
    """The graph's label passed through a one-iteration Loop."""
    from onnx import TensorProto, helper

    graph = proto.graph
    (label,) = [n for n in graph.node if "label" in n.output]
    label.output[list(label.output).index("label")] = "label_before_loop"
    body = helper.make_graph(
        [helper.make_node("Identity", ["carried"], ["carried_out"]),
         helper.make_node("Identity", ["condition"], ["condition_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", TensorProto.INT64, None)],
    )  # fmt: skip
    graph.initializer.append(helper.make_tensor("one", TensorProto.INT64, [], [1]))
    graph.node.append(
        helper.make_node("Loop", ["one", "", "label_before_loop"], ["label"], body=body)
    )


def _custom(proto):
    proto.graph.node[0].domain = "com.example"


def test_openvino_alone_scores_onnx_files_with_every_check(
    model, image_files, tmp_path
):
    """A process where the onnx package cannot be imported: OpenVINO (and
    onnxruntime) score .onnx files exactly as with it, and refuse damaged and
    forged ones for the same reasons."""
    path = export(model, tmp_path / "model.onnx")
    damaged = tmp_path / "damaged.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of a weight
    damaged.write_bytes(bytes(data))
    edited = tmp_path / "edited.onnx"
    edited.write_bytes(path.read_bytes().replace(b'"precision"', b'"Precision"'))
    loop = _forged(path, tmp_path / "loop.onnx", _loop)
    custom = _forged(path, tmp_path / "custom.onnx", _custom)
    runtimes = ["onnxruntime"] + ["openvino"] * HAS_OPENVINO
    files = {"model": path, "damaged": damaged, "edited": edited, "loop": loop,
             "custom": custom}  # fmt: skip
    routes = [f"{runtime}={files[name]}" for runtime in runtimes for name in files]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_ONNX, ",".join(routes),
         str(tmp_path / "out.json"), *image_files],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "onnx loaded: False" in done.stdout
    results = json.loads((tmp_path / "out.json").read_text())
    reference = ExportedModel(path).anomaly_maps(image_files, size="input")
    for runtime in runtimes:
        scores, maps = results[f"{runtime}={path}"]
        assert _relative(scores, reference.score_samples) < RTOL, runtime
        assert _relative(maps, reference.maps) < RTOL, runtime
        refusals = {name: results[f"{runtime}={files[name]}"] for name in files}
        assert "does not match its SHA-256 digest" in refusals["damaged"]
        assert "does not match its SHA-256 digest" in refusals["edited"]
        assert "Loop" in refusals["loop"]
        assert "com.example" in refusals["custom"]
        # the same refusals as where onnx is installed
        for name in ("damaged", "edited", "loop", "custom"):
            with pytest.raises(ModelFileError) as error:
                ExportedModel(files[name], runtime=runtime)
            assert str(error.value) == refusals[name], (runtime, name)


def test_the_onnx_reader_finds_what_the_onnx_package_finds(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = export(model, tmp_path / "model.onnx")
    variants = {
        "export": path,
        "loop": _forged(path, tmp_path / "loop.onnx", _loop),
        "custom": _forged(path, tmp_path / "custom.onnx", _custom),
    }
    for name, file in variants.items():
        proto = onnx.load(file)
        contents = deploy_runtime.OnnxContents(file.read_bytes())
        assert contents.properties == {p.key: p.value for p in proto.metadata_props}
        assert deploy_runtime.foreign_operators(
            file.read_bytes()
        ) == deploy_runtime.foreign_operators(proto), name
    assert deploy_runtime.foreign_operators(path.read_bytes()) == []
    # a graph given in two pieces is one graph, as protobuf merges it
    data = path.read_bytes()
    extra = onnx.helper.make_graph(
        [onnx.helper.make_node("Loop", [], [])], "", [], []
    ).SerializeToString()
    split = data + b"\x3a" + len(extra).to_bytes(1, "little") + extra
    assert "Loop" in deploy_runtime.foreign_operators(
        onnx.load_model_from_string(split)
    )
    assert "Loop" in deploy_runtime.foreign_operators(split)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x3a\xff\xff\x7f", "longer than the file"),
        (b"\x3a\x05\x0a\x03", "longer than the file"),
        (b"\x3b", "wire type 3"),
        (b"\x00", "numbered 0"),
        (b"\x72\x04\x0a\x02\xff\xfe", "not UTF-8"),
        (b"\x72\x02\x0a\x80", "truncated or overlong varint"),
        (b"\x08" + b"\xff" * 11, "truncated or overlong varint"),
        (b"\x38\x01", "the graph is not a message"),
    ],
)
def test_unreadable_onnx_bytes_are_refused_by_name(data, reason, tmp_path):
    with pytest.raises(ValueError, match=reason):
        deploy_runtime.OnnxContents(data)
    file = tmp_path / "bad.onnx"
    file.write_bytes(data)
    runtime = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "openvino"
    with pytest.raises(ModelFileError, match="not a readable ONNX file"):
        ExportedModel(file, runtime=runtime)
