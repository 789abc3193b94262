"""PLACEHOLDER (replaced by the issue27b branch)."""
import os
def auto_worker_count(cores=None) -> int:
  cores = cores or os.cpu_count() or 1
  return 0 if cores < 8 else min(16, cores // 4)
def resolve(worker_count: int) -> int:
  return auto_worker_count() if worker_count < 0 else worker_count
def workers_row(worker_count: int) -> str:
  """The start-up block's row: how many tokenizer processes feed this host, and why."""
  n = resolve(worker_count)
  why = (f'auto from {os.cpu_count()} cores' if worker_count < 0 else 'data.worker_count')
  return f'{n} tokenizer process(es) ({why}; 0: in the trainer process)'
