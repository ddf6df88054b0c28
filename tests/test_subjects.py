"""subjects' shared cache (stdlib corpus tokens, trained models) on disk, and its errors."""

import json
import logging
import pathlib

import numpy as np
import pytest

from lmhead_jax.analysis import subjects
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.data import prepare, read_index
from lmhead_jax.training import runner, sharding

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NEED = ("a.txt",)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty cache directory, named by $LMHEAD_JAX_CACHE."""
  monkeypatch.setenv("LMHEAD_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def counting(monkeypatch, module, name: str) -> list:
  """Wraps module.name so that each call appends its positional arguments to the returned list."""
  calls, real = [], getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
  return calls


def writer(calls: list, text="built"):
  """A build function that writes stage/a.txt and counts its calls."""
  def build(stage):
    calls.append(stage)
    stage.mkdir()
    (stage / "a.txt").write_text(text)
  return build


def tiny(cfg=None):
  cfg = cfg or subjects.base_config()
  cfg.model.update(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                   max_seq_len=16)
  cfg.data.update(max_chars=100_000, seq_len=16)
  cfg.train.update(batch_size=4, eval_batches=0, bottleneck_every=0)
  return cfg


def test_cache_root(tmp_path, monkeypatch):
  cfg = subjects.base_config()
  monkeypatch.delenv("LMHEAD_JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert subjects.cache_root(cfg) == tmp_path / "xdg" / "lmhead_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert subjects.cache_root(cfg) == tmp_path / "home" / ".cache" / "lmhead_jax"
  monkeypatch.setenv("LMHEAD_JAX_CACHE", str(tmp_path / "env"))
  assert subjects.cache_root(cfg) == tmp_path / "env"
  cfg.cache_dir = str(tmp_path / "cfg")
  assert subjects.cache_root(cfg) == tmp_path / "cfg"


def test_cached_builds_once_per_key(tmp_path):
  calls = []
  a = subjects.cached(tmp_path, {"v": 1}, writer(calls), NEED)
  assert subjects.cached(tmp_path, {"v": 1}, writer(calls, "again"), NEED) == a
  assert len(calls) == 1 and (a / "a.txt").read_text() == "built"
  assert json.loads((a / "key.json").read_text()) == {"v": 1}
  b = subjects.cached(tmp_path, {"v": 2}, writer(calls), NEED)
  assert b != a and len(calls) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])  # no temp dirs


def test_cached_killed_and_half_written_entries(tmp_path, caplog):
  def killed(stage):
    stage.mkdir()
    (stage / "a.txt").write_text("half")
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    subjects.cached(tmp_path, {"v": 1}, killed, NEED)
  assert list(tmp_path.iterdir()) == []  # neither an entry nor its temp directory

  calls = []
  entry = subjects.cached(tmp_path, {"v": 1}, writer(calls), NEED)
  (tmp_path / f".{entry.name}.tmp-0000abcd").mkdir()  # left by a SIGKILLed build: ignored
  for corrupt in (lambda: (entry / "a.txt").unlink(), lambda: (entry / "key.json").unlink(),
                  lambda: (entry / "key.json").write_text('{"v": 2}')):
    corrupt()
    with caplog.at_level(logging.WARNING, "lmhead_jax.analysis.subjects"):
      assert subjects.cached(tmp_path, {"v": 1}, writer(calls), NEED) == entry
    assert "incomplete" in caplog.text and str(entry) in caplog.text
    assert (entry / "a.txt").read_text() == "built"
    assert json.loads((entry / "key.json").read_text()) == {"v": 1}
    caplog.clear()
  assert len(calls) == 4


def test_cached_concurrent_build_of_the_same_key(tmp_path):
  """Another process publishes the entry while this one builds: its entry is kept."""
  calls = []
  def racing(stage):
    subjects.cached(tmp_path, {"v": 1}, writer(calls, "first"), NEED)
    writer(calls, "second")(stage)
  entry = subjects.cached(tmp_path, {"v": 1}, racing, NEED)
  assert (entry / "a.txt").read_text() == "first" and len(calls) == 2
  assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_stdlib_tokens_shared_across_workdirs(tmp_path, cache, monkeypatch):
  builds = counting(monkeypatch, prepare, "prepare")
  cfg = tiny()
  val = subjects._token_dir(cfg, tmp_path / "a", "m", None, 300)
  assert subjects._token_dir(cfg, tmp_path / "b", "m", None, 300, "train") == val[:-3] + "train"
  assert len(builds) == 1 and pathlib.Path(val).is_relative_to(cache / "tokens")
  assert read_index(val)["vocab_size"] == 300 and read_index(val[:-3] + "train")["num_tokens"]
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  cfg.data.text_field = "body"  # not read for the stdlib corpus: still a hit
  assert subjects._token_dir(cfg, tmp_path / "c", "m", None, 300) == val and len(builds) == 1
  other = subjects._token_dir(cfg, tmp_path / "a", "m", None, 320)
  assert other != val and len(builds) == 2 and read_index(other)["vocab_size"] == 320


@pytest.mark.slow  # ~12 s: compiles init, a train step and restores twice
def test_trained_model_cached_and_restored(tmp_path, cache, monkeypatch):
  runs = counting(monkeypatch, runner, "run")
  cfg = tiny()
  cfg.train.steps = 2
  mesh = sharding.make_mesh()
  first = next(subjects.load(cfg, tmp_path / "a", mesh))
  cfg.measure.num_sequences, cfg.dtype = 8, "bfloat16"  # not part of the model's key
  second = next(subjects.load(cfg, tmp_path / "b", mesh))
  assert len(runs) == 1 and first.name == second.name == "trained-d16"
  entries = list((cache / "runs").iterdir())
  assert [e.name for e in entries] == [runs[0][1].name.split(".tmp-")[0][1:]]  # built beside
  assert (entries[0] / "checkpoints" / "2").is_dir()
  assert json.loads((entries[0] / "summary.json").read_text())["steps"] == 2
  np.testing.assert_array_equal(first.params["head"]["w_VxD"], second.params["head"]["w_VxD"])
  assert second.data.path == str(cache / "tokens" / pathlib.Path(second.data.path).parent.name
                                 / "train")
  assert not (tmp_path / "b").exists()  # nothing written to the new workdir


@pytest.mark.parametrize("models", ["checkpoints", "fresh"])
def test_no_tokenizer_and_too_few_ids_for_a_bpe(tmp_path, cache, models):
  cfg = subjects.base_config()
  if models == "checkpoints":
    cfg.checkpoints = str(FIXTURES / "llama")  # V = 128, no tokenizer.json
    s = next(subjects.load(cfg, tmp_path, sharding.make_mesh()))
  else:  # what load(fresh="16") yields, less its params (initializing compiles for seconds)
    cfg.model.vocab_size = 128
    c = ModelConfig.of(cfg.model)
    s = subjects.Subject("fresh-d16", c, HeadConfig.of(cfg.head.to_dict(), c), params={})
  with pytest.raises(ValueError) as e:
    subjects.source(cfg, s, tmp_path)
  msg = str(e.value)
  assert f"model {s.name!r} has no tokenizer.json" in msg and "vocab_size=128" in msg
  for hint in ("--config.data.path=<token dir>", "tokenizer.json",
               "--config.model.vocab_size >= 257"):
    assert hint in msg
  assert "--train-bpe" not in msg
  assert not cache.exists() and not any(tmp_path.iterdir())
