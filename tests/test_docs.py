"""The documentation site builds without a single warning (Sphinx -W)."""

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.filterwarnings("ignore:The mapping interface")
def test_docs_build_without_warnings(tmp_path):
    build = pytest.importorskip("sphinx.cmd.build")
    status = build.build_main(
        ["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")]
    )
    assert status == 0, "sphinx-build -W failed; run it to see the warnings"
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("DeepFeatureTransformer", "DFMDetector", "anomaly_maps", "aupro"):
        assert name in api
    assert "pca_level" in api  # docstrings were rendered, not just names


def test_every_public_name_is_in_the_reference():
    import skdfm

    api = (DOCS / "api.rst").read_text()
    missing = [
        name for name in skdfm.__all__ if name != "__version__" and name not in api
    ]
    assert not missing
    import skdfm.distributed

    section = api.split("currentmodule:: skdfm.distributed")[1].split("currentmodule")[
        0
    ]
    assert [n for n in skdfm.distributed.__all__ if n not in section] == []


@pytest.mark.slow
def test_every_doctest_example_of_the_pages_runs():
    import doctest

    pages = [p for p in sorted(DOCS.glob("*.rst")) if ">>>" in p.read_text()]
    assert DOCS / "grid_search.rst" in pages
    for page in pages:
        result = doctest.testfile(
            str(page), module_relative=False, optionflags=doctest.ELLIPSIS
        )
        assert result.failed == 0, page.name
