"""The typed configs (ModelConfig, HeadConfig): conversion from mappings, and tying."""

import math

import pytest

from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.runs import experiment


def test_dataclass_conversion_refuses_unknown_and_missing_keys():
  good = dict(vocab_size=64, d_model=8, n_layers=1, n_heads=2)
  with pytest.raises(ValueError, match=r"unknown key\(s\) model\.d_modell"):
    ModelConfig.of(good | {"d_modell": 16})
  with pytest.raises(ValueError, match=r"missing key\(s\) model\.n_heads"):
    ModelConfig.of({k: v for k, v in good.items() if k != "n_heads"})
  with pytest.raises(ValueError, match=r"unknown key\(s\) head\.rnak"):
    HeadConfig.of({"kind": "factorized", "rnak": 4}, ModelConfig.of(good))
  cfg = experiment.base_config()  # the experiment groups convert as they are
  assert HeadConfig.of(cfg.head, ModelConfig.of(cfg.model)).vocab_size == 1024


def test_tying_comes_from_model_tie_embeddings_alone():
  tied, untied = (ModelConfig(vocab_size=64, d_model=8, n_layers=1, n_heads=2, tie_embeddings=t)
                  for t in (True, False))
  for kind in ("linear", "tied"):
    assert HeadConfig.of({"kind": kind}, tied).kind == "tied"
  assert HeadConfig.of({}, tied).kind == "tied" and HeadConfig.of({}, untied).kind == "linear"
  assert HeadConfig.of({"kind": "linear"}, untied).kind == "linear"
  with pytest.raises(ValueError, match="head.kind='tied' needs model.tie_embeddings=True"):
    HeadConfig.of({"kind": "tied"}, untied)
  with pytest.raises(ValueError, match="tie_embeddings=True conflicts with head.kind='factorized'"):
    HeadConfig.of({"kind": "factorized", "rank": 4}, tied)


NAN, INF = math.nan, math.inf
