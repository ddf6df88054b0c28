"""Cross-entropy of an LM head: dense, and chunked so that the N×V logits never exist at once.

`fused_head_loss(h, w, targets, mask, chunk_size=...)` gives the mean CE of z = h Wᵀ and
per-token stats. With a chunk_size it scans over token chunks (and, with vocab_block, over
vocabulary blocks with an online log-sum-exp). Its `custom_vjp` forms G = (p − e_y)·m/N chunk by
chunk in the forward pass and accumulates dh = G W and dW = Gᵀ H there: a training step costs
the dense path's three matmuls, and peak memory is O(chunk·V + N·D + V·D), not O(N·V).

Token n goes to chunk n mod K (K chunks), so every chunk spans the whole batch: with tokens
sharded over devices and chunk_size a multiple of the shard count, each device holds an equal
slice of every chunk. W may be replicated or sharded on V (vocab_block is for unsharded V).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmhead_jax.core import checks

IGNORE_INDEX = -100  # a target equal to it is masked (Hugging Face's ignore_index convention)


def valid_mask(targets: jax.Array, mask=None) -> jax.Array:
  """The float32 0/1 mask of valid positions: `mask` (all when None) less IGNORE_INDEX targets."""
  m = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask).astype(
      jnp.float32)
  if m.shape != targets.shape:
    raise ValueError(f"mask shape {m.shape} does not match targets shape {targets.shape}")
  return m * (jnp.asarray(targets) != IGNORE_INDEX)


def cross_entropy(z: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Mean CE over valid positions, in float32. G = ∂/∂z has rows (p_t − e_{y_t}) / N, accurate
  to a relative few ε in every entry even when p_y → 1 (see `_finish`)."""
  m = valid_mask(targets, mask)
  z = z.astype(jnp.float32)
  loss_N = _finish(_block_stats(z, targets, 0), targets, m, z.shape[-1])[0]
  return jnp.sum(loss_N) / jnp.maximum(jnp.sum(m), 1.0)


def accuracy(z: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Fraction of valid positions whose argmax logit is the target."""
  m = valid_mask(targets, mask)
  hit = (jnp.argmax(z, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0)


@struct.dataclass
class TokenStats:
  """Per-token float32 stats of `fused_head_loss` (0 at masked positions); not differentiated."""

  g_sq_N: jax.Array  # ‖p_t − e_y‖² = Σ_{j≠y} p_j² + (Σ_{j≠y} p_j)² (N·g_t, not g_t = (p_t − e_y)/N)
  correct_N: jax.Array  # 1 where argmax z_t = y_t
  loss_N: jax.Array  # −log p_y


def _block_stats(z_CxU, y_C, offset):
  """(max z, Σe, Σ_{j≠y} e, Σ_{j≠y} e², argmax, z_y) of columns [offset, offset + U), with
  e = exp(z − max z); z_y is 0 for targets outside the block. `_merge` combines two blocks.

  The sums over j ≠ y give 1 − p_y and ‖p − e_y‖² without cancellation when p_y → 1.
  """
  z_max = jax.lax.stop_gradient(jnp.max(z_CxU, axis=-1))
  e = jnp.exp(z_CxU - z_max[..., None])
  is_y = (y_C - offset)[..., None] == jnp.arange(z_CxU.shape[-1])
  rest = jnp.where(is_y, 0.0, e)
  return (z_max, jnp.sum(e, -1), jnp.sum(rest, -1), jnp.sum(rest * rest, -1),
          jnp.argmax(z_CxU, -1) + offset, jnp.sum(jnp.where(is_y, z_CxU, 0.0), -1))


def _merge(a, b):
  """Online log-sum-exp: stats of the union of two blocks (ties keep the first argmax)."""
  z_max = jnp.maximum(a[0], b[0])
  ca, cb = jnp.exp(a[0] - z_max), jnp.exp(b[0] - z_max)
  return (z_max, a[1] * ca + b[1] * cb, a[2] * ca + b[2] * cb, a[3] * ca * ca + b[3] * cb * cb,
          jnp.where(b[0] > a[0], b[4], a[4]), a[5] + b[5])


def _finish(stats, y_C, m_C, vocab_size):
  """The masked per-token losses (differentiable), TokenStats and (z_max, log s1, 1 − p_y).

  With q = Σ_{j≠y} p_j = 1 − p_y: ‖p − e_y‖² = Σ_{j≠y} p_j² + q², and −log p_y = −log1p(−q) when
  p_y ≥ ½, else log s1 − (z_y − z_max) (never z − lse, which is rounded at |z|·ε). Autodiff of the
  loss gives G with g_y = −q to a relative few ε. A target outside [0, V) makes the loss NaN,
  except IGNORE_INDEX (masked by `valid_mask`).
  """
  z_max, s1, r1, r2, arg, z_y = stats
  q = r1 / s1
  sure = q < 0.5
  loss = jnp.where(sure, -jnp.log1p(-jnp.where(sure, q, 0.0)), jnp.log(s1) - (z_y - z_max))
  ok = ((y_C >= 0) & (y_C < vocab_size)) | (y_C == IGNORE_INDEX)
  loss_C = jnp.where(ok, loss, jnp.nan) * m_C
  g_sq = r2 / (s1 * s1) + q * q
  correct = (arg == y_C).astype(jnp.float32)
  tok = TokenStats(g_sq * m_C, correct * m_C, loss_C)
  return loss_C, jax.lax.stop_gradient(tok), jax.lax.stop_gradient((z_max, jnp.log(s1), q))


def _logit_grad(z_CxU, y_C, offset, z_max, log_s1, q):
  """Rows p − e_y of the columns [offset, offset + U): p = exp((z − z_max) − log s1), g_y = −q."""
  p = jnp.exp((z_CxU - z_max[:, None]) - log_s1[:, None])
  return jnp.where((y_C - offset)[:, None] == jnp.arange(z_CxU.shape[-1]), -q[:, None], p)


def _logits(h_CxD, w_UxD, offset, limit=None):
  """float32 logits of columns [offset, offset + U); those at or past `limit` are −inf."""
  z = jnp.einsum("cd,bd->cb", h_CxD, w_UxD, preferred_element_type=jnp.float32)
  if limit is None:
    return z
  return jnp.where(offset + jnp.arange(z.shape[-1]) < limit, z, -jnp.inf)


def _over_blocks(f, init, xs):
  """`lax.scan` over vocabulary blocks, or one plain call when there is a single block."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return jax.lax.scan(f, init, xs)
  carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda x: x[None], y)


