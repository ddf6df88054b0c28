"""measure.py and subjects.py against float64 numpy, transformers' logits and real subprocesses."""

import functools
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import FIXTURES, ROOT, reference_stats
from lmhead_jax.runs import corpus, measurement
from lmhead_jax.analysis import measure
from lmhead_jax.core import bottleneck, model
from lmhead_jax.data import pipeline
from lmhead_jax.data.tokens import write_token_dir
from lmhead_jax.training import sharding



def np_token_stats(h, w, y, w_range=None):
  """Per-token loss, ‖p − e_y‖², ‖(p − e_y) Π‖² in float64; Π = W_r W_r⁺ (W_r defaults to W)."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  z = h @ w.T
  z -= z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  g = np.exp(logp) - np.eye(w.shape[0])[y]
  w_r = w if w_range is None else np.asarray(w_range, np.float64)
  gp = g @ (w_r @ np.linalg.pinv(w_r))
  return -logp[np.arange(len(y)), y], (g**2).sum(-1), (gp**2).sum(-1)


def np_batch(h, w, y, m, w_range=None):
  """destroyed_ratio, visible_cosine and token_destroyed_ratio of one batch, float64."""
  keep = np.asarray(m).reshape(-1) > 0
  loss, g_sq, vis = np_token_stats(np.reshape(h, (-1, h.shape[-1]))[keep], w,
                                   np.asarray(y).reshape(-1)[keep], w_range)
  cos = np.sqrt(vis.sum() / g_sq.sum())
  return dict(destroyed_ratio=np.sqrt(1 - cos**2), visible_cosine=cos,
              token_destroyed_ratio=np.mean(np.sqrt(1 - vis / g_sq)), loss=loss.mean())


class ListSource:
  """A grain-compatible source of fixed windows."""

  def __init__(self, tokens_SxW, mask_SxL=None):
    self.tokens = np.asarray(tokens_SxW, np.int32)
    self.seq_len = self.tokens.shape[1] - 1
    self.mask = (np.ones((len(self.tokens), self.seq_len), np.float32) if mask_SxL is None
                 else np.asarray(mask_SxL, np.float32))

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, i):
    return {"inputs": self.tokens[i, :-1], "targets": self.tokens[i, 1:], "mask": self.mask[i]}


@pytest.mark.parametrize("rank", [None, 3])
def test_sequence_sums_against_numpy(rank):
  rng = np.random.default_rng(0)
  b, length, d, v = 3, 8, 8, 50
  h = rng.normal(size=(b, length, d)).astype(np.float32)
  w = w_range = rng.normal(size=(v, d)) / np.sqrt(d)
  if rank:  # float32 rounding makes A·B full rank to numpy; range(W) = range(A) exactly
    w_range = rng.normal(size=(v, rank))
    w = w_range @ rng.normal(size=(rank, d)) / d
  w = w.astype(np.float32)
  y = rng.integers(0, v, (b, length))
  mask = (rng.random((b, length)) > 0.25).astype(np.float32)
  m = bottleneck.range_map(jnp.asarray(w))
  out = measure.sequence_sums(jnp.asarray(h), jnp.asarray(w), m, jnp.asarray(y),
                              jnp.asarray(mask), chunk_len=4)
  loss, g_sq, vis = (x.reshape(b, length) for x in np_token_stats(h.reshape(-1, d), w,
                                                                   y.reshape(-1), w_range))
  ratio = np.sqrt(np.clip(1 - vis / g_sq, 0, 1))
  want = dict(loss=loss, g_sq=g_sq, vis_sq=vis, token_ratio=ratio, n=np.ones_like(loss))
  for f in measure.FIELDS:
    np.testing.assert_allclose(out[f], (want[f] * mask).sum(1), rtol=2e-5, err_msg=f)
  assert measure.head_rank(m) == (rank or d)


def test_sequence_sums_bad_chunk():
  with pytest.raises(ValueError, match="chunk_len=3 does not divide seq_len=8"):
    measure.sequence_sums(jnp.ones((1, 8, 4)), jnp.ones((5, 4)), jnp.eye(4),
                          jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8)), chunk_len=3)


def test_ci95_student_t():
  # t_{0.975, 1} = 12.7062 and t_{0.975, 4} = 2.7764 (tables).
  r = measure.ci95([1.0, 3.0])
  assert r["mean"] == 2.0 and r["n"] == 2
  np.testing.assert_allclose(r["ci95"], 12.7062 * np.sqrt(2) / np.sqrt(2), rtol=1e-4)
  x = np.array([0.1, 0.4, 0.2, 0.3, 0.5])
  np.testing.assert_allclose(measure.ci95(x)["ci95"], 2.7764 * x.std(ddof=1) / np.sqrt(5),
                             rtol=1e-4)
  assert measure.ci95([0.5])["ci95"] is None
  assert measure.ci95([0.1] * 3)["ci95"] == 0.0  # np.std gives 1.7e-17 here


def test_aggregate_batches_and_pooled():
  sums = dict(loss=np.array([2.0, 4.0, 6.0, 8.0]), g_sq=np.array([1.0, 1.0, 2.0, 2.0]),
              vis_sq=np.array([0.01, 0.03, 0.0, 0.08]), token_ratio=np.array([1.8, 1.9, 2, 1.6]),
              n=np.array([2.0, 2.0, 2.0, 2.0]))
  r = measure.aggregate(sums, batch_size=2)
  batch_cos = np.sqrt([0.04 / 2, 0.08 / 4])
  np.testing.assert_allclose(r["visible_cosine"]["mean"], batch_cos.mean())
  np.testing.assert_allclose(r["destroyed_ratio"]["mean"], np.sqrt(1 - batch_cos**2).mean())
  np.testing.assert_allclose(r["destroyed_ratio"]["pooled"], np.sqrt(1 - 0.12 / 6))
  np.testing.assert_allclose(r["token_destroyed_ratio"]["mean"], np.mean([3.7 / 4, 3.6 / 4]))
  np.testing.assert_allclose(r["loss"]["pooled"], 20 / 8)
  with pytest.raises(ValueError, match="4 sequences do not split into batches of 3"):
    measure.aggregate(sums, batch_size=3)


def test_baseline():
  np.testing.assert_allclose(measure.baseline(768, 50257), 0.99233, atol=1e-5)
  np.testing.assert_allclose(measure.baseline(4096, 49152), 0.95743, atol=1e-5)
  assert measure.baseline(10, 5) == 0.0


@functools.cache
def _subject(spec):
  cfg = measurement.base_config()
  cfg.fresh = spec
  cfg.model.update(vocab_size=1024, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=32)
  return cfg, next(measurement.load(cfg, "/nonexistent", sharding.make_mesh()))


def _fresh_subject(spec="16"):
  """(config, subject) of a fresh 1-layer model with V = 1024 (the config is a copy)."""
  cfg, s = _subject(spec)
  return ml_collections.ConfigDict(cfg.to_dict()), s


@pytest.mark.parametrize("spec,rank", [pytest.param("16", 16, marks=pytest.mark.slow), ("16r4", 4)])
def test_measure_fresh_model_against_numpy(spec, rank):
  cfg, s = _fresh_subject(spec)
  assert s.name == ("fresh-d16" if rank == 16 else "fresh-d16-r4")
  rng = np.random.default_rng(1)
  source = ListSource(rng.integers(0, 1024, (12, 17)),
                      (rng.random((12, 16)) > 0.1).astype(np.float32))
  r = measure.measure(s, source, sharding.make_mesh(), batch_size=4, num_sequences=12, seed=3,
                      chunk_len=8)
  w = np.asarray(measure.head_matrix(s.params, s.head_cfg))
  w_range = s.params["head"].get("a_VxR", w)  # range(A B) = range(A)
  per_batch, it = [], iter(pipeline.make_dataset(source, global_batch_size=4, seed=3))
  for _ in range(3):
    b = next(it)
    h = np.asarray(model.hidden(s.params, b["inputs"], s.model_cfg))
    per_batch.append(np_batch(h, w, b["targets"], b["mask"], w_range))
  for key in ("destroyed_ratio", "visible_cosine", "token_destroyed_ratio", "loss"):
    x = np.array([p[key] for p in per_batch])
    np.testing.assert_allclose(r[key]["mean"], x.mean(), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(r[key]["sd"], x.std(ddof=1), rtol=1e-3, atol=1e-7, err_msg=key)
  assert r["rank"] == rank and r["sequences"] == 12 and r["tokens"] == source.mask.sum()
  np.testing.assert_allclose(r["baseline"], np.sqrt(1 - rank / 1024))
  # D ≪ V: the paper's regime, near the random-subspace baseline.
  assert 0.9 < r["destroyed_ratio"]["mean"] < 0.999
  assert abs(r["destroyed_ratio"]["mean"] - r["baseline"]) < 0.01


def test_measure_too_few_sequences():
  _, s = _fresh_subject()
  source = ListSource(np.zeros((3, 9), np.int32))
  with pytest.raises(ValueError, match=r"num_sequences=8 \(source holds 3\) gives no full batch"):
    measure.measure(s, source, sharding.make_mesh(), batch_size=4, num_sequences=8)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_checkpoint_against_transformers_logits(family):
  """The checkpoint path end to end, against the logits that `transformers` computed."""
  cfg = measurement.base_config()
  cfg.checkpoints = str(FIXTURES / family)
  s = next(measurement.load(cfg, "/nonexistent", sharding.make_mesh()))
  assert s.name == family and s.head_cfg.kind == ("tied" if family == "gpt2" else "linear")
  r = measure.measure(s, ListSource(np.load(FIXTURES / family / "reference.npz")["tokens"]), sharding.make_mesh(), batch_size=2,
                      num_sequences=2)
  cos, loss = reference_stats(family)
  np.testing.assert_allclose(r["visible_cosine"]["mean"], cos, rtol=1e-4)
  np.testing.assert_allclose(r["loss"]["mean"], loss, rtol=1e-4)
  np.testing.assert_allclose(r["baseline"], np.sqrt(1 - 32 / 128))


def test_source_and_load_errors(tmp_path):
  cfg = measurement.base_config()
  cfg.fresh = "64x2"
  with pytest.raises(ValueError, match="item '64x2' is not 'D' or 'DrR'"):
    next(measurement.load(cfg, tmp_path, sharding.make_mesh()))
  cfg.fresh, cfg.runs = "", str(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither a runner workdir"):
    next(measurement.load(cfg, tmp_path, sharding.make_mesh()))
  cfg, s = _fresh_subject()
  cfg.data.text = str(tmp_path / "docs.txt")
  with pytest.raises(ValueError, match="model 'fresh-d16' has no tokenizer.json"):
    corpus.source(cfg, s, tmp_path)
  cfg.data.update(text="", stdlib=False)
  with pytest.raises(ValueError, match="set data.path, data.text or data.stdlib"):
    corpus.source(cfg, s, tmp_path)
  write_token_dir(tmp_path / "big", [np.arange(4096)], vocab_size=4096, tokenizer="none")
  cfg.data.path = str(tmp_path / "big")
  with pytest.raises(ValueError, match="vocab_size=4096 .* more than the model's 1024"):
    corpus.source(cfg, s, tmp_path)


def test_cpu_preset_runs_offline(tmp_path):
  """The experiment module end to end: BPE on the stdlib corpus, fresh and trained models."""
  cmd = [sys.executable, "-m", "experiments.measure_pretrained",
         "--config=experiments/measure_pretrained.py:cpu", f"--workdir={tmp_path}",
         "--config.fresh=32r8", "--config.train.steps=4", "--config.model.vocab_size=512",
         "--config.model.d_model=32", "--config.data.max_chars=300000",
         "--config.data.seq_len=32", "--config.measure.num_sequences=32",
         "--config.measure.batch_size=8", "--config.train.eval_batches=1",
         f"--config.cache_dir={tmp_path / 'cache'}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  models = json.loads((tmp_path / "summary.json").read_text())["models"]
  assert [m["name"] for m in models] == ["fresh-d32-r8", "trained-d32"]
  assert [m["rank"] for m in models] == [8, 32]
  for m in models:
    assert 0.9 < m["destroyed_ratio"]["mean"] < 0.999
    assert m["sequences"] == 32 and m["destroyed_ratio"]["n"] == 4
    assert m["destroyed_ratio"]["mean"] == pytest.approx(
        np.sqrt(1 - m["visible_cosine"]["mean"] ** 2), abs=0.01)
  assert "trained-d32" in proc.stdout.splitlines()[-1]
  assert (tmp_path / "measure_destroyed.png").stat().st_size > 10_000
  assert len(list((tmp_path / "cache" / "runs").glob("*/checkpoints/4"))) == 1
