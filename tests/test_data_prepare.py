import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmhead_jax.data.prepare import prepare
from lmhead_jax.data.tokens import TokenFileSource, read_index

TXT = ["Hello world!\n\nA second paragraph, with  two spaces.\n",
       "Ünïcödé: naïve café — 東京 🚀\ttab\r\nCRLF line\n",
       "def f(x):\n    return x ** 2  # code\n"]
JSONL = ["first json document", "", "second one\nwith a newline", "  leading spaces"]


def _corpus(root, parquet=False):
  """Writes a corpus; returns its documents in the order prepare reads them (sorted paths)."""
  root.mkdir()
  (root / "a.txt").write_text(TXT[0], encoding="utf-8")
  with open(root / "b.jsonl", "w", encoding="utf-8") as f:
    for t in JSONL:
      f.write(json.dumps({"text": t, "id": 1}) + "\n\n")
  (root / "c.txt").write_bytes(TXT[1].encode())  # keeps the \r\n
  (root / "ignored.csv").write_text("not read")
  (root / "sub").mkdir()
  (root / "sub" / "d.txt").write_text(TXT[2], encoding="utf-8")
  docs = [TXT[0], *JSONL, TXT[1]]
  if parquet:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["parquet doc ✓", "another"], "n": [1, 2]}),
                   root / "c2.parquet", row_group_size=1)
    docs += ["parquet doc ✓", "another"]
  return docs + [TXT[2]]


def _decoded_docs(token_dir, tok_path, eos_token):
  tok = Tokenizer.from_file(str(tok_path))
  index = read_index(token_dir)
  assert index["tokenizer"] == "../tokenizer.json"
  assert index["vocab_size"] == tok.get_vocab_size()
  ids = TokenFileSource(token_dir, 1, mode="sequential").read(0, index["num_tokens"])
  eos = tok.token_to_id(eos_token)
  assert ids[-1] == eos
  cuts = np.flatnonzero(ids == eos)
  return [tok.decode(d[:-1].tolist(), skip_special_tokens=False)
          for d in np.split(ids, cuts + 1)[:-1]]


def test_trained_bpe_round_trips_with_val_split(tmp_path):
  docs = _corpus(tmp_path / "in", parquet=True)
  assert len(docs) == 9
  out = tmp_path / "out"
  indexes = prepare(out, [tmp_path / "in"], train_bpe_vocab=300, val_fraction=0.25,
                    progress=False)
  assert set(indexes) == {"train", "val"}
  assert indexes["train"]["vocab_size"] <= 300
  val = [docs[3], docs[7]]  # floor(0.25 (i+1)) > floor(0.25 i) at i = 3, 7 (of 0..8)
  assert _decoded_docs(out / "val", out / "tokenizer.json", "<|endoftext|>") == val
  train = [d for i, d in enumerate(docs) if i not in (3, 7)]
  assert _decoded_docs(out / "train", out / "tokenizer.json", "<|endoftext|>") == train


def test_prepare_is_deterministic(tmp_path):
  _corpus(tmp_path / "in")
  for name in ("o1", "o2"):
    prepare(tmp_path / name, [tmp_path / "in"], train_bpe_vocab=280, val_fraction=0.3,
            progress=False)
  files = sorted(str(p.relative_to(tmp_path / "o1")) for p in (tmp_path / "o1").rglob("*"))
  assert "train/shard_00000.bin" in files and "tokenizer.json" in files
  for f in files:
    if os.path.isfile(tmp_path / "o1" / f):
      assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f


def _own_tokenizer(path, special):
  """A tokenizer.json built directly with `tokenizers` (not by prepare)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      ["some training text for a tokenizer", "δ ε ζ"] * 20,
      trainers.BpeTrainer(vocab_size=290, special_tokens=special, show_progress=False,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path))
  return path


def test_loaded_tokenizer_round_trips(tmp_path):
  docs = _corpus(tmp_path / "in")
  tok_path = _own_tokenizer(tmp_path / "my_tokenizer.json", ["<pad>", "</s>"])
  out = tmp_path / "out"
  prepare(out, [tmp_path / "in"], tokenizer=str(tok_path), shard_tokens=64, progress=False)
  assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
  assert not (out / "val").exists()
  assert len(read_index(out / "train")["shards"]) > 1
  assert _decoded_docs(out / "train", out / "tokenizer.json", "</s>") == docs


def test_cli_stdlib_corpus(tmp_path):
  from pydoc_data import topics  # ground truth: the first documents of the corpus

  expected, left = [], 20_000
  for k in sorted(topics.topics):
    expected.append(topics.topics[k][:left])
    left -= len(expected[-1])
    if not left:
      break
  out = tmp_path / "std"
  r = subprocess.run([sys.executable, "-m", "lmhead_jax.data.prepare", "--stdlib",
                      "--max-chars", "20000", "--train-bpe", "400", "--out", str(out)],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "tokenizing train" in r.stderr and f"{out / 'train'}:" in r.stdout
  assert _decoded_docs(out / "train", out / "tokenizer.json", "<|endoftext|>") == expected


def test_bad_inputs(tmp_path):
  _corpus(tmp_path / "in")
  kw = dict(train_bpe_vocab=300, progress=False)
  with pytest.raises(FileNotFoundError, match=f"input {tmp_path / 'nope.txt'} does not"):
    prepare(tmp_path / "o", [tmp_path / "nope.txt"], **kw)
  with pytest.raises(ValueError, match=f"input {tmp_path / 'in' / 'ignored.csv'} is not one"):
    prepare(tmp_path / "o", [tmp_path / "in" / "ignored.csv"], **kw)
  with pytest.raises(ValueError, match=f"{tmp_path / 'in' / 'b.jsonl'}:1: .*'body'"):
    prepare(tmp_path / "o", [tmp_path / "in"], text_field="body", **kw)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": \n')
  with pytest.raises(ValueError, match=f"{bad}:2: "):
    prepare(tmp_path / "o", [bad], **kw)
  with pytest.raises(ValueError, match="the val split .* is empty"):
    prepare(tmp_path / "o", [tmp_path / "in" / "a.txt"], val_fraction=0.5, **kw)
  with pytest.raises(ValueError, match="exactly one of"):
    prepare(tmp_path / "o", [tmp_path / "in"], progress=False)
  with pytest.raises(ValueError, match="no input documents"):
    prepare(tmp_path / "o", [], **kw)
  with pytest.raises(ValueError, match="--train-bpe 200: needs at least"):
    prepare(tmp_path / "o", [tmp_path / "in"], train_bpe_vocab=200, progress=False)
  no_eos = _own_tokenizer(tmp_path / "no_eos.json", ["<pad>"])
  with pytest.raises(ValueError, match=f"tokenizer {no_eos} has no EOS token"):
    prepare(tmp_path / "o", [tmp_path / "in"], tokenizer=str(no_eos), progress=False)
  with pytest.raises(FileNotFoundError, match=f"tokenizer {tmp_path / 'x.json'} does not"):
    prepare(tmp_path / "o", [tmp_path / "in"], tokenizer=str(tmp_path / "x.json"))


def test_parquet_errors(tmp_path, monkeypatch):
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  path = tmp_path / "t.parquet"
  pq.write_table(pa.table({"body": ["x"]}), path)
  with pytest.raises(ValueError, match=f"{path} has no column 'text'"):
    prepare(tmp_path / "o", [path], train_bpe_vocab=300, progress=False)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match=f"reading {path} needs pyarrow"):
    prepare(tmp_path / "o", [path], train_bpe_vocab=300, progress=False)
