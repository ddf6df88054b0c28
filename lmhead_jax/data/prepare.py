"""Tokenizes text into token directories: `python -m lmhead_jax.data.prepare`.

    python -m lmhead_jax.data.prepare --out OUT [INPUT ...] [--stdlib] \\
        (--tokenizer tokenizer.json | --train-bpe VOCAB_SIZE) [--val-fraction 0.01]

Inputs are `.txt` files (one document per file), `.jsonl` (one document per line, field
`--text-field`), `.parquet` (column `--text-field`; needs pyarrow) or directories of those
(searched recursively, in sorted order). `--stdlib` adds a real corpus that needs no download:
the `pydoc_data` topics, then the standard library's own `*.py` files, in sorted order.
`--max-chars` caps the total text. Every document is followed by the EOS id.

Output layout::

  OUT/tokenizer.json   the tokenizer: a copy of --tokenizer, or the BPE trained by --train-bpe
  OUT/train/           a token directory (lmhead_jax.data.tokens); its index names the
                       tokenizer as "../tokenizer.json"
  OUT/val/             with --val-fraction f > 0: documents i with floor((i+1) f) > floor(i f),
                       i.e. every (1/f)-th document; the others go to OUT/train/

`--train-bpe V` trains a byte-level BPE with V ids (including `<|endoftext|>`) on the train
documents only. The output depends only on the inputs and the flags.
"""

import argparse
import itertools
import json
import os
import pathlib
import shutil
import sysconfig
import time
from collections.abc import Iterable, Iterator

import numpy as np
import tqdm
from pydoc_data import topics

from lmhead_jax.data.tokens import write_token_dir

EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SUFFIXES = (".txt", ".jsonl", ".parquet")


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


def _parquet_texts(path: str, field: str) -> Iterator[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    raise ValueError(f"{path} has no column {field!r} (columns: {pf.schema_arrow.names})")
  for batch in pf.iter_batches(columns=[field]):
    yield from batch.column(0).to_pylist()


def _jsonl_texts(path: str, field: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)[field]
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n}: no JSON object with a {field!r} field ({e!r})") from e


def file_documents(path: str, text_field: str = "text") -> Iterator[str]:
  """The documents of one input file, by suffix."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path} does not exist")
  if path.endswith(".txt"):
    with open(path, encoding="utf-8", newline="") as f:
      yield f.read()
  elif path.endswith(".jsonl"):
    yield from _jsonl_texts(path, text_field)
  elif path.endswith(".parquet"):
    yield from _parquet_texts(path, text_field)
  else:
    raise ValueError(f"input {path} is not one of {SUFFIXES}")


def _input_files(inputs: Iterable[str]) -> list[str]:
  files = []
  for p in map(str, inputs):
    if os.path.isdir(p):
      files += sorted(str(f) for f in pathlib.Path(p).rglob("*") if f.suffix in SUFFIXES)
    else:
      files.append(p)
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


def train_bpe(docs: Iterable[str], vocab_size: int, progress: bool = True):
  """A byte-level BPE tokenizer with `<|endoftext|>`, trained on `docs`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 257:
    raise ValueError(f"--train-bpe {vocab_size}: needs at least 256 bytes + 1 EOS id")
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


def prepare(out_dir, inputs: Iterable[str] = (), *, tokenizer: str | None = None,
            train_bpe_vocab: int | None = None, stdlib: bool = False,
            max_chars: int | None = None, text_field: str = "text", val_fraction: float = 0.0,
            eos_token: str | None = None, shard_tokens: int = 1 << 28,
            progress: bool = True) -> dict[str, dict]:
  """Writes OUT/tokenizer.json, OUT/train/ and (val_fraction > 0) OUT/val/; returns the indexes."""
  from tokenizers import Tokenizer

  if (tokenizer is None) == (train_bpe_vocab is None):
    raise ValueError("pass exactly one of tokenizer= (a tokenizer.json) or train_bpe_vocab=")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
  files = _input_files(inputs)
  if not files and not stdlib:
    raise ValueError("no input documents: pass input files or directories, or stdlib=True")

  def documents(split: str) -> Iterator[str]:
    docs = _capped(itertools.chain(
        *(file_documents(f, text_field) for f in files),
        stdlib_documents() if stdlib else ()), max_chars)
    return (d for i, d in enumerate(docs) if _is_val(i, val_fraction) == (split == "val"))

  os.makedirs(out_dir, exist_ok=True)
  tok_path = os.path.join(out_dir, "tokenizer.json")
  if tokenizer is None:
    tok = train_bpe(documents("train"), train_bpe_vocab, progress)
    tok.save(tok_path)
  else:
    if not os.path.isfile(tokenizer):
      raise FileNotFoundError(f"tokenizer {tokenizer} does not exist")
    tok = Tokenizer.from_file(str(tokenizer))
    if os.path.abspath(tokenizer) != os.path.abspath(tok_path):
      shutil.copyfile(tokenizer, tok_path)
  eos = eos_id(tok, tokenizer or tok_path, eos_token)

  indexes = {}
  for split in ("train", "val") if val_fraction else ("train",):
    with tqdm.tqdm(desc=f"tokenizing {split}", unit="doc", disable=not progress) as bar:
      index = write_token_dir(
          os.path.join(out_dir, split), _encode(tok, documents(split), eos, bar),
          vocab_size=tok.get_vocab_size(), tokenizer="../tokenizer.json",
          shard_tokens=shard_tokens)
    if not index["num_tokens"]:
      raise ValueError(f"the {split} split of {out_dir} is empty: too few documents for "
                       f"val_fraction={val_fraction}")
    indexes[split] = index
  return indexes


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(
      prog="python -m lmhead_jax.data.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("inputs", nargs="*", help=".txt / .jsonl / .parquet files or directories")
  parser.add_argument("--out", required=True, help="output directory")
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--tokenizer", help="a Hugging Face tokenizers tokenizer.json")
  group.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this vocab size on the train documents")
  parser.add_argument("--stdlib", action="store_true",
                      help="add the Python standard library's source and pydoc topics")
  parser.add_argument("--max-chars", type=int, help="cap on the total characters of text")
  parser.add_argument("--text-field", default="text", help="jsonl field / parquet column")
  parser.add_argument("--val-fraction", type=float, default=0.0,
                      help="fraction of documents written to OUT/val/")
  parser.add_argument("--eos-token", help="document separator token (default: auto)")
  parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard")
  args = parser.parse_args(argv)
  t0 = time.time()
  indexes = prepare(
      args.out, args.inputs, tokenizer=args.tokenizer, train_bpe_vocab=args.train_bpe,
      stdlib=args.stdlib, max_chars=args.max_chars, text_field=args.text_field,
      val_fraction=args.val_fraction, eos_token=args.eos_token, shard_tokens=args.shard_tokens)
  for split, index in indexes.items():
    print(f"{os.path.join(args.out, split)}: {index['num_tokens']} tokens, "
          f"vocab_size={index['vocab_size']}, {len(index['shards'])} shard(s)")
  print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  main()
