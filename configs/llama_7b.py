"""LLaMA-7b (the baseline's llama_7b.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 7b config."""
  c = base.with_size(base.get_config(), '7b')
  base.with_recipe(c, '7b')
  # Parameters and Adam state sharded over every chip (fsdp): 7b's bf16 parameters alone are
  # 12.6 GiB, its float32 Adam state 4x that; replicated (data) they fit no chip's HBM.
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
