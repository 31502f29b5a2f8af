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
# ten-way union). Sphinx matches these names as written in a string
# annotation (`from __future__ import annotations`). emax's own aliases,
# written `_options.RatesLike`, are not listed here: a key `_options.X` would
# hide the module's other names from Sphinx (it cannot import `_options`);
# their expansions are replaced by their names instead (`_short_aliases`).
# `Params` (chex's recursive `ArrayTree`) must stay unevaluated: its forward
# reference cannot be resolved in emax's modules, and one annotation that
# fails to evaluate leaves the whole signature as raw strings.
_EXTERNAL_ALIASES = (
    'ArrayLike', 'jax.typing.ArrayLike', 'jax.typing.DTypeLike', 'DTypeLike',
    'PyTree', 'optax.Params', 'optax.Updates', 'optax.OptState',
    'optax.Schedule', 'optax.ScalarOrSchedule', 'chex.ArrayTree',
    'chex.Numeric', 'Params', 'ArrayTree')
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time: no intersphinx inventories to download.
intersphinx_mapping = {}

html_theme = 'alabaster'
html_title = f'emax {release}'
html_static_path = []


_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")
_PRIVATE_MODULE = re.compile(r'(?<![\w.])(?:emax\.)?_[a-z_]+\.(?=[A-Z])')


def _emax_aliases():
  """{name: value} of the type aliases (unions) of emax's modules."""
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
        found[name] = value
  return found


def _expanded_aliases():
  """[(the union Sphinx writes for an alias, its name)], the longest first:
  emax's aliases, and chex's tree type where a signature holds it evaluated
  (a dataclass's fields: ``optax.OptState`` in a Flax train state)."""
  import chex
  import optax
  from sphinx.util.typing import stringify_annotation
  aliases = {name: value for name, value in _emax_aliases().items()
             if value != chex.ArrayTree}  # `Params`: by name, never expanded
  # optax.OptState, optax.Params and chex.ArrayTree are one union: where
  # Sphinx expands it (evaluated annotations), call it what it is.
  aliases['PyTree'] = optax.OptState
  found = {stringify_annotation(value, 'smart'): name
           for name, value in aliases.items()}
  return sorted(found.items(), key=lambda item: -len(item[0]))


_EXPANDED = _expanded_aliases()
autodoc_type_aliases = {name: name for name in _EXTERNAL_ALIASES}
autodoc_type_aliases.update({name: name for name in _emax_aliases()})


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
  """Aliases by name in signatures: Sphinx 9 renders an alias inside
  ``X | None`` as the repr ``TypeAliasForwardRef('X')``, and an evaluated
  alias as its whole union."""
  del app, what, name, obj, options
  def fix(text):
    if text is None:
      return None
    text = _FORWARD_REF.sub(r'\1', text)
    for union, alias in _EXPANDED:
      text = text.replace(union, alias)
    return _PRIVATE_MODULE.sub('', text)  # `_tree.MaskLike` -> `MaskLike`
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
