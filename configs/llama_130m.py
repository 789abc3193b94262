"""LLaMA-130m (the baseline's llama_130m.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 130m config."""
  c = base.with_size(base.get_config(), '130m')
  base.with_recipe(c, '130m')
  # 2 micro-batches (the same gradient) so that the pure-bf16 step fits v5e-8: 16.16 GiB per chip
  # of 16 with one (the TPU compiler: 10.48 GiB with 2, 32% MFU). One node of 8 H100 fits it whole
  # (docs/GPU.md): --config.optim.micro_batches=1 there.
  c.optim.micro_batches = 2
  return c
