"""tests/multidevice in one process of its own with 8 fake CPU devices."""

import subprocess
import sys

import pytest

from helpers import ROOT


def run_multidevice(*args):
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                         "tests/multidevice", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, f"{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
  assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_multidevice():
  run_multidevice()


@pytest.mark.slow
def test_multidevice_slow():
  run_multidevice("-m", "slow")
