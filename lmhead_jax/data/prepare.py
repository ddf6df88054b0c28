"""Tokenizes text into token directories: `python -m lmhead_jax.data.prepare`.

    python -m lmhead_jax.data.prepare --out OUT [INPUT ...] [--stdlib] \
        (--tokenizer tokenizer.json | --train-bpe VOCAB_SIZE) [--val-fraction 0.01]

Inputs are .txt, .jsonl or .parquet files or directories of them; `--stdlib` adds the Python
standard library as a corpus that needs no download. OUT gets tokenizer.json, train/ and (with
--val-fraction) val/, token directories of `lmhead_jax.data.tokens`. Everything is checked
before any work, and the output is staged beside OUT and moved in at the end, so a failed run
leaves OUT as it was. Inputs, layout, the val split and the BPE: docs/INTERNALS.md.
"""

import argparse
import itertools
import json
import logging
import math
import os
import pathlib
import re
import secrets
import shutil
import socket
import sysconfig
import time
from collections.abc import Iterable, Iterator

import numpy as np
import tqdm
from pydoc_data import topics

from lmhead_jax.core.config import MAX_VOCAB_SIZE
from lmhead_jax.data.tokens import FORMATS, write_token_dir

EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SUFFIXES = (".txt", ".jsonl", ".parquet")
OUTPUTS = ("tokenizer.json", "train", "val")  # what prepare writes into OUT
log = logging.getLogger(__name__)


def stdlib_documents() -> Iterator[str]:
  """The pydoc topics, then every UTF-8 `*.py` file of the standard library (no site-packages)."""
  yield from (topics.topics[k] for k in sorted(topics.topics))
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for f in sorted(root.rglob("*.py")):
    if {"site-packages", "dist-packages"}.isdisjoint(f.relative_to(root).parts):
      try:
        yield f.read_text("utf-8")
      except UnicodeDecodeError:
        continue


def _text(value, where: str) -> str:
  """A document's text; anything else is an error naming `where`."""
  if not isinstance(value, str):
    raise ValueError(f"{where} is {value!r} ({type(value).__name__}), not a string")
  return value


def _parquet_texts(path: str, field: str) -> Iterator[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    raise ValueError(f"{path} has no column {field!r} (columns: {pf.schema_arrow.names})")
  rows = itertools.chain.from_iterable(
      batch.column(0).to_pylist() for batch in pf.iter_batches(columns=[field]))
  for n, text in enumerate(rows):
    yield _text(text, f"{path}: row {n} of column {field!r}")


def _jsonl_texts(path: str, field: str) -> Iterator[str]:
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
        doc = json.loads(line) if line.strip() else None
      except ValueError as e:  # UnicodeDecodeError, JSONDecodeError
        raise ValueError(f"{path}:{n}: not a UTF-8 JSON line ({e})") from None
      if doc is None:
        continue
      if not isinstance(doc, dict) or field not in doc:
        raise ValueError(f"{path}:{n}: no JSON object with a {field!r} field")
      yield _text(doc[field], f"{path}:{n}: field {field!r}")


def file_documents(path: str, text_field: str = "text") -> Iterator[str]:
  """The documents of one input file, by suffix."""
  if path.endswith(".txt"):
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"input {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    yield text
  elif path.endswith(".jsonl"):
    yield from _jsonl_texts(path, text_field)
  elif path.endswith(".parquet"):
    yield from _parquet_texts(path, text_field)
  else:
    raise ValueError(f"input {path} is not one of {SUFFIXES}")


def _input_files(inputs: Iterable[str]) -> list[str]:
  """The input files, directories expanded; each must exist, have a known suffix, not be empty."""
  files = []
  for p in map(str, inputs):
    if os.path.isdir(p):
      files += sorted(str(f) for f in pathlib.Path(p).rglob("*")
                      if f.suffix in SUFFIXES and f.is_file())
    else:
      files.append(p)
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f"input {f} does not exist")
    if not f.endswith(SUFFIXES):
      raise ValueError(f"input {f} is not one of {SUFFIXES}")
    if not os.path.getsize(f):
      raise ValueError(f"input {f} is empty")
  return files


