"""Streaming, sharded bottleneck measurement of a model over many sequences, with 95% CIs.

Every token t contributes its loss, ‖g_t‖² and ‖g_t Π‖² with g_t = p_t − e_{y_t}. One jitted step
takes a batch of sequences, sharded over the mesh's batch axes, and returns per-sequence sums;
only those [B] vectors leave the devices, so any number of sequences streams through.
`aggregate` gives batch, token and pooled ratios; CIs are over batches (disjoint random
windows, the independent units). The aggregations, the CI and the isotropic baseline:
docs/INTERNALS.md.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from lmhead_jax.core import bottleneck, heads, model
from lmhead_jax.core.loss import cross_entropy
from lmhead_jax.data import pipeline
from lmhead_jax.training import sharding

FIELDS = ("loss", "g_sq", "vis_sq", "token_ratio", "n")
HIGHEST = jax.lax.Precision.HIGHEST


def token_grad(h_NxD, w_VxD, y_N):
  """Per-token loss and unscaled logit gradient g_t = p_t − e_{y_t} of z = h Wᵀ (float32)."""
  z = jnp.matmul(h_NxD.astype(jnp.float32), w_VxD.astype(jnp.float32).T, precision=HIGHEST)
  return jax.vmap(jax.value_and_grad(cross_entropy))(z, y_N)


def token_stats(h_NxD, w_VxD, m_DxK, y_N):
  """Per-token loss, ‖g_t‖² and ‖g_t Π‖² (Π through the range map m of W)."""
  loss, g = token_grad(h_NxD, w_VxD, y_N)
  b = jnp.matmul(g, w_VxD.astype(jnp.float32), precision=HIGHEST)
  return loss, jnp.sum(g * g, -1), bottleneck.visible_sq(b, m_DxK)


def sequence_sums(h_BxLxD, w_VxD, m_DxK, y_BxL, mask_BxL, chunk_len: int) -> dict:
  """[B] sums over each sequence's valid tokens of FIELDS, `chunk_len` positions at a time."""
  b, length, d = h_BxLxD.shape
  if length % chunk_len:
    raise ValueError(f"measure.chunk_len={chunk_len} does not divide seq_len={length}")
  k = length // chunk_len
  split = lambda x: jnp.moveaxis(x.reshape(b, k, chunk_len, *x.shape[2:]), 1, 0)

  def chunk(xs):
    h, y, m = xs
    loss, g_sq, vis_sq = token_stats(h.reshape(-1, d), w_VxD, m_DxK, y.reshape(-1))
    per_tok = dict(loss=loss, g_sq=g_sq, vis_sq=vis_sq, token_ratio=bottleneck.destroyed(vis_sq, g_sq),
                   n=jnp.ones_like(loss))
    return {f: jnp.sum(v.reshape(b, chunk_len) * m, -1) for f, v in per_tok.items()}

  out = jax.lax.map(chunk, (split(h_BxLxD), split(y_BxL), split(mask_BxL.astype(jnp.float32))))
  return {f: jnp.sum(v, 0) for f, v in out.items()}


def head_matrix(params, hc):
  return heads.matrix(heads.params_of(params, hc))


def make_step(subject, mesh, chunk_len: int):
  """step(params, m, batch) -> [B] sums, jitted with the batch sharded and the sums replicated."""
  def step(params, m_DxK, batch):
    h = model.hidden(params, batch["inputs"], subject.model_cfg)
    return sequence_sums(h, head_matrix(params, subject.head_cfg), m_DxK, batch["targets"],
                         batch["mask"], chunk_len)

  batch_sh = {k: sharding.batch_sharding(mesh) for k in ("inputs", "targets", "mask")}
  rep = sharding.replicated(mesh)
  return jax.jit(sharding.traced_on(mesh, step), in_shardings=(None, rep, batch_sh),
                 out_shardings=rep)


def head_rank(m_DxK) -> int:
  """rank(W): the range map's nonzero columns."""
  return int(jnp.sum(jnp.any(m_DxK != 0, axis=0)))


def baseline(rank: int, vocab_size: int) -> float:
  """destroyed_ratio of an isotropic G: √(1 − rank/V)."""
  return math.sqrt(max(1.0 - rank / vocab_size, 0.0))


def ci95(x) -> dict:
  """Mean, sd and the 95% Student-t half-width over the entries of x (None for one entry)."""
  x = np.asarray(x, np.float64)
  n, mean = x.size, float(np.mean(x))
  if n < 2:
    return dict(mean=mean, sd=None, ci95=None, n=n)
  sd = 0.0 if np.all(x == x[0]) else float(np.std(x, ddof=1))  # no round-off "± 1e-16"
  return dict(mean=mean, sd=sd, ci95=float(scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)),
              n=n)


