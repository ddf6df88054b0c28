"""A Flax Linen language model trained with bottleneck.head_loss, logging the destroyed ratio."""

import flax.linen as nn
import jax
import optax

from lmhead_jax.core import bottleneck, flax_heads


class LM(nn.Module):
  """Embedding, one pre-norm transformer block, final norm, linear head."""
  vocab_size: int = 256
  dim: int = 32

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.dim)
    self.norms = [nn.LayerNorm() for _ in range(3)]
    self.attn = nn.MultiHeadDotProductAttention(num_heads=4)
    self.mlp = nn.Sequential([nn.Dense(4 * self.dim), nn.gelu, nn.Dense(self.dim)])
    self.head = nn.Dense(self.vocab_size, use_bias=False)

  def hidden(self, tokens):  # h[B, L, D]: what the head consumes
    x = self.embed(tokens)
    x = x + self.attn(self.norms[0](x), mask=nn.make_causal_mask(tokens))
    x = x + self.mlp(self.norms[1](x))
    return self.norms[2](x)

  def __call__(self, tokens):  # logits, which also creates the head's parameters at init
    return self.head(self.hidden(tokens))


model, tx = LM(), optax.adamw(1e-2)


def loss_fn(params, tokens):  # (loss, BottleneckStats) of next-token prediction
  h = model.apply(params, tokens[:, :-1], method=LM.hidden)
  return bottleneck.head_loss(h, flax_heads.head_matrix(params["params"]["head"]), tokens[:, 1:])


@jax.jit
def train_step(params, opt_state, tokens):
  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, stats


def batch(step):  # each sequence repeats one random symbol
  return jax.random.randint(jax.random.key(step), (64, 1), 0, model.vocab_size).repeat(17, axis=1)


def main(steps=20):
  params = model.init(jax.random.key(0), batch(0))
  opt_state = tx.init(params)
  for step in range(steps):
    params, opt_state, stats = train_step(params, opt_state, batch(step))
    print(f"step {step}  loss {stats.loss:.3f}  destroyed_ratio {stats.destroyed_ratio:.4f}")
  return params


if __name__ == "__main__":
  main()
