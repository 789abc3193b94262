"""gpas_jax: LLaMA-style pretraining with Gradient-Preserving Activation Scaling in JAX/Flax NNX.

The package is a house in layers: each layer imports only the layers below it (never a peer or
one above), so a reader can start at the bottom and meet nothing unexplained. Bottom first:

  storage, tree_paths, sharding, distributed   one way to touch local and gs:// files; key-path
                                               names; the mesh and logical-axis rules; start-up
  runtime/    what training and the performance tools share: console, profiling, CPU peak,
              XLA flags, the fast allocator
  config      sizes, recipes, allowed values, the validation of a ConfigDict and its resolution
              (baseline_faithful into plain fields, once) | testing/: a local GCS server (a peer)
  model/      the GPAS op (model/gpas.py, the paper's idea), layers, blocks, the transformer,
              per-layer statistics, the baseline's parameter names (interop)
  data/       TFDS / embedded / token-row sources, tokenizers, grain pipelines (a peer of model)
  train/      the trainer, steps, optimizer, checkpoints, faults, metrics, init_from, sweeps
  analysis/   run directories, figures, results tables, the seeded study
  evals/      downstream tasks through lm-evaluation-harness: the JAX backend, task files, the
              harness CLI (a peer of analysis)
  baseline/   the PyTorch side as tools: the port of the release, its training loop, hf_tools,
              the side-by-side comparison
  perf/       the bench and its parts, AOT plans

LAYERS is that order; tests/test_package_layers.py reads every module's imports and holds it.
"""

import glob
import importlib.util
import os
import sys

# The folder holding gpas_jax/ and configs/: the clone, or site-packages once installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom first; the entries of one tuple are peers (neither may import the other).
LAYERS: tuple[tuple[str, ...], ...] = (
    ('storage', 'tree_paths', 'sharding', 'distributed'),
    ('runtime',),
    ('config', 'testing'),
    ('model', 'data'),
    ('train',),
    ('analysis', 'evals'),
    ('baseline',),
    ('perf',),
)


# Accelerator plugins besides libtpu: with one of them and its chip, JAX's own platform choice is
# kept; without the chip (a CPU host with the gpu extra, for the GPU compiler) JAX stays on the CPU.
_GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin')
# The modules JAX imports for them: at its import (jaxlib's GPU kernels in the plugin package)
# and at its plugin discovery (jax_plugins.<name>.initialize()).
_GPU_PLUGIN_MODULES = _GPU_PLUGINS + ('jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13',
                                      'jax_plugins.xla_rocm60', 'jax_plugins.xla_rocm7')


def _pci_devices(vendor: str, device_class: str = '') -> bool:
  """A PCI device of a vendor (and class prefix) on this host."""
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path, encoding='ascii') as f:
        if f.read().strip() != vendor:
          continue
      with open(os.path.join(os.path.dirname(path), 'class'), encoding='ascii') as f:
        if f.read().strip().startswith(device_class):
          return True
    except OSError:
      continue
  return False


def _tpu_chip_present() -> bool:
  """A TPU on this host: a Google PCI device (vendor 0x1ae0, what JAX checks) or its nodes."""
  return (_pci_devices('0x1ae0') or bool(glob.glob('/dev/accel*'))
          or bool(glob.glob('/dev/vfio/[0-9]*')))


def _gpu_present() -> bool:
  """A GPU on this host: an NVIDIA or AMD display-class PCI device (0x03...), or their nodes."""
  return (_pci_devices('0x10de', '0x03') or _pci_devices('0x1002', '0x03')
          or os.path.exists('/dev/nvidiactl') or os.path.exists('/dev/kfd'))


class _DeferredPlugin:  # pylint: disable=too-few-public-methods
  """Stands in sys.modules for a GPU plugin on a host without a GPU, where JAX runs on the CPU:
  the plugin's libraries print, on loading, that no driver was found. JAX's import finds no GPU
  kernels in it (it is no package) and its plugin discovery calls an initialize() that loads
  nothing. load_gpu_plugin() puts the real one back for the GPU compiler."""

  def __init__(self, name: str):
    self.__name__ = name

  @staticmethod
  def initialize() -> None:
    return None


def load_gpu_plugin() -> None:
  """Undoes the deferral of the GPU plugins (the GPU compiler's start: gpas_jax.perf.gpu_plan):
  JAX's CUDA version module and plugin registration, where JAX got the stand-ins already."""
  deferred = [n for n in _GPU_PLUGIN_MODULES if isinstance(sys.modules.get(n), _DeferredPlugin)]
  for name in deferred:
    del sys.modules[name]
  lib = sys.modules.get('jax._src.lib')
  if not deferred or lib is None:
    return  # JAX's own import and discovery will find the real plugins
  if lib.cuda_versions is None and importlib.util.find_spec('jax_cuda12_plugin') is not None:
    # JAX's import bound its CUDA version module (None under the stand-in): its cuDNN attention
    # asks it the cuDNN version (nvidia-cudnn-cu12, where installed) before lowering.
    lib.cuda_versions = importlib.import_module('jax_cuda12_plugin._versions')
    for name in ('jax._src.cudnn.fused_attention_stablehlo', 'jax._src.lax.linalg'):
      if getattr(sys.modules.get(name), 'cuda_versions', True) is None:
        sys.modules[name].cuda_versions = lib.cuda_versions
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge._plugins_registered:  # pylint: disable=protected-access
    for name in deferred:
      if name.startswith('jax_plugins.') and importlib.util.find_spec(name) is not None:
        importlib.import_module(name).initialize()


def skip_absent_tpu() -> bool:
  """On a host with an accelerator plugin installed (the tpu or gpu extra) but not its chip, JAX
  uses the CPU directly.

  Otherwise every JAX start tries the TPU first and prints libtpu's errors (no accelerator type,
  no worker hostnames), or loads the CUDA plugin (no driver found), before falling back to the
  CPU. Sets JAX_PLATFORMS=cpu (inherited by subprocesses) unless the user chose platforms or
  forces TPU init, and defers the GPU plugins where JAX is on the CPU (load_gpu_plugin); a TPU
  VM or a GPU host is left alone. The
  compilers still run (gpas_jax.perf.tpu_plan, gpu_plan). True if set.
  """
  tpu = importlib.util.find_spec('libtpu') is not None
  gpu = any(importlib.util.find_spec(p) for p in _GPU_PLUGINS) and not _gpu_present()
  chosen = os.environ.get('JAX_PLATFORMS')
  if gpu and chosen in (None, 'cpu'):
    for name in _GPU_PLUGIN_MODULES:
      sys.modules.setdefault(name, _DeferredPlugin(name))  # type: ignore[arg-type]
  if (chosen is not None or 'JAX_FORCE_TPU_INIT' in os.environ or not (tpu or gpu)
      or _tpu_chip_present() or _gpu_present()):
    return False
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in sys.modules:  # imported already: its config read the environment before this
    sys.modules['jax'].config.update('jax_platforms', 'cpu')
  return True

skip_absent_tpu()
