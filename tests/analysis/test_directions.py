"""directions.py against float64 numpy, and the update_direction experiment."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from lmhead_jax.analysis import directions

ROOT = helpers.ROOT


def np_loss(z, y, m):
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -(logp[np.arange(len(y)), y] * m).sum() / m.sum()


def problem(seed=0, n=48, v=300, d=6):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(v, d)) / np.sqrt(d)).astype(np.float32)
  y = rng.integers(0, v, n)
  m = (rng.random(n) > 0.2).astype(np.float32)
  return h, w, y, m


def np_directions(h, w, y, m):
  h, w = np.asarray(h, np.float64) * m[:, None], np.asarray(w, np.float64)
  z = h @ w.T
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = (p - np.eye(w.shape[0])[y]) * m[:, None] / m.sum()
  return z, g, {"ideal": -g, "hidden": -g @ w @ np.linalg.pinv(w),
                "joint": -(g @ w @ w.T + h @ h.T @ g)}


def test_directions_against_numpy():
  h, w, y, m = problem()
  z, g, us = directions.directions(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), jnp.asarray(m))
  z_ref, g_ref, us_ref = np_directions(h, w, y, m)
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g, g_ref, atol=1e-7 * np.abs(g_ref).max())
  for k in us_ref:
    scale = np.abs(us_ref[k]).max()
    np.testing.assert_allclose(us[k], us_ref[k], atol=2e-6 * scale, err_msg=k)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 100.0])
def test_loss_change_against_numpy(scale):
  h, w, y, m = problem(1)
  z = (h @ w.T).astype(np.float64)
  dz = np.random.default_rng(2).normal(size=z.shape) * scale
  got = directions.loss_change(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(m),
                               jnp.asarray(dz, jnp.float32))
  z32 = np.asarray(z, np.float32).astype(np.float64)  # the same rounded inputs
  dz32 = np.asarray(dz, np.float32).astype(np.float64)
  want = np_loss(z32 + dz32, y, m) - np_loss(z32, y, m)
  # Relative accuracy even when the change is 1e-6 of the loss (float32 logsumexp would give
  # only ε₃₂·ℒ absolute).
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_loss_curves_ordering_and_first_order():
  h, w, y, m = problem(3)
  eps = np.logspace(-4, 1, 11).astype(np.float32)
  out = directions.loss_curves(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), jnp.asarray(m), eps)
  _, g, us = np_directions(h, w, y, m)
  root_n = np.sqrt(m.sum())
  for k, u in us.items():
    cos = np.sum(-g * u) / (np.linalg.norm(g) * np.linalg.norm(u))
    np.testing.assert_allclose(out[k]["cosine"], cos, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(out[k]["first_order"], -eps * root_n * np.linalg.norm(g) * cos,
                               rtol=1e-5, err_msg=k)
    change, first = np.asarray(out[k]["loss_change"]), np.asarray(out[k]["first_order"])
    # Small ε: ΔL = first order + O(ε²), so the relative error shrinks 10× per decade of ε.
    err = np.abs(change - first) / np.abs(first)
    assert err[0] < 1e-3, (k, err)
    np.testing.assert_allclose(err[4] / err[2], 10.0, rtol=0.2, err_msg=k)
  np.testing.assert_allclose(out["ideal"]["cosine"], 1.0, rtol=1e-6)
  # −G lowers the loss most per unit norm at every small and moderate step.
  for k in ("hidden", "joint"):
    small = eps <= 0.1
    assert np.all(out["ideal"]["loss_change"][small] < out[k]["loss_change"][small]), k
  ratios = directions.ratios(jax_free(out))
  assert ratios["hidden"]["first_order"] > 2 and ratios["joint"]["first_order"] > 1


def jax_free(out):
  return {k: {f: np.asarray(x).tolist() for f, x in d.items()} for k, d in out.items()}


def test_ratios():
  res = {"ideal": {"cosine": 1.0, "loss_change": [-0.1, -2.0, -1.0]},
         "hidden": {"cosine": 0.1, "loss_change": [-0.01, -0.5, 0.3]},
         "joint": {"cosine": 0.2, "loss_change": [0.0, 0.1, 0.2]}}
  r = directions.ratios(res)
  assert r["hidden"] == {"first_order": 10.0, "best": 4.0}
  assert r["joint"]["first_order"] == 5.0 and r["joint"]["best"] == float("inf")


def test_cpu_preset_runs_offline(tmp_path):
  workdir = tmp_path / "new" / "workdir"  # not there yet: the experiment makes it
  cmd = [sys.executable, "-m", "experiments.update_direction",
         "--config=experiments/update_direction.py:cpu", f"--workdir={workdir}",
         "--config.train.steps=0", "--config.fresh=16", "--config.model.vocab_size=400",
         "--config.data.max_chars=200000", "--config.data.seq_len=32",
         "--config.update_dir.eps_points=6"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (r,) = json.loads((workdir / "summary.json").read_text())["models"]
  assert r["name"] == "fresh-d16" and r["tokens"] == 8 * 32 and len(r["eps"]) == 6
  d = r["directions"]
  assert d["ideal"]["loss_change"][0] < d["hidden"]["loss_change"][0] < 0
  assert d["ideal"]["loss_change"][0] < d["joint"]["loss_change"][0] < 0
  assert r["ratios"]["hidden"]["first_order"] == pytest.approx(1 / d["hidden"]["cosine"])
  assert "−GΠ" in proc.stdout
  assert (workdir / "update_directions.png").stat().st_size > 10_000
