"""LLaMA-1b (the baseline's llama_1b.json), with the paper's recipe."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the 1b config."""
  c = base.with_size(base.get_config(), '1b')
  base.with_recipe(c, '1b')
  # Parameters and Adam state sharded over every chip (fsdp), not replicated (data): pure data
  # parallelism needs 16.5 GiB per chip for 1b on v5e-256 (the TPU compiler, docs/TPU.md).
  c.mesh.data, c.mesh.fsdp = 1, -1
  # On one node of 8 H100 this plan needs 65.1 GiB per GPU, over the 59.3 GiB JAX's allocator
  # takes by default (the GPU compiler, docs/GPU.md): there use --config.mesh.data=8
  # --config.mesh.fsdp=1 --config.model.remat_policy=save_dots (29.6 GiB, the fastest plan
  # compiled), or XLA_PYTHON_CLIENT_MEM_FRACTION=0.9.
  return c
