"""The CPU benchmark of the performance issue: a 20m-shaped Pre+GPAS model, fp32, Adam.

hidden 256, 4 layers, 4 heads, ffn 688, vocab 8000, batch 8, seq 256 (python -m gpas_jax.perf.bench).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """Returns the CPU benchmark config."""
  c = base.get_config()
  c.size_name = 'bench_cpu'
  m = c.model
  m.vocab_size = 8000
  m.hidden_size = 256
  m.intermediate_size = 688
  m.num_layers = 4
  m.num_heads = 4
  m.post_num = 1
  m.norm_type = 'pre_gpas'
  m.scan_layers = False  # On CPU a Python loop over 4 layers is ~15% faster than a scan.
  c.data.tokenizer_vocab_size = 8000
  c.data.max_length = 256
  c.data.eval_batch_size = 8
  c.optim.global_batch_size = 8
  c.optim.lr = 1e-3
  c.num_train_steps = 1000
  c.optim.warmup_steps = 100
  c.mesh.data = -1
  # XLA:CPU's dots on Eigen, reductions on YNNPACK: this step 4.6% [2.8%, 7.4%] faster than with
  # XLA's default (YNNPACK dots) on the 2-core CPU; not for every shape (gpas_jax/runtime/xla_flags.py).
  c.xla_flags = '--xla_cpu_experimental_ynn_fusion_type=reduce'
  return c
