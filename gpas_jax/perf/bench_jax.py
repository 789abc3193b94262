"""The JAX side of the benchmark: the compiled train step of a config, timed one call at a time.

`JaxVariant` compiles `steps.make_train_step` for a config on a fixed random batch (lowering
and compile times, XLA's memory analysis) and times single steps. Variants that only change the
config run in the benchmark's process; a variant that needs another process environment (another
malloc, other XLA_FLAGS) runs the same code in a worker (`start`, gpas_jax/perf/bench_proc.py).
Import no jax at module level: gpas_jax.perf.bench imports this before its launcher re-executes.
"""

import ast
import json
import time
from typing import Any, Callable

from gpas_jax.perf import bench_proc
from gpas_jax.runtime import allocator


def gpas_counterpart(norm_type: str) -> str | None:
  """The same architecture with GPAS toggled ('pre_gpas' <-> 'pre'); None if there is none."""
  if norm_type.endswith('_gpas'):
    return norm_type[:-len('_gpas')]
  if norm_type in ('pre', 'lns', 'deeppost', 'sandwich', 'post_pre'):
    return norm_type + '_gpas'
  return None  # 'post': the baseline has no post_gpas


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, Any]:
  """Token ids in [2, vocab - 1) (no pads, no frozen row), segment ids 1: every target counts."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, max(3, vocab - 1), size=(batch, seq)).astype(np.int32)
  return {'input_ids': ids, 'segment_ids': np.ones_like(ids)}


def parse_overrides(text: str) -> tuple[dict[str, Any], dict[str, str]]:
  """'model.attention_impl=einsum;XLA_FLAGS=--xla_cpu_use_onednn=true' -> (config, env) parts.

  Upper-case keys are environment variables (they need a worker process), as is `xla_flags`
  (added to the worker's XLA_FLAGS); the others are config fields, with Python literals parsed
  (`True`, `3`, `1e-3`) and anything else kept as a string.
  """
  config, env = {}, {}
  for part in filter(None, (p.strip() for p in text.split(';'))):
    key, sep, value = part.partition('=')
    if not sep or not key:
      raise ValueError(f'--try {text!r}: {part!r} is not key=value (e.g. '
                       'model.attention_impl=einsum or XLA_FLAGS=--xla_cpu_use_onednn=true)')
    if key == 'xla_flags':  # takes effect only in a fresh process: a worker's XLA_FLAGS
      key = 'XLA_FLAGS'
    if key.isupper():
      env[key] = value
      continue
    try:
      config[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      config[key] = value
  return config, env


def apply_overrides(config, overrides: dict[str, Any]):
  """A copy of `config` with dotted-path fields set; an unknown field raises, naming it."""
  c = config.copy_and_resolve_references()
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = c
    for p in parents:
      node = node[p] if p in node else None
      if node is None:
        break
    if node is None or leaf not in node:
      raise ValueError(f'--try: the config has no field {path!r}')
    node[leaf] = value
  return c


class JaxVariant:
  """One compiled train step on a fixed batch, stepped one call at a time."""

  def __init__(self, name: str, config, devices=None):
    import jax  # pylint: disable=import-outside-toplevel
    from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
    from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
    self.name, self.config = name, config
    self.s = steps.setup(config, devices)
    self.batch_size, self.seq = config.optim.global_batch_size, config.data.max_length
    local = random_batch(self.batch_size, self.seq, config.model.vocab_size, config.seed)
    self.batch = steps.global_batch(self.s, local)
    self.state = steps.init_state(self.s)
    run = steps.make_train_step(self.s)
    with sharding.use_mesh(self.s.mesh, self.s.rules):
      t0 = time.perf_counter()
      lowered = run.jitted.lower(self.state, self.batch)
      t1 = time.perf_counter()
      self.compiled = lowered.compile()
      t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1
    self.first_step_s = self.lower_s + self.compile_s
    self.times: list[float] = []
    self.memory = memory_analysis(self.compiled)
    self.last_loss = float('nan')
    self._jax = jax

  def step(self) -> float:
    """Runs one step and returns its wall time in seconds."""
    from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
    with sharding.use_mesh(self.s.mesh, self.s.rules):
      t0 = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      self._jax.block_until_ready((self.state, metrics))
      dt = time.perf_counter() - t0
    self.last_loss = float(metrics['loss'])
    return dt


def memory_analysis(compiled) -> dict[str, float]:
  """Per-device bytes from XLA's buffer assignment (arguments, outputs, temporaries, peak)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    ma = None
  if ma is None:
    return {}
  out = {k: float(getattr(ma, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def build_worker_step(spec: dict[str, Any]) -> tuple[Callable[[], float], str]:
  """(one timed step, info) of the JaxVariant for spec['config'] (JSON), in a worker process."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(json.loads(spec['config']))
  v = JaxVariant(spec['name'], config)
  return v.step, f'compiled in {v.compile_s:.2f} s under {allocator.describe()}'


def start(name: str, config, malloc: str, env_overrides: dict[str, str] | None,
          timeout_s: float) -> bench_proc.Worker:
  """Starts a worker timing `config`'s step under allocator `malloc` and extra env variables."""
  env = allocator.allocator_env(malloc)
  for key, value in (env_overrides or {}).items():
    # Added to XLA_FLAGS, not replacing it (it may hold the host device count).
    env[key] = f'{env.get(key, "")} {value}'.strip() if key == 'XLA_FLAGS' else value
  spec = {'name': name, 'config': config.to_json_best_effort()}
  return bench_proc.Worker(name, 'jax', spec, env, timeout_s)
