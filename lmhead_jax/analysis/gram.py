"""Singular values of the logit gradient G over many tokens, without ever holding the N×V matrix.

Two methods, both streaming G in chunks of tokens recomputed from the hidden states: `gram`
(C = GᵀG, V×V, accumulated sharded by rows over every device, float64 by default, then its
eigenvalues in float64 on the host) and `randomized` (the top k σ of C by a randomized range
finder, one pass over the tokens per product, when C does not fit). G is scaled by 1/N as in the
paper. Resolution, convergence and the rank rules (`numerical_rank`, `numerical_rank_fine`):
docs/INTERNALS.md.
"""

import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import threadpoolctl
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lmhead_jax.analysis import measure, spectrum
from lmhead_jax.core import model
from lmhead_jax.data import pipeline
from lmhead_jax.training import sharding

EPS32 = float(np.finfo(np.float32).eps)
log = logging.getLogger(__name__)


def chunk_grad(h_BxLxD, w_VxD, y_BxL, mask_BxL, dtype):
  """G's rows g_t = (p_t − e_{y_t})·m_t of one chunk, [B·L, V] in `dtype`."""
  _, g = measure.token_grad(h_BxLxD.reshape(-1, h_BxLxD.shape[-1]), w_VxD, y_BxL.reshape(-1))
  return (g * mask_BxL.reshape(-1, 1)).astype(dtype)


def gram_size(v: int, devices: int) -> int:
  """C's side: V rounded up to a multiple of the devices, so that its rows split evenly (the
  zero rows and columns add zero eigenvalues only, which the summaries drop)."""
  return -(-v // devices) * devices


def gram_update(mesh, v: int):
  """update(c, h, w, y, mask) -> c + gᵀg, jitted and donated, C [`gram_size`]² split by rows over
  every device: the chunk's G is gathered on every device, which then computes only its own rows
  of C (no device holds a V×V partial sum)."""
  vp = gram_size(v, mesh.devices.size)

  def update(c, h, w, y, m):
    g = jnp.pad(chunk_grad(h, w, y, m, c.dtype), ((0, 0), (0, vp - v)))
    g = jax.lax.with_sharding_constraint(g, sharding.replicated(mesh))
    return c + g.T @ g

  return jax.jit(update, out_shardings=gram_sharding(mesh), donate_argnums=0)


def gram_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(sharding.MESH_AXES, None))


def make_gram(mesh, v: int, dtype):
  """(`gram_update`, C = 0)."""
  vp = gram_size(v, mesh.devices.size)
  zeros = jax.jit(lambda: jnp.zeros((vp, vp), dtype), out_shardings=gram_sharding(mesh))
  return gram_update(mesh, v), zeros()


def host_sigma(c_VxV) -> np.ndarray:
  """σ descending from the eigenvalues of C = GᵀG, by LAPACK in float64 on the host, with every
  core (negative round-off clipped to 0). C's row shards (every process's) are copied into one
  host array, which the eigensolver overwrites; accelerators have no float64 eigensolver."""
  if jax.process_count() > 1:
    c_VxV = multihost_utils.process_allgather(c_VxV, tiled=True)
  host = np.array(c_VxV, np.float64)
  v, t = len(host), time.perf_counter()
  log.info("eigenvalues of the %d×%d Gram on the host (float64, %d threads)", v, v,
           os.cpu_count())
  with threadpoolctl.threadpool_limits(os.cpu_count(), user_api="blas"):  # no XLA work runs now
    lam = scipy.linalg.eigvalsh(host, overwrite_a=True, check_finite=False)
  log.info("eigenvalues done in %.0f s", time.perf_counter() - t)
  return np.sqrt(np.clip(lam[::-1], 0.0, None))


