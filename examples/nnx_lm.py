"""A Flax NNX language model trained with bottleneck.head_loss, logging the destroyed ratio.

  python examples/nnx_lm.py [--stable]   (--stable: with PaLM's z-loss and a logit softcap)
"""

import functools
import sys

import jax
import optax
from flax import nnx

from lmhead_jax.core import bottleneck, flax_heads


class LM(nnx.Module):
  """Embedding, one pre-norm transformer block, final norm, linear head."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.norm1, self.norm2, self.norm = (nnx.LayerNorm(dim, rngs=rngs) for _ in range(3))
    self.attn = nnx.MultiHeadAttention(4, dim, decode=False, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.gelu,
                              nnx.Linear(4 * dim, dim, rngs=rngs))
    self.head = nnx.Linear(dim, vocab_size, use_bias=False, rngs=rngs)

  def hidden(self, tokens):  # h[B, L, D]: what the head consumes
    x = self.embed(tokens)
    x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(tokens))
    x = x + self.mlp(self.norm2(x))
    return self.norm(x)


def loss_fn(model, tokens, **options):  # (loss, BottleneckStats) of next-token prediction
  h = model.hidden(tokens[:, :-1])
  return bottleneck.head_loss(h, flax_heads.head_matrix(model.head), tokens[:, 1:], **options)


STABLE = dict(z_loss=1e-4, softcap=30.0)  # PaLM's z-loss, Gemma 2's final-logit softcap


@functools.partial(nnx.jit, static_argnames="stable")
def train_step(model, optimizer, tokens, stable=False):
  loss = functools.partial(loss_fn, **(STABLE if stable else {}))
  (_, stats), grads = nnx.value_and_grad(loss, has_aux=True)(model, tokens)
  optimizer.update(model, grads)
  return stats


def batch(step, vocab_size):  # each sequence repeats one random symbol
  return jax.random.randint(jax.random.key(step), (64, 1), 0, vocab_size).repeat(17, axis=1)


def main(steps=20, vocab_size=256, dim=32, stable=False):
  model = LM(vocab_size, dim, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  for step in range(steps):
    stats = train_step(model, optimizer, batch(step, vocab_size), stable=stable)
    print(f"step {step}  loss {stats.loss:.3f}  destroyed_ratio {stats.destroyed_ratio:.4f}")
  return model


if __name__ == "__main__":
  main(stable="--stable" in sys.argv)
