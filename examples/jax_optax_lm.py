"""A plain-JAX language model (tied embedding) trained with optax and bottleneck.head_loss."""

import jax
import jax.numpy as jnp
import optax

from lmhead_jax import bottleneck

VOCAB, DIM = 256, 32
tx = optax.adamw(1e-2)


def init(key):  # the embedding is also the head: W = E[V, D]
  k1, k2, k3 = jax.random.split(key, 3)
  normal = lambda k, shape: jax.random.normal(k, shape) * DIM**-0.5
  return {"embed": normal(k1, (VOCAB, DIM)), "qkv": normal(k2, (DIM, 3 * DIM)),
          "mlp_in": normal(k3, (DIM, 4 * DIM)), "mlp_out": jnp.zeros((4 * DIM, DIM))}


def hidden(params, tokens):  # embedding, one block (causal attention, MLP), RMS norm
  x = params["embed"][tokens]
  q, k, v = jnp.split((x @ params["qkv"])[:, :, None, :], 3, axis=-1)  # one head
  x = x + jax.nn.dot_product_attention(q, k, v, is_causal=True)[:, :, 0]
  x = x + jax.nn.gelu(x @ params["mlp_in"]) @ params["mlp_out"]
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def loss_fn(params, tokens):  # (loss, BottleneckStats) of next-token prediction
  h = hidden(params, tokens[:, :-1])
  return bottleneck.head_loss(h, params["embed"], tokens[:, 1:])


@jax.jit
def train_step(params, opt_state, tokens):
  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, stats


def batch(step):  # each sequence repeats one random symbol
  return jax.random.randint(jax.random.key(step), (64, 1), 0, VOCAB).repeat(17, axis=1)


def main(steps=20):
  params = init(jax.random.key(0))
  opt_state = tx.init(params)
  for step in range(steps):
    params, opt_state, stats = train_step(params, opt_state, batch(step))
    print(f"step {step}  loss {stats.loss:.3f}  destroyed_ratio {stats.destroyed_ratio:.4f}")
  return params


if __name__ == "__main__":
  main()