def _scan_chunks(h_TxCxD, w_MxUxD, y_TxC, m_TxC, vocab_size, dtype, with_grad):
  """Loss and stats over T chunks of C tokens and M vocabulary blocks of U columns; with_grad
  also gives (dh, dW) of the loss."""
  h_TxCxD, w_MxUxD = h_TxCxD.astype(dtype), w_MxUxD.astype(dtype)
  nb, u, _ = w_MxUxD.shape
  blocks = (w_MxUxD, jnp.arange(nb) * u)
  limit = vocab_size if nb * u > vocab_size else None  # padded columns to hide
  n = jnp.maximum(jnp.sum(m_TxC), 1.0)

  def chunk(dw_MxUxD, x):
    h_CxD, y_C, m_C = x
    def stats_step(acc, blk):
      w, off = blk
      return _merge(acc, _block_stats(_logits(h_CxD, w, off, limit), y_C, off)), None
    zero = jnp.zeros_like(m_C)
    init = (zero - jnp.inf, zero, zero, zero, jnp.zeros_like(y_C), zero)  # stats of no columns
    _, tok, soft = _finish(_over_blocks(stats_step, init, blocks)[0], y_C, m_C, vocab_size)
    if not with_grad:
      return dw_MxUxD, (tok, None)
    def grad_step(dh_CxD, blk):  # recomputes the block's logits (XLA dedupes it for one block)
      w, off = blk
      g = _logit_grad(_logits(h_CxD, w, off, limit), y_C, off, *soft)
      g_CxU = (g * (m_C / n)[:, None]).astype(dtype)
      # Both contract a dimension that may be sharded: the outputs are sharded like h and w.
      dh = jnp.einsum("cu,ud->cd", g_CxU, w, preferred_element_type=jnp.float32,
                      out_sharding=jax.typeof(h_CxD).sharding)
      dw = jnp.einsum("cu,cd->ud", g_CxU, h_CxD, preferred_element_type=jnp.float32,
                      out_sharding=jax.typeof(w).sharding)
      return dh_CxD + dh, dw
    dh_CxD, dw = _over_blocks(grad_step, jnp.zeros_like(h_CxD, jnp.float32), blocks)
    return dw_MxUxD + dw, (tok, dh_CxD)

  dw0 = jnp.zeros_like(w_MxUxD, jnp.float32) if with_grad else None
  dw, (tok, dh) = jax.lax.scan(chunk, dw0, (h_TxCxD, y_TxC, m_TxC))
  return jnp.sum(tok.loss_N) / n, tok, (dh, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(h_TxCxD, w_MxUxD, y_TxC, m_TxC, vocab_size, dtype):
  loss, tok, _ = _scan_chunks(h_TxCxD, w_MxUxD, y_TxC, m_TxC, vocab_size, dtype, False)
  return loss, tok


def _chunked_fwd(h_TxCxD, w_MxUxD, y_TxC, m_TxC, vocab_size, dtype):
  """Gradients come with the forward pass; those of unperturbed inputs are dropped (and DCE'd)."""
  h, w = h_TxCxD.value, w_MxUxD.value
  loss, tok, (dh, dw) = _scan_chunks(h, w, y_TxC.value, m_TxC.value, vocab_size, dtype, True)
  return (loss, tok), (dh.astype(h.dtype) if h_TxCxD.perturbed else None,
                       dw.astype(w.dtype) if w_MxUxD.perturbed else None)


def _chunked_bwd(vocab_size, dtype, res, ct):
  del vocab_size, dtype
  ct_loss = ct[0]  # the stats are constants: their cotangents are dropped
  if isinstance(ct_loss, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  return *[None if g is None else (ct_loss * g).astype(g.dtype) for g in res], None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


def _to_chunks(x, k, c):
  """[N, ...] → [K, C, ...], token n at (n mod K, n div K); padding is zero."""
  x = jnp.pad(x, [(0, k * c - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return jnp.swapaxes(x.reshape((c, k) + x.shape[1:]), 0, 1)


def _from_chunks(x_TxC, n):
  return jnp.swapaxes(x_TxC, 0, 1).reshape(-1)[:n]


def _positive(name, value):
  if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def fused_head_loss(h, w_VxD, targets, mask=None, *, chunk_size, vocab_block=None,
                    compute_dtype=None) -> tuple[jax.Array, TokenStats]:
  """Mean CE of z = h Wᵀ over valid tokens, and per-token stats: (loss, TokenStats).

  h[..., D] and targets[...] are flattened to N tokens. The matmuls run in `compute_dtype`
  (default: h's dtype) with float32 accumulation; softmax, loss and G are float32. chunk_size=None
  is the dense path (plain autodiff through N×V logits). Otherwise tokens are processed
  chunk_size at a time, and vocab_block (if set) splits V into blocks with an online
  log-sum-exp. Gradients reach h and w (in their dtypes) but not the stats.
  """
  _positive("chunk_size", chunk_size)
  _positive("vocab_block", vocab_block)
  if vocab_block is not None and chunk_size is None:
    raise ValueError("vocab_block needs chunk_size (the dense path has no vocabulary blocks)")
  h, w_VxD = jnp.asarray(h), jnp.asarray(w_VxD)
  if w_VxD.ndim != 2:
    raise ValueError(f"w must be a [V, D] matrix, got shape {w_VxD.shape}")
  v, d = w_VxD.shape
  if h.ndim < 1 or h.shape[-1] != d:
    raise ValueError(f"h has shape {h.shape} but w has shape {w_VxD.shape} (D={d})")
  targets = checks.token_ids(targets, v, "targets", ignore_index=IGNORE_INDEX)
  if targets.shape != h.shape[:-1]:
    raise ValueError(f"targets shape {targets.shape} does not match h shape {h.shape}[:-1]")
  m_N = valid_mask(targets, mask).reshape(-1)
  h_NxD, y_N = h.reshape(-1, d), targets.reshape(-1)
  dtype = jnp.dtype(compute_dtype or h.dtype)

  if chunk_size is None:
    z_NxV = _logits(h_NxD.astype(dtype), w_VxD.astype(dtype), 0)
    loss_N, tok, _ = _finish(_block_stats(z_NxV, y_N, 0), y_N, m_N, v)
    return jnp.sum(loss_N) / jnp.maximum(jnp.sum(m_N), 1.0), tok

  n = y_N.shape[0]
  c = max(1, min(chunk_size, n))
  k = -(-n // c)
  u = min(vocab_block or v, v)
  nb = -(-v // u)
  w_MxUxD = jnp.pad(w_VxD, [(0, nb * u - v), (0, 0)]).reshape(nb, u, d)
  loss, tok = _chunked(_to_chunks(h_NxD, k, c), w_MxUxD, _to_chunks(y_N, k, c),
                       _to_chunks(m_N, k, c), v, dtype)
  return loss, jax.tree.map(lambda x: _from_chunks(x, n), tok)
