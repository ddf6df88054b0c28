"""lmhead_jax: the LM head as a gradient bottleneck, in JAX.

The modules live in layers, lowest first (LAYERS); a module never imports from a higher layer.
The public modules of the flat layout stay importable under their old names (MOVED), as the very
same module objects, imported only when asked for: `from lmhead_jax import bottleneck, model`.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

# XLA:CPU runs QR/SVD (the bottleneck's range map) through OpenBLAS, whose threads spin against
# XLA's own thread pool: a step with the metrics ran 2x slower on 2 cores. One OpenBLAS thread
# fixes it. This only takes effect if lmhead_jax is imported before jax/numpy load OpenBLAS
# (the experiment and benchmark entry points do); an explicit setting is respected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _accelerator_present() -> bool:
  """An NVIDIA driver or a TPU device file (/dev/accel* on v4/v5p, /dev/vfio/N on v5e/v6e)."""
  vfio = os.path.isdir("/dev/vfio") and any(n.isdigit() for n in os.listdir("/dev/vfio"))
  return (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/accel0")
          or vfio)


# The compile extras (tpu-compile, gpu-compile) install JAX's TPU and CUDA plugins; on a machine
# without a TPU or GPU, JAX's plugin discovery then prints ~25 lines (a cuDNN traceback, libtpu
# warnings) at the first device use. There, unless JAX_PLATFORMS says otherwise, JAX runs on the
# CPU only; `plan --compile` still reaches both compilers (they need no backend).
if "JAX_PLATFORMS" not in os.environ and not _accelerator_present():
  if "jax" in sys.modules:  # effective while no backend has started yet
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"

__version__ = "0.1.0"

LAYERS = ("core", "data", "training", "analysis", "runs", "tools", "reporting")
MOVED = {f"{__name__}.{name}": f"{__name__}.{layer}.{name}" for layer, name in (
    ("core", "bottleneck"), ("core", "model"), ("data", "hf"), ("tools", "plan"),
    ("training", "train"))}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Imports lmhead_jax.<old name> as the module it moved to; runs it for `python -m`."""

  def find_spec(self, name, path=None, target=None):
    if name in MOVED:
      origin = importlib.util.find_spec(MOVED[name]).origin
      return importlib.util.spec_from_loader(name, self, origin=origin)

  def create_module(self, spec):
    module = importlib.import_module(MOVED[spec.name])
    spec.loader_state = module.__spec__  # module_from_spec is about to overwrite it
    return module

  def exec_module(self, module):
    module.__spec__ = module.__spec__.loader_state

  def get_code(self, name):
    return importlib.util.find_spec(MOVED[name]).loader.get_code(MOVED[name])


sys.meta_path.insert(0, _Moved())  # before the editable-install finders


def __getattr__(name):
  if f"{__name__}.{name}" in MOVED:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
