"""The PyTorch side of the benchmark: the reference model's train step, as users run PyTorch.

`gpas_jax/baseline/torch_model.py`'s model with `torch.optim.Adam` (its defaults), the same shapes and
tokens as the JAX step, eager or `torch.compile`d. Each variant runs in a worker subprocess
(gpas_jax/perf/bench_proc.py) under a chosen malloc: the default one (PyTorch as users run it) or the
fast one the JAX side runs under (the same allocator).
"""

import dataclasses
from typing import Callable

from gpas_jax.perf import bench_proc
from gpas_jax.runtime import allocator


@dataclasses.dataclass
class TorchSpec:
  """The reference model's shapes and how to run it."""
  vocab: int
  hidden: int
  ffn: int
  layers: int
  heads: int
  norm_type: str
  post_num: int
  batch: int
  seq: int
  dtype: str = 'float32'
  compile: bool = False
  threads: int = 0  # 0: torch's default (one per core), as users run it
  seed: int = 0
  lr: float = 1e-3


def spec_from_config(config, threads: int = 0) -> TorchSpec:
  """The TorchSpec with a gpas_jax config's shapes."""
  m = config.model
  return TorchSpec(vocab=m.vocab_size, hidden=m.hidden_size, ffn=m.intermediate_size,
                   layers=m.num_layers, heads=m.num_heads, norm_type=m.norm_type,
                   post_num=m.post_num, batch=config.optim.global_batch_size,
                   seq=config.data.max_length, seed=config.seed, threads=threads,
                   dtype='bfloat16' if m.compute_dtype == 'bfloat16' else m.compute_dtype)


def build_step(spec: TorchSpec) -> tuple[Callable[[], float], str]:
  """(one timed train step, 'N threads') of the reference model (runs in the worker)."""
  import torch  # pylint: disable=import-outside-toplevel
  from gpas_jax.baseline import torch_model  # pylint: disable=import-outside-toplevel
  from gpas_jax.perf import bench_jax  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  if spec.threads:
    torch.set_num_threads(spec.threads)
  cfg = torch_model.RefConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                              intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
                              num_attention_heads=spec.heads, norm_type=spec.norm_type,
                              post_num=spec.post_num)
  model = torch_model.RefModel(cfg, seed=spec.seed).to(getattr(torch, spec.dtype))
  opt = torch.optim.Adam(model.parameters(), lr=spec.lr)  # as users run it: defaults
  ids = bench_jax.random_batch(spec.batch, spec.seq, spec.vocab, spec.seed)['input_ids']
  ids = torch.from_numpy(ids).long()
  forward = torch.compile(model) if spec.compile else model

  def step() -> float:
    t0 = time.perf_counter()
    loss = torch_model.loss_fn(forward(ids), ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0

  return step, f'{torch.get_num_threads()} threads'


def malloc_label(malloc: str) -> str:
  """'glibc malloc' for the default allocator, else the allocator's name."""
  return 'glibc malloc' if malloc == allocator.DEFAULT else malloc


def start(spec: TorchSpec, malloc: str, timeout_s: float) -> bench_proc.Worker:
  """Starts a worker for `spec` under allocator `malloc` ('default' or a name in allocator)."""
  name = f'torch {"compile" if spec.compile else "eager"} ({malloc_label(malloc)})'
  env = allocator.allocator_env(malloc)
  return bench_proc.Worker(name, 'torch', dataclasses.asdict(spec), env, timeout_s)
