import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmhead_jax.data import tokens
from lmhead_jax.data.tokens import TokenFileSource, read_index, write_token_dir


def _stream(n, vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, n)


def _write(path, stream, vocab, shard_tokens=97, pieces=5, **kw):
  return write_token_dir(path, np.array_split(stream, pieces), vocab_size=vocab,
                         tokenizer="test", shard_tokens=shard_tokens, **kw)


def _windows(src):
  return np.concatenate([np.r_[r["inputs"], r["targets"][-1]] for r in map(src.__getitem__,
                                                                             range(len(src)))])


@pytest.mark.parametrize("vocab,dtype", [(300, "uint16"), (65536, "uint16"), (70_000, "uint32")])
def test_write_layout_and_dtype(tmp_path, vocab, dtype):
  stream = _stream(1000, vocab)
  stream[3] = vocab - 1
  index = _write(tmp_path, stream, vocab)
  assert json.loads((tmp_path / "index.json").read_text()) == index
  assert index["dtype"] == dtype and index["num_tokens"] == 1000 and index["vocab_size"] == vocab
  assert [s["num_tokens"] for s in index["shards"]] == [97] * 10 + [30]
  raw = np.concatenate([np.fromfile(tmp_path / s["path"], dtype) for s in index["shards"]])
  np.testing.assert_array_equal(raw, stream)
  assert read_index(tmp_path) == index


def test_sequential_windows_cover_the_stream_without_overlap(tmp_path):
  stream = _stream(1000, 500)
  _write(tmp_path, stream, 500)
  src = TokenFileSource(tmp_path, seq_len=15, mode="sequential")  # W = 16 crosses shard ends
  assert len(src) == 1000 // 16
  np.testing.assert_array_equal(_windows(src), stream[:len(src) * 16])
  assert 1000 - len(src) * 16 < 16
  rec = src[5]
  np.testing.assert_array_equal(rec["inputs"], stream[80:95])
  np.testing.assert_array_equal(rec["targets"], stream[81:96])
  np.testing.assert_array_equal(rec["mask"], np.ones(15, np.float32))
  assert (rec["inputs"].dtype, rec["targets"].dtype) == (np.int32, np.int32)
  with pytest.raises(IndexError):
    src[len(src)]


def test_random_windows_shift_the_grid_by_seed(tmp_path):
  stream = _stream(1003, 500)
  _write(tmp_path, stream, 500)
  offsets = set()
  for seed in range(8):
    src = TokenFileSource(tmp_path, seq_len=9, mode="random", seed=seed)
    assert len(src) == 1003 // 10 - 1
    i = np.flatnonzero([np.array_equal(_windows(src), stream[o:o + len(src) * 10])
                        for o in range(1003 - len(src) * 10 + 1)])
    assert len(i) == 1  # windows are consecutive and non-overlapping from one offset
    offsets.add(int(i[0]))
    assert TokenFileSource(tmp_path, seq_len=9, mode="random", seed=seed).offset == i[0]
  assert len(offsets) > 3


def _corrupt(tmp_path, edit):
  _write(tmp_path, _stream(200, 100), 100, shard_tokens=50)
  index = json.loads((tmp_path / "index.json").read_text())
  edit(index)
  (tmp_path / "index.json").write_text(json.dumps(index))


def _set(key, value):
  return lambda index: index.__setitem__(key, value)


@pytest.mark.parametrize("edit,err,name,match", [
    (_set("dtype", "int8"), ValueError, "index.json", "dtype='int8'"),
    (_set("dtype", "float32"), ValueError, "index.json", "dtype='float32'"),
    (_set("vocab_size", 70_000), ValueError, "index.json", "does not fit dtype=uint16"),
    (_set("num_tokens", 201), ValueError, "index.json", "num_tokens=201"),
    (lambda ix: ix["shards"][2].__setitem__("path", "nope.bin"), FileNotFoundError, "nope.bin",
     "does not exist"),
    (lambda ix: ix.pop("shards"), ValueError, "index.json", "malformed"),
])
def test_bad_index(tmp_path, edit, err, name, match):
  _corrupt(tmp_path, edit)
  with pytest.raises(err, match=match) as e:
    TokenFileSource(tmp_path, 4)
  assert os.path.join(str(tmp_path), name) in str(e.value)


