"""Subjects from typed parts: a fresh initialization and a Hugging Face checkpoint, on a mesh."""

import jax
import numpy as np
from helpers import FIXTURES, one_device_mesh

from lmhead_jax.analysis import subjects
from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.data import hf


def test_fresh_is_the_models_init_under_the_seed():
  c = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2)
  hc = HeadConfig(64, 16, kind="factorized", rank=4)
  s = subjects.fresh("f", c, hc, seed=3, mesh=one_device_mesh())
  assert (s.name, s.model_cfg, s.head_cfg, s.tokenizer) == ("f", c, hc, None)
  want = model.init(jax.random.key(3), c, hc)
  for got, ref in zip(jax.tree.leaves(s.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, ref)


def test_from_hf_loads_the_checkpoint_and_its_tokenizer():
  path = FIXTURES / "llama"
  s = subjects.from_hf(str(path), "float32", one_device_mesh())
  c, params = hf.load_checkpoint(path, "float32")
  assert s.name == "llama" and s.model_cfg == c and s.head_cfg.kind in ("linear", "tied")
  assert s.tokenizer == (str(path / "tokenizer.json") if (path / "tokenizer.json").is_file()
                         else None)
  for got, ref in zip(jax.tree.leaves(s.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, ref)
