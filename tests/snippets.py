"""Extracts and runs the Python code blocks of Markdown pages.

Used by ``tests/test_docs.py`` on ``README.md`` and ``docs/*.md``. How a page
is run:

* Fenced blocks whose info string starts with ``python`` or ``py`` run; any
  other language (``bash``, ``text``, ``toml``, ``{eval-rst}``, ``pycon``...)
  does not. Fences may be indented (inside a list item) and use ``` or ~~~.
* The blocks of one page run in order in one namespace, a fresh module per
  page: a name a block defines is there for the blocks after it.
* Hidden setup: an HTML comment that starts with ``<!-- setup`` on its own
  line and ends with ``-->`` on its own line holds Python that runs before
  every visible block of the page (all such comments, in page order). Renderers
  (GitHub, MyST) do not show it.
* A block whose first non-blank line is ``# skip: <reason>`` is compiled (a
  syntax error fails the page) but not run; the test reports it as skipped
  with its reason. The names it would define do not exist for later blocks.
* Other HTML comments are ignored, code blocks inside them included.

Line numbers are the page's own: a traceback points at the Markdown line.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import textwrap
import traceback
import types

RUN_LANGUAGES = ('python', 'py')
_FENCE = re.compile(r'^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$')
_SKIP = re.compile(r'^#\s*skip:\s*(?P<reason>\S.*?)\s*$')
_SETUP_OPEN = re.compile(r'^\s*<!--\s*setup\s*$')
_COMMENT_CLOSE = re.compile(r'^\s*-->\s*$')


class SnippetError(Exception):
  """A code block of a page failed; the message names the page and line."""


@dataclasses.dataclass(frozen=True)
class Block:
  """One piece of Python from a page.

  Attributes:
    path: the page.
    line: 1-based line in the page of the block's first line of code.
    code: the source, dedented.
    setup: whether it came from a hidden ``<!-- setup`` comment.
    skip: the reason after ``# skip:``, or None when the block runs.
  """
  path: pathlib.Path
  line: int
  code: str
  setup: bool = False
  skip: str | None = None


def _language(info: str) -> str:
  words = info.strip().split()
  return words[0].lower() if words else ''


def parse(path: pathlib.Path, text: str | None = None) -> list[Block]:
  """The Python blocks of the page at ``path``, setup blocks first.

  Args:
    path: the Markdown page.
    text: its contents; read from ``path`` when None.

  Returns:
    The blocks in the order they run: the hidden setup blocks in page order,
    then the visible Python blocks in page order.

  Raises:
    ValueError: on a fence or an HTML comment that is never closed.
  """
  path = pathlib.Path(path)
  lines = (path.read_text() if text is None else text).splitlines()
  setups, blocks = [], []
  i = 0
  while i < len(lines):
    line = lines[i]
    if _SETUP_OPEN.match(line):
      end = _find(lines, i + 1, _COMMENT_CLOSE.match, path, i, 'setup comment')
      setups.append(Block(path, i + 2, _dedent(lines[i + 1:end]), setup=True))
      i = end + 1
      continue
    if line.lstrip().startswith('<!--'):
      if '-->' in line.split('<!--', 1)[1]:
        i += 1
        continue
      end = _find(lines, i + 1, lambda s: '-->' in s, path, i, 'HTML comment')
      i = end + 1
      continue
    fence = _FENCE.match(line)
    if fence:
      mark = fence['fence']
      close = re.compile(
          rf'^[ \t]*{re.escape(mark[0])}{{{len(mark)},}}[ \t]*$')
      end = _find(lines, i + 1, close.match, path, i, f'{mark} fence')
      if _language(fence['info']) in RUN_LANGUAGES:
        code = _dedent(lines[i + 1:end])
        first = next((s for s in code.splitlines() if s.strip()), '')
        skip = _SKIP.match(first.strip())
        blocks.append(Block(path, i + 2, code,
                            skip=skip['reason'] if skip else None))
      i = end + 1
      continue
    i += 1
  return setups + blocks


def _find(lines, start, match, path, opened, what) -> int:
  for j in range(start, len(lines)):
    if match(lines[j]):
      return j
  raise ValueError(f'{path}:{opened + 1}: this {what} is never closed.')


def _dedent(lines: list[str]) -> str:
  return textwrap.dedent('\n'.join(lines)) + '\n'


def compile_block(block: Block):
  """Compiles ``block`` so that its line numbers are the page's."""
  source = '\n' * (block.line - 1) + block.code
  return compile(source, str(block.path), 'exec', dont_inherit=True)


def run_page(path: pathlib.Path, name: str | None = None) -> list[Block]:
  """Runs the Python blocks of the page at ``path`` in one namespace.

  Run it in a scratch working directory: blocks may write files.

  Args:
    path: the Markdown page.
    name: the page's name in error messages (``README.md``); ``path`` when None.

  Returns:
    The blocks that were skipped (``# skip: reason``), in page order.

  Raises:
    SnippetError: naming the page, the line of the failing block and the
      error, with the traceback below the block (first syntax errors, then
      the first block that raises).
  """
  path = pathlib.Path(path)
  name = name or str(path)
  blocks = parse(path)
  compiled = []
  for block in blocks:
    try:
      compiled.append(compile_block(block))
    except SyntaxError as e:
      raise SnippetError(
          f'{name}:{e.lineno}: syntax error in the block at line {block.line}:'
          f' {e.msg}') from None
  module = types.ModuleType('_emax_snippets_' + re.sub(r'\W', '_', name))
  module.__file__ = str(path)
  sys.modules[module.__name__] = module  # dataclasses, pickle look it up
  try:
    for block, code in zip(blocks, compiled):
      if block.skip is not None:
        continue
      try:
        exec(code, module.__dict__)  # pylint: disable=exec-used
      except BaseException as e:  # noqa: B036 - report SystemExit too
        if isinstance(e, KeyboardInterrupt):
          raise
        tb = ''.join(traceback.format_exception(
            type(e), e, e.__traceback__.tb_next))
        kind = 'hidden setup block' if block.setup else 'block'
        raise SnippetError(
            f'{name}:{_error_line(e, block)}: the {kind} at line {block.line}'
            f' failed with {type(e).__name__}: {e}\n\n{tb}') from None
  finally:
    sys.modules.pop(module.__name__, None)
  return [block for block in blocks if block.skip is not None]


def _error_line(error: BaseException, block: Block) -> int:
  """The page line the error came from (the deepest frame in the page)."""
  line = block.line
  for frame, lineno in traceback.walk_tb(error.__traceback__):
    if frame.f_code.co_filename == str(block.path):
      line = lineno
  return line
