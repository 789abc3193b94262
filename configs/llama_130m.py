"""LLaMA-130m (the baseline's llama_130m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 130m config."""
  c = base.with_size(base.get_config(), '130m')
  base.with_recipe(c, '130m')
  return c
