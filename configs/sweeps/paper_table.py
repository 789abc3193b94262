"""The paper's results table: 71m..1b x four architectures with and without GPAS."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the sweep: 5 sizes x 8 norm types x seed 0 (the paper's single seed), 40 runs."""
  c = ml_collections.ConfigDict()
  c.base_config = 'configs/llama_{size}.py'  # Each size file carries the paper's recipe.
  c.sizes = ('71m', '130m', '250m', '350m', '1b')
  c.norm_types = ('pre', 'pre_gpas', 'sandwich', 'sandwich_gpas', 'lns', 'lns_gpas',
                  'post_pre', 'post_pre_gpas')
  c.seeds = (0,)
  c.overrides = ml_collections.ConfigDict()
  return c
