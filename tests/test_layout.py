"""The package's layout: what lives where, and what each part may import."""

import ast
import importlib.util
import json
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import skdfm

PACKAGE = Path(skdfm.__file__).parent

#: modules that run exported models and must stay importable without torch:
#: every module of skdfm._deploy, found afresh, and the helpers they share with
#: the torch-free command line
TORCH_FREE = sorted(
    {"skdfm._deploy", "skdfm._imaging.decode", "skdfm._evaluation.map_files"}
    | {"skdfm._evaluation.plotting", "skdfm.cli"}  # score's maps, the command
    | {
        f"skdfm._deploy.{module.name}"
        for module in pkgutil.iter_modules([str(PACKAGE / "_deploy")])
    }
)
#: what an exported model runs without: skdfm-runtime (tools/build_runtime_wheel.py)
#: installs none of them
HEAVY = (
    "torch", "torchvision", "timm", "sklearn", "scipy", "onnx", "joblib",
    "safetensors", "tqdm", "matplotlib",
)  # fmt: skip

#: the top level of skdfm/: the public modules ...
PUBLIC = {"__init__", "__main__", "cli", "distributed"}  # cli: a module or package
#: ... the modules old pickles name (joblib files of skdfm 0.1) ...
PICKLE_PATHS = {
    "_detector": "DFMDetector",
    "_transformer": "DeepFeatureTransformer",
    "_cache": "FeatureCache",
}
#: ... and the private subpackages that hold everything else
SUBPACKAGES = {"_core", "_kernels", "_imaging", "_tools", "_deploy", "_evaluation"}


