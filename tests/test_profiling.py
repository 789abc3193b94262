"""The step profile: ops attributed from a real trace, async dots timed to their end, train traces."""

import collections
import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from gpas_jax import config as config_lib
from gpas_jax.perf import bench
from gpas_jax.runtime import profiling
from gpas_jax.train import trainer
from tests.helpers import tiny_train_config

M, K, N = 256, 128, 64


def _loss(x_MxK, w_KxN):
  h_MxN = x_MxK @ w_KxN
  return jnp.sum(jnp.tanh(h_MxN) * 2.0)


def test_summary_of_a_real_trace_counts_every_dot_and_names_source_lines(tmp_path):
  x = jax.random.normal(jax.random.PRNGKey(0), (M, K))
  w = jax.random.normal(jax.random.PRNGKey(1), (K, N))
  step = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))
  jax.block_until_ready(step(x, w))
  times = profiling.capture(lambda: jax.block_until_ready(step(x, w)), 3, str(tmp_path))
  assert len(times) == 3 and all(t > 0 for t in times)
  hlo = step.lower(x, w).compile().as_text()
  s = profiling.summarize(profiling.latest_trace(str(tmp_path)), hlo, steps=3, step_ms=1.0)
  # Forward x @ w and the two gradient matmuls (dx = g w^T, dw = x^T g), each once per step.
  fwd = f'f32[{M},{N}] <- lhs [{M}x{K}] contracting {{1}}'
  by_key = {g.key: g for g in s.dots}
  assert by_key[fwd].count == 1 and by_key[fwd].flops_per_step == 2.0 * M * K * N
  assert sum(g.flops_per_step for g in s.dots) == 3 * 2.0 * M * K * N
  assert all(g.ms_per_step > 0 for g in s.dots + s.others)
  assert any(g.key.startswith('test_profiling.py:') for g in s.others), [g.key for g in s.others]
  assert s.thread_busy and all(0 < b <= 1 for b in s.thread_busy)
  text = profiling.format_summary(s)
  assert fwd in text and 'by source line' in text


def _write_trace(path, events):
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)


HLO = """HloModule jit_f, entry_computation_layout={(f32[8,4]{1,0}, f32[8,2]{1,0})->f32[4,2]{1,0}}

ENTRY %main (a: f32[8,4], b: f32[8,2]) -> f32[4,2] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %dot.1 = f32[4,2]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
  ROOT %tanh.2 = f32[4,2]{1,0} tanh(%dot.1), metadata={op_name="jit(f)/tanh"}
}
"""


def test_an_async_dot_counts_until_its_end_event_and_other_ops_their_own_span(tmp_path):
  op = lambda name, ts, dur, tid=1: {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur, 'tid': tid,
                                     'args': {'hlo_module': 'jit_f', 'hlo_op': name}}
  end = lambda name, ts, tid=1: {'ph': 'X', 'name': f'end: {name}', 'ts': ts, 'dur': 0.0,
                                 'tid': tid}
  events = []
  for step in range(2):  # times in microseconds
    t = step * 10_000.0
    events += [op('dot.1', t, 10.0), end('dot.1', t + 4_000.0, tid=2),
               op('tanh.2', t + 4_000.0, 500.0), end('tanh.2', t + 9_000.0)]
  path = os.path.join(tmp_path, 'perfetto_trace.json.gz')
  _write_trace(path, events)
  s = profiling.summarize(path, HLO, steps=2)
  (dot,) = s.dots
  assert dot.key == 'f32[4,2] <- lhs [8x4] contracting {0}'
  assert dot.ms_per_step == pytest.approx(4.0) and dot.count == 1
  assert dot.flops_per_step == 2.0 * 8 * 4 * 2
  (tanh,) = s.others
  assert tanh.key == 'tanh' and tanh.ms_per_step == pytest.approx(0.5)


def test_trace_window_runs_from_start_for_count_steps(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace', lambda d, **kw: calls.append(('start', d)))
  monkeypatch.setattr(jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  w = profiling.TraceWindow(3, 2, '/trace')
  seen = []
  for n in range(1, 7):
    w.before(n)
    if w.due(n):
      w.close()
      seen.append(n)
  assert calls == [('start', '/trace'), ('stop',)] and seen == [4]
  off = profiling.TraceWindow(0, 3, '/trace')
  for n in range(1, 4):
    off.before(n)
    assert not off.due(n)
  off.close()
  assert len(calls) == 2


def test_config_profile_writes_a_trace_of_the_chosen_steps(tmp_path):
  c = tiny_train_config(num_train_steps=4, **{'profile.start_step': 2, 'profile.num_steps': 2})
  trainer.train(c, str(tmp_path), jax.devices()[:1])
  events = json.load(gzip.open(profiling.latest_trace(str(tmp_path / 'profile'))))['traceEvents']
  runs = collections.Counter(e['args']['hlo_op'] for e in events
                             if e.get('args', {}).get('hlo_module') == 'jit_step_fn')
  assert min(runs.values()) == 2  # steps 2 and 3 (ops in a scanned layer run once per layer)


@pytest.mark.parametrize('field, value', [('profile.start_step', -1), ('profile.num_steps', 0)])
def test_bad_profile_window_is_refused_by_name(field, value):
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    config_lib.validate(tiny_train_config(**{field: value}))


def test_benchmark_profile_reports_where_the_step_time_goes(tmp_path):
  results = bench.run_benchmark(tiny_train_config(), steps=1, warmup=0, compare_gpas=False,
                                baseline_faithful=False, other_mallocs=False,
                                profile_dir=str(tmp_path), profile_steps=2,
                                devices=jax.devices()[:1], log=lambda s: None)
  p = results['profile']
  assert p['steps'] == 2 and p['dot_ms'] > 0 and p['other_ms'] > 0
  assert any(d['flops_per_step'] > 0 and d['gflops_per_s'] > 0 for d in p['dots'])
  assert any(o['key'].startswith(('layers.py:', 'model.py:')) for o in p['others'])
  json.dumps(results, default=float)
  assert 'by source line' in bench.format_report(results)
