"""A CPU-sized study: the tiny model, three architectures with and without GPAS, three seeds."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the sweep: tiny x 6 norm types x seeds 0, 1, 2 (18 runs)."""
  c = ml_collections.ConfigDict()
  c.base_config = {'tiny': 'configs/tiny.py'}
  c.sizes = ('tiny',)
  c.norm_types = ('pre', 'pre_gpas', 'sandwich', 'sandwich_gpas', 'lns', 'lns_gpas')
  c.seeds = (0, 1, 2)
  c.overrides = ml_collections.ConfigDict()
  # About 1.5 min a run on 2 CPU cores (18 runs: ~30 min): 300 steps x 16 x 128 tokens.
  c.overrides.num_train_steps = 300
  c.overrides.eval_every_steps = 100
  c.overrides.checkpoint_every_steps = 300
  c.overrides.analysis = ml_collections.ConfigDict({'every_steps': 50})
  return c
