"""The type checker over the package, as CI runs it (through pytest)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_is_clean_with_untyped_defs_disallowed(tmp_path):
  if shutil.which('mypy') is None and subprocess.run(
      [sys.executable, '-c', 'import mypy'], capture_output=True).returncode:
    pytest.skip('mypy is not installed (it comes with the test extra)')
  result = subprocess.run(
      [sys.executable, '-m', 'mypy', '--disallow-untyped-defs',
       '--ignore-missing-imports', '--cache-dir', str(tmp_path / 'cache'),
       'emax'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
