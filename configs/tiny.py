"""A tiny Pre+GPAS model on the embedded corpus: the default run, a few minutes on 2 CPU cores."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny CPU config."""
  c = base.get_config()
  c.size_name = 'tiny'
  m = c.model
  m.vocab_size = 4096
  m.hidden_size = 128
  m.intermediate_size = 352
  m.num_layers = 4
  m.num_heads = 4
  m.post_num = 1
  m.scan_layers = False  # On CPU a Python loop over 4 layers is faster than a scan.
  c.data.tokenizer_vocab_size = 4096
  c.data.max_length = 128
  c.data.eval_tokens = 10_000  # most of the embedded validation split (~13k tokens)
  c.data.eval_batch_size = 32
  c.optim.global_batch_size = 16
  c.optim.lr = 3e-3
  c.num_train_steps = 600
  c.optim.warmup_steps = 60
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c
