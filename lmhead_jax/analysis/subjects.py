"""The models that the measurement experiments look at (`Subject`), made from typed parts: a
local Hugging Face checkpoint (`from_hf`) or a random initialization (`fresh`), placed on a mesh.
Which models a measurement config names, and the data they are measured on, are the run layer's
(`lmhead_jax.runs.measurement`, `lmhead_jax.runs.corpus`).
"""

import dataclasses
import os
import pathlib

import jax
import ml_collections

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig, default_head
from lmhead_jax.data import hf
from lmhead_jax.training import sharding


@dataclasses.dataclass
class Subject:
  """One model under measurement; params are placed on the mesh."""

  name: str
  model_cfg: ModelConfig
  head_cfg: HeadConfig
  params: dict
  tokenizer: str | None = None  # the tokenizer.json of its text, if known
  data: ml_collections.ConfigDict | None = None  # the data config it was trained on


def placed(params, c: ModelConfig, hc: HeadConfig, mesh) -> dict:
  """`params` laid out on `mesh` by their logical axes."""
  return jax.device_put(params, sharding.param_shardings(params, model.param_axes(c, hc), mesh))


def from_hf(path: str, dtype: str, mesh) -> Subject:
  """A local Hugging Face checkpoint directory, params in `dtype`, with its tokenizer.json."""
  c, params = hf.load_checkpoint(path, dtype)
  hc = default_head(c)
  tok = os.path.join(path, "tokenizer.json")
  return Subject(pathlib.Path(path).name, c, hc, placed(params, c, hc, mesh),
                 tok if os.path.isfile(tok) else None)


def fresh(name: str, c: ModelConfig, hc: HeadConfig, seed: int, mesh) -> Subject:
  """A random initialization of `c`/`hc`, born sharded on `mesh`."""
  shapes = jax.eval_shape(lambda k: model.init(k, c, hc), jax.random.key(0))
  sh = sharding.param_shardings(shapes, model.param_axes(c, hc), mesh)
  params = jax.jit(lambda k: model.init(k, c, hc), out_shardings=sh)(jax.random.key(seed))
  return Subject(name, c, hc, params)
