"""A cache shared by processes, experiments and workdirs: entries built once, published whole.

`cached(root, key, build, need)` is root/<hash of key>: built by `build(stage)` in a temporary
directory beside it (on process 0 only, unless every_process), then renamed in with key.json
(what it was built from) written last, so a killed or concurrent build never leaves a partial
entry; an entry without key.json or one of its `need`ed files is rebuilt with a warning.
"""

import hashlib
import json
import logging
import os
import pathlib
import secrets
import shutil
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
KEY = "key.json"  # written last into a cache entry: what it was built from


def cache_root(cache_dir: str = "") -> pathlib.Path:
  """`cache_dir`, else $LMHEAD_JAX_CACHE, else $XDG_CACHE_HOME/lmhead_jax (~/.cache/...)."""
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  root = cache_dir or os.environ.get("LMHEAD_JAX_CACHE") or os.path.join(xdg, "lmhead_jax")
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
