"""Collective bytes of programs compiled by XLA:CPU for 8 devices: explicit collectives in nested
loops against their ring counts, and a train step's per-layer bytes against `costs`' formula."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from helpers import tiny_config
from lmhead_jax.runs import experiment
from lmhead_jax.tools import aot, collectives, costs
from lmhead_jax.training import sharding


def test_explicit_collectives_in_nested_loops():
  """shard_map over a 2 × 4 mesh; the inner scan runs 5 times per outer trip, 3 outer trips."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def inner(x_4x16, _):
    g_16x16 = jax.lax.all_gather(x_4x16, "b", tiled=True)  # 3 · 256 B sent
    s_4x16 = jax.lax.psum_scatter(g_16x16, "b", tiled=True)  # 3/4 · 1024 B
    p_4x16 = jax.lax.ppermute(s_4x16, "a", [(0, 1), (1, 0)])  # 256 B
    return p_4x16 + jax.lax.psum(p_4x16, ("a", "b")), None  # 2 · 7/8 · 256 B

  def outer(x_4x16, _):
    x_4x16, _ = jax.lax.scan(inner, x_4x16, length=5)
    t_4x16 = jax.lax.all_to_all(x_4x16, "b", 0, 0, tiled=True)  # 3/4 · 256 B
    return t_4x16 * 2, None

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")))
  def f(x):
    return jax.lax.scan(outer, x, length=3)[0]

  x = jax.ShapeDtypeStruct((32, 16), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, P(("a", "b"))))
  text = f.lower(x).compile().as_text()
  sent = collectives.per_device(text)
  b = 4 * 16 * 4
  expected = {"all-gather": 15 * 3 * b, "reduce-scatter": 15 * 3 / 4 * 4 * b,
              "collective-permute": 15 * b, "all-reduce": 15 * 2 * 7 / 8 * b,
              "all-to-all": 3 * 3 / 4 * b}
  assert sent == pytest.approx(expected)


def train_step_bytes(n_layers: int, mesh_shape: tuple) -> tuple[dict, dict]:
  """(XLA:CPU's collective bytes, `costs.collective_bytes`) of the plain train step of a
  float32 tiny model, 2 micro-batches."""
  cfg = tiny_config(n_layers=n_layers)
  cfg.train.update(batch_size=16, grad_accum=2)
  s = experiment.resolve(cfg, sharding.make_mesh(*mesh_shape))
  (program,) = aot.train_programs(s, ("train_step_no_metrics",)).values()
  sent = collectives.per_device(program.lowered.compile().as_text())
  formula = costs.collective_bytes(s.model, s.head, dict(zip(sharding.MESH_AXES, mesh_shape)),
                                   s.batch_size, s.grad_accum, s.seq_len, "all-reduce")
  return sent, formula


@pytest.mark.parametrize("mesh_shape", [
    (1, 8, 1), pytest.param((2, 4, 1), marks=pytest.mark.slow)])
def test_layer_bytes_match_the_formula(mesh_shape):
  """Two more layers add, in each of the 2 micro-batches, the all-gather of their weights over
  fsdp in the forward and in the backward, and the all-reduce of their gradients over all 8
  devices (XLA:CPU makes no reduce-scatter): float32 throughout, every weight fsdp-sharded.
  (From 1 layer, XLA drops the layer loop and shares the gathers: 2 and 4.)"""
  (one, f_one), (two, f_two) = (train_step_bytes(n, mesh_shape) for n in (2, 4))
  layer_bytes = 4 * costs.param_counts(*experiment.configs(tiny_config(n_layers=1)))["layers"]
  f = mesh_shape[1]
  expected = {"all-gather": 2 * 2 * 2 * (f - 1) / f * layer_bytes,
              "all-reduce": 2 * 2 * 2 * 7 / 8 * layer_bytes}
  for kind, added in expected.items():
    assert two[kind] - one[kind] == pytest.approx(added), kind
    assert f_two[kind] - f_one[kind] == pytest.approx(added), kind


def test_the_chunked_head_loop_sends_nothing():
  """data 2 × fsdp 4, W split by V over fsdp, 1,024 tokens in 8 chunks of 128: W is gathered
  once before the chunk loop and dW reduced once after it; the loop itself (8 trips; the layer
  loops make 2) sends no byte: no gather of h, no per-chunk reduction of dW."""
  cfg = tiny_config(n_layers=2, vocab_size=4096, d_model=64)
  cfg.train.update(batch_size=16, grad_accum=1)
  cfg.data.seq_len, cfg.head.chunk_size = 64, 128
  s = experiment.resolve(cfg, sharding.make_mesh(2, 4, 1))
  (program,) = aot.train_programs(s, ("train_step_no_metrics",)).values()
  module = collectives.Module(program.lowered.compile().as_text())
  loops = [i for body in module.computations.values() for i in body if i.opcode == "while"]
  chunk_loops = [i for i in loops if module.trip_count(i) == 8]
  assert chunk_loops
  for loop in chunk_loops:
    body = re.search(r"body=%([\w.\-]+)", loop.attrs)[1]
    assert not any(module.total(body, collectives.sent).values()), body
  w_gathers = [i for body in module.computations.values() for i in body
               if i.opcode.removesuffix("-start") == "all-gather" and "f32[4096,64]" in i.type]
  assert len(w_gathers) == 1
