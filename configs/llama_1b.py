"""LLaMA-1b (the baseline's llama_1b.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 1b config."""
  c = base.with_size(base.get_config(), '1b')
  base.with_recipe(c, '1b')
  return c
