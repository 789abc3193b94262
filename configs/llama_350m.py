"""LLaMA-350m (the baseline's llama_350m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 350m config."""
  c = base.with_size(base.get_config(), '350m')
  base.with_recipe(c, '350m')
  # 4 micro-batches (the same gradient) so that the pure-bf16 step fits v5e-8: 37.33 GiB per chip
  # of 16 with one (the TPU compiler: 14.37 GiB with 4, 26% MFU). One node of 8 H100 fits it whole
  # (docs/GPU.md): --config.optim.micro_batches=1 there.
  c.optim.micro_batches = 4
  return c
