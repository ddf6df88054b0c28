"""Fixtures for every test; shared helpers live in helpers.py."""

import os

import pytest

# XLA:CPU's LLVM optimizations take longer to compile the tests' tiny programs than they ever
# save at run time (a train step compiles in half the time without); subprocesses inherit this.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"

# tests/multidevice runs in a process of its own with 8 CPU devices (see test_multidevice.py);
# name it on the command line to run it directly.
collect_ignore = ["multidevice"]


@pytest.fixture(autouse=True, scope="session")
def _subjects_cache(tmp_path_factory):
  """The shared cache of lmhead_jax.analysis.subjects in a temporary directory, never ~/.cache."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("LMHEAD_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """An empty cache directory, named by $LMHEAD_JAX_CACHE."""
  monkeypatch.setenv("LMHEAD_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"
