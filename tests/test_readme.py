"""The README's quick start and .ci/run agree, and the README's API is real."""

import pathlib
import re

import emax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quick_start_commands():
  text = (ROOT / 'README.md').read_text()
  section = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_exactly_two_commands():
  commands = quick_start_commands()
  assert len(commands) == 2, commands
  assert commands[0].startswith('pip install ".[examples]" && python examples/')
  assert commands[1] == 'pip install ".[test]" && python -m pytest -q'
  example = commands[0].split('python ', 1)[1]
  assert (ROOT / example).is_file()


def test_ci_runs_exactly_the_readme_test_command():
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert quick_start_commands()[1] in ci


def test_public_surface():
  assert emax.__version__
  assert list(emax.__all__) == sorted(emax.__all__)
  for name in emax.__all__:
    assert getattr(emax, name).__doc__, name


def test_readme_is_short_and_links_exist():
  text = (ROOT / 'README.md').read_text()
  assert len(text.splitlines()) <= 150
  for target in re.findall(r'\]\(([^)#]+)\)', text):
    if '://' not in target:
      assert (ROOT / target).exists(), target
