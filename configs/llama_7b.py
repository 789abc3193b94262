"""LLaMA-7b (the baseline's llama_7b.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 7b config."""
  c = base.with_size(base.get_config(), '7b')
  base.with_recipe(c, '7b')
  return c
