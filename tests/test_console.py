"""The console: quiet third-party logs, timed blocks, step windows, progress lines."""

import math
import time

from absl import flags
from absl import logging

from gpas_jax.runtime import console


def test_quiet_logs_unless_verbosity_given():
  logging.set_verbosity(logging.INFO)
  assert not flags.FLAGS['verbosity'].present
  console.quiet_logs()
  assert logging.get_verbosity() == logging.WARNING
  flags.FLAGS['verbosity'].present = 1  # as if --verbosity=0 had been passed
  try:
    logging.set_verbosity(logging.INFO)
    console.quiet_logs()
    assert logging.get_verbosity() == logging.INFO and console.verbose()
  finally:
    flags.FLAGS['verbosity'].present = 0
    logging.set_verbosity(logging.WARNING)


def test_timed_closes_its_line_or_repeats_what_it_closes(capsys):
  with console.timed('compiling'):
    pass
  assert capsys.readouterr().out.startswith('compiling ... done in ')
  with console.timed('building'):
    console.say('  train split: 10 documents')
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == 'building ...' and lines[1] == '  train split: 10 documents'
  assert lines[2].startswith('building: done in ')


def test_step_window_leaves_out_excluded_time_and_averages_finite_losses():
  window = console.StepWindow()
  window.add(4.0, timed=False)  # the compiling step: its loss counts, its time does not
  window.reset()
  window.add(float('nan'), timed=False)
  window.add(2.0)
  window.add(3.0)
  with window.excluded():
    time.sleep(0.3)
  assert window.steps == 2
  assert window.step_time() < 0.1  # without the exclusion it would be >= 0.15
  assert window.mean_loss() == 2.5
  window.reset()
  window.add(float('inf'))
  assert math.isnan(window.mean_loss())


def test_progress_is_silent_for_short_work_and_reports_long_work(capsys):
  assert list(console.progress(range(3), 'short', every_s=60)) == [0, 1, 2]
  assert capsys.readouterr().out == ''

  def slow():
    for i in range(3):
      time.sleep(0.06)
      yield i

  items = list(console.progress(slow(), 'eval', every_s=0.05, count=lambda i: 10, total=30,
                                unit='tokens'))
  assert items == [0, 1, 2]
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1].startswith('eval: 30 of 30 tokens (100%), ') and len(lines) == 3
