"""Build the skdfm-runtime wheel: skdfm for machines that only score exported models.

skdfm-runtime is a second distribution built from this repository. Its wheel holds
the same ``skdfm`` package, at the same version, but it depends only on numpy and
Pillow; one extra adds the runtime, ``[onnxruntime]`` or ``[openvino]``. torch,
timm, scikit-learn and scipy are not installed: :class:`skdfm.ExportedModel` and
``skdfm score model.onnx|model.xml`` work, fitting, exporting and evaluating need
the full skdfm (in another environment: the two distributions install the same
``skdfm`` package and must never share one).

Usage, from the repository (needs pip and the package registry for setuptools, as
``pip install -e .`` does)::

    python tools/build_runtime_wheel.py      # dist/skdfm_runtime-<v>-py3-none-any.whl
    python tools/build_runtime_wheel.py --dist-dir wheels/

then, on the scoring machine::

    python -m venv venv && . venv/bin/activate
    pip install "skdfm_runtime-<v>-py3-none-any.whl[onnxruntime]"   # or [openvino]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
NAME = "skdfm-runtime"
#: What every scoring machine needs: arrays and image decoding. The pins are
#: skdfm's own (tests/test_runtime_wheel.py checks that they agree).
DEPENDENCIES = ["numpy>=1.24", "Pillow>=9"]
#: One runtime by extra; 16-bit colour files at full precision as in skdfm.
EXTRAS = {
    "onnxruntime": ["onnxruntime>=1.18"],
    "openvino": ["openvino>=2024.4"],
    "16bit": ["imagecodecs>=2024.1.1"],
}
DESCRIPTION = (
    "skdfm for scoring machines: runs models exported by skdfm (ONNX, OpenVINO) "
    "without torch, timm or scikit-learn"
)
README = f"""# {NAME}

{DESCRIPTION}.

The `skdfm` package of skdfm at the same version, with only numpy and Pillow as
dependencies; install it with one runtime:

    pip install "{NAME}[onnxruntime]"    # or "{NAME}[openvino]"

It scores exported models (`skdfm.ExportedModel`, `skdfm score model.onnx IMAGES
--maps DIR`). Fitting, exporting and evaluating need the full skdfm, installed in
another environment: both distributions install the `skdfm` package, so never
install them side by side.
"""


def version(repository: Path = REPOSITORY) -> str:
    """skdfm's ``__version__``, read from its source (nothing is imported)."""
    tree = ast.parse((repository / "skdfm" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == "__version__" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise ValueError("skdfm/__init__.py sets no __version__")


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def pyproject(version: str) -> str:
    """The pyproject.toml of skdfm-runtime at ``version``."""
    extras = "\n".join(
        f"{json.dumps(name)} = {_toml_list(requirements)}"
        for name, requirements in EXTRAS.items()
    )
    return f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME}"
version = "{version}"
description = {json.dumps(DESCRIPTION)}
readme = "README.md"
requires-python = ">=3.10"
license = {{ text = "BSD-3-Clause" }}
dependencies = {_toml_list(DEPENDENCIES)}

[project.optional-dependencies]
{extras}

[project.scripts]
skdfm = "skdfm.cli:main"

[tool.setuptools.packages.find]
include = ["skdfm*"]
"""


def build(dist_dir, *, isolation: bool = True, repository: Path = REPOSITORY) -> Path:
    """Build the wheel into ``dist_dir``; returns its path.

    The package is copied (without caches) into a scratch folder beside a
    pyproject of its own, and ``pip wheel --no-deps`` builds it there: the
    repository's own pyproject and build folders are never touched.
    ``isolation=False`` builds with the setuptools (>= 70.1) of this environment,
    without the registry.
    """
    dist_dir = Path(dist_dir).resolve()
    dist_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skdfm-runtime-") as scratch:
        source = Path(scratch) / "source"
        shutil.copytree(
            repository / "skdfm",
            source / "skdfm",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        (source / "pyproject.toml").write_text(pyproject(version(repository)))
        (source / "README.md").write_text(README)
        built = Path(scratch) / "wheel"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
        command += [] if isolation else ["--no-build-isolation"]
        subprocess.run(
            [*command, "--wheel-dir", os.fspath(built), os.fspath(source)],
            check=True,
        )
        (wheel,) = built.glob("*.whl")
        target = dist_dir / wheel.name
        shutil.copyfile(wheel, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dist-dir",
        default=REPOSITORY / "dist",
        help="folder the wheel is written to (default: dist/)",
    )
    parser.add_argument(
        "--no-build-isolation",
        action="store_true",
        help="build with this environment's setuptools (>= 70.1), offline",
    )
    args = parser.parse_args(argv)
    print(build(args.dist_dir, isolation=not args.no_build_isolation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