def test_the_deployment_modules_never_load_torch_timm_or_sklearn():
    code = (
        "import importlib, sys\n"
        f"heavy = {HEAVY!r}\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "    print(name, loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "skdfm._deploy.runtime" in TORCH_FREE
    assert done.stdout.splitlines() == [f"{name} []" for name in TORCH_FREE]


def _modules_installed_by(requirements) -> set[str]:
    """The top-level modules of the distributions ``requirements`` install here,
    with their dependencies (what skdfm-runtime and that extra would install)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), list(requirements)
    while todo:
        name = canonicalize_name(todo.pop())
        if name not in seen:
            seen.add(name)
            for text in metadata.requires(name) or []:
                requirement = Requirement(text)
                if requirement.marker is None or requirement.marker.evaluate(
                    {"extra": ""}
                ):
                    todo.append(requirement.name)
    return {
        module
        for module, names in metadata.packages_distributions().items()
        if {canonicalize_name(n) for n in names} & seen
    }


#: ``skdfm score`` in a process that can import only the standard library, skdfm
#: and what skdfm-runtime installs: everything else is refused by the import system.
ONLY_RUNTIME = """
import importlib.abc, json, sys

allowed = set(json.loads(sys.argv[1])) | set(sys.stdlib_module_names) | {"skdfm"}

class Gate(importlib.abc.MetaPathFinder):  # others are not found, as if absent
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in allowed:
            for finder in self.finders:
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    return spec
        return None

sys.meta_path[:] = [Gate(list(sys.meta_path))]
from skdfm.cli import main

code = main(["score", *sys.argv[2:], "--no-progress"])
print("exit:", code)
"""


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """A tiny model with a pixel threshold, exported in the formats installed here,
    and 8 image files."""
    from PIL import Image
    from sklearn.pipeline import make_pipeline

    from .conftest import SMALL_BACKBONE

    folder = tmp_path_factory.mktemp("exported")
    images, y, masks = skdfm.make_defect_images(20, 4, image_size=64, random_state=0)
    model = make_pipeline(
        skdfm.DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2"),
        skdfm.DFMDetector(device="cpu"),
    ).fit(images[y == 1][:16])
    skdfm.calibrate_pixel_threshold(model, images, masks)
    files = {}
    for fmt, suffix, runtime in (("onnx", "onnx", "onnxruntime"),
                                 ("openvino", "xml", "openvino")):  # fmt: skip
        if importlib.util.find_spec(runtime):
            files[suffix] = skdfm.export(model, folder / f"model.{suffix}", format=fmt)
    for i, image in enumerate(images[16:]):
        Image.fromarray(image).save(folder / f"{i}.png")
    return files, folder


@pytest.mark.parametrize(
    "runtime, suffix",
    [("onnxruntime", "onnx"), ("openvino", "onnx"), ("openvino", "xml")],
)
def test_exported_models_score_with_only_what_skdfm_runtime_installs(
    exported_model, tmp_path, runtime, suffix
):
    """The command's scores, maps, masks and CSV of an exported model, with only
    numpy, Pillow and one runtime (and their dependencies) importable: OpenVINO
    alone scores .onnx files too."""
    pytest.importorskip(runtime)
    files, folder = exported_model
    path = files.get(suffix) or pytest.skip(f"cannot export .{suffix} here")
    allowed = _modules_installed_by(["numpy", "pillow", runtime])
    assert not allowed & set(HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", ONLY_RUNTIME, json.dumps(sorted(allowed)), str(path),
         str(folder), "--csv", str(tmp_path / "s.csv"),
         "--maps", str(tmp_path / "maps"), "--masks", str(tmp_path / "masks")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exit: 0" in done.stdout, done.stderr
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 8
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 8
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 8


@pytest.mark.parametrize("module, name", sorted(PICKLE_PATHS.items()))
def test_the_class_paths_of_old_pickles_still_resolve(module, name):
    # a protocol 0 GLOBAL opcode: what pickle and joblib look up on load
    found = pickle.loads(f"cskdfm.{module}\n{name}\n.".encode())
    assert found is getattr(skdfm, name)
    assert found.__module__ == f"skdfm.{module}"  # pickles write this path anew


def test_the_top_level_holds_only_the_chosen_modules():
    entries = {
        path.name
        for path in PACKAGE.iterdir()
        if path.name != "__pycache__" and not path.name.startswith(".")
    }
    stems = {name.removesuffix(".py") for name in entries}
    assert stems == PUBLIC | set(PICKLE_PATHS) | SUBPACKAGES, (
        "a new top-level module is a choice: add it to the sets above, or put it "
        "in a subpackage"
    )
    for name in SUBPACKAGES:
        assert (PACKAGE / name / "__init__.py").is_file(), name
    for name in set(PICKLE_PATHS) | {"__init__", "__main__", "distributed"}:
        assert f"{name}.py" in entries, name
    assert ("cli.py" in entries) != ("cli" in entries)  # one or the other


#: The layers, lowest first: a part imports only parts of a lower rank or its own.
RANK = {
    "_core": 0,
    "_kernels": 1,
    "_imaging": 1,
    "_deploy": 2,
    "_cache": 3,
    "_transformer": 3,
    "_detector": 3,
    "_tools": 4,
    "_evaluation": 5,
    "distributed": 6,
    "cli": 6,
    "__main__": 7,
}
#: Upward imports made on purpose, each inside a function, with the reason.
UPWARD = {
    # DFMDetector.fit goes through the one fit path, as stream_fit,
    # distributed.fit and the command do, so their checks cannot drift
    ("_detector", "_tools.fitting"),
}


def _imports_of_parts():
    """(importing part, imported part.module, file, line, inside a function)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts == ("__init__.py",):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level >= 1):
                continue
            base = list(parts[: len(parts) - node.level])
            target = base + [m for m in (node.module or "").split(".") if m]
            if not target:  # the package root: __version__ and the public names
                continue
            found.append(
                (
                    parts[0].removesuffix(".py"),
                    ".".join(t.removesuffix(".py") for t in target[:2]),
                    f"{'/'.join(parts)}:{node.lineno}",
                    node.col_offset > 0,
                )
            )
    return found


def test_each_layer_imports_only_the_layers_below_it():
    imports = _imports_of_parts()
    assert len(imports) > 50  # the walk finds the package's imports
    upward = [
        f"{where}: {part} imports {target}"
        for part, target, where, _ in imports
        if RANK[target.split(".")[0]] > RANK[part] and (part, target) not in UPWARD
    ]
    assert upward == []
    # the allowed exceptions are still needed, and made inside a function
    for part, target in UPWARD:
        uses = [lazy for p, t, _, lazy in imports if (p, t) == (part, target)]
        assert uses and all(uses), (part, target)
