"""LLaMA-250m (the baseline's llama_250m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 250m config."""
  c = base.with_size(base.get_config(), '250m')
  base.with_recipe(c, '250m')
  return c
