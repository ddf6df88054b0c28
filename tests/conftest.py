"""Shared test helpers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lmhead_jax.training.experiment import base_config


@pytest.fixture(autouse=True, scope="session")
def _subjects_cache(tmp_path_factory):
  """The shared cache of lmhead_jax.analysis.subjects in a temporary directory, never ~/.cache."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("LMHEAD_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


def tiny_config(**model):
  """A model small enough for unit tests: V=256, D=32, 2 layers, GQA 4/2."""
  cfg = base_config()
  cfg.model.update(dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=64, max_seq_len=64), **model)
  cfg.data.seq_len = 16
  cfg.train.batch_size = 8
  return cfg


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600) -> dict:
  """Runs `code` in a fresh Python with n fake CPU devices; returns the JSON it prints last."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
