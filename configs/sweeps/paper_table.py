"""The paper's table as the authors ran it: 71m..1b x four architectures with and without GPAS.

Each size file carries the paper's recipe and the release's loss chunks (GPUs x accumulation);
this sweep adds what the release computes: baseline_faithful (torch's Adam and clipping
arithmetic, its bf16 loss and attention numerics, N + 1 updates) in pure bf16 (parameters and
Adam state), and the gate clip of 0.01 that 1b Sandwich+GPAS needs (the authors' README).
Every run still needs its data flags (C4 and the T5 tokenizer), e.g. with --print_only:
  --sweep.overrides.data.data_dir=/data/tfds --sweep.overrides.data.tokenizer=/data/t5.model
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the sweep: 5 sizes x 8 norm types x seed 0 (the paper's single seed), 40 runs."""
  c = ml_collections.ConfigDict()
  c.base_config = 'configs/llama_{size}.py'
  c.sizes = ('71m', '130m', '250m', '350m', '1b')
  c.norm_types = ('pre', 'pre_gpas', 'sandwich', 'sandwich_gpas', 'lns', 'lns_gpas',
                  'post_pre', 'post_pre_gpas')
  c.seeds = (0,)
  c.overrides = ml_collections.ConfigDict()
  c.overrides.baseline_faithful = True
  c.overrides.model = ml_collections.ConfigDict()
  c.overrides.model.param_dtype = 'bfloat16'
  c.overrides.model.compute_dtype = 'bfloat16'
  c.overrides.data = ml_collections.ConfigDict()
  c.overrides.data.data_dir = ''
  c.overrides.data.tokenizer = ''
  # (size, norm_type, key, value): settings of single runs.
  c.run_overrides = (('1b', 'sandwich_gpas', 'optim.gate_clip', 0.01),)
  return c
