"""Sphinx configuration of the emax documentation.

Build from the repository root (see CONTRIBUTING.md)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are MyST Markdown (``docs/*.md``); the API reference renders the Google
style docstrings with autodoc and napoleon. Nothing is fetched from the
network (no intersphinx), so the build works offline and in CI.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Document the emax of this checkout, installed or not.
sys.path.insert(0, str(ROOT))
# autodoc imports emax (and jax): no accelerator probing for a docs build.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import emax  # noqa: E402

project = 'emax'
author = 'The emax authors'
copyright = '2026, The emax authors'  # noqa: A001 (Sphinx's name)
release = emax.__version__
version = release

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]

source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']

# MyST: $...$ math, ::: fences, and #anchors for headings down to ###, so
# pages can link to [a section](decay.md#some-heading).
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3

# autodoc + napoleon: Google style docstrings (Args / Returns / Raises /
# Examples), members in source order, type hints in the signature.
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_default_options = {'show-inheritance': False}
# Show type aliases by name, not expanded into long unions. Works for the
# modules that use `from __future__ import annotations` (string annotations);
# a name absent from the sources does nothing.
autodoc_type_aliases = {
    name: name for name in (
        'ArrayLike', 'jax.typing.ArrayLike', 'Decay', 'Schedule', 'PyTree',
        'optax.Params', 'optax.Updates', 'optax.Schedule',
        'optax.ScalarOrSchedule', 'chex.ArrayTree', 'chex.Numeric')
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time: no intersphinx inventories to download.
intersphinx_mapping = {}

html_theme = 'alabaster'
html_title = f'emax {release}'
html_static_path = []
