"""examples/ (issue 13, part 2): each trains with head_loss; on its trained model, the stats are
linear_head_stats' on the same batch and the gradients are those of a plain CE on the model's
own logits (its head layer's call, so a transposed head matrix would show)."""

import ast
import contextlib
import functools
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_bottleneck import FIELDS, assert_stats
from test_readme import README, snippets

from lmhead_jax import bottleneck
from lmhead_jax.core.loss import cross_entropy

EXAMPLES = os.path.join(os.path.dirname(README), "examples")
NAMES = ("nnx_lm", "linen_lm", "jax_optax_lm")


def source(name):
  with open(os.path.join(EXAMPLES, name + ".py")) as f:
    return f.read()


def load(code, path):
  namespace = {"__name__": "example"}
  exec(compile(code, path, "exec"), namespace)
  return namespace


def train(ns, steps, **kw):
  """Runs main(steps, **kw): the trained model or params, and the logged (loss,
  destroyed_ratio)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    trained = ns["main"](steps, **kw)
  logged = re.findall(r"step \d+  loss ([0-9.]+)  destroyed_ratio ([0-9.]+)", out.getvalue())
  assert len(logged) == steps, out.getvalue()
  return trained, np.array(logged, float)


def assert_grads(got, want):
  """Leaf by leaf, to 1e-5 of the largest entry: the query/key gradients are round-off around
  an exact 0 (every key of a one-symbol sequence is the same)."""
  leaves = jax.tree.leaves(want)
  assert len(jax.tree.leaves(got)) == len(leaves) >= 4
  scale = max(np.abs(w).max() for w in leaves)
  for g, w in zip(jax.tree.leaves(got), leaves):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


def readme_nnx_snippet():
  (code,) = [s for s in snippets() if "nnx.value_and_grad" in s]
  return code


def test_readme_shows_the_nnx_example():
  """The README's snippet is examples/nnx_lm.py after its docstring, so the test of one is the
  test of the other."""
  body = source("nnx_lm").split('"""', 2)[2].lstrip("\n")
  assert readme_nnx_snippet() == body


def test_nnx_example():
  ns = load(readme_nnx_snippet(), README)
  model, logged = train(ns, steps=20)
  assert logged[-1, 0] < 0.6 * logged[0, 0]  # it learns (from ln 256 = 5.5)
  tokens = ns["batch"](100, 256)
  x, y = tokens[:, :-1], tokens[:, 1:]
  (loss, stats), grads = nnx.jit(nnx.value_and_grad(ns["loss_fn"], has_aux=True))(model, tokens)
  plain = nnx.jit(nnx.grad(lambda m: cross_entropy(m.head(m.hidden(x)), y)))(model)
  assert_grads(grads, plain)
  lin = jax.jit(bottleneck.linear_head_stats)(model.hidden(x), model.head.kernel[...].T, y)
  assert_stats(stats, {k: getattr(lin, k) for k in FIELDS}, rtol=1e-5)
  assert 0 < stats.destroyed_ratio < 1 and loss == stats.loss


def test_nnx_example_stable():
  """--stable (z-loss and softcap): it learns; the gradients are those of the objective written
  out in plain JAX on the model's own logits, and G is its gradient in the raw logits."""
  ns = load(source("nnx_lm"), "nnx_lm.py")
  model, logged = train(ns, steps=20, stable=True)
  assert logged[-1, 0] < 0.6 * logged[0, 0]
  tokens = ns["batch"](100, 256)
  x, y = tokens[:, :-1], tokens[:, 1:]
  loss_fn = functools.partial(ns["loss_fn"], **ns["STABLE"])
  (loss, stats), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, tokens)

  def plain(z):  # mean of lse − s_y + α·lse², s = c·tanh(z/c)
    c, alpha = ns["STABLE"]["softcap"], ns["STABLE"]["z_loss"]
    s = c * jnp.tanh(z / c)
    lse = jax.nn.logsumexp(s, -1)
    return jnp.mean(lse - jnp.take_along_axis(s, y[..., None], -1)[..., 0] + alpha * lse**2)

  assert_grads(grads, nnx.jit(nnx.grad(lambda m: plain(m.head(m.hidden(x)))))(model))
  z = model.head(model.hidden(x))
  g = jax.grad(plain)(z)
  np.testing.assert_allclose(loss, plain(z), rtol=1e-5)
  np.testing.assert_allclose(stats.full_norm, np.linalg.norm(g), rtol=1e-5)
  np.testing.assert_allclose(stats.backbone_norm, np.linalg.norm(g @ model.head.kernel[...].T),
                             rtol=1e-4)


def test_linen_example():
  ns = load(source("linen_lm"), "linen_lm.py")
  params, logged = train(ns, steps=20)
  assert logged[-1, 0] < 0.6 * logged[0, 0]
  model, tokens = ns["model"], ns["batch"](100)
  x, y = tokens[:, :-1], tokens[:, 1:]
  (_, stats), grads = jax.jit(jax.value_and_grad(ns["loss_fn"], has_aux=True))(params, tokens)
  plain = jax.jit(jax.grad(lambda p: cross_entropy(model.apply(p, x), y)))(params)
  assert_grads(grads, plain)
  h = model.apply(params, x, method=ns["LM"].hidden)
  lin = jax.jit(bottleneck.linear_head_stats)(h, params["params"]["head"]["kernel"].T, y)
  assert_stats(stats, {k: getattr(lin, k) for k in FIELDS}, rtol=1e-5)


def test_jax_optax_example():
  ns = load(source("jax_optax_lm"), "jax_optax_lm.py")
  params, logged = train(ns, steps=20)
  assert logged[-1, 0] < 0.6 * logged[0, 0]
  tokens = ns["batch"](100)
  x, y = tokens[:, :-1], tokens[:, 1:]
  (_, stats), grads = jax.jit(jax.value_and_grad(ns["loss_fn"], has_aux=True))(params, tokens)
  # The tied head: W = E reaches the embedding through the lookup and through the head.
  plain = jax.jit(jax.grad(lambda p: cross_entropy(ns["hidden"](p, x) @ p["embed"].T, y)))(params)
  assert_grads(grads, plain)
  lin = jax.jit(bottleneck.linear_head_stats)(ns["hidden"](params, x), params["embed"], y)
  assert_stats(stats, {k: getattr(lin, k) for k in FIELDS}, rtol=1e-5)


def user_code_lines(code):
  """Lines other than blanks, comments and docstrings."""
  docs = set()
  for node in ast.walk(ast.parse(code)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
      docs.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
  return [line for i, line in enumerate(code.splitlines(), 1)
          if line.strip() and not line.lstrip().startswith("#") and i not in docs]


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_short(name):
  assert len(user_code_lines(source(name))) <= 40
