"""The documentation: every public name in the API reference, every snippet of
README.md and docs/*.md runs, the site builds with warnings as errors, and the
integrations name the extra to install when Flax is missing.

How to write a page whose snippets run (the runner is ``tests/snippets.py``):
``python`` blocks of a page run in order in one namespace; an HTML comment
``<!-- setup`` ... ``-->`` holds hidden Python that runs first; a block whose
first line is ``# skip: <reason>`` is compiled, not run, and reported skipped.
"""

import importlib
import json
import os
import pathlib
import pkgutil
import re
import runpy
import subprocess
import sys
import textwrap

import jax
import pytest

import emax
import snippets

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
API_PAGE = DOCS / 'api.md'

# Every public module of emax: each has an `__all__`, and each name in it has
# an autodoc entry in docs/api.md. A new public module is one more line here
# (test_public_modules_are_listed fails until it is).
PUBLIC_MODULES = (
    'emax',
    'emax.checkpoint',
    'emax.flax',
    'emax.nnx',
    'emax.posthoc',
)

PAGES = [ROOT / 'README.md'] + sorted(DOCS.glob('*.md'))


def _page_name(path):
  return path.relative_to(ROOT).as_posix()


# --- every public name is in the API reference -------------------------------

_DIRECTIVE = re.compile(
    r'^\s*(?:\.\.\s+auto(?P<rst>\w+)::|```+\{auto(?P<myst>\w+)\})'
    r'\s+(?P<name>[\w.]+)', re.M)


def documented_names():
  """{full name: autodoc directive} for each autodoc entry of docs/api.md."""
  found = {}
  for m in _DIRECTIVE.finditer(API_PAGE.read_text()):
    found[m['name']] = m['rst'] or m['myst']
  return found


def test_public_modules_are_listed():
  public = {f'emax.{m.name}' for m in pkgutil.iter_modules(emax.__path__)
            if not m.name.startswith('_')}
  unlisted = sorted(public - set(PUBLIC_MODULES))
  assert not unlisted, (
      f'Public modules missing from PUBLIC_MODULES in {__file__}: {unlisted}.'
      ' Add them there (and their names to docs/api.md), or make them private'
      ' with a leading underscore.')
  gone = sorted(set(PUBLIC_MODULES) - public - {'emax'})
  assert not gone, f'PUBLIC_MODULES lists modules that do not exist: {gone}.'


@pytest.mark.parametrize('module_name', PUBLIC_MODULES)
def test_all_is_sorted_and_real(module_name):
  module = importlib.import_module(module_name)
  names = getattr(module, '__all__', None)
  assert names is not None, f'{module_name} has no __all__.'
  assert list(names) == sorted(names), (
      f'{module_name}.__all__ is not sorted: {names}')
  missing = [n for n in names if not hasattr(module, n)]
  assert not missing, f'{module_name}.__all__ names missing attributes: {missing}'
  undocumented = [n for n in names if not getattr(module, n).__doc__]
  assert not undocumented, f'{module_name}: no docstring: {undocumented}'


