"""Token directories: shards of token ids plus `index.json`, served as windows.

Two shard formats: "flat" (raw binary ids, memory-mapped) and "arrayrecord" (grain's native
ArrayRecord files, records of `record_tokens` ids, read through grain's ArrayRecordDataSource).
`read_index` reads and checks index.json (a flat shard whose byte size is not its token count
times the dtype's size, or an ArrayRecord shard whose record count is off, is refused);
`TokenFileSource` serves non-overlapping windows of seq_len + 1 consecutive tokens as
inputs/targets, "sequential" or "random" (the window grid shifted by an offset drawn from the
seed); `fingerprint` is a content hash of the ids, the same for both formats. The layout and the
window modes: docs/INTERNALS.md. A flat directory may be on gs:// (its shards are then read whole
into host memory); ArrayRecord files are read by array_record's own file layer: local paths.
"""

import hashlib
import json
import os

import numpy as np
from etils import epath

DTYPES = ("uint16", "uint32")
FORMATS = ("flat", "arrayrecord")
INDEX = "index.json"
RECORD_TOKENS = 4096  # ids per ArrayRecord record
SCAN_CHUNK = 1 << 24  # tokens per chunk of the load-time id scan


def _dtype_for(vocab_size: int, dtype: str | None) -> str:
  dtype = dtype or ("uint16" if vocab_size <= 1 << 16 else "uint32")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
  if vocab_size - 1 > np.iinfo(dtype).max:
    raise ValueError(f"dtype={dtype} cannot hold ids of vocab_size={vocab_size}")
  return dtype


def _hasher(dtype: str, vocab_size: int):
  return hashlib.sha256(f"{dtype}:{vocab_size}:".encode())


class _RecordWriter:
  """A file-like `write(bytes)` that cuts the id stream into ArrayRecord records of
  `record_tokens` ids (the last one of the directory may be shorter)."""

  def __init__(self, path: str, record_bytes: int):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.writer, self.size, self.pending = ArrayRecordWriter(path, "group_size:1"), record_bytes, b""

  def write(self, data: bytes):
    data = self.pending + data
    full = len(data) // self.size * self.size
    for i in range(0, full, self.size):
      self.writer.write(data[i:i + self.size])
    self.pending = data[full:]

  def close(self):
    if self.pending:
      self.writer.write(self.pending)
    self.writer.close()


