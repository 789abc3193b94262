"""A narrow deep model for the CPU study of GPAS: 12 layers of hidden 128, the paper's recipe.

    python train.py --config configs/deep_cpu.py:float32 --workdir runs/deep/f32
    python train.py --config configs/deep_cpu.py:bfloat16 --workdir runs/deep/bf16

The argument is the precision: 'float32' (parameters, compute and Adam state) or 'bfloat16'
(pure bf16 as the release trains: parameters, gradients and Adam state in bf16). Both run with
baseline_faithful (torch's Adam arithmetic, N + 1 updates), so precision is the one difference.
"""

import ml_collections

from configs import tiny

PRECISIONS = {'float32': 'f32', 'bfloat16': 'bf16'}


def get_config(precision: str = 'float32') -> ml_collections.ConfigDict:
  """Returns the deep CPU config in the given precision ('float32' or 'bfloat16')."""
  if precision not in PRECISIONS:
    raise ValueError(f'configs/deep_cpu.py:{precision}: the precision must be one of '
                     f'{sorted(PRECISIONS)}, e.g. --config configs/deep_cpu.py:bfloat16.')
  c = tiny.get_config()
  c.size_name = f'deep12_{PRECISIONS[precision]}'
  c.baseline_faithful = True
  m = c.model
  m.num_layers = 12
  m.post_num = 3  # Mix-LN's L // 4, as the baseline.
  m.param_dtype = precision
  m.compute_dtype = precision
  # The paper's recipe at its smaller sizes: peak lr 1e-3, 10% warmup, cosine to 0.1, no clipping.
  # 400 steps of 8 x 128 tokens: what 24 runs afford in ~80 minutes on 2 cores (README, "The deep
  # CPU study", says how the pilot chose it).
  c.optim.lr = 1e-3
  c.optim.global_batch_size = 8
  c.num_train_steps = 400
  c.optim.warmup_steps = 40
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 400
  c.log_every_steps = 25
  c.analysis.every_steps = 25
  return c
