"""Sphinx configuration: API reference from the numpydoc docstrings, user guide."""

import skdfm

project = "skdfm"
author = "skdfm developers"
release = version = skdfm.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # fitted attributes as fields, not duplicate targets
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
intersphinx_mapping = {}  # built offline: no inventories are fetched
nitpicky = False
html_theme = "alabaster"
html_static_path = ["_static"]
exclude_patterns = ["_build"]
