"""LLaMA-71m (the baseline's llama_71m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 71m config."""
  c = base.with_size(base.get_config(), '71m')
  base.with_recipe(c, '71m')
  return c
