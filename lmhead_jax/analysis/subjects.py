"""The models that the measurement experiments look at, and the token data they read.

Models (`load`, in this order; config keys at the top level):
- `checkpoints`: local Hugging Face directories, comma-separated (`lmhead_jax.hf`; params in
  `dtype`). Their `tokenizer.json`, when present, tokenizes `data.text` or the stdlib corpus.
- `runs`: runner workdirs (config.json + checkpoints/), or directories whose subdirectories are
  runner workdirs (a sweep); the latest checkpoint of each, read by the data config it trained on.
- `fresh`: random-init models of `model`/`head`, comma-separated `D` (width D, d_ff = 4D) or
  `DrR` (factorized head of rank R).
- `train.steps > 0`: one model of `model`/`head`, trained by `runner.run` on the stdlib corpus
  for that many steps, once: the runner workdir is cached (below) and restored from there.

Data (`source`): `data.path` (a token directory) if set; else `data.text` (comma-separated
.txt/.jsonl/.parquet files or directories) tokenized with the model's tokenizer.json; else a
run's own data (its eval split when it has one); else the Python standard library corpus
(`data.stdlib`), with the model's tokenizer or, for models that have none, a byte-level BPE of
`model.vocab_size` ids trained on it. The stdlib corpus keeps 5% of its documents as a val
split, which is what gets measured (and what a `train.steps` model never trains on).

Cache: `data.text` is tokenized once into WORKDIR/tokens/<key>/. The stdlib corpus tokens and the
`train.steps` model are shared by every experiment and workdir, in `cache_dir` (default
$LMHEAD_JAX_CACHE, else $XDG_CACHE_HOME/lmhead_jax, else ~/.cache/lmhead_jax) under tokens/<key>/
and runs/<key>/. <key> hashes exactly what determines the entry (tokenizer or BPE size, corpus
settings and Python version; for a model its seed, model, head, data, train and optimizer groups),
written beside it as key.json. An entry is built in a temporary directory and renamed in, so a
killed or concurrent build never leaves a partial one; an entry without key.json or its files is
rebuilt with a warning.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import platform
import re
import secrets
import shutil
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.data import pipeline, prepare, read_index
from lmhead_jax.data import hf
from lmhead_jax.training import checkpoint, runner, setup, sharding
from lmhead_jax.training.experiment import base_config as train_config

log = logging.getLogger(__name__)
FRESH = re.compile(r"(\d+)(?:r(\d+))?")
KEY = "key.json"  # written last into a cache entry: what it was built from


@dataclasses.dataclass
class Subject:
  """One model under measurement; params are placed on the mesh."""

  name: str
  model_cfg: ModelConfig
  head_cfg: HeadConfig
  params: dict
  tokenizer: str | None = None  # the tokenizer.json of its text, if known
  data: ml_collections.ConfigDict | None = None  # the data config it was trained on


def base_config():
  """Training keys (for `train.steps`) plus the measurement experiments' own keys."""
  c = train_config()
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


def split_list(value) -> list[str]:
  items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
  return [s.strip() for s in items if s.strip()]


def _placed(params, c: ModelConfig, hc: HeadConfig, mesh) -> dict:
  return jax.device_put(params, sharding.param_shardings(params, model.param_axes(c, hc), mesh))


def _hf(path: str, dtype: str, mesh) -> Subject:
  c, params = hf.load_checkpoint(path, dtype)
  hc = hf.head_config(c)
  tok = os.path.join(path, "tokenizer.json")
  return Subject(pathlib.Path(path).name, c, hc, _placed(params, c, hc, mesh),
                 tok if os.path.isfile(tok) else None)


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
  s = setup.resolve(cfg, mesh)
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every=0, keep=cfg.checkpoint.keep)
  try:
    restored = ckpt.restore_latest(s.abstract_state())
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"runs: {run_dir} has no restorable checkpoint in checkpoints/")
  state, step = restored
  return Subject(name or f"{run_dir.name}@{step}", s.model, s.head, state.params, _tokenizer_of(cfg.data),
                 cfg.data)


