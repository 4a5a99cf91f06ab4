"""The package's seams: no module reaches into another object's private parts."""

import ast
from pathlib import Path

import skdfm

PACKAGE = Path(skdfm.__file__).parent
OWN = {"self", "cls"}
#: the standard library's public names that start with an underscore, each with the
#: reason: ``os._exit`` ends a process stuck in native code (``_core.files``' SIGTERM
#: watchdog), where ``sys.exit`` would wait for the stuck thread
PUBLIC_UNDERSCORED = {"os._exit"}


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
            if not _owner(node.value) and ast.unparse(node) not in PUBLIC_UNDERSCORED:
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


# -- tests name no private attribute or file the package no longer has ----------------

TESTS = Path(__file__).parent
#: the attribute calls whose second argument names an attribute of the first
NAMED = {"getattr", "setattr", "hasattr", "delattr"}
#: ... and the methods that do (``monkeypatch.setattr``, ``mock.patch.object``)
NAMED_METHODS = {"setattr", "delattr", "object"}
#: private names the tests read on objects that are not skdfm's (torch's
#: ``Tensor._version``, ``os._exit``, ...), each with the reason; none today
NOT_OURS: dict[str, str] = {}


def _scope_names(body: list[ast.stmt]) -> set[str]:
    """Names bound in a module or class body: assignments and imports."""
    names = set()
    for node in body:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def defined_private_names(source: str) -> set[str]:
    """The private names a module defines: ``x._name = ...`` targets, def/class
    names at any depth, module-level and class-level bindings, and string
    constants that are private identifiers (``getattr(self, "_name")``)."""
    tree = ast.parse(source)
    names = _scope_names(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= _scope_names(node.body)
        elif isinstance(node, ast.Attribute) and isinstance(
            node.ctx, (ast.Store, ast.Del)
        ):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.isidentifier():
                names.add(node.value)
    return {name for name in names if _private(name) and name != "_"}


def _string(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def private_names_read(source: str) -> list[tuple[int, str]]:
    """(line, name) of every private attribute the source reaches on an object
    other than ``self``/``cls``: ``det._statistics``, ``getattr(m, "_x")``,
    ``monkeypatch.setattr(module, "_x", ...)`` and the private parts of a
    ``monkeypatch.setattr("skdfm._kernels.eigen._X", ...)`` target."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not _owner(node.value):
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            named = (isinstance(func, ast.Name) and func.id in NAMED) or (
                isinstance(func, ast.Attribute) and func.attr in NAMED_METHODS
            )
            if not named or _owner(node.args[0]):
                continue
            first, second = [_string(arg) for arg in node.args[:2]] + [None] * (
                2 - len(node.args[:2])
            )
            if first and first.startswith("skdfm."):  # a dotted target
                parts = first.split(".")[1:]
            else:
                parts = [second] if first is None and second else []
            found += [(node.lineno, part) for part in parts if _private(part)]
        elif (  # "_name" in vars(det): a stale name would pass it vacuously
            isinstance(node, ast.Compare)
            and _private(_string(node.left) or "")
            and all(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
        ):
            found.append((node.lineno, node.left.value))
    return sorted(found)


def private_files_named(source: str) -> list[tuple[int, str]]:
    """(line, name) of the strings that name a private module file of the package,
    ``Path(skdfm.__file__).parent / "_files.py"`` (a script loading it by path)."""
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.endswith(".py")
        and all(part.isidentifier() for part in Path(node.value[:-3]).parts)
        and any(_private(part) for part in Path(node.value[:-3]).parts)
    )


def package_private_names() -> set[str]:
    """Every private name the package defines, its module names included."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        names |= defined_private_names(path.read_text())
        names |= {part for part in path.relative_to(PACKAGE).parts if _private(part)}
        names.add(path.stem)
    return {name for name in names if _private(name)}


def test_the_stale_name_checker_finds_what_it_looks_for():
    package = """
_LIMIT = 3
from ._kernels import scatter as _scatter
class Detector:
    _cached = None
    def _fit(self):
        self._statistics = 1
        other._written = 2
        getattr(self, "_by_name")
def _helper(): _local = 1
"""
    defined = defined_private_names(package)
    assert defined == {
        "_LIMIT", "_scatter", "_cached", "_fit", "_statistics", "_written",
        "_by_name", "_helper",
    }  # fmt: skip
    tests = """
det._statistics
self._own
module._applied.value
monkeypatch.setattr(skdfm._core, "_gone", 1)
getattr(det, "_fit")
monkeypatch.setattr("skdfm._kernels.eigen._STEMR", 1)
hasattr(self, "_mine")
det.__class__
assert "_gone" not in vars(det) and "public" in vars(det)
"""
    assert private_names_read(tests) == [
        (2, "_statistics"), (4, "_applied"), (5, "_core"), (5, "_gone"),
        (6, "_fit"), (7, "_STEMR"), (7, "_kernels"), (10, "_gone"),
    ]  # fmt: skip
    stale = {name for _, name in private_names_read(tests)} - defined
    assert stale == {"_applied", "_core", "_gone", "_kernels", "_STEMR"}
    files = 'a = root / "_files.py"\nb = "_core/files.py"\nc = "__init__.py"\n'
    assert private_files_named(files) == [(1, "_files.py"), (2, "_core/files.py")]


def test_tests_read_no_private_name_the_package_no_longer_defines():
    known = package_private_names() | set(NOT_OURS)
    stale = []
    for path in sorted(TESTS.glob("*.py")):
        source = path.read_text()
        own = defined_private_names(source)  # helpers and fakes of the test itself
        stale += [
            f"{path.name}:{line}: {name}"
            for line, name in private_names_read(source)
            if name not in known and name not in own
        ]
        stale += [
            f"{path.name}:{line}: {name} (no such file in skdfm/)"
            for line, name in private_files_named(source)
            if not (PACKAGE / name).is_file()
            and path.name != Path(__file__).name  # its examples are made up
        ]
    assert stale == []
