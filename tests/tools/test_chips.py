"""The chip table: slice names and link bandwidths."""

import pytest

from lmhead_jax.runs import experiment
from lmhead_jax.tools import chips, costs


def test_parse_slice():
  assert chips.parse_slice("v5p-64")[2] == 32  # v5p counts TensorCores, 2 per chip
  assert chips.parse_slice("v6e-64")[2] == 64
  assert chips.parse_slice("v5litepod-16")[2] == 16
  with pytest.raises(ValueError, match="unknown slice 'v9-8'"):
    chips.parse_slice("v9-8")
  with pytest.raises(ValueError, match="not a multiple of 2"):
    chips.parse_slice("v5p-3")


def test_link_bandwidths_are_half_the_bidirectional_figures():
  # Google Cloud: v5p 1,200 GB/s, v6e 800 GB/s, v5e 400 GB/s bidirectional per chip; NVLink 4
  # 900 GB/s; one 400 Gb/s NIC per GPU beyond a host of 8.
  for kind, bidirectional in (("v5p", 1200e9), ("v6e", 800e9), ("v5e", 400e9), ("h200", 900e9)):
    assert chips.CHIPS[kind].link_bytes_per_s(8) == bidirectional / 2
  assert chips.CHIPS["h200"].link_bytes_per_s(16) == 400e9 / 8
  assert chips.CHIPS["v5p"].link_bytes_per_s(6144) == 600e9  # one slice: all ICI


def counts(cfg):
  """Parameters of the tiny model by role: layer matmul weights, layer norms, V·D, D."""
  c, hc = experiment.configs(cfg)
  layers = costs.param_counts(c, hc)["layers"]
  norms = 2 * c.n_layers * c.d_model
  return layers - norms, norms, c.vocab_size * c.d_model, c.d_model
