"""The models that the measurement experiments look at, and the token data they read.

Models (`load`, in this order; config keys at the top level):
- `checkpoints`: local Hugging Face directories, comma-separated (`lmhead_jax.hf`; params in
  `dtype`). Their `tokenizer.json`, when present, tokenizes `data.text` or the stdlib corpus.
- `runs`: runner workdirs (config.json + checkpoints/), or directories whose subdirectories are
  runner workdirs (a sweep); the latest checkpoint of each, read by the data config it trained on.
- `fresh`: random-init models of `model`/`head`, comma-separated `D` (width D, d_ff = 4D) or
  `DrR` (factorized head of rank R).
- `train.steps > 0`: one model of `model`/`head`, first trained by `runner.run` on the token
  data for that many steps (in WORKDIR/trained, resumed when run again).

Data (`source`): `data.path` (a token directory) if set; else `data.text` (comma-separated
.txt/.jsonl/.parquet files or directories) tokenized with the model's tokenizer.json; else a
run's own data (its eval split when it has one); else the Python standard library corpus
(`data.stdlib`), with the model's tokenizer or, for models that have none, a byte-level BPE of
`model.vocab_size` ids trained on it. Tokenized text is cached under WORKDIR/tokens/<key>/; the
stdlib corpus keeps 5% of its documents as a val split, which is what gets measured (and what a
`train.steps` model never trains on).
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterator

import jax
import ml_collections
from jax.experimental import multihost_utils

from lmhead_jax import checkpoint, hf, model, runner, sharding, train
from lmhead_jax.config import HeadConfig, ModelConfig, base_config as train_config
from lmhead_jax.data import pipeline, prepare, read_index

log = logging.getLogger(__name__)
FRESH = re.compile(r"(\d+)(?:r(\d+))?")


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
    c.data.update(text="", text_field="text", stdlib=True, max_chars=20_000_000)
    c.measure = ml_collections.ConfigDict(dict(batch_size=16, num_sequences=256))
  c.train.update(steps=0, batch_size=16, log_every=50, eval_every=0, eval_batches=4)
  c.data.update(kind="tokens", seq_len=128)
  return c


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
  c, hc = train.configs(cfg)
  shapes = jax.eval_shape(lambda k: train.init_state(k, cfg, mesh)[0], jax.random.key(0))
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every=0, keep=cfg.checkpoint.keep)
  try:
    restored = ckpt.restore_latest(
        checkpoint.abstract_like(shapes, train.state_shardings(cfg, mesh)))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"runs: {run_dir} has no restorable checkpoint in checkpoints/")
  state, step = restored
  return Subject(name or f"{run_dir.name}@{step}", c, hc, state.params, _tokenizer_of(cfg.data),
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
  """Trains `model`/`head` on the token data for `train.steps` steps (or resumes) and loads it."""
  name, v = f"trained-d{cfg.model.d_model}", cfg.model.vocab_size
  run_cfg = ml_collections.ConfigDict(cfg.to_dict())
  run_cfg.data.update(kind="tokens", path=_token_dir(cfg, workdir, name, None, v, "train"),
                      eval_path=_token_dir(cfg, workdir, name, None, v, "val"))
  summary = runner.run(run_cfg, workdir / "trained")
  log.info("trained model: %s", {k: summary[k] for k in ("loss", "eval/loss") if k in summary})
  return restore_run(workdir / "trained", mesh, name)


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
  tok_key = pathlib.Path(tokenizer).read_bytes() if tokenizer else f"bpe{vocab_size}".encode()
  key = hashlib.sha1(json.dumps([inputs, int(d.max_chars), d.text_field]).encode() + tok_key)
  out = workdir / "tokens" / key.hexdigest()[:12]
  split = split or ("train" if inputs else "val")
  if jax.process_index() == 0 and not (out / split / "index.json").is_file():
    prepare.prepare(out, inputs, tokenizer=tokenizer, stdlib=not inputs,
                    train_bpe_vocab=None if tokenizer else vocab_size,
                    max_chars=int(d.max_chars) or None, text_field=d.text_field,
                    val_fraction=0.0 if inputs else 0.05)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"tokens {out}")
  return str(out / split)


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
