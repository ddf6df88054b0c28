"""The measurement experiments' config and main: which models a config names, loaded one at a
time (`load`), measured on their data (`lmhead_jax.runs.corpus`), tabled and drawn
(`measure_each`).

Models (`load`, in this order; config keys at the top level):
- `checkpoints`: local Hugging Face directories, comma-separated (`lmhead_jax.hf`; params in
  `dtype`). Their `tokenizer.json`, when present, tokenizes `data.text` or the stdlib corpus.
- `runs`: runner workdirs (config.json + checkpoints/), or directories whose subdirectories are
  runner workdirs (a sweep); the latest checkpoint of each, read by the data config it trained on.
- `fresh`: random-init models of `model`/`head`, comma-separated `D` (width D, d_ff = 4D) or
  `DrR` (factorized head of rank R).
- `train.steps > 0`: one model of `model`/`head`, trained by `runner.run` on the stdlib corpus
  for that many steps, once: the runner workdir is cached (`lmhead_jax.runs.cache`, keyed by its
  seed, model, head, data, train and optimizer groups) and restored from there.
"""

import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import jax
import ml_collections

from lmhead_jax.analysis import subjects
from lmhead_jax.analysis.subjects import Subject
from lmhead_jax.core.config import HeadConfig
from lmhead_jax.data.tokens import read_index
from lmhead_jax.runs import cache, checkpoint, corpus, experiment, runner
from lmhead_jax.training import sharding

log = logging.getLogger(__name__)
FRESH = re.compile(r"(\d+)(?:r(\d+))?")


def base_config():
  """Training keys (for `train.steps`) plus the measurement experiments' own keys."""
  c = experiment.base_config()
  with c.unlocked():
    c.checkpoints = ""
    c.dtype = "float32"
    c.runs = ""
    c.fresh = ""
    c.cache_dir = ""  # shared corpus tokens and trained models ("": see cache_root)
    c.data.update(text="", text_field="text", stdlib=True, max_chars=20_000_000)
    c.measure = ml_collections.ConfigDict(dict(batch_size=16, num_sequences=256))
  c.train.update(steps=0, batch_size=16, log_every=50, eval_every=0, eval_batches=4)
  c.data.update(kind="tokens", seq_len=128)
  return c


def cpu_preset(cfg, vocab_size: int, fresh: str, batch_size: int):
  """The `cpu` presets' subjects: `fresh` widths and a 2-layer D=64 model trained 300 steps on
  the stdlib corpus (the same config, so the experiments share its cache entry)."""
  cfg.fresh = fresh
  cfg.model.update(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                   d_ff=256, max_seq_len=128)
  cfg.train.update(steps=300, batch_size=16)
  cfg.optimizer.update(learning_rate=3e-3, warmup_steps=30, schedule="cosine")
  cfg.measure.batch_size = batch_size
  return cfg


def _run_dirs(path: str) -> list[pathlib.Path]:
  p = pathlib.Path(path)
  if (p / "config.json").is_file():
    return [p]
  runs = sorted(d for d in p.iterdir() if (d / "config.json").is_file()) if p.is_dir() else []
  if not runs:
    raise FileNotFoundError(f"runs: {path} is neither a runner workdir (config.json) nor a "
                            "directory of them")
  return runs


def _tokenizer_of(data) -> str | None:
  if data.kind != "tokens" or not data.path:
    return None
  tok = os.path.join(data.path, read_index(data.path)["tokenizer"])
  return tok if os.path.isfile(tok) else None


def restore_run(run_dir: pathlib.Path, mesh, name: str | None = None) -> Subject:
  """The latest checkpoint of a runner workdir."""
  cfg = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
  setup = experiment.resolve(cfg, mesh)
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every=0, keep=cfg.checkpoint.keep)
  try:
    restored = ckpt.restore_latest(setup.abstract_state())
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"runs: {run_dir} has no restorable checkpoint in checkpoints/")
  state, step = restored
  return Subject(name or f"{run_dir.name}@{step}", setup.model, setup.head, state.params,
                 _tokenizer_of(cfg.data), cfg.data)


def _fresh(spec: str, cfg, mesh) -> Subject:
  m = FRESH.fullmatch(spec)
  if m is None:
    raise ValueError(f"fresh={cfg.fresh!r}: item {spec!r} is not 'D' or 'DrR' (e.g. 64, 128r16)")
  d, r = int(m[1]), m[2] and int(m[2])
  c = dataclasses.replace(experiment.configs(cfg)[0], d_model=d, d_ff=4 * d)
  hc = HeadConfig.of({"kind": "factorized", "rank": r} if r else cfg.head.to_dict(), c)
  return subjects.fresh(f"fresh-d{d}" + (f"-r{r}" if r else ""), c, hc, int(cfg.seed), mesh)


def _trained(cfg, workdir: pathlib.Path, mesh) -> Subject:
  """`model`/`head` trained for `train.steps` steps on the stdlib corpus (cached) and loaded."""
  name, v = f"trained-d{cfg.model.d_model}", cfg.model.vocab_size
  run_cfg = ml_collections.ConfigDict(cfg.to_dict())
  run_cfg.data.update(kind="tokens", path=corpus.token_dir(cfg, workdir, name, None, v, "train"),
                      eval_path=corpus.token_dir(cfg, workdir, name, None, v, "val"))
  key = {k: run_cfg[k].to_dict() if isinstance(run_cfg[k], ml_collections.ConfigDict)
         else run_cfg[k] for k in ("seed", "model", "head", "data", "train", "optimizer")}
  run = cache.cached(cache.cache_root(cfg.cache_dir) / "runs", key,
                     lambda stage: runner.run(run_cfg, stage),
                     ("config.json", f"checkpoints/{int(cfg.train.steps)}"), every_process=True)
  log.info("trained model %s: %s", name, run)
  return restore_run(run, mesh, name)


def measure_each(cfg, workdir, measure_one: Callable, table: Callable[[list[dict]], str],
                 figure: Callable[[list[dict], pathlib.Path], None], figure_name: str) -> None:
  """The measurement experiments' main: `measure_one(subject, source, mesh) -> dict` for every
  subject (its table printed as it comes), then the table of all; host 0 writes
  WORKDIR/summary.json ({"models": [...]}) and draws `figure` into WORKDIR/`figure_name`."""
  out = pathlib.Path(workdir)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)  # before the work: an unwritable workdir fails now
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  results = []
  for subject in load(cfg, workdir, mesh):
    results.append(measure_one(subject, corpus.source(cfg, subject, workdir), mesh))
    print(table(results[-1:]), flush=True)
  if not results:
    raise ValueError("no models to measure: set checkpoints, runs, fresh or train.steps")
  print(table(results))
  if jax.process_index() == 0:
    (out / "summary.json").write_text(json.dumps({"models": results}, indent=2))
    figure(results, out / figure_name)


def load(cfg, workdir, mesh) -> Iterator[Subject]:
  """The configured models, one at a time (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  for path in corpus.split_list(cfg.checkpoints):
    yield subjects.from_hf(path, cfg.dtype, mesh)
  for path in corpus.split_list(cfg.runs):
    for run in _run_dirs(path):
      yield restore_run(run, mesh)
  for spec in corpus.split_list(cfg.fresh):
    yield _fresh(spec, cfg, mesh)
  if int(cfg.train.steps) > 0:
    yield _trained(cfg, workdir, mesh)
