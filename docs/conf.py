"""Sphinx configuration of crossent's documentation site (``make docs``).

Why Sphinx rather than MkDocs: crossent's docstrings are reStructuredText (``.. math::``,
``:func:`` cross-references, numpydoc/Google sections), which Sphinx's autodoc and napoleon read
as they are; MkDocs' mkdocstrings would need them rewritten in Markdown. MyST lets the prose
pages (and BENCHMARKS.md, CHANGELOG.md) stay Markdown, MathJax renders the math, and
``-W --keep-going`` turns every broken reference or malformed docstring into a build failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crossent import __version__  # noqa: E402

project = "crossent"
author = "crossent maintainers"
copyright = "crossent maintainers, MIT licence"
release = __version__
version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_mock_imports = ["triton", "transformers", "matplotlib", "mpl_toolkits", "sklearn", "mnist1d"]
napoleon_google_docstring = True
napoleon_numpy_docstring = True
# Attributes sections as fields: a NamedTuple's fields are not described twice
napoleon_use_ivar = True
# Type hints in signatures name torch and numpy classes that have no inventory here.
nitpicky = False

# MathJax from its CDN by default; CROSSENT_MATHJAX=path/or/url/tex-mml-chtml.js for offline reading
if os.environ.get("CROSSENT_MATHJAX"):
    mathjax_path = os.environ["CROSSENT_MATHJAX"]

html_theme = "furo"
html_title = f"crossent {__version__}"
html_static_path: list[str] = []
