"""LLaMA-250m (the baseline's llama_250m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 250m config."""
  c = base.with_size(base.get_config(), '250m')
  base.with_recipe(c, '250m')
  # 4 micro-batches (the same gradient) so that the pure-bf16 step fits v5e-8: 32.23 GiB per chip
  # of 16 with one, 16.86 with 2 (the TPU compiler: 11.44 GiB with 4, 25% MFU). One node of 8 H100
  # fits it whole (docs/GPU.md): --config.optim.micro_batches=1 there.
  c.optim.micro_batches = 4
  return c
