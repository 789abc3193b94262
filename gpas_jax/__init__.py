"""gpas_jax: LLaMA-style pretraining with Gradient-Preserving Activation Scaling in JAX/Flax NNX.

The package is a house in layers: each layer imports only the layers below it (never a peer or
one above), so a reader can start at the bottom and meet nothing unexplained. Bottom first:

  storage, tree_paths, sharding, distributed   one way to touch local and gs:// files; key-path
                                               names; the mesh and logical-axis rules; start-up
  runtime/    what training and the performance tools share: console, profiling, CPU peak,
              XLA flags, the fast allocator
  config      sizes, recipes, allowed values and the validation of a ConfigDict
  model/      the GPAS op (model/gpas.py, the paper's idea), layers, blocks, the transformer,
              per-layer statistics, the baseline's parameter names (interop)
  data/       TFDS / embedded / token-row sources, tokenizers, grain pipelines (a peer of model)
  train/      the trainer, steps, optimizer, checkpoints, faults, metrics, init_from, sweeps
  analysis/   run directories, figures, results tables, the seeded study
  baseline/   the PyTorch side as tools: the port of the release, its training loop, hf_tools,
              the side-by-side comparison
  perf/       the bench and its parts, AOT plans

LAYERS is that order; tests/test_layers.py reads every module's imports and holds it.
"""

import os

# The folder holding gpas_jax/ and configs/: the clone, or site-packages once installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom first; the entries of one tuple are peers (neither may import the other).
LAYERS: tuple[tuple[str, ...], ...] = (
    ('storage', 'tree_paths', 'sharding', 'distributed'),
    ('runtime',),
    ('config',),
    ('model', 'data'),
    ('train',),
    ('analysis',),
    ('baseline',),
    ('perf',),
)
