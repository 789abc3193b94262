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


# Accelerator plugins besides libtpu: with one of them, JAX's own platform choice is kept.
_GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin')


def _tpu_chip_present() -> bool:
  """A TPU on this host: a Google PCI device (vendor 0x1ae0, what JAX checks) or its nodes."""
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path, encoding='ascii') as f:
        if f.read().strip() == '0x1ae0':
          return True
    except OSError:
      continue
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def skip_absent_tpu() -> bool:
  """On a host with libtpu installed (the tpu extra) but no TPU, JAX uses the CPU directly.

  Otherwise every JAX start tries the TPU first and prints libtpu's errors (no accelerator type,
  no worker hostnames) before falling back to the CPU. Sets JAX_PLATFORMS=cpu (inherited by
  subprocesses) unless the user chose platforms, forces TPU init, or a GPU plugin is installed;
  a TPU VM is left alone. The TPU compiler still runs (gpas_jax.perf.tpu_plan). True if set.
  """
  if ('JAX_PLATFORMS' in os.environ or 'JAX_FORCE_TPU_INIT' in os.environ
      or importlib.util.find_spec('libtpu') is None
      or any(importlib.util.find_spec(p) for p in _GPU_PLUGINS) or _tpu_chip_present()):
    return False
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in sys.modules:  # imported already: its config read the environment before this
    sys.modules['jax'].config.update('jax_platforms', 'cpu')
  return True


skip_absent_tpu()