def write_token_dir(out_dir, ids, *, vocab_size: int, tokenizer: str, dtype: str | None = None,
                    shard_tokens: int = 1 << 28, format: str = "flat") -> dict:
  """Writes an iterable of id arrays into `out_dir` as shards of `shard_tokens` ids (for
  "arrayrecord", rounded up to whole records of RECORD_TOKENS); returns the index."""
  dtype = _dtype_for(vocab_size, dtype)
  if shard_tokens < 1:
    raise ValueError(f"shard_tokens={shard_tokens} must be at least 1")
  if format not in FORMATS:
    raise ValueError(f"format={format!r} is not one of {FORMATS}")
  records = format == "arrayrecord"
  if records:
    shard_tokens = -(-shard_tokens // RECORD_TOKENS) * RECORD_TOKENS
  os.makedirs(out_dir, exist_ok=True)
  shards, f, digest = [], None, _hasher(dtype, vocab_size)
  for k, chunk in enumerate(ids):
    chunk = np.asarray(chunk).ravel()
    if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
      bad = chunk.min() if chunk.min() < 0 else chunk.max()
      raise ValueError(f"array {k} written to {out_dir} has id {bad} outside "
                       f"[0, vocab_size={vocab_size})")
    chunk = chunk.astype(dtype)
    while chunk.size:
      if f is None or shards[-1]["num_tokens"] == shard_tokens:
        if f:
          f.close()
        suffix = "array_record" if records else "bin"
        shards.append({"path": f"shard_{len(shards):05d}.{suffix}", "num_tokens": 0})
        path = os.path.join(out_dir, shards[-1]["path"])
        f = (_RecordWriter(path, RECORD_TOKENS * np.dtype(dtype).itemsize) if records
             else open(path, "wb"))
      n = min(chunk.size, shard_tokens - shards[-1]["num_tokens"])
      f.write(chunk[:n].tobytes())
      digest.update(chunk[:n].tobytes())
      shards[-1]["num_tokens"] += n
      chunk = chunk[n:]
  if f:
    f.close()
  index = {"dtype": dtype, "vocab_size": int(vocab_size),
           "num_tokens": sum(s["num_tokens"] for s in shards), "tokenizer": tokenizer,
           "shards": shards, "fingerprint": f"sha256:{digest.hexdigest()}"}
  if records:
    index |= {"format": format, "record_tokens": RECORD_TOKENS}
  tmp = os.path.join(out_dir, INDEX + ".tmp")
  with open(tmp, "w") as fi:
    json.dump(index, fi, indent=1)
  os.replace(tmp, os.path.join(out_dir, INDEX))
  return index


def inside(root, name, listed_in) -> str:
  """root/name for a relative `name` that stays inside `root`; anything else is refused."""
  if not isinstance(name, str) or os.path.isabs(name) or (
      os.path.normpath(name).split(os.sep)[0] == os.pardir):
    raise ValueError(f"{listed_in} lists {name!r}, not a path inside {root}")
  return os.path.join(root, name)


def read_index(path) -> dict:
  """Reads and validates `path/index.json`; errors name the file."""
  index_path = os.path.join(path, INDEX)
  if not epath.Path(index_path).is_file():
    raise FileNotFoundError(f"token index {index_path} does not exist")
  try:
    index = json.loads(epath.Path(index_path).read_text())
    dtype, vocab_size, shards = index["dtype"], int(index["vocab_size"]), index["shards"]
    counts = [int(s["num_tokens"]) for s in shards]
    paths = [s["path"] for s in shards]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index_path} is malformed: {e!r}") from e
  if dtype not in DTYPES:
    raise ValueError(f"{index_path}: dtype={dtype!r} is not one of {DTYPES}")
  if vocab_size < 1 or vocab_size - 1 > np.iinfo(dtype).max:
    raise ValueError(f"{index_path}: vocab_size={vocab_size} does not fit dtype={dtype}")
  if sum(counts) != index.get("num_tokens"):
    raise ValueError(f"{index_path}: num_tokens={index.get('num_tokens')} but the shards "
                     f"hold {sum(counts)}")
  fmt, per_record = index.get("format", "flat"), index.get("record_tokens")
  if fmt not in FORMATS:
    raise ValueError(f"{index_path}: format={fmt!r} is not one of {FORMATS}")
  for k, (p, n) in enumerate(zip(paths, counts)):
    shard = inside(path, p, index_path)
    if not epath.Path(shard).is_file():
      raise FileNotFoundError(f"token shard {shard} (listed in {index_path}) does not exist")
    if fmt == "arrayrecord":
      _check_records(shard, n, per_record, k == len(paths) - 1, index_path)
      continue
    size, want = epath.Path(shard).stat().length, n * np.dtype(dtype).itemsize
    if size != want:
      raise ValueError(f"token shard {shard} has {size} bytes, {index_path} says {n} "
                       f"{dtype} tokens ({want} bytes): truncated or wrong dtype")
  return index


