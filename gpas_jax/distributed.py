"""Multi-host start-up (jax.distributed from flags, or auto-detected on TPU and SLURM) and the
hosts' word on one question, exchanged with a bound on the wait."""

import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections


def _cluster_detected() -> bool:
  """True on a multi-host TPU slice or a multi-task SLURM job, where jax finds its peers."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1 or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ


def maybe_initialize(config: ml_collections.ConfigDict) -> None:
  """Calls jax.distributed.initialize() when the run spans several processes."""
  d = config.distributed
  if d.coordinator_address:
    host = d.coordinator_address.rsplit(':', 1)[0]
    kwargs = {}
    if host in ('127.0.0.1', 'localhost'):  # a local test: never listen beyond loopback
      kwargs['coordinator_bind_address'] = d.coordinator_address
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id, **kwargs)
  elif _cluster_detected():
    jax.distributed.initialize()


class HostsTimeoutError(RuntimeError):
  """Some hosts did not answer within the bound; the message names them."""


# How long a host waits for the others' word: longer than any host's own work on the question
# (a restore's storage retries are bounded at ~31 s, checkpoint.GCS_RETRIES) plus a wide margin,
# so a host that died or hangs stops the others instead of holding them forever.
DEFAULT_TIMEOUT_S = 600.0
_rounds: dict[str, int] = {}


def timeout_s() -> float:
  """The bound of one exchange: GPAS_HOST_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
  return float(os.environ.get('GPAS_HOST_TIMEOUT_S', DEFAULT_TIMEOUT_S))


def exchange(topic: str, word: Any) -> list[Any]:
  """Every host's JSON `word` on `topic`, in process order (this host's included).

  Runs through jax.distributed's key-value store, not device collectives, so a host that never
  answers ends the wait with HostsTimeoutError after timeout_s() instead of a hang. Every host
  must ask the same topics in the same order (each topic's rounds are numbered).
  """
  count = jax.process_count()
  if count == 1:
    return [word]
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  client = jax_distributed.global_state.client
  n = _rounds[topic] = _rounds.get(topic, 0) + 1
  key = f'gpas_jax/{topic}/{n}'
  client.key_value_set(f'{key}/{jax.process_index()}', json.dumps(word))
  deadline = time.monotonic() + timeout_s()
  words, missing = [], []
  for p in range(count):
    left_ms = max(1, int(1000 * (deadline - time.monotonic())))
    try:
      words.append(json.loads(client.blocking_key_value_get(f'{key}/{p}', left_ms)))
    except Exception:  # pylint: disable=broad-except
      # the client raises on a deadline: collect every silent host
      missing.append(p)
      words.append(None)
  if missing:
    raise HostsTimeoutError(
        f'host(s) {", ".join(map(str, missing))} of {count} gave no word on {topic!r} within '
        f'{timeout_s():g} s (GPAS_HOST_TIMEOUT_S); they died or hang: see their logs.')
  return words


def from_process_0(topic: str, compute: Callable[[], Any]) -> Any:
  """`compute()` on process 0, its JSON result given to every host (the others compute nothing)."""
  word = compute() if jax.process_index() == 0 else None
  return exchange(topic, word)[0]
