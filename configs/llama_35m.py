"""LLaMA-35m (the baseline's llama_35m.json)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 35m config."""
  c = base.with_size(base.get_config(), '35m')
  # The paper trains no model of this size: the 71m recipe is the nearest.
  base.with_recipe(c, '71m')
  return c