@pytest.mark.parametrize("outside", ["../outside.bin", "{tmp}/outside.bin", "a/../../outside.bin"])
def test_shard_path_outside_the_directory(tmp_path, outside):
  """A shard that exists, with the right size, but outside the token directory is refused."""
  _stream(50, 100).astype(np.uint16).tofile(tmp_path / "outside.bin")
  outside = outside.format(tmp=tmp_path)
  _corrupt(tmp_path / "d", lambda ix: ix["shards"][2].__setitem__("path", outside))
  with pytest.raises(ValueError, match=f"{tmp_path / 'd' / 'index.json'} lists '{outside}', not a "
                                       f"path inside {tmp_path / 'd'}"):
    TokenFileSource(tmp_path / "d", 4)


def test_missing_index(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "index.json")):
    TokenFileSource(tmp_path, 4)


def test_truncated_shard(tmp_path):
  _write(tmp_path, _stream(200, 100), 100, shard_tokens=50)
  shard = tmp_path / "shard_00002.bin"
  shard.write_bytes(shard.read_bytes()[:-2])
  with pytest.raises(ValueError, match=f"{shard} has 98 bytes.*truncated"):
    TokenFileSource(tmp_path, 4)


def test_shard_of_another_dtype_than_its_label(tmp_path):
  """uint32 ids under an index that says uint16: each shard is twice the size the index implies."""
  _write(tmp_path, _stream(200, 100), 100, shard_tokens=50, dtype="uint32")
  index = json.loads((tmp_path / "index.json").read_text()) | {"dtype": "uint16"}
  (tmp_path / "index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=f"token shard {tmp_path / 'shard_00000.bin'} has 200 bytes, "
                                       f"{tmp_path / 'index.json'} says 50 uint16 tokens "
                                       r"\(100 bytes\): truncated or wrong dtype"):
    TokenFileSource(tmp_path, 4)
  with pytest.raises(ValueError, match="shard_00000.bin has 200 bytes"):
    tokens.fingerprint(tmp_path)


@pytest.mark.parametrize("shard_tokens", [0, -1])
def test_non_positive_shard_tokens_refused(tmp_path, shard_tokens):
  """It used to open empty shards forever: run in a subprocess with a time limit."""
  code = ("from lmhead_jax.data.tokens import write_token_dir; "
          f"write_token_dir({str(tmp_path / 'd')!r}, [[1, 2]], vocab_size=5, tokenizer='t', "
          f"shard_tokens={shard_tokens})")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert r.returncode == 1
  assert r.stderr.splitlines()[-1] == f"ValueError: shard_tokens={shard_tokens} must be at least 1"
  assert not (tmp_path / "d").exists()


def test_ids_beyond_vocab_at_load_and_write(tmp_path):
  stream = _stream(200, 100).astype(np.uint16)
  _write(tmp_path, stream, 100, shard_tokens=50)
  stream[123] = 100
  stream[100:150].tofile(tmp_path / "shard_00002.bin")
  with pytest.raises(ValueError, match=f"{tmp_path / 'shard_00002.bin'} contains id 100"):
    TokenFileSource(tmp_path, 4)
  TokenFileSource(tmp_path, 4, check_ids=False)  # the scan is what catches it
  with pytest.raises(ValueError, match=f"array 3 written to {tmp_path / 'w'} has id 100"):
    _write(tmp_path / "w", stream, 100)
  with pytest.raises(ValueError, match="has id -1"):
    write_token_dir(tmp_path / "w", [[0, -1]], vocab_size=5, tokenizer="t")
  with pytest.raises(ValueError, match="uint16 cannot hold ids of vocab_size=70000"):
    write_token_dir(tmp_path / "w", [[0]], vocab_size=70_000, tokenizer="t", dtype="uint16")


def test_model_compatibility(tmp_path):
  _write(tmp_path, _stream(200, 100), 100)
  src = TokenFileSource(tmp_path, 4)
  src.check_compatible(100)
  src.check_compatible(128)  # a padded model vocab can embed every id
  with pytest.raises(ValueError, match=f"{tmp_path / 'index.json'} has vocab_size=100"):
    src.check_compatible(99)


