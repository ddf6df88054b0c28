import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmhead_jax.data import prepare as prepare_module
from lmhead_jax.data import tokens
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


def test_cli_arrayrecord_format_holds_the_same_documents(tmp_path):
  outs = {}
  for fmt in ("flat", "arrayrecord"):
    outs[fmt] = tmp_path / fmt
    r = subprocess.run([sys.executable, "-m", "lmhead_jax.data.prepare", "--stdlib",
                        "--max-chars", "20000", "--train-bpe", "400", "--format", fmt,
                        "--shard-tokens", "5000", "--out", str(outs[fmt])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
  index = read_index(outs["arrayrecord"] / "train")
  assert index["format"] == "arrayrecord" and len(index["shards"]) > 1
  assert index["fingerprint"] == read_index(outs["flat"] / "train")["fingerprint"]
  docs = [_decoded_docs(outs[f] / "train", outs[f] / "tokenizer.json", "<|endoftext|>")
          for f in outs]
  assert docs[0] == docs[1] and len(docs[0]) > 1
  r = subprocess.run([sys.executable, "-m", "lmhead_jax.data.prepare", "--stdlib",
                      "--train-bpe", "400", "--format", "tfrecord", "--out", str(tmp_path / "x")],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "invalid choice: 'tfrecord'" in r.stderr


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
  with pytest.raises(ValueError, match="exactly one of"):
    prepare(tmp_path / "o", [tmp_path / "in"], progress=False)
  with pytest.raises(ValueError, match="no input documents"):
    prepare(tmp_path / "o", [], **kw)
  with pytest.raises(ValueError, match=r"--train-bpe 200: must be in \[257, 16777216\]"):
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


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lmhead_jax.data.prepare", *map(str, args)],
                        capture_output=True, text=True, timeout=120)


def _tree(root: Path) -> dict:
  """Every file under root -> its bytes ({} if root does not exist)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _refused_cleanly(tmp_path, match, inputs, **kw):
  """prepare refuses with `match`, and leaves neither OUT nor anything beside it."""
  before = sorted(tmp_path.iterdir())
  with pytest.raises(ValueError, match=match):
    prepare(tmp_path / "out", inputs, progress=False, **kw)
  assert sorted(tmp_path.iterdir()) == before


def test_empty_txt_refused_before_any_output(tmp_path):
  _corpus(tmp_path / "in")
  (tmp_path / "in" / "sub" / "empty.txt").write_text("")
  empty = tmp_path / "in" / "sub" / "empty.txt"
  for inputs in ([empty], [tmp_path / "in"]):
    _refused_cleanly(tmp_path, f"input {empty} is empty", inputs, train_bpe_vocab=300)
  blank = tmp_path / "blank.jsonl"
  blank.write_text("\n\n")
  _refused_cleanly(tmp_path, "the input holds no documents", [blank], train_bpe_vocab=300)
  r = _cli("--out", tmp_path / "out", "--train-bpe", "300", empty)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip() == f"python -m lmhead_jax.data.prepare: error: input {empty} is empty"
  assert not (tmp_path / "out").exists()


def test_tokenizer_that_is_not_json(tmp_path):
  _corpus(tmp_path / "in")
  bad = tmp_path / "tok.json"
  bad.write_text("<html>not a tokenizer</html>")
  _refused_cleanly(tmp_path, f"tokenizer {bad} is not a tokenizers tokenizer.json: expected",
                   [tmp_path / "in"], tokenizer=str(bad))
  r = _cli("--out", tmp_path / "out", "--tokenizer", bad, tmp_path / "in")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert f"error: tokenizer {bad} is not a tokenizers tokenizer.json" in r.stderr
  assert not (tmp_path / "out").exists()


def test_bad_documents_name_the_file_and_line(tmp_path):
  txt = tmp_path / "latin1.txt"
  txt.write_bytes("caf\xe9 au lait".encode("latin-1"))
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  numbers = tmp_path / "numbers.jsonl"
  numbers.write_text('{"text": "ok"}\n\n{"text": 5}\n')
  nulls = tmp_path / "nulls.jsonl"
  nulls.write_text('{"text": null}\n')
  listed = tmp_path / "list.jsonl"
  listed.write_text('["text"]\n')
  for path, match in [(txt, f"input {txt} is not UTF-8 text: invalid continuation byte at byte 3"),
                      (jsonl, f"{jsonl}:2: not a UTF-8 JSON line"),
                      (numbers, f"{numbers}:3: field 'text' is 5 \\(int\\), not a string"),
                      (nulls, f"{nulls}:1: field 'text' is None"),
                      (listed, f"{listed}:1: no JSON object with a 'text' field")]:
    _refused_cleanly(tmp_path, match, [path], train_bpe_vocab=300)
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  parquet = tmp_path / "ints.parquet"
  pq.write_table(pa.table({"text": [1, 2]}), parquet)
  _refused_cleanly(tmp_path, f"{parquet}: row 0 of column 'text' is 1 \\(int\\), not a string",
                   [parquet], train_bpe_vocab=300)


def test_val_split_of_too_few_documents_refused_before_any_work(tmp_path, monkeypatch):
  _corpus(tmp_path / "in")
  monkeypatch.setattr(prepare_module, "train_bpe", lambda *a: pytest.fail("trained a BPE"))
  _refused_cleanly(tmp_path, r"val_fraction=0.5 needs at least 2 documents for a val split, the "
                   r"input holds 1 \(a .txt file is one document", [tmp_path / "in" / "a.txt"],
                   train_bpe_vocab=300, val_fraction=0.5)
  # 7 documents (blank jsonl lines are none); the first val one is document 9 for f = 0.1
  _refused_cleanly(tmp_path, "needs at least 10 documents .* holds 7", [tmp_path / "in"],
                   train_bpe_vocab=300, val_fraction=0.1)
  help_text = " ".join(_cli("--help").stdout.split())
  assert ".txt files (one document each)" in help_text and "at least 1/f documents" in help_text
  assert "(default: 0.0, no val split)" in help_text and "(default: text)" in help_text


@pytest.mark.parametrize("previous", [False, True])
def test_a_failed_run_leaves_no_partial_output(tmp_path, previous):
  """A bad document deep in the input is found while shards are written: OUT stays as it was."""
  docs = _corpus(tmp_path / "in")
  tok = str(_own_tokenizer(tmp_path / "tok.json", ["</s>"]))
  out = tmp_path / "out"
  if previous:
    prepare(out, [tmp_path / "in"], tokenizer=tok, val_fraction=0.5, progress=False)
    (out / "notes.md").write_text("mine")
  before, listing = _tree(out), sorted(tmp_path.iterdir())
  with open(tmp_path / "in" / "b.jsonl", "a") as f:
    f.write('{"text": 5}\n')
  with pytest.raises(ValueError, match=f"{tmp_path / 'in' / 'b.jsonl'}:9: field 'text' is 5"):
    prepare(out, [tmp_path / "in"], tokenizer=tok, shard_tokens=16, progress=False)
  assert _tree(out) == before and sorted(tmp_path.iterdir()) == listing
  # A successful run replaces tokenizer.json, train/ and an old val/, and keeps other files.
  (tmp_path / "in" / "b.jsonl").unlink()
  prepare(out, [tmp_path / "in"], tokenizer=tok, progress=False)
  assert sorted(p.name for p in out.iterdir()) == ["notes.md"] * previous + ["tokenizer.json",
                                                                             "train"]
  assert _decoded_docs(out / "train", out / "tokenizer.json", "</s>") == [docs[0], *docs[5:]]
  assert not list(tmp_path.glob(".out.tmp-*"))


def test_train_bpe_that_runs_out_of_merges_reports_the_real_vocab(tmp_path):
  (tmp_path / "a.txt").write_text("tiny corpus, tiny corpus, few words " * 20)
  out = tmp_path / "out"
  r = _cli("--out", out, "--train-bpe", "512", tmp_path / "a.txt")
  assert r.returncode == 0, r.stderr
  real = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
  assert 257 <= real < 512
  assert read_index(out / "train")["vocab_size"] == real
  assert (f"note: --train-bpe 512 gave a vocabulary of only {real} ids (the corpus ran out of "
          f"merges); the data's vocab_size is {real}") in r.stdout


@pytest.mark.parametrize("flag", ["0", "-1"])
def test_non_positive_shard_tokens_refused_in_one_line(tmp_path, flag):
  """It used to write empty shards forever."""
  (tmp_path / "a.txt").write_text("some text")
  r = subprocess.run([sys.executable, "-m", "lmhead_jax.data.prepare", "--out", tmp_path / "out",
                      "--train-bpe", "300", "--shard-tokens", flag, tmp_path / "a.txt"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 1 and r.stderr == (f"python -m lmhead_jax.data.prepare: error: "
                                            f"--shard-tokens {flag}: must be at least 1 token "
                                            f"per shard\n")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_train_bpe_beyond_the_bound_refused_before_any_work(tmp_path):
  """tokenizers allocates ~70 bytes per requested id: 2**31 aborted the process inside Rust and
  left the staging directory behind."""
  (tmp_path / "a.txt").write_text("some text")
  r = _cli("--out", tmp_path / "out", "--train-bpe", 2**31, tmp_path / "a.txt")
  assert r.returncode == 1 and r.stderr == (
      "python -m lmhead_jax.data.prepare: error: --train-bpe 2147483648: must be in [257, "
      "16777216] (at least 256 bytes + 1 EOS id, at most model.vocab_size's bound)\n")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
  _refused_cleanly(tmp_path, r"--train-bpe 16777217: must be in \[257, 16777216\]",
                   [tmp_path / "a.txt"], train_bpe_vocab=2**24 + 1)
  index = prepare(tmp_path / "out", [tmp_path / "a.txt"], train_bpe_vocab=2**24,
                  progress=False)["train"]  # the bound itself trains (the corpus's few merges)
  assert 257 < index["vocab_size"] < 300


@pytest.mark.parametrize("kw, match", [
    (dict(max_chars=0), "--max-chars 0: must be at least 1"),
    (dict(max_chars=-5), "--max-chars -5: must be at least 1"),
    (dict(val_fraction=1.0), r"--val-fraction 1.0: must be in \[0, 1\)"),
    (dict(val_fraction=-0.1), r"--val-fraction -0.1: must be in \[0, 1\)"),
    (dict(val_fraction=float("nan")), r"--val-fraction nan: must be in \[0, 1\)")])
def test_flag_values_out_of_range_name_the_flag(tmp_path, kw, match):
  _corpus(tmp_path / "in")
  _refused_cleanly(tmp_path, match, [tmp_path / "in"], train_bpe_vocab=300, **kw)


@pytest.mark.parametrize("umask, out", [(0o022, "out"), (0o027, "new/parent/out")])
def test_new_out_gets_the_umask_mode(tmp_path, umask, out):
  (tmp_path / "a.txt").write_text("some text")
  old = os.umask(umask)
  try:
    prepare(tmp_path / out, [tmp_path / "a.txt"], train_bpe_vocab=300, progress=False)
  finally:
    os.umask(old)
  for d in (tmp_path / out, tmp_path / out / "train"):
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
  assert stat.S_IMODE((tmp_path / out / "tokenizer.json").stat().st_mode) == 0o666 & ~umask


def test_staging_dir_of_a_killed_run_is_removed(tmp_path, caplog):
  """A prepare killed mid-run leaves its staging directory; the next run into OUT removes it,
  but not one of a live process or of another host."""
  (tmp_path / "a.txt").write_text("some text")
  out = tmp_path / "out"
  run = subprocess.Popen([sys.executable, "-m", "lmhead_jax.data.prepare", "--stdlib",
                          "--train-bpe", "30000", "--out", out], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 60
    while not (stale := list(tmp_path.glob(".out.tmp-*"))):
      assert run.poll() is None and time.monotonic() < deadline, "no staging directory appeared"
      time.sleep(0.02)
  finally:
    run.send_signal(signal.SIGKILL)
    run.wait()
  (stale,) = stale
  live = tmp_path / f".out.tmp-{socket.gethostname()}-{os.getpid()}-0123abcd"
  elsewhere = tmp_path / f".out.tmp-otherhost-{run.pid}-0123abcd"
  live.mkdir()
  elsewhere.mkdir()
  prepare(out, [tmp_path / "a.txt"], train_bpe_vocab=300, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [live.name, elsewhere.name, "a.txt", "out"])
  assert caplog.messages == [f"removing {stale}: the staging directory of an unfinished prepare "
                             f"into {out} (process {run.pid} is gone)"]


def test_rerun_with_another_bpe_size_changes_the_fingerprint(tmp_path):
  _corpus(tmp_path / "in")
  out, seen = tmp_path / "out", {}
  for vocab in (300, 270, 300):
    prepare(out, [tmp_path / "in"], train_bpe_vocab=vocab, shard_tokens=64, progress=False)
    index = read_index(out / "train")
    shards = b"".join((out / "train" / s["path"]).read_bytes() for s in index["shards"])
    want = hashlib.sha256(f"uint16:{index['vocab_size']}:".encode() + shards).hexdigest()
    assert tokens.fingerprint(out / "train") == f"sha256:{want}"
    seen.setdefault(vocab, set()).add(want)
  assert len(seen[300]) == 1 and seen[300] != seen[270]
