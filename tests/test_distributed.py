"""The hosts' word on one question: through the key-value store, in process order, with a bound."""

import json
import time
import types

import pytest

from gpas_jax import distributed


class _Store:
  """jax.distributed's client as far as exchange uses it; host 1 answers or stays silent."""

  def __init__(self, silent: bool):
    self.kv, self.silent = {}, silent

  def key_value_set(self, key, value):
    self.kv[key] = value
    if not self.silent and key.endswith('/0'):
      self.kv[key[:-1] + '1'] = json.dumps({'host': 1})

  def blocking_key_value_get(self, key, timeout_ms):
    if key not in self.kv:
      time.sleep(timeout_ms / 1000)
      raise RuntimeError(f'DEADLINE_EXCEEDED: {key}')
    return self.kv[key]


@pytest.fixture
def two_hosts(monkeypatch):
  def use(silent: bool) -> _Store:
    store = _Store(silent)
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(jax_distributed.global_state, 'client', store)
    monkeypatch.setattr(distributed, 'jax', types.SimpleNamespace(
        process_count=lambda: 2, process_index=lambda: 0))
    return store
  return use


def test_exchange_gives_every_word_in_process_order_and_numbers_rounds(two_hosts):
  store = two_hosts(silent=False)
  assert distributed.exchange('q', {'host': 0}) == [{'host': 0}, {'host': 1}]
  assert distributed.from_process_0('steps', lambda: [6, 3]) == [6, 3]
  distributed.exchange('q', {'host': 0})
  rounds = sorted(k for k in store.kv if k.startswith('gpas_jax/q/'))
  assert len({k.rsplit('/', 1)[0] for k in rounds}) == 2  # a fresh key for each round


def test_a_silent_host_ends_the_wait_after_the_bound_naming_it(two_hosts, monkeypatch):
  two_hosts(silent=True)
  monkeypatch.setenv('GPAS_HOST_TIMEOUT_S', '0.5')
  t = time.monotonic()
  with pytest.raises(distributed.HostsTimeoutError,
                     match=r"host\(s\) 1 of 2 gave no word on 'q' within 0.5 s"):
    distributed.exchange('q', {'host': 0})
  assert time.monotonic() - t < 5


def test_one_process_needs_no_store():
  assert distributed.exchange('alone', 7) == [7]
