"""The package's seams: no module reaches into another object's private parts."""

import ast
from pathlib import Path

import skdfm

PACKAGE = Path(skdfm.__file__).parent
OWN = {"self", "cls"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner(node: ast.AST) -> bool:
    """``self`` / ``cls`` / ``super()``: the object's own attributes."""
    if isinstance(node, ast.Name):
        return node.id in OWN
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "super"
    )


def cross_module_reaches(source: str) -> list[str]:
    """Private names imported from sibling modules, private attributes of other
    objects used, and fitted attributes (``name_``) of other objects written."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (
            node.level >= 1 or (node.module or "").startswith("skdfm.")
        ):
            found += [
                f"{node.lineno}: imports {node.module}.{alias.name}"
                for alias in node.names
                if _private(alias.name)
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not _owner(node.value):
                found.append(f"{node.lineno}: uses {ast.unparse(node)}")
        elif (  # getattr(obj, "_x"), setattr(obj, "fitted_", ...) and the like
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and not _owner(node.args[0])
        ):
            name = node.args[1].value
            writes = node.func.id in ("setattr", "delattr") and name.endswith("_")
            if _private(name) or writes:
                found.append(f"{node.lineno}: uses {ast.unparse(node)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr.endswith("_")
                    and not target.attr.startswith("__")
                    and not _owner(target.value)
                ):
                    found.append(f"{node.lineno}: writes {ast.unparse(target)}")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_the_checker_finds_what_it_looks_for():
    source = """
from ._images import _read_file
from ._pca import chunk_rows
def f(detector, transformer):
    detector._labels(1)
    transformer.device_ = "cpu"
    self._own()
    super()._own()
    self.fitted_ = 1
    getattr(detector, "_state")
    setattr(transformer, "backbone_", None)
    getattr(detector, "offset_")
    setattr(self, "_x", 1)
from skdfm._imaging.images import _opened
"""
    found = cross_module_reaches(source)
    assert found == [
        "2: imports _images._read_file",
        "5: uses detector._labels",
        "6: writes transformer.device_",
        "10: uses getattr(detector, '_state')",
        "11: uses setattr(transformer, 'backbone_', None)",
        "14: imports skdfm._imaging.images._opened",
    ]


def test_no_module_reaches_into_another_objects_privates():
    reaches = {
        str(path.relative_to(PACKAGE)): cross_module_reaches(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    assert {name: found for name, found in reaches.items() if found} == {}
