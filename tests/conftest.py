"""Test set-up: 8 fake CPU devices for the mesh tests."""

import os
import pathlib

# Test programs are tiny and compiled once each: XLA:CPU's backend optimisations cost more
# compile time than they save (about half of the suite's compile time). Set before jax starts.
# GPAS_TEST_XLA_DEFAULT=1 keeps XLA's default level (tests/test_xla_default_level.py).
if os.environ.get('GPAS_TEST_XLA_DEFAULT') != '1':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
# gpas_jax before jax: on a host without a GPU it defers the gpu extra's CUDA plugin (quiet).
import gpas_jax  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests.helpers import DATA_CACHE

# The bench and trainer tests measure a CPU peak under load: keep it out of the user's cache.
os.environ.setdefault('GPAS_CPU_PEAK_CACHE', os.path.join(DATA_CACHE, 'cpu_peak.json'))

# Nothing downloads in tests: lm-eval's datasets and transformers read local files only.
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_HUB_OFFLINE'] = '1'

# Before any backend starts: sharding tests use meshes of these 8 CPU devices.
jax.config.update('jax_num_cpu_devices', 8)

# Tests build the same small programs many times (fresh lambdas defeat jit's in-memory cache):
# a persistent cache shared by the test workers turns repeats into cache hits.
jax.config.update('jax_compilation_cache_dir', os.path.join(DATA_CACHE, 'xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def cache(tmp_path_factory) -> pathlib.Path:
  """A build cache shared by the xdist workers (builds are locked, so they never race)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  return root / 'gpas_data_cache'


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """At a worker's end execnet interrupts its main thread; a KeyboardInterrupt that lands in
  JAX's gc callback would be printed as an ignored exception after the results. The callback
  only frees device buffers early, and the process is ending: it goes first."""
  import gc  # pylint: disable=import-outside-toplevel
  gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, '__name__', '') != '_xla_gc_callback']
