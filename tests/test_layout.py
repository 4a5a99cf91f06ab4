"""The package's layout: what lives where, and what each part may import."""

import ast
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
    | {
        f"skdfm._deploy.{module.name}"
        for module in pkgutil.iter_modules([str(PACKAGE / "_deploy")])
    }
)
#: what an exported model runs without (the ``[onnx]``/``[openvino]`` extras)
HEAVY = ("torch", "torchvision", "timm", "sklearn")

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
