"""The experiment config resolved once into the typed parts that the train step is built from.

`resolve(cfg, mesh)` reads the ConfigDict once: model and head config, the parameters' logical
axes (the spec tree), optimizer and schedule, the train options, and, on a mesh, the shardings
of every TrainState leaf and of the batch. The train step, the runner and the tools take the
Setup's parts; only `resolve` reads the raw config. A Setup passed to `resolve` comes back as
it is (placed on `mesh` if one is given), so public functions accept either.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.training import checkpoint, sharding
from lmhead_jax.training.optim import make_optimizer


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
    return checkpoint.abstract_like(shapes, self.state_shardings)

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


def configs(cfg) -> tuple[ModelConfig, HeadConfig]:
  """The model and head configs of an experiment config."""
  c = ModelConfig.of(cfg.model)
  return c, HeadConfig.of(cfg.head, c)


def resolve(cfg, mesh=None) -> Setup:
  """`cfg` (a ConfigDict, or a Setup that passes through) resolved, on `mesh` if given."""
  s = cfg if isinstance(cfg, Setup) else _resolve(cfg)
  return s if mesh is None or s.mesh == mesh else s.on(mesh)


def _resolve(cfg) -> Setup:
  c, hc = configs(cfg)
  b, k = int(cfg.train.batch_size), int(cfg.train.grad_accum)
  if k < 1 or b % k:
    raise ValueError(f"train.batch_size={b} is not divisible by train.grad_accum={k}")
  if cfg.data.seq_len > c.max_seq_len:
    raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={c.max_seq_len}")
  axes = model.param_axes(c, hc)
  tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, axes)
  return Setup(model=c, head=hc, axes=axes, tx=tx, schedule=schedule, seed=int(cfg.seed),
               steps=int(cfg.train.steps), batch_size=b, grad_accum=k,
               seq_len=int(cfg.data.seq_len), clip_norm=float(cfg.optimizer.clip_norm),
               alignment_weight=float(cfg.train.alignment_weight))


def _state_shardings(s: Setup, mesh) -> TrainState:
  """Shardings of every TrainState leaf; optimizer moments follow their parameter."""
  shapes = jax.eval_shape(s.new_state, jax.random.key(0))
  p_sh = sharding.param_shardings(shapes.params, s.axes, mesh)
  rep = sharding.replicated(mesh)
  # optax states hold copies of the param tree (mu, nu, trace): match them by structure.
  p_def = jax.tree.structure(shapes.params)
  like_params = lambda x: jax.tree.structure(x) == p_def
  opt_sh = jax.tree.map(lambda sub: p_sh if like_params(sub) else jax.tree.map(lambda _: rep, sub),
                        shapes.opt_state, is_leaf=like_params)
  return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)
