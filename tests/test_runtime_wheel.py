"""skdfm-runtime: the wheel tools/build_runtime_wheel.py builds, installed alone in a
fresh venv (the slow tests need the package registry, as ``pip install`` does)."""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skdfm

REPOSITORY = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "build_runtime_wheel", REPOSITORY / "tools" / "build_runtime_wheel.py"
)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

#: what skdfm-runtime must never install
TRAINING = {
    "torch", "torchvision", "timm", "scikit-learn", "scipy", "onnx", "onnxscript",
    "joblib", "safetensors", "tqdm", "matplotlib",
}  # fmt: skip


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(requirement).name)


def test_the_runtime_distribution_needs_numpy_pillow_and_one_runtime():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(build.pyproject(build.version()))["project"]
    main = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    assert project["name"] == "skdfm-runtime"
    assert project["version"] == skdfm.__version__
    assert {_name(r) for r in project["dependencies"]} == {"numpy", "pillow"}
    extras = project["optional-dependencies"]
    assert {k: [_name(r) for r in v] for k, v in extras.items()} == {
        "onnxruntime": ["onnxruntime"], "openvino": ["openvino"],
        "16bit": ["imagecodecs"],
    }  # fmt: skip
    # skdfm's own pins, the same command
    pinned = set(main["dependencies"]).union(*main["optional-dependencies"].values())
    for requirement in project["dependencies"] + sum(extras.values(), []):
        assert requirement in pinned, requirement
    assert project["scripts"] == main["scripts"]
    assert project["requires-python"] == main["requires-python"]


def test_a_training_name_without_torch_says_what_is_missing():
    """Where torch is not installed (skdfm-runtime, or skdfm installed with
    --no-deps), a training-side name raises an ImportError naming the package;
    the runtime's names still work."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if not installed
        "import skdfm\n"
        "print(skdfm.ExportedModel.__name__)\n"
        "try:\n"
        "    skdfm.DFMDetector\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error.name, error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ExportedModel"
    assert lines[1].startswith(
        "ImportError torch skdfm.DFMDetector needs torch, which is not installed: "
        "reinstall skdfm with its dependencies"
    )


# -- the wheel, installed in a fresh venv ------------------------------------------


def _modern_setuptools() -> bool:
    """setuptools >= 70.1 here: it builds wheels without the registry."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    return build.build(folder, isolation=not _modern_setuptools())


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A tiny fitted Pipeline (with a pixel threshold), its .onnx export and image
    files of several sizes."""
    from sklearn.pipeline import make_pipeline

    from .conftest import SMALL_BACKBONE

    folder = tmp_path_factory.mktemp("deployed")
    images, y, masks = skdfm.make_defect_images(24, 6, image_size=64, random_state=0)
    model = make_pipeline(
        skdfm.DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2"),
        skdfm.DFMDetector(device="cpu"),
    ).fit(images[y == 1][:20])
    skdfm.calibrate_pixel_threshold(model, images, masks)
    path = skdfm.export(model, folder / "model.onnx")
    (folder / "images").mkdir()
    for i, image in enumerate(images[20:]):
        picture = Image.fromarray(image)
        picture = picture.resize((80, 48)) if i % 3 == 2 else picture
        picture.save(folder / "images" / f"{i}.png")
    files = sorted(str(p) for p in (folder / "images").iterdir())
    return model, path, files, folder


#: run in the fresh venv: ExportedModel's scores and maps, what a training name says
IN_VENV = """
import json, sys
import skdfm

model = skdfm.ExportedModel(sys.argv[1])
result = model.anomaly_maps(sys.argv[3:], size="input")
try:
    skdfm.DFMDetector
    message = None
except ImportError as error:
    message = str(error)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in
               ("torch", "timm", "sklearn", "scipy", "onnx", "tqdm"))
with open(sys.argv[2], "w") as handle:
    json.dump({"runtime": model.runtime_, "scores": result.score_samples.tolist(),
               "maps": result.maps.tolist(), "training": message, "heavy": heavy},
              handle)