def _check_records(shard: str, n: int, per_record, last: bool, index_path: str) -> None:
  """An ArrayRecord shard holds ceil(n / record_tokens) records, all full but the directory's
  last one (so that token t is in record t // record_tokens)."""
  from array_record.python.array_record_module import ArrayRecordReader
  if not isinstance(per_record, int) or per_record < 1 or (n % per_record and not last):
    raise ValueError(f"{index_path}: record_tokens={per_record!r} does not divide the "
                     f"{n} tokens of {shard}, which is not the last shard")
  try:
    reader = ArrayRecordReader(shard)
    found = reader.num_records()
    reader.close()
  except Exception as e:  # array_record raises a bare RuntimeError/OSError on a bad file
    raise ValueError(f"token shard {shard} is not an ArrayRecord file: {e}") from None
  if found != -(-n // per_record):
    raise ValueError(f"token shard {shard} has {found} records, {index_path} says {n} tokens "
                     f"in records of {per_record}: truncated or not this directory's")


class _Records:
  """The ids of an ArrayRecord directory as one array-like: `size` and `[a:b]` slices, read
  record by record through grain's ArrayRecordDataSource."""

  def __init__(self, paths: list[str], dtype: str, n: int, per_record: int):
    import grain
    self.source, self.dtype, self.size, self.per = (
        grain.sources.ArrayRecordDataSource(paths), dtype, n, per_record)

  def __getitem__(self, window: slice) -> np.ndarray:
    a, b, _ = window.indices(self.size)
    if a >= b:
      return np.zeros(0, self.dtype)
    first, last = a // self.per, (b - 1) // self.per
    ids = np.concatenate([np.frombuffer(self.source[r], self.dtype)
                          for r in range(first, last + 1)])
    return ids[a - first * self.per:b - first * self.per]


def fingerprint(path) -> str:
  """The content fingerprint of a token directory: the one its index records, else (an index
  written before fingerprints) the same hash computed from its shards."""
  index = read_index(path)
  if "fingerprint" in index:
    return index["fingerprint"]
  digest = _hasher(index["dtype"], int(index["vocab_size"]))
  for shard in index["shards"]:  # an index without a fingerprint predates ArrayRecord: flat
    with epath.Path(inside(path, shard["path"], INDEX)).open("rb") as f:
      while block := f.read(1 << 24):
        digest.update(block)
  return f"sha256:{digest.hexdigest()}"


def _ids(shard: str, dtype: str, n: int) -> np.ndarray:
  """The `n` ids of a shard: memory-mapped when local, read whole from gs://."""
  if "://" in shard:
    return np.frombuffer(epath.Path(shard).read_bytes(), dtype, count=n)
  return np.memmap(shard, dtype, "r", shape=(n,))


class TokenFileSource:
  """Random-access source of windows from a token directory (see the module docstring)."""

  def __init__(self, path, seq_len: int, *, mode: str = "random", seed: int = 0,
               check_ids: bool = True):
    if mode not in ("random", "sequential"):
      raise ValueError(f"mode={mode!r} is not 'random' or 'sequential'")
    self.path, self.seq_len, self.index = str(path), seq_len, read_index(path)
    self.vocab_size = self.index["vocab_size"]
    listed = [s for s in self.index["shards"] if s["num_tokens"]]
    self.shard_paths = [os.path.join(path, s["path"]) for s in listed]
    if self.index.get("format") == "arrayrecord":  # one array-like over every record
      if "://" in self.path:
        raise ValueError(f"{self.path}: ArrayRecord token directories are read from local "
                         "disk (array_record has no gs:// reader): stage it, or prepare it with "
                         "--format=flat")
      self.shards = [_Records(self.shard_paths, self.index["dtype"], self.index["num_tokens"],
                              self.index["record_tokens"])]
      self.shard_paths = [self.path]
    else:
      self.shards = [_ids(p, self.index["dtype"], s["num_tokens"])
                     for p, s in zip(self.shard_paths, listed)]
    self.starts = np.cumsum([0] + [s.size for s in self.shards])
    if check_ids:
      self._scan_ids()
    n_tok, w = int(self.starts[-1]), seq_len + 1
    if n_tok < w:
      raise ValueError(f"{self.path} holds {n_tok} tokens, fewer than seq_len + 1 = {w}")
    self.num_windows, self.offset = n_tok // w, 0
    if mode == "random":
      self.num_windows = max(n_tok // w - 1, 1)
      self.offset = int(np.random.default_rng(seed).integers(n_tok - self.num_windows * w + 1))

  def _scan_ids(self):
    for name, shard in zip(self.shard_paths, self.shards):
      for i in range(0, shard.size, SCAN_CHUNK):
        top = int(shard[i:i + SCAN_CHUNK].max(initial=0))
        if top >= self.vocab_size:
          raise ValueError(f"token shard {name} contains id {top} >= vocab_size="
                           f"{self.vocab_size} of {os.path.join(self.path, INDEX)}")

  def check_compatible(self, model_vocab_size: int):
    """Errors unless every id of this directory is a valid id of a model with this vocab."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(f"{os.path.join(self.path, INDEX)} has vocab_size={self.vocab_size} "
                       f"({self.index['dtype']}), more than the model's {model_vocab_size}")

  def read(self, start: int, n: int) -> np.ndarray:
    """Tokens [start, start + n) of the concatenated stream, as int32."""
    out, s = [], int(np.searchsorted(self.starts, start, side="right")) - 1
    while n:
      at = start - self.starts[s]
      piece = self.shards[s][at:at + n]
      out.append(piece)
      start, n, s = start + piece.size, n - piece.size, s + 1
    return np.concatenate(out).astype(np.int32)

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < self.num_windows:
      raise IndexError(f"window {i} out of range [0, {self.num_windows}) for {self.path}")
    w = self.read(self.offset + i * (self.seq_len + 1), self.seq_len + 1)
    return {"inputs": w[:-1], "targets": w[1:], "mask": np.ones(self.seq_len, np.float32)}