@pytest.mark.parametrize('module_name', PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
  module = importlib.import_module(module_name)
  documented = documented_names()
  missing = [f'{module_name}.{n}' for n in module.__all__
             if f'{module_name}.{n}' not in documented]
  assert not missing, (
      f'{API_PAGE.relative_to(ROOT)} does not document {missing}. Add an'
      ' autodoc entry for each, e.g. ".. autofunction:: emax.ema" inside an'
      ' {eval-rst} block.')


def test_api_reference_documents_only_public_names():
  public = set(PUBLIC_MODULES)
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    public |= {f'{module_name}.{n}' for n in module.__all__}
  documented = documented_names()
  extra = sorted(name for name, kind in documented.items()
                 if name not in public
                 # members of a documented class (emax.X.method) are fine
                 and not (kind != 'module' and name.rsplit('.', 1)[0] in public))
  assert not extra, (
      f'{API_PAGE.relative_to(ROOT)} documents names that are not public'
      f' (in no __all__ of PUBLIC_MODULES): {extra}')


def test_documented_names_parser():
  text = ('```{eval-rst}\n.. autofunction:: emax.ema\n   :noindex:\n'
          '.. autoclass:: emax.flax.EmaTrainState\n```\n'
          '```{autofunction} emax.init\n```\n')
  found = {m['name']: m['rst'] or m['myst'] for m in _DIRECTIVE.finditer(text)}
  assert found == {'emax.ema': 'function', 'emax.flax.EmaTrainState': 'class',
                   'emax.init': 'function'}


# --- every snippet runs -------------------------------------------------------


def _skipped_params():
  params = []
  for path in PAGES:
    for block in snippets.parse(path):
      if block.skip is not None:
        where = f'{_page_name(path)}:{block.line}'
        params.append(pytest.param(where, block.skip, id=where))
  return params


@pytest.mark.standard_promotion  # user code: optax adam & co. are not strict
@pytest.mark.parametrize('path', PAGES, ids=_page_name)
def test_page_snippets_run(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # snippets may write files: not into the repo
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  config = dict(jax.config.values)
  try:
    try:
      snippets.run_page(path, name=_page_name(path))
      failure = None
    except snippets.SnippetError as e:
      failure = str(e)
  finally:  # a page that sets e.g. jax_enable_x64 must not leak it
    for name, value in config.items():
      if jax.config.values.get(name) != value:
        jax.config.update(name, value)
  if failure:  # outside the except: no chained traceback, just the page's
    pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize('where, reason', _skipped_params() or [
    pytest.param(None, None, id='none',
                 marks=pytest.mark.skip(reason='no page skips a snippet'))])
def test_skipped_snippets(where, reason):
  """One skipped test per `# skip: reason` block, so that the reason shows."""
  pytest.skip(f'{where}: {reason}')


# --- the snippet runner itself ------------------------------------------------

_PAGE = '''\
# A page

<!-- setup
import math
base = 2
-->

Text, then a list item with an indented block:

- item

  ```python
  value = math.pow(base, 3)
  ```

```bash
exit 1
```

<!-- an ordinary comment
```python
raise RuntimeError('commented out: never runs')
```
-->

```python
# skip: needs a GPU
raise RuntimeError('skipped: never runs')
```

~~~py
open('written.txt', 'w').write(str(value))
~~~
'''


def _write(tmp_path, text):
  path = tmp_path / 'page.md'
  path.write_text(text)
  return path


def test_runner_runs_setup_first_and_shares_names(tmp_path, monkeypatch):
  path = _write(tmp_path, _PAGE)
  blocks = snippets.parse(path)
  assert [(b.line, b.setup, b.skip) for b in blocks] == [
      (4, True, None), (13, False, None), (27, False, 'needs a GPU'),
      (32, False, None)]
  monkeypatch.chdir(tmp_path)
  skipped = snippets.run_page(path)
  assert [b.line for b in skipped] == [27]
  assert (tmp_path / 'written.txt').read_text() == '8.0'


def test_runner_names_the_failing_line(tmp_path):
  text = ('# Page\n\n```python\nx = 1\n```\n\n```python\ny = x + 1\n'
          'z = undefined_name\n```\n')
  path = _write(tmp_path, text)
  with pytest.raises(snippets.SnippetError) as e:
    snippets.run_page(path, name='page.md')
  message = str(e.value)
  assert message.startswith('page.md:9: the block at line 8 failed with'
                            ' NameError'), message
  assert 'undefined_name' in message


def test_runner_reports_syntax_errors_of_skipped_blocks(tmp_path):
  text = '```python\n# skip: needs several processes\nx = (\n```\n'
  path = _write(tmp_path, text)
  with pytest.raises(snippets.SnippetError, match=r'page.md:\d+: syntax error'):
    snippets.run_page(path, name='page.md')


def test_runner_rejects_unclosed_fences_and_comments(tmp_path):
  with pytest.raises(ValueError, match='page.md:2: this ``` fence'):
    snippets.parse(_write(tmp_path, 'a\n```python\nx = 1\n'))
  with pytest.raises(ValueError, match='page.md:1: this setup comment'):
    snippets.parse(_write(tmp_path, '<!-- setup\nx = 1\n'))


# --- the site builds ----------------------------------------------------------


def test_docs_build_with_warnings_as_errors(tmp_path):
  pytest.importorskip('sphinx', reason='sphinx is not installed: pip install'
                      ' -e ".[docs]" (the test extra includes it)')
  pytest.importorskip('myst_parser', reason='myst-parser is not installed: pip'
                      ' install -e ".[docs]" (the test extra includes it)')
  command = [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-E', '-q',
             '-b', 'html', '-d', str(tmp_path / 'doctrees'), str(DOCS),
             str(tmp_path / 'html')]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, (
      'The docs build failed (warnings are errors). Rebuild with\n'
      '  python -m sphinx -W --keep-going -b html docs docs/_build/html\n'
      f'{done.stdout[-4000:]}\n{done.stderr[-8000:]}')
  html = tmp_path / 'html'
  api = (html / 'api.html').read_text()
  # Short signatures: a rate's alias by name, never the union it stands for.
  for name in ('emax.ema', 'emax.with_ema', 'emax.update'):
    start = api.index(f'id="{name}"')
    signature = re.sub(r'<[^>]+>', '', api[start:api.index('</dt>', start)])
    assert re.search(r'\bdecay: \w+ \| None = None', signature), signature
    assert 'Callable' not in signature and 'ForwardRef' not in signature, (
        signature)
  signatures = re.findall(r'<dt class="sig[^"]*"[^>]*>(.*?)</dt>', api, re.S)
  texts = [re.sub(r'<[^>]+>', '', s) for s in signatures]
  unreadable = [t for t in texts if 'bool | number' in t or 'ForwardRef' in t
                or re.search(r'(?<![\w.])_[a-z_]+\.[A-Z]', t)]
  assert not unreadable, (
      f'signatures with an alias expanded, or a private module: {unreadable}')
  # The command line is in the reference, with its --help as it runs now.
  assert '--sigma-rel' in api and 'python -m emax.posthoc' in api
  # Nothing is loaded from the network when a page is read: MathJax too.
  for page in html.glob('*.html'):
    remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?:[^"]+)"',
                        page.read_text())
    assert not remote, f'{page.name} loads {remote}'
  assert (html / '_static' / 'mathjax' / 'tex-chtml.js').is_file()


def test_docs_extra_installs_what_the_build_imports():
  """``pip install ".[docs]"`` must be enough for the README's Sphinx
  command: each extension of docs/conf.py and each integration that autodoc
  imports comes from a requirement of the ``docs`` extra."""
  import importlib.metadata
  tomllib = pytest.importorskip('tomllib', reason='Python 3.11+ reads TOML')
  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())[
      'project']['optional-dependencies']

  def names(extra):
    found = set()
    for requirement in extras[extra]:
      name = re.match(r'[\w.-]+', requirement)[0].lower()
      inner = re.fullmatch(r'emax\[([\w,]+)\]', requirement.replace(' ', ''))
      found |= set().union(*map(names, inner[1].split(','))) if inner else {
          name.replace('_', '-')}
    return found

  docs = names('docs')
  conf = {'__file__': str(DOCS / 'conf.py'), '__name__': 'conf'}
  exec(compile((DOCS / 'conf.py').read_text(), str(DOCS / 'conf.py'), 'exec'),
       conf)
  modules = [e for e in conf['extensions'] if not e.startswith('sphinx.')]
  modules += ['sphinx', 'flax', 'orbax']  # autodoc imports emax.flax & co.
  distributions = importlib.metadata.packages_distributions()
  for module in modules:
    provided = {d.lower() for d in distributions.get(module.split('.')[0], [])}
    assert provided & docs, (
        f'docs/conf.py needs {module!r} (from {sorted(provided)}), which the'
        f' docs extra of pyproject.toml does not install: {sorted(docs)}.')


@pytest.mark.standard_promotion  # a user's script, as the page snippets
def test_decay_plot_script_runs(tmp_path, monkeypatch):
  """docs/decay.png is drawn by docs/decay_plot.py: the script still runs (as
  ``python docs/decay_plot.py OUT.png``, in this process: no second start of
  Python and JAX)."""
  pytest.importorskip('matplotlib')
  out = tmp_path / 'decay.png'
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, 'argv', [str(DOCS / 'decay_plot.py'), str(out)])
  runpy.run_path(str(DOCS / 'decay_plot.py'), run_name='__main__')
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '](decay.png)' in (DOCS / 'decay.md').read_text()


# --- a core install names the extra ------------------------------------------

_WITHOUT_FLAX = textwrap.dedent('''
    import json, sys
    for name in ('flax', 'orbax', 'orbax.checkpoint'):
      sys.modules[name] = None  # as if not installed: importing raises
    import emax, emax.checkpoint
    errors = {}
    for module in ('emax.flax', 'emax.nnx'):
      try:
        __import__(module)
      except ImportError as e:
        errors[module] = str(e)
    try:
      emax.checkpoint.save(None, 0, {})
    except ImportError as e:
      errors['emax.checkpoint'] = str(e)
    print(json.dumps(errors))
''')


def test_integrations_without_flax_name_the_extra():
  done = subprocess.run([sys.executable, '-c', _WITHOUT_FLAX], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 0, done.stderr[-4000:]
  errors = json.loads(done.stdout.strip().splitlines()[-1])
  for module in ('emax.flax', 'emax.nnx', 'emax.checkpoint'):
    assert module in errors, f'{module} raised no ImportError without flax.'
    assert 'pip install "emax[flax]"' in errors[module], errors[module]
