"""The shared cache on disk: built once per key, killed and concurrent builds."""

import json
import logging

import pytest

from lmhead_jax.runs import cache, measurement


NEED = ("a.txt",)


def writer(calls: list, text="built"):
  """A build function that writes stage/a.txt and counts its calls."""
  def build(stage):
    calls.append(stage)
    stage.mkdir()
    (stage / "a.txt").write_text(text)
  return build


def test_cache_root(tmp_path, monkeypatch):
  cfg = measurement.base_config()
  monkeypatch.delenv("LMHEAD_JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache.cache_root(cfg.cache_dir) == tmp_path / "xdg" / "lmhead_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache.cache_root(cfg.cache_dir) == tmp_path / "home" / ".cache" / "lmhead_jax"
  monkeypatch.setenv("LMHEAD_JAX_CACHE", str(tmp_path / "env"))
  assert cache.cache_root(cfg.cache_dir) == tmp_path / "env"
  cfg.cache_dir = str(tmp_path / "cfg")
  assert cache.cache_root(cfg.cache_dir) == tmp_path / "cfg"


def test_cached_builds_once_per_key(tmp_path):
  calls = []
  a = cache.cached(tmp_path, {"v": 1}, writer(calls), NEED)
  assert cache.cached(tmp_path, {"v": 1}, writer(calls, "again"), NEED) == a
  assert len(calls) == 1 and (a / "a.txt").read_text() == "built"
  assert json.loads((a / "key.json").read_text()) == {"v": 1}
  b = cache.cached(tmp_path, {"v": 2}, writer(calls), NEED)
  assert b != a and len(calls) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])  # no temp dirs


def test_cached_killed_and_half_written_entries(tmp_path, caplog):
  def killed(stage):
    stage.mkdir()
    (stage / "a.txt").write_text("half")
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    cache.cached(tmp_path, {"v": 1}, killed, NEED)
  assert list(tmp_path.iterdir()) == []  # neither an entry nor its temp directory

  calls = []
  entry = cache.cached(tmp_path, {"v": 1}, writer(calls), NEED)
  (tmp_path / f".{entry.name}.tmp-0000abcd").mkdir()  # left by a SIGKILLed build: ignored
  for corrupt in (lambda: (entry / "a.txt").unlink(), lambda: (entry / "key.json").unlink(),
                  lambda: (entry / "key.json").write_text('{"v": 2}')):
    corrupt()
    with caplog.at_level(logging.WARNING, "lmhead_jax.analysis.subjects"):
      assert cache.cached(tmp_path, {"v": 1}, writer(calls), NEED) == entry
    assert "incomplete" in caplog.text and str(entry) in caplog.text
    assert (entry / "a.txt").read_text() == "built"
    assert json.loads((entry / "key.json").read_text()) == {"v": 1}
    caplog.clear()
  assert len(calls) == 4


def test_cached_concurrent_build_of_the_same_key(tmp_path):
  """Another process publishes the entry while this one builds: its entry is kept."""
  calls = []
  def racing(stage):
    cache.cached(tmp_path, {"v": 1}, writer(calls, "first"), NEED)
    writer(calls, "second")(stage)
  entry = cache.cached(tmp_path, {"v": 1}, racing, NEED)
  assert (entry / "a.txt").read_text() == "first" and len(calls) == 2
  assert [p.name for p in tmp_path.iterdir()] == [entry.name]