def aggregate(sums: dict, batch_size: int) -> dict:
  """Batch, token and pooled aggregations (module docstring) of per-sequence sums [S]."""
  per_seq = {f: np.asarray(sums[f], np.float64) for f in FIELDS}
  if per_seq["n"].size % batch_size:
    raise ValueError(f"{per_seq['n'].size} sequences do not split into batches of {batch_size}")
  per_batch = {f: v.reshape(-1, batch_size).sum(1) for f, v in per_seq.items()}
  cos_sq = lambda vis, full: np.clip(vis / np.where(full > 0, full, 1.0), 0.0, 1.0)
  c2 = cos_sq(per_batch["vis_sq"], per_batch["g_sq"])
  pooled = cos_sq(per_seq["vis_sq"].sum(), per_seq["g_sq"].sum())
  n, n_all = np.maximum(per_batch["n"], 1.0), per_seq["n"].sum()
  return {
      "destroyed_ratio": ci95(np.sqrt(1.0 - c2)) | {"pooled": float(np.sqrt(1.0 - pooled))},
      "visible_cosine": ci95(np.sqrt(c2)) | {"pooled": float(np.sqrt(pooled))},
      "token_destroyed_ratio": ci95(per_batch["token_ratio"] / n)
                               | {"pooled": float(per_seq["token_ratio"].sum() / n_all)},
      "loss": ci95(per_batch["loss"] / n) | {"pooled": float(per_seq["loss"].sum() / n_all)},
  }


def measure(subject, source, mesh, *, batch_size: int, num_sequences: int, seed: int = 0,
            chunk_len: int | None = None) -> dict:
  """Streams `num_sequences` shuffled windows of `source` through subject `subject`; the summary."""
  num_batches = min(num_sequences, len(source)) // batch_size
  if num_batches < 1:
    raise ValueError(f"measure.num_sequences={num_sequences} (source holds {len(source)}) gives "
                     f"no full batch of measure.batch_size={batch_size}")
  dp = sharding.data_parallel_size(mesh)
  if batch_size % dp:
    raise ValueError(f"measure.batch_size={batch_size} is not divisible by the data-parallel "
                     f"size {dp}")
  v, d = subject.model_cfg.vocab_size, subject.model_cfg.d_model
  m = jax.jit(bottleneck.range_map, out_shardings=sharding.replicated(mesh))(
      head_matrix(subject.params, subject.head_cfg))
  step = make_step(subject, mesh, chunk_len or source.seq_len)
  ds = iter(pipeline.make_dataset(source, global_batch_size=batch_size, seed=seed))
  batch_sh = sharding.batch_sharding(mesh)
  t0, sums = time.perf_counter(), []
  for i in range(num_batches):
    sums.append(step(subject.params, m, pipeline.global_batch(next(ds), batch_sh)))
    if i == 0:  # the throughput leaves out compilation and the first batch
      jax.block_until_ready(sums[0])
      t1 = time.perf_counter()
  sums = {f: np.concatenate([np.asarray(x[f]) for x in jax.device_get(sums)]) for f in FIELDS}
  t2 = time.perf_counter()
  rank = head_rank(m)
  return ({"name": subject.name, "family": subject.model_cfg.family, "vocab_size": v, "d_model": d,
           "head": subject.head_cfg.kind, "rank": rank, "baseline": baseline(rank, v),
           "sequences": num_batches * batch_size, "seq_len": source.seq_len,
           "tokens": int(sums["n"].sum()), "seconds": t2 - t0,
           "tokens_per_sec": float(sums["n"][batch_size:].sum() / max(t2 - t1, 1e-9))}
          | aggregate(sums, batch_size))


def table(results: list[dict]) -> str:
  """A plain-text table of `measure` results: mean ± 95% CI, pooled value, baseline."""
  def cell(m):
    return f"{m['mean']:.4f}" + ("" if m["ci95"] is None else f"±{m['ci95']:.1g}")
  rows = [("model", "V", "D", "rank", "tokens", "loss", "destroyed", "pooled", "baseline",
           "visible_cos", "token_destroyed")]
  rows += [(r["name"], r["vocab_size"], r["d_model"], r["rank"], r["tokens"],
            f"{r['loss']['mean']:.3f}", cell(r["destroyed_ratio"]),
            f"{r['destroyed_ratio']['pooled']:.4f}", f"{r['baseline']:.4f}",
            cell(r["visible_cosine"]), cell(r["token_destroyed_ratio"])) for r in results]
  return format_rows(rows)


def format_rows(rows) -> str:
  """Rows of cells as left-aligned text columns."""
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
                   for row in rows)
