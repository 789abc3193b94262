"""How many tokenizer worker processes the pipeline starts: data.worker_count, or the rule below.

data.worker_count = -1 (the default) picks from the cores this process may run on:

  fewer than MIN_CORES cores  ->  0 (tokenize in the trainer process)
  otherwise                   ->  min(MAX_WORKERS, cores // CORES_PER_WORKER)

Why: a worker is a spawned process that imports grain, TFDS and SentencePiece, so its first batch
comes seconds after it starts (3-8 s on a busy 2-core machine); on a laptop, a CI runner or a small
GPU host that start-up only slows short runs and tests, and the few cores are wanted by the trainer
itself (XLA's compiler and host threads, checkpoint writes). A TPU VM has far more cores than one
process uses: a v5e VM 112 vCPUs for 4 chips (224 for 8), v5p 208 for 4, v6e 180 for 4 or 8, v4 240
for 4; there workers also take tokenizing off the training loop's GIL. One worker per
CORES_PER_WORKER vCPUs leaves three quarters of them (hyperthreads: two per physical core) to the
trainer. MAX_WORKERS covers the hungriest plan of docs/tpu_table.jsonl (71m on v6e-8: 2.9M tokens/s
per host) at the slowest per-core rate `python -m gpas_jax.perf.data_bench` measured (a 32k BPE
tokenizer, padded rows: ~300k tokens per CPU-second, so ~10 cores; ~14 at the rate with workers'
overhead; docs/DATA.md); more would add only start-up time and memory (each worker holds its own
tokenizer and buffers). So a TPU VM gets 16 workers, an 8-core host 2, this project's 2-core
development machine 0.
"""

import os

from gpas_jax.data.errors import DataError

AUTO = -1
MIN_CORES = 8
CORES_PER_WORKER = 4
MAX_WORKERS = 16


def available_cores() -> int:
  """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def auto_worker_count(cores: int | None = None) -> int:
  """The rule's worker count for a host with `cores` cores (default: this process's cores)."""
  cores = available_cores() if cores is None else cores
  if cores < MIN_CORES:
    return 0
  return min(MAX_WORKERS, cores // CORES_PER_WORKER)


def check(worker_count: int) -> None:
  """Raises DataError unless worker_count is a count (>= 0) or AUTO (-1)."""
  if not isinstance(worker_count, int) or worker_count < AUTO:
    raise DataError(f'data.worker_count={worker_count!r} must be >= 0, or -1 for a count chosen '
                    "from the host's cores.")


def resolve(worker_count: int) -> int:
  """data.worker_count as the pipeline uses it: -1 -> auto_worker_count(), else the value."""
  check(worker_count)
  return auto_worker_count() if worker_count == AUTO else worker_count


def workers_row(worker_count: int) -> str:
  """The start-up block's row: how many tokenizer processes feed this host, and why."""
  n = resolve(worker_count)
  why = (f"auto: {available_cores()} cores" if worker_count == AUTO else 'data.worker_count')
  return f'{n} tokenizer process(es) ({why}; 0: the trainer process tokenizes)'
