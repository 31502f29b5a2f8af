"""Sphinx configuration of the emax documentation.

Build from the repository root (see CONTRIBUTING.md)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are MyST Markdown (``docs/*.md``); the API reference renders the Google
style docstrings with autodoc and napoleon. Nothing is fetched from the
network, at build time (no intersphinx) or when a page is read (MathJax is
served from ``_static``), so the site works offline and in CI. The ``docs``
extra installs everything the build imports.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Document the emax of this checkout, installed or not.
sys.path.insert(0, str(ROOT))
# autodoc imports emax (and jax): no accelerator probing for a docs build.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from docutils import nodes  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

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
    # MathJax from the package (its build copies it into _static/mathjax),
    # not from a CDN: the pages render math offline too.
    'sphinx-mathjax-offline',
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
# Show type aliases by name, not expanded into long unions (a rate is a
# ten-way union). Sphinx matches the annotation as written in the source
# (string annotations: `from __future__ import annotations`), so each alias
# of emax's modules is listed as `_module.Name` (how the modules refer to one
# another) and as `Name`; a name absent from the sources does nothing.
_EXTERNAL_ALIASES = (
    'ArrayLike', 'jax.typing.ArrayLike', 'jax.typing.DTypeLike', 'DTypeLike',
    'PyTree', 'optax.Params', 'optax.Updates', 'optax.OptState',
    'optax.Schedule', 'optax.ScalarOrSchedule', 'chex.ArrayTree',
    'chex.Numeric')


def _emax_aliases():
  import importlib
  import pkgutil
  import types
  import typing
  found = {}
  for info in pkgutil.iter_modules(emax.__path__):
    try:
      module = importlib.import_module(f'emax.{info.name}')
    except ImportError:  # an integration whose extra is missing
      continue
    for name, value in vars(module).items():
      if name[:1].isupper() and typing.get_origin(value) in (
          typing.Union, types.UnionType):
        for key in (name, f'{info.name}.{name}', f'emax.{info.name}.{name}'):
          found[key] = name
  return found


autodoc_type_aliases = {name: name for name in _EXTERNAL_ALIASES}
autodoc_type_aliases.update(_emax_aliases())
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time: no intersphinx inventories to download.
intersphinx_mapping = {}

html_theme = 'alabaster'
html_title = f'emax {release}'
html_static_path = []


_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def _expanded_aliases():
  """{the union Sphinx writes for an alias: its name}, for the aliases of
  other libraries that reach a signature already evaluated (a dataclass's
  fields, e.g. ``optax.OptState`` in a Flax train state), where
  ``autodoc_type_aliases`` cannot apply; the longest first."""
  import chex
  import optax
  from sphinx.util.typing import stringify_annotation
  aliases = {'optax.OptState': optax.OptState, 'chex.ArrayTree': chex.ArrayTree}
  found = {stringify_annotation(value, 'smart'): name
           for name, value in aliases.items()}
  return sorted(found.items(), key=lambda item: -len(item[0]))


_EXPANDED = _expanded_aliases()


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
  """Aliases by name in signatures: Sphinx 9 renders an alias inside
  ``X | None`` as the repr ``TypeAliasForwardRef('X')``, and an evaluated
  alias as its whole union."""
  del app, what, name, obj, options
  def fix(text):
    if text is None:
      return None
    for union, alias in _EXPANDED:
      text = text.replace(union, alias)
    return _FORWARD_REF.sub(r'\1', text)
  return fix(signature), fix(return_annotation)


class CommandHelp(SphinxDirective):
  """``{command-help} python -m emax.posthoc``: the command's ``--help``
  text, run at build time (80 columns), so the page cannot drift from it."""

  required_arguments = 1
  final_argument_whitespace = True

  def run(self):
    words = shlex.split(self.arguments[0])
    if words[0] == 'python':
      words[0] = sys.executable
    done = subprocess.run(
        [*words, '--help'], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, 'COLUMNS': '80', 'NO_COLOR': '1'})
    if done.returncode:
      raise self.error(f'{self.arguments[0]} --help failed:\n{done.stderr}')
    block = nodes.literal_block(done.stdout, done.stdout)
    block['language'] = 'text'
    return [block]


def setup(app):
  app.connect('autodoc-process-signature', _short_aliases)
  app.add_directive('command-help', CommandHelp)
