"""Multi-host start-up: jax.distributed from explicit flags, or auto-detected on TPU and SLURM."""

import os

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
