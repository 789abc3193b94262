"""LLaMA-20m (the baseline's llama_20m.json)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 20m config."""
  c = base.with_size(base.get_config(), '20m')
  # The paper trains no model of this size: the 71m recipe is the nearest.
  base.with_recipe(c, '71m')
  return c