def test_too_short(tmp_path):
  _write(tmp_path, _stream(8, 100), 100)
  with pytest.raises(ValueError, match="8 tokens, fewer than seq_len"):
    TokenFileSource(tmp_path, 8)


def test_fingerprint_follows_the_content(tmp_path):
  import hashlib
  ids = [np.arange(1000) % 300, np.arange(77) % 300]
  write_token_dir(tmp_path / "a", ids, vocab_size=300, tokenizer="t", shard_tokens=256)
  write_token_dir(tmp_path / "b", [np.concatenate(ids)], vocab_size=300, tokenizer="other")
  want = hashlib.sha256(b"uint16:300:" + np.concatenate(ids).astype("<u2").tobytes()).hexdigest()
  assert tokens.fingerprint(tmp_path / "a") == tokens.fingerprint(tmp_path / "b") == f"sha256:{want}"
  index = json.loads((tmp_path / "a" / "index.json").read_text())
  del index["fingerprint"]  # an index written before fingerprints: computed from the shards
  (tmp_path / "a" / "index.json").write_text(json.dumps(index))
  assert tokens.fingerprint(tmp_path / "a") == f"sha256:{want}"
  write_token_dir(tmp_path / "b", [np.concatenate(ids)[::-1]], vocab_size=300, tokenizer="t")
  assert tokens.fingerprint(tmp_path / "b") != f"sha256:{want}"


def test_arrayrecord_directory_serves_the_flat_directorys_windows(tmp_path):
  """Same ids, same fingerprint, same windows in both modes; the records are grain's native
  ArrayRecord files of RECORD_TOKENS ids each (the last shorter)."""
  import grain
  rng = np.random.default_rng(0)
  ids = [rng.integers(0, 300, n) for n in (10_000, 5_000, 3)]
  flat = write_token_dir(tmp_path / "flat", ids, vocab_size=300, tokenizer="t", shard_tokens=6000)
  rec = write_token_dir(tmp_path / "ar", ids, vocab_size=300, tokenizer="t", shard_tokens=6000,
                        format="arrayrecord")
  assert rec["fingerprint"] == flat["fingerprint"] == tokens.fingerprint(tmp_path / "ar")
  assert [s["num_tokens"] for s in rec["shards"]] == [8192, 15_003 - 8192]
  source = grain.sources.ArrayRecordDataSource(
      [str(tmp_path / "ar" / s["path"]) for s in rec["shards"]])
  records = [np.frombuffer(source[i], np.uint16) for i in range(len(source))]
  assert [r.size for r in records] == [4096, 4096, 4096, 15_003 - 3 * 4096]
  np.testing.assert_array_equal(np.concatenate(records), np.concatenate(ids))
  for mode in ("random", "sequential"):
    a = TokenFileSource(tmp_path / "flat", 100, mode=mode, seed=5)
    b = TokenFileSource(tmp_path / "ar", 100, mode=mode, seed=5)
    assert len(a) == len(b) == (147 if mode == "random" else 148)  # 15,003 // 101
    for i in range(len(a)):
      for key in ("inputs", "targets"):
        np.testing.assert_array_equal(a[i][key], b[i][key])


def test_arrayrecord_shard_with_missing_records_or_not_arrayrecord_is_refused(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  ids = [np.arange(9000) % 300]
  write_token_dir(tmp_path / "ar", ids, vocab_size=300, tokenizer="t", format="arrayrecord")
  shard = tmp_path / "ar" / "shard_00000.array_record"
  writer = ArrayRecordWriter(str(shard), "group_size:1")  # two of its three records
  for r in range(2):
    writer.write((np.arange(4096) % 300).astype(np.uint16).tobytes())
  writer.close()
  with pytest.raises(ValueError, match=f"{shard} has 2 records, .* says 9000 tokens in records "
                     "of 4096: truncated"):
    read_index(tmp_path / "ar")
  shard.write_bytes(b"not an array record file")
  with pytest.raises(ValueError, match=f"{shard} is not an ArrayRecord file"):
    read_index(tmp_path / "ar")
  with pytest.raises(ValueError, match="format='parquet' is not one of"):
    write_token_dir(tmp_path / "x", ids, vocab_size=300, tokenizer="t", format="parquet")
