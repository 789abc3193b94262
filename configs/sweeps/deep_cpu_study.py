"""The deep CPU study: 12 layers of hidden 128, Pre and Sandwich with and without GPAS, in
float32 and in the release's pure bf16 (baseline_faithful), three seeds: 24 runs.

    python -m gpas_jax.train.sweep --sweep configs/sweeps/deep_cpu_study.py --root runs/deep_cpu_study \\
        --parallel 2
    python -m gpas_jax.analysis.study --root runs/deep_cpu_study --out docs/deep_cpu_study

The model and recipe are configs/deep_cpu.py's; the step count was chosen by a pilot (README,
"The deep CPU study"). With --parallel 2 on 2 cores the whole study takes about 70 minutes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the sweep: 2 precisions x 4 norm types x seeds 0, 1, 2 (24 runs)."""
  c = ml_collections.ConfigDict()
  c.base_config = {'deep12_f32': 'configs/deep_cpu.py:float32',
                   'deep12_bf16': 'configs/deep_cpu.py:bfloat16'}
  c.sizes = ('deep12_f32', 'deep12_bf16')
  c.norm_types = ('pre', 'pre_gpas', 'sandwich', 'sandwich_gpas')
  c.seeds = (0, 1, 2)
  c.overrides = ml_collections.ConfigDict()
  return c