def _fresh(spec: str, cfg, mesh) -> Subject:
  m = FRESH.fullmatch(spec)
  if m is None:
    raise ValueError(f"fresh={cfg.fresh!r}: item {spec!r} is not 'D' or 'DrR' (e.g. 64, 128r16)")
  d, r = int(m[1]), m[2] and int(m[2])
  c = dataclasses.replace(ModelConfig.of(cfg.model), d_model=d, d_ff=4 * d)
  hc = HeadConfig.of({"kind": "factorized", "rank": r} if r else cfg.head.to_dict(), c)
  shapes = jax.eval_shape(lambda k: model.init(k, c, hc), jax.random.key(0))
  sh = sharding.param_shardings(shapes, model.param_axes(c, hc), mesh)
  params = jax.jit(lambda k: model.init(k, c, hc), out_shardings=sh)(jax.random.key(cfg.seed))
  return Subject(f"fresh-d{d}" + (f"-r{r}" if r else ""), c, hc, params)


def _trained(cfg, workdir: pathlib.Path, mesh) -> Subject:
  """`model`/`head` trained for `train.steps` steps on the stdlib corpus (cached) and loaded."""
  name, v = f"trained-d{cfg.model.d_model}", cfg.model.vocab_size
  run_cfg = ml_collections.ConfigDict(cfg.to_dict())
  run_cfg.data.update(kind="tokens", path=_token_dir(cfg, workdir, name, None, v, "train"),
                      eval_path=_token_dir(cfg, workdir, name, None, v, "val"))
  key = {k: run_cfg[k].to_dict() if isinstance(run_cfg[k], ml_collections.ConfigDict)
         else run_cfg[k] for k in ("seed", "model", "head", "data", "train", "optimizer")}
  run = cached(cache_root(cfg) / "runs", key, lambda stage: runner.run(run_cfg, stage),
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
  for s in load(cfg, workdir, mesh):
    results.append(measure_one(s, source(cfg, s, workdir), mesh))
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
  for path in split_list(cfg.checkpoints):
    yield _hf(path, cfg.dtype, mesh)
  for path in split_list(cfg.runs):
    for run in _run_dirs(path):
      yield restore_run(run, mesh)
  for spec in split_list(cfg.fresh):
    yield _fresh(spec, cfg, mesh)
  if int(cfg.train.steps) > 0:
    yield _trained(cfg, workdir, mesh)


def _token_dir(cfg, workdir: pathlib.Path, name: str, tokenizer: str | None, vocab_size: int,
               split: str | None = None) -> str:
  """Tokenizes data.text or the stdlib corpus (once, cached) and returns a split's directory."""
  d = cfg.data
  inputs = split_list(d.text)
  if inputs:
    if tokenizer is None:
      raise ValueError(f"data.text needs a tokenizer, but model {name!r} has no tokenizer.json; "
                       "pass data.path (a token directory) instead")
  elif not d.stdlib:
    raise ValueError(f"model {name!r} has no data: set data.path, data.text or data.stdlib")
  elif tokenizer is None and vocab_size < 257:
    raise ValueError(
        f"model {name!r} has no tokenizer.json, and its vocab_size={vocab_size} is too small for "
        "the byte-level BPE that would tokenize the stdlib corpus for it (256 bytes + 1 EOS id "
        f"needs >= 257). Pass --config.data.path=<token dir> (made by python -m {prepare.__name__}"
        " with this model's tokenizer), use a checkpoint that has its tokenizer.json, or, for "
        "fresh and trained models, set --config.model.vocab_size >= 257")
  tok = (hashlib.sha256(pathlib.Path(tokenizer).read_bytes()).hexdigest() if tokenizer
         else f"bpe{vocab_size}")
  max_chars = int(d.max_chars) or None
  if inputs:
    root, val_fraction = workdir / "tokens", 0.0
    key = dict(text=inputs, text_field=d.text_field, max_chars=max_chars, tokenizer=tok)
  else:
    root, val_fraction = cache_root(cfg) / "tokens", 0.05
    key = dict(corpus="stdlib", python=platform.python_version(), max_chars=max_chars,
               val_fraction=val_fraction, tokenizer=tok)
  build = lambda stage: prepare.prepare(
      stage, inputs, tokenizer=tokenizer, stdlib=not inputs,
      train_bpe_vocab=None if tokenizer else vocab_size, max_chars=max_chars,
      text_field=d.text_field, val_fraction=val_fraction)
  splits = ("train", "val") if val_fraction else ("train",)
  out = cached(root, key, build, ("tokenizer.json",) + tuple(f"{s}/index.json" for s in splits))
  return str(out / (split or ("train" if inputs else "val")))


def cache_root(cfg) -> pathlib.Path:
  """`cache_dir`, else $LMHEAD_JAX_CACHE, else $XDG_CACHE_HOME/lmhead_jax (~/.cache/...)."""
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  root = cfg.cache_dir or os.environ.get("LMHEAD_JAX_CACHE") or os.path.join(xdg, "lmhead_jax")
  return pathlib.Path(root).expanduser().absolute()


def cached(root: pathlib.Path, key: dict, build: Callable[[pathlib.Path], object],
           need: tuple[str, ...], *, every_process: bool = False) -> pathlib.Path:
  """root/<hash of key>: made once by `build(stage)` (on process 0 only, unless every_process)
  into a temporary directory beside it, then renamed in with key.json. An entry whose key.json
  or `need`ed files are missing is rebuilt with a warning."""
  text = json.dumps(key, sort_keys=True, indent=1)
  out = root / hashlib.sha256(text.encode()).hexdigest()[:16]
  hit, nonce = _agree(_complete(out, text, need), secrets.randbits(31))
  if hit:
    return out
  main = jax.process_index() == 0
  stage = root / f".{out.name}.tmp-{nonce:08x}"
  if main:
    if out.exists():
      log.warning("cache entry %s is incomplete (no %s or one of %s); rebuilding it", out, KEY,
                  need)
    root.mkdir(parents=True, exist_ok=True)
  try:
    if main or every_process:
      build(stage)
    _sync(f"built {stage}")
    if main:
      (stage / KEY).write_text(text)
      if out.exists() and not _complete(out, text, need):
        shutil.rmtree(out, ignore_errors=True)
      try:
        stage.rename(out)
      except OSError:  # a concurrent build of the same key got there first
        if not _complete(out, text, need):
          raise
    _sync(f"published {out}")
  finally:
    if main:
      shutil.rmtree(stage, ignore_errors=True)
  return out


def _complete(entry: pathlib.Path, text: str, need: tuple[str, ...]) -> bool:
  try:
    return (entry / KEY).read_text() == text and all((entry / n).exists() for n in need)
  except OSError:
    return False


def _agree(*values: int) -> list[int]:
  """Process 0's values, on every process."""
  if jax.process_count() == 1:
    return list(values)
  return [int(v) for v in multihost_utils.broadcast_one_to_all(np.array(values, np.int32))]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def source(cfg, s: Subject, workdir):
  """The windows of `data.seq_len` tokens (a grain-compatible source) that `s` is measured on."""
  data = ml_collections.ConfigDict(cfg.data.to_dict())
  if not (data.path or split_list(data.text)) and s.data is not None:
    data = ml_collections.ConfigDict(s.data.to_dict())
    data.seq_len = cfg.data.seq_len
    split = "eval" if data.kind != "tokens" or data.eval_path else "train"
    return pipeline.make_source(data, s.model_cfg.vocab_size, split=split, seed=cfg.seed)
  if not data.path:
    data.path = _token_dir(cfg, pathlib.Path(workdir), s.name, s.tokenizer,
                           s.model_cfg.vocab_size)
  data.kind = "tokens"
  return pipeline.make_source(data, s.model_cfg.vocab_size, seed=cfg.seed)