def _capped(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
  left = max_chars
  for doc in docs:
    if left is not None:
      if left <= 0:
        return
      doc, left = doc[:left], left - len(doc)
    yield doc


def _is_val(i: int, val_fraction: float) -> bool:
  return int((i + 1) * val_fraction) > int(i * val_fraction)


def _documents_needed(val_fraction: float) -> int:
  """How many documents give every split one: 1, or up to the first val document."""
  if not val_fraction:
    return 1  # document 0 is a train one
  start = max(math.ceil(1 / val_fraction) - 2, 0)  # the first val one is near 1/f - 1
  return 1 + next(i for i in itertools.count(start) if _is_val(i, val_fraction))


def train_bpe(docs: Iterable[str], vocab_size: int, progress: bool = True):
  """A byte-level BPE tokenizer with `<|endoftext|>`, trained on `docs`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKENS[0]], show_progress=progress,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(docs, trainer)
  return tok


def eos_id(tok, name: str, eos_token: str | None = None) -> int:
  """The id of `eos_token`, or of the first known EOS token the tokenizer has."""
  candidates = (eos_token,) if eos_token else EOS_TOKENS
  for t in candidates:
    if (i := tok.token_to_id(t)) is not None:
      return i
  raise ValueError(f"tokenizer {name} has no EOS token among {candidates}; pass --eos-token")


def _encode(tok, docs: Iterable[str], eos: int, bar: tqdm.tqdm) -> Iterator[np.ndarray]:
  tokens = 0
  for batch in itertools.batched(docs, 256):
    encs = tok.encode_batch(list(batch), add_special_tokens=False)
    ids = np.concatenate([np.asarray(e.ids + [eos], np.int64) for e in encs])
    tokens += ids.size
    bar.update(len(batch))
    bar.set_postfix(tokens=tokens, refresh=False)
    yield ids


def _load_tokenizer(path: str):
  from tokenizers import Tokenizer

  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer {path} does not exist")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception
    raise ValueError(f"tokenizer {path} is not a tokenizers tokenizer.json: {e}") from None


def _check_flags(train_bpe_vocab: int | None, max_chars: int | None, val_fraction: float,
                 shard_tokens: int):
  """Refuses flag values outside their range, naming the flag. The --train-bpe bound is the
  model's: tokenizers' BpeTrainer allocates ~70 bytes per requested id up front (2**31 asks for
  141 GB and aborts the process inside Rust)."""
  if train_bpe_vocab is not None and not 257 <= train_bpe_vocab <= MAX_VOCAB_SIZE:
    raise ValueError(f"--train-bpe {train_bpe_vocab}: must be in [257, {MAX_VOCAB_SIZE}] (at "
                     f"least 256 bytes + 1 EOS id, at most model.vocab_size's bound)")
  if max_chars is not None and max_chars < 1:
    raise ValueError(f"--max-chars {max_chars}: must be at least 1 (or not given: no cap)")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
  if shard_tokens < 1:
    raise ValueError(f"--shard-tokens {shard_tokens}: must be at least 1 token per shard")


def _alive(pid: int) -> bool:
  """Whether process `pid` exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, as another user's
    pass
  return True


def _new_stage(out: pathlib.Path) -> pathlib.Path:
  """A new staging directory `.OUT.tmp-HOST-PID-RANDOM` in OUT's nearest existing ancestor, with
  the umask's mode; first removes (with a warning) those of this host whose process is gone."""
  anchor = out.parent
  while not anchor.is_dir():
    anchor = anchor.parent
  host, ours = socket.gethostname(), f".{out.name}.tmp-"
  stale = re.compile(rf"{re.escape(ours + host)}-(\d{{1,9}})-[0-9a-f]{{8}}")
  for d in anchor.iterdir():
    if (m := stale.fullmatch(d.name)) and d.is_dir() and not _alive(int(m[1])):
      log.warning("removing %s: the staging directory of an unfinished prepare into %s "
                  "(process %s is gone)", d, out, m[1])
      shutil.rmtree(d, ignore_errors=True)
  stage = anchor / f"{ours}{host}-{os.getpid()}-{secrets.token_hex(4)}"
  stage.mkdir()
  return stage


def _publish(stage: pathlib.Path, out: pathlib.Path):
  """Moves the finished stage to `out`, replacing out's tokenizer.json, train/ and val/."""
  out.parent.mkdir(parents=True, exist_ok=True)
  if not out.exists():
    stage.rename(out)
    return
  for name in OUTPUTS:
    old = out / name
    if old.is_dir() and not old.is_symlink():
      shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
      old.unlink()
    if (stage / name).exists():
      (stage / name).rename(old)


def prepare(out_dir, inputs: Iterable[str] = (), *, tokenizer: str | None = None,
            train_bpe_vocab: int | None = None, stdlib: bool = False,
            max_chars: int | None = None, text_field: str = "text", val_fraction: float = 0.0,
            eos_token: str | None = None, shard_tokens: int = 1 << 28,
            format: str = "flat", progress: bool = True) -> dict[str, dict]:
  """Writes OUT/tokenizer.json, OUT/train/ and (val_fraction > 0) OUT/val/; returns the indexes.

  The inputs, the tokenizer and the document count are checked first; everything is written
  beside OUT, then moved in, so an error leaves OUT as it was.
  """
  if (tokenizer is None) == (train_bpe_vocab is None):
    raise ValueError("pass exactly one of tokenizer= (a tokenizer.json) or train_bpe_vocab=")
  _check_flags(train_bpe_vocab, max_chars, val_fraction, shard_tokens)
  if format not in FORMATS:
    raise ValueError(f"--format {format}: must be one of {', '.join(FORMATS)}")
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and not out.is_dir():
    raise ValueError(f"output {out} exists and is not a directory")
  files = _input_files(inputs)
  if not files and not stdlib:
    raise ValueError("no input documents: pass input files or directories, or stdlib=True")
  if tokenizer is None:
    if eos_token not in (None, EOS_TOKENS[0]):
      raise ValueError(f"--eos-token {eos_token}: a trained BPE's EOS token is {EOS_TOKENS[0]}")
  else:
    tok = _load_tokenizer(str(tokenizer))
    eos = eos_id(tok, tokenizer, eos_token)

  def documents(split: str | None = None) -> Iterator[str]:
    docs = _capped(itertools.chain(
        *(file_documents(f, text_field) for f in files),
        stdlib_documents() if stdlib else ()), max_chars)
    return (d for i, d in enumerate(docs)
            if split is None or _is_val(i, val_fraction) == (split == "val"))

  need = _documents_needed(val_fraction)
  if not (n := sum(1 for _ in itertools.islice(documents(), need))):
    raise ValueError("the input holds no documents")
  if n < need:
    raise ValueError(f"val_fraction={val_fraction} needs at least {need} documents for a val "
                     f"split, the input holds {n} (a .txt file is one document, a .jsonl line one)")

  stage = _new_stage(out)
  try:
    tok_path = stage / "tokenizer.json"
    if tokenizer is None:
      tok = train_bpe(documents("train"), train_bpe_vocab, progress)
      tok.save(str(tok_path))
      eos = eos_id(tok, str(out / "tokenizer.json"), eos_token)
    else:
      shutil.copyfile(tokenizer, tok_path)
    indexes = {}
    for split in ("train", "val") if val_fraction else ("train",):
      with tqdm.tqdm(desc=f"tokenizing {split}", unit="doc", disable=not progress) as bar:
        indexes[split] = write_token_dir(
            stage / split, _encode(tok, documents(split), eos, bar),
            vocab_size=tok.get_vocab_size(), tokenizer="../tokenizer.json",
            shard_tokens=shard_tokens, format=format)
    _publish(stage, out)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return indexes


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(
      prog="python -m lmhead_jax.data.prepare", description=__doc__.split("\n\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="*", help=".txt files (one document each), .jsonl (one a "
                      "line), .parquet (one a row), or directories of those")
  parser.add_argument("--out", required=True, help="output directory")
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--tokenizer", help="a Hugging Face tokenizers tokenizer.json")
  group.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this vocab size on the train documents")
  parser.add_argument("--stdlib", action="store_true",
                      help="add the Python standard library's source and pydoc topics")
  parser.add_argument("--max-chars", type=int, help="cap on the total characters of text")
  parser.add_argument("--text-field", default="text",
                      help="jsonl field / parquet column (default: %(default)s)")
  parser.add_argument("--val-fraction", type=float, default=0.0,
                      help="fraction of the documents (not tokens) written to OUT/val/; needs at "
                      "least 1/f documents (default: %(default)s, no val split)")
  parser.add_argument("--eos-token", help=f"document separator token (default: the first of "
                      f"{', '.join(EOS_TOKENS)} in the tokenizer)")
  parser.add_argument("--shard-tokens", type=int, default=1 << 28,
                      help="tokens per shard (default: %(default)s)")
  parser.add_argument("--format", default="flat", choices=FORMATS,
                      help="flat: raw ids, memory-mapped, readable from gs://; arrayrecord: "
                      "grain's ArrayRecord files, local (default: %(default)s)")
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    indexes = prepare(
        args.out, args.inputs, tokenizer=args.tokenizer, train_bpe_vocab=args.train_bpe,
        stdlib=args.stdlib, max_chars=args.max_chars, text_field=args.text_field,
        val_fraction=args.val_fraction, eos_token=args.eos_token, shard_tokens=args.shard_tokens,
        format=args.format)
  except (ValueError, OSError, ImportError) as e:
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  for split, index in indexes.items():
    print(f"{os.path.join(args.out, split)}: {index['num_tokens']} tokens, "
          f"vocab_size={index['vocab_size']}, {len(index['shards'])} shard(s)")
  vocab = indexes["train"]["vocab_size"]
  if args.train_bpe and vocab < args.train_bpe:
    print(f"note: --train-bpe {args.train_bpe} gave a vocabulary of only {vocab} ids (the corpus "
          f"ran out of merges); the data's vocab_size is {vocab}")
  print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  main()