def randomized_sigma(apply_c, v: int, k: int, key, *, power_iters: int = 30,
                     oversample: int | None = None, tol: float = 0.01,
                     dtype=jnp.float32) -> tuple[np.ndarray, np.ndarray]:
  """The top k σ of G and an estimate of each one's relative error, from products X ↦ C X = GᵀG X
  (V×p): subspace iteration with Rayleigh–Ritz, at most power_iters + 2 products.

  The Ritz values θ_i ≤ λ_i(C) underestimate. With the residuals r_i = C u_i − θ_i u_i (free: C Q
  is the next iteration's product) an eigenvalue lies within ‖r_i‖ of θ_i, so σ_i's relative error
  is estimated by ‖r_i‖ / (2θ_i). Iteration stops once every estimate of σ_1..σ_k is ≤ tol.
  """
  p = min(v, k + (oversample if oversample is not None else max(10, k // 2)))
  q = jnp.linalg.qr(apply_c(jax.random.normal(key, (v, p), dtype)))[0]
  for i in range(power_iters + 1):
    y = apply_c(q)
    theta, u = jnp.linalg.eigh((q.T @ y + y.T @ q) / 2)
    theta, u = theta[::-1][:k], u[:, ::-1][:, :k]
    r = jnp.linalg.norm(y @ u - q @ (u * theta), axis=0)
    lam = np.clip(np.asarray(theta, np.float64), 0.0, None)
    err = np.asarray(r, np.float64) / (2 * np.where(lam > 0, lam, np.inf))
    if i == power_iters or np.all(err <= tol):
      return np.sqrt(lam), err
    q = jnp.linalg.qr(y)[0]


def summary(sigma, total_sq: float, shape: tuple[int, int], d_model: int,
            resolution: float = 0.0, sigma_err=None) -> dict:
  """`spectrum.spectrum_stats` of G from its leading σ (all, or the top k) and ‖G‖² = total_sq.

  A partial σ gets the unresolved tail √(total_sq − Σσ²) as one last value, which makes the
  cumulative quantities exact up to index k; those that need the tail's split are None. A rank
  whose cut-off lies below `resolution`·σ_1 (the eigensolver's noise floor) is None too.

  With `sigma_err` (relative errors of σ, as from `randomized_sigma`) every number X also gets
  X_err = |X(σ·(1 + err)) − X(σ)|; `residual_2d_is_bound` is True when residual_2d_err exceeds 1%
  of it (σ that underestimate make residual_2d an upper bound).
  """
  n, v = shape
  sigma_K = np.sort(np.asarray(sigma, np.float64))[::-1][:min(n, v)]
  k, complete = len(sigma_K), len(sigma_K) == min(n, v)
  tail = math.sqrt(max(total_sq - np.sum(sigma_K**2), 0.0))
  padded = sigma_K if complete else np.append(sigma_K, tail)
  with jax.enable_x64(True):
    st = spectrum.spectrum_stats(jnp.asarray(padded), d_model)
  out = {f: float(getattr(st, f)) for f in ("effective_rank", "k_70", "k_999", "residual_d",
                                             "residual_2d", "max_cosine_2d")}
  out.update(k_70=int(out["k_70"]), k_999=int(out["k_999"]), sigma_1=float(sigma_K[0]))
  for name, tol in (("numerical_rank", max(n, v)), ("numerical_rank_fine", math.sqrt(max(n, v)))):
    above = int(np.sum(sigma_K > sigma_K[0] * tol * EPS32))
    out[name] = above if (complete or above < k) and tol * EPS32 >= resolution else None
  if not complete:
    out["effective_rank"] = None
    for key, needs in (("k_70", out["k_70"]), ("k_999", out["k_999"]), ("residual_d", d_model),
                       ("residual_2d", 2 * d_model), ("max_cosine_2d", 2 * d_model)):
      if needs > k:
        out[key] = None
  if sigma_err is not None:
    err = np.asarray(sigma_err, np.float64)[np.argsort(sigma)[::-1]][:len(sigma_K)]
    hi = summary(sigma_K * (1 + err), total_sq, shape, d_model, resolution)
    out |= {f"{key}_err": None if x is None or hi[key] is None else abs(hi[key] - x)
            for key, x in list(out.items())}
    err = out["residual_2d_err"]
    out["residual_2d_is_bound"] = None if err is None else err > 0.01 * out["residual_2d"]
  return out


def hidden_chunks(subject, source, mesh, *, num_tokens: int, batch_size: int, seed: int = 0):
  """(h, targets, mask, valid count) of `subject` on batches of `source`, sharded by rows, until
  num_tokens valid tokens."""
  step = jax.jit(lambda p, x, m: (model.hidden(p, x, subject.model_cfg), jnp.sum(m)),
                 out_shardings=(sharding.batch_sharding(mesh, 3), sharding.replicated(mesh)))
  ds = iter(pipeline.make_dataset(source, global_batch_size=batch_size, seed=seed))
  seen = 0
  while seen < num_tokens:
    b = pipeline.global_batch(next(ds), sharding.batch_sharding(mesh))
    h, n = step(subject.params, b["inputs"], b["mask"])
    seen += int(n)
    yield h, b["targets"], b["mask"], int(n)


def host_memory_gib() -> float:
  """This host's physical memory in GiB."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def gram_gib(v: int, gram_dtype: str, devices: int) -> tuple[float, float]:
  """(GiB per device, GiB on the host) that C takes: its row shard, and C in float64 for the
  eigensolver beside the accumulator's own copy (on a CPU device that is host memory too). Not
  counted: each batch's G, gathered on every device, and a compiler's temporaries (XLA:TPU's
  float64 emulation): `plan --compile` gives the whole per-device figure."""
  vp = gram_size(v, devices)
  c = vp * vp * np.dtype(gram_dtype).itemsize / 2**30
  return c / devices, vp * vp * 8 / 2**30 + c


def choose_method(method: str, v: int, gram_dtype: str, gram_max_gib: float, devices: int = 1,
                  host_max_gib: float = 0.0) -> str:
  """'gram' or 'randomized'; 'auto' picks gram when C's share per device fits in gram_max_gib and
  the host's part (`gram_gib`) in host_max_gib (0: half of this host's memory)."""
  if method == "auto":
    per_device, host = gram_gib(v, gram_dtype, devices)
    fits = host <= (host_max_gib or host_memory_gib() / 2) and per_device <= gram_max_gib
    return "gram" if fits else "randomized"
  if method not in ("gram", "randomized"):
    raise ValueError(f"spectrum.method={method!r} is not 'auto', 'gram' or 'randomized'")
  return method


def growing_spectrum(subject, source, mesh, *, tokens: list[int], batch_size: int, method: str,
                     gram_dtype: str = "float64", k: int = 0, power_iters: int = 30,
                     seed: int = 0) -> list[dict]:
  """Spectrum summaries of G over the first N valid tokens, for each N of `tokens` (reached at
  whole batches: several N passed by one batch give one point)."""
  if method not in ("gram", "randomized"):
    raise ValueError(f"method={method!r} is not 'gram' or 'randomized'")
  if max(tokens) > len(source) * source.seq_len:
    raise ValueError(f"spectrum.tokens asks for {max(tokens)} tokens but the data holds "
                     f"{len(source)} windows of {source.seq_len}; windows would repeat")
  if method == "randomized" and k < 1:
    raise ValueError(f"spectrum.rank_k={k}: the randomized method needs the number of σ to find")
  v, d = subject.model_cfg.vocab_size, subject.model_cfg.d_model
  w = measure.head_matrix(subject.params, subject.head_cfg)
  sq = jax.jit(lambda h, w, y, m: jnp.sum(jnp.square(chunk_grad(h, w, y, m, jnp.float32))),
               out_shardings=sharding.replicated(mesh))
  pending, points, seen, total_sq, cache = sorted(set(tokens)), [], 0, 0.0, []

  def due() -> bool:
    nonlocal pending
    passed = [t for t in pending if t <= seen]
    pending = pending[len(passed):]
    return bool(passed)

  # C accumulates in this dtype: σ below √ε·σ_1 of it are noise (the eigensolver is float64).
  resolution = math.sqrt(np.finfo(gram_dtype if method == "gram" else np.float32).eps)

  def add(sigma, err=None):  # σ of the unscaled rows g_t; G = (rows) / N
    points.append(dict(tokens=seen) | summary(sigma / seen, total_sq / seen**2, (seen, v), d,
                                              resolution, err))

  x64 = lambda: jax.enable_x64(gram_dtype == "float64")
  if method == "gram":
    with x64():
      update, c = make_gram(mesh, v, jnp.dtype(gram_dtype))
  prod = jax.jit(lambda x, h, w, y, m: (lambda g: g.T @ (g @ x))(chunk_grad(h, w, y, m, x.dtype)))
  bar = tqdm.tqdm(total=max(tokens), desc=f"G of {subject.name}", unit="tok", unit_scale=True,
                  disable=jax.process_index() != 0, mininterval=10)
  for h, y, m, n in hidden_chunks(subject, source, mesh, num_tokens=max(tokens),
                                  batch_size=batch_size, seed=seed):
    seen, total_sq = seen + n, total_sq + float(sq(h, w, y, m))
    bar.update(min(n, bar.total - bar.n))
    if method == "gram":
      with x64():
        c = update(c, h, w, y, m)
        if due():
          add(host_sigma(c))
      continue
    cache.append((h, y, m))
    if due():
      apply_c = lambda x: sum(prod(x, h, w, y, m) for h, y, m in cache)
      add(*randomized_sigma(apply_c, v, min(k, seen, v), jax.random.key(seed),
                            power_iters=power_iters))
  bar.close()
  return points
