"""gpas_jax.runtime.cpu_peak: the CPU peak is measured once per machine, cached, and shared with train."""

import json

import jax
import pytest

from gpas_jax.runtime import cpu_peak
from gpas_jax.train import trainer
from tests.helpers import tiny_train_config


@pytest.fixture
def fake_measure(tmp_path, monkeypatch):
  """Points the cache at tmp_path and replaces the matmul timing by a scripted one."""
  monkeypatch.setenv(cpu_peak.CACHE_ENV, str(tmp_path / 'peak.json'))
  script = []  # (flops, share) per call
  calls = []

  def measure(dtype):
    calls.append(dtype)
    return script.pop(0)

  monkeypatch.setattr(cpu_peak, 'measure', measure)
  return script, calls


def test_measured_once_then_read_from_the_cache(fake_measure, tmp_path):
  script, calls = fake_measure
  script.append((2e11, 0.97))
  assert cpu_peak.cpu_peak_flops()[0] == 2e11
  peak, source = cpu_peak.cpu_peak_flops(refine=True)
  assert peak == 2e11 and 'cached' in source and len(calls) == 1
  data = json.loads((tmp_path / 'peak.json').read_text())
  (key, entry), = data.items()
  assert key == cpu_peak.machine_key('float32')
  assert f'jax {jax.__version__}' in key and f'{cpu_peak.usable_cores()} cores' in key
  assert cpu_peak.cpu_model() in key and entry['final']


def test_a_busy_measurement_is_provisional_and_refined_by_the_bench(fake_measure):
  script, calls = fake_measure
  script += [(5e10, 0.3), (1.5e11, 0.5), (1e11, 0.95)]
  peak, source = cpu_peak.cpu_peak_flops()
  assert peak == 5e10 and 'provisional' in source
  assert cpu_peak.cpu_peak_flops()[0] == 5e10 and len(calls) == 1  # train: no re-measuring
  assert cpu_peak.cpu_peak_flops(refine=True)[0] == 1.5e11  # the bench: the best so far
  # A quiet run makes the entry final, keeping the best rate seen.
  peak, source = cpu_peak.cpu_peak_flops(refine=True)
  assert peak == 1.5e11 and 'provisional' not in source and len(calls) == 3
  assert cpu_peak.cpu_peak_flops(refine=True)[0] == 1.5e11 and len(calls) == 3


def test_remeasure_and_an_unreadable_cache_measure_again(fake_measure, tmp_path):
  script, calls = fake_measure
  (tmp_path / 'peak.json').write_text('{not json')
  script += [(1e11, 0.9), (3e11, 0.9)]
  assert cpu_peak.cpu_peak_flops()[0] == 1e11
  assert cpu_peak.cpu_peak_flops(remeasure=True)[0] == 3e11 and len(calls) == 2


def test_trainer_divides_by_the_cached_number(fake_measure):
  script, _ = fake_measure
  script.append((1.234e11, 0.95))
  cpu_peak.cpu_peak_flops()
  # The host's peak, shared by this process's CPU devices (8 fake ones in the tests): MFU sums
  # the per-device peak over the mesh, so the whole host counts once.
  assert jax.local_device_count() == 8
  peak, source = trainer._peak_flops(tiny_train_config())  # pylint: disable=protected-access
  assert peak == 1.234e11 / 8 and "the host's 123.4 GFLOP/s over 8 CPU devices" in source


def test_real_measurement_is_a_rate_and_a_share():
  flops, share = cpu_peak.measure(repeats=2)
  assert 1e8 < flops < 1e14 and 0 < share <= 1
