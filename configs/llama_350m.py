"""LLaMA-350m (the baseline's llama_350m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 350m config."""
  c = base.with_size(base.get_config(), '350m')
  base.with_recipe(c, '350m')
  return c
