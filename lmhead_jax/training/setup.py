"""The typed parts that the train step is built from: `Setup` (model, head, optimizer, batch
shape, and on a mesh the shardings of every TrainState leaf and of the batch) and `TrainState`.
`build` makes a Setup from typed configs; the run layer's `experiment.resolve` reads the
experiment config into one, once.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, LossConfig, ModelConfig
from lmhead_jax.training import sharding
from lmhead_jax.training.optim import OptimizerConfig, make_optimizer


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # raw uint32 key data, so checkpoints hold a plain array


@dataclasses.dataclass(frozen=True)
class Setup:
  model: ModelConfig
  head: HeadConfig
  axes: Any  # logical axes of every parameter, the params' tree structure
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  seed: int
  steps: int
  batch_size: int  # global, over all micro-batches
  grad_accum: int
  seq_len: int
  clip_norm: float
  alignment_weight: float
  loss: LossConfig = LossConfig()
  mesh: jax.sharding.Mesh | None = None
  state_shardings: TrainState | None = None  # NamedSharding per leaf, on `mesh`
  batch_shardings: dict | None = None

  def new_state(self, key) -> TrainState:
    """A fresh, unsharded TrainState (wrap in jit with out_shardings, or eval_shape it)."""
    k_params, k_rng = jax.random.split(key)
    params = model.init(k_params, self.model, self.head)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=jax.random.key_data(k_rng))

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the TrainState, carrying its shardings (for restore or lowering)."""
    shapes = jax.eval_shape(self.new_state, jax.random.key(0))
    return sharding.abstract_like(shapes, self.state_shardings)

  def on(self, mesh) -> "Setup":
    """This setup placed on `mesh`: checked against it, with the shardings of state and batch."""
    check_batch_split(self.batch_size, self.grad_accum, sharding.data_parallel_size(mesh))
    return dataclasses.replace(
        self, mesh=mesh, state_shardings=_state_shardings(self, mesh),
        batch_shardings={k: sharding.batch_sharding(mesh) for k in ("inputs", "targets", "mask")})


def check_batch_split(batch_size: int, grad_accum: int, dp: int) -> None:
  """Each micro-batch must split evenly over the `dp` data-parallel devices."""
  if (batch_size // grad_accum) % dp:
    raise ValueError(f"train.batch_size={batch_size} (per micro-batch {batch_size // grad_accum}) "
                     f"is not divisible by the data-parallel size {dp} (mesh data×fsdp); make "
                     "it a multiple, or change train.grad_accum or the mesh")


def build(model_cfg: ModelConfig, head_cfg: HeadConfig, optimizer: OptimizerConfig, *, seed: int,
          steps: int, batch_size: int, grad_accum: int, seq_len: int,
          alignment_weight: float = 0.0, loss: LossConfig = LossConfig(), mesh=None) -> Setup:
  """A Setup from typed configs, checked; placed on `mesh` if given."""
  if grad_accum < 1 or batch_size % grad_accum:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by "
                     f"train.grad_accum={grad_accum}")
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
  axes = model.param_axes(model_cfg, head_cfg)
  tx, schedule = make_optimizer(optimizer, steps, axes)
  out = Setup(model=model_cfg, head=head_cfg, axes=axes, tx=tx, schedule=schedule, seed=seed,
              steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
              clip_norm=float(optimizer.clip_norm), alignment_weight=float(alignment_weight),
              loss=loss)
  return out if mesh is None else out.on(mesh)


def _state_shardings(setup: Setup, mesh) -> TrainState:
  """Shardings of every TrainState leaf; optimizer moments follow their parameter."""
  shapes = jax.eval_shape(setup.new_state, jax.random.key(0))
  p_sh = sharding.param_shardings(shapes.params, setup.axes, mesh)
  rep = sharding.replicated(mesh)
  # optax states hold copies of the param tree (mu, nu, trace): match them by structure.
  p_def = jax.tree.structure(shapes.params)
  like_params = lambda x: jax.tree.structure(x) == p_def
  opt_sh = jax.tree.map(lambda sub: p_sh if like_params(sub) else jax.tree.map(lambda _: rep, sub),
                        shapes.opt_state, is_leaf=like_params)
  return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)
