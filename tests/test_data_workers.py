"""gpas_jax.data.workers: data.worker_count=-1 picks the tokenizer workers from the host's cores."""

import os

import pytest

from configs import base
from gpas_jax import config as config_lib
from gpas_jax.data import validate_data
from gpas_jax.data import workers
from gpas_jax.data.errors import DataError
from tests.helpers import tiny_train_config


@pytest.mark.parametrize('cores,expected', [
    (1, 0), (2, 0), (4, 0), (7, 0),  # laptops, CI, this machine: no worker start-up to wait for
    (8, 2), (16, 4), (32, 8),
    (112, 16), (224, 16),  # a v5e TPU VM (4 chips), the 8-chip one
    (180, 16), (208, 16), (240, 16),  # v6e, v5p, v4
])
def test_rule(cores, expected):
  assert workers.auto_worker_count(cores) == expected


def test_rule_grows_with_the_cores_and_stays_capped():
  counts = [workers.auto_worker_count(n) for n in range(1, 513)]
  assert counts == sorted(counts)
  assert max(counts) == workers.MAX_WORKERS
  # Three quarters of a big host's vCPUs stay with the trainer.
  assert all(w * workers.CORES_PER_WORKER <= n for n, w in enumerate(counts, 1))


def test_resolve_reads_this_process_cores(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(2)), raising=False)
  assert workers.available_cores() == 2
  assert workers.resolve(-1) == 0  # this 2-core machine: tokenize in the trainer
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(112)), raising=False)
  assert workers.resolve(-1) == 16  # a v5e TPU VM
  assert [workers.resolve(n) for n in (0, 1, 3, 40)] == [0, 1, 3, 40]  # a user's count is kept


def test_default_is_auto_and_accepted():
  assert base.get_config().data.worker_count == workers.AUTO
  c = tiny_train_config()
  assert c.data.worker_count == -1
  config_lib.validate(c)
  validate_data(c, 1)


@pytest.mark.parametrize('bad', [-2, -7])
def test_other_values_are_refused_naming_the_fix(bad):
  with pytest.raises(DataError, match=rf'data.worker_count={bad}.*-1 for a count chosen'):
    workers.resolve(bad)
  c = tiny_train_config(**{'data.worker_count': bad})
  with pytest.raises(DataError, match=rf'data.worker_count={bad}'):
    validate_data(c, 1)
  with pytest.raises(config_lib.ConfigError, match=rf'data.worker_count={bad} must be an integer'):
    config_lib.validate(c)


def test_a_fraction_is_refused():
  with pytest.raises(DataError, match=r'data.worker_count=1.5 must be >= 0'):
    workers.resolve(1.5)