"""


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def _csv_scores(path) -> dict:
    with open(path, newline="") as handle:
        return {
            row["path"]: float(row["anomaly_score"]) for row in csv.DictReader(handle)
        }


def _pictures(folder: Path) -> list:
    return sorted(p.relative_to(folder) for p in folder.rglob("*.png"))


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["onnxruntime", "openvino"])
def test_the_runtime_wheel_installs_alone_and_scores_as_the_full_install(
    wheel, deployed, tmp_path, extra
):
    """Fresh venv, the wheel with one runtime from the registry: pip check is clean,
    nothing of the training side is installed, and ``skdfm score`` (CSV, maps) and
    ExportedModel score as the full install does. OpenVINO scores the .onnx alone."""
    pytest.importorskip(extra)  # the full install's reference runs it here
    model, path, files, folder = deployed
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    python, command = venv / "bin" / "python", venv / "bin" / "skdfm"
    _run([python, "-m", "pip", "install", "-q", f"{wheel}[{extra}]"], timeout=900)
    assert "No broken requirements" in _run([python, "-m", "pip", "check"]).stdout
    listed = _run([python, "-m", "pip", "list", "--format", "json"]).stdout
    installed = {_name(p["name"]): p["version"] for p in json.loads(listed)}
    assert not TRAINING & set(installed), sorted(TRAINING & set(installed))
    assert {"skdfm-runtime", "numpy", "pillow", extra} <= set(installed)
    assert installed["skdfm-runtime"] == skdfm.__version__
    size = _run(["du", "-sh", str(venv)]).stdout.split()[0]
    print(f"\nskdfm-runtime[{extra}]: venv {size}; {sorted(installed)}")

    # the command: the CSV's scores and the overlays, as the full install's
    version = _run([command, "--version"]).stdout.strip()
    assert version == f"skdfm {skdfm.__version__}"
    outputs = {}
    for name, executable in (("runtime", [command]),
                             ("full", [sys.executable, "-m", "skdfm"])):  # fmt: skip
        out = tmp_path / name
        out.mkdir()
        _run([*executable, "score", str(path), str(folder / "images"),
              "--csv", str(out / "scores.csv"), "--maps", str(out / "maps"),
              "--no-progress"], timeout=300, cwd=tmp_path)  # fmt: skip
        outputs[name] = out
    runtime_scores = _csv_scores(outputs["runtime"] / "scores.csv")
    full_scores = _csv_scores(outputs["full"] / "scores.csv")
    assert sorted(runtime_scores) == sorted(full_scores) == files
    # the full install's command runs onnxruntime: OpenVINO's float32 rounding
    # differs from it by about 1e-7 relative
    tolerance = 1e-6 if extra == "onnxruntime" else 1e-5
    assert _relative([runtime_scores[f] for f in files],
                     [full_scores[f] for f in files]) < tolerance  # fmt: skip
    maps = _pictures(outputs["runtime"] / "maps")
    assert len(maps) == len(files) and maps == _pictures(outputs["full"] / "maps")
    for name in maps:
        ours = np.asarray(Image.open(outputs["runtime"] / "maps" / name), np.int16)
        theirs = np.asarray(Image.open(outputs["full"] / "maps" / name), np.int16)
        assert ours.shape == theirs.shape
        if extra == "onnxruntime":  # the same runtime: the same picture
            assert np.abs(ours - theirs).max() <= 1, name

    # ExportedModel: the full install's scores and maps, on the same runtime
    result_file = tmp_path / "result.json"
    _run([python, "-c", IN_VENV, str(path), str(result_file), *files], timeout=300)
    result = json.loads(result_file.read_text())
    assert result["runtime"] == extra and result["heavy"] == []
    reference = skdfm.ExportedModel(path, runtime=extra).anomaly_maps(
        files, size="input"
    )
    assert _relative(result["scores"], reference.score_samples) < 1e-6
    assert _relative(result["maps"], reference.maps) < 1e-6
    assert _relative(result["scores"], model.score_samples(files)) < 1e-5
    assert "skdfm-runtime scores exported models only" in result["training"]
    assert "skdfm.DFMDetector needs torch" in result["training"]
    shutil.rmtree(venv)  # 200-300 MB
