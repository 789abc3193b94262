"""What the command-line tools print: quiet third-party logs, a start-up block, timings, progress.

Console lines are printed (process 0 only), not logged, so they stay readable at the default log
level. Third-party INFO logs (Orbax's ~50 lines per checkpoint save, TFDS, absl, jax) are at
WARNING unless `--verbosity` (or `-v`) asks for more. No jax import at module level: the data and
analysis tools use this module too.
"""

import contextlib
import math
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, TextIO

from absl import flags
from absl import logging


def quiet_logs() -> None:
  """Sets absl/Python logging to WARNING, unless --verbosity/-v was given on the command line;
  without --traceback, leaves out the tracebacks a failed checkpoint write spills."""
  if 'verbosity' in flags.FLAGS and flags.FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  if not ('traceback' in flags.FLAGS and flags.FLAGS.traceback):
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietFailures) for f in handler.filters):
      handler.addFilter(_QuietFailures())
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


# Where the error records of a failed save come from: Orbax's threads, asyncio's tasks, gcsfs's
# retries.
_SAVE_LOGGERS = ('/orbax/', '/asyncio/', '/gcsfs/')


class _QuietFailures:
  """Leaves out the error records with a traceback that a failed save logs: the same cause from
  each thread and retry (~300 lines for one bucket write), which the tool's one-line error
  names; --traceback keeps them."""

  def filter(self, record: Any) -> bool:
    where = record.pathname.replace('\\', '/')
    return not (record.exc_info and any(name in where for name in _SAVE_LOGGERS))


def _quiet_closed_loop(hook: Any) -> Any:
  """sys.unraisablehook without the 'Event loop is closed' a storage client's late callbacks
  raise (from its C++ threads, one per pending request) after a failed save closed Orbax's loop."""
  def unraisablehook(unraisable: Any) -> None:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    hook(unraisable)
  unraisablehook.quiet = True
  return hook if getattr(hook, 'quiet', False) else unraisablehook


def verbose() -> bool:
  """True when INFO logs are shown (--verbosity >= 0 given): third-party chatter is welcome."""
  return ('verbosity' in flags.FLAGS and flags.FLAGS['verbosity'].present
          and logging.get_verbosity() >= logging.INFO)


def _is_main_process() -> bool:
  if 'jax' not in sys.modules:  # The data and analysis tools may run without jax loaded.
    return True
  return sys.modules['jax'].process_index() == 0


_open_line = False  # A 'doing X ...' line waits for its 'done'; other lines start below it.


def say(message: str, stream: TextIO | None = None, end: str = '\n') -> None:
  """Prints one console line on process 0 and flushes it."""
  global _open_line
  if not _is_main_process():
    return
  if _open_line:
    print(file=stream or sys.stdout)
  print(message, file=stream or sys.stdout, end=end, flush=True)
  _open_line = end != '\n'


def format_count(n: float) -> str:
  """12.3k / 1.85M / 7.0B style counts (parameters, tokens)."""
  for div, suffix in ((1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
    if abs(n) >= div:
      return f'{n / div:.3g}{suffix}'
  return f'{n:.0f}'


@contextlib.contextmanager
def timed(what: str, stream: TextIO | None = None) -> Iterator[None]:
  """Prints 'what ...' now and 'done in N s' when the block ends (or 'failed after N s')."""
  global _open_line
  say(f'{what} ...', stream, end='')
  start = time.perf_counter()
  ok = False
  try:
    yield
    ok = True
  finally:
    same_line = _open_line
    _open_line = False  # The closing words go on the open line, or repeat what they close.
    result = 'done' if ok else 'failed'
    say(f'{" " if same_line else what + ": "}{result} in {time.perf_counter() - start:.1f} s',
        stream)


class StepWindow:
  """Times the train steps of one logging window, leaving out eval, analysis and checkpoints.

  `excluded()` wraps work that is not a train step; the caller first waits for the queued steps
  (jax dispatches asynchronously), so their time is not excluded with it.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    """Starts a new window now."""
    self._start = time.perf_counter()
    self._excluded = 0.0
    self.steps = 0
    self._losses: list[Any] = []

  def add(self, loss: Any, timed: bool = True) -> None:
    """Keeps one step's loss (a device scalar, read at log time); counts it as timed or not."""
    self.steps += int(timed)
    self._losses.append(loss)

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    """Time spent in the block is not train-step time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - start

  def step_time(self) -> float:
    """Mean seconds per train step in this window (wall time less the excluded blocks)."""
    return max(time.perf_counter() - self._start - self._excluded, 1e-9) / max(self.steps, 1)

  def mean_loss(self) -> float:
    """The mean of the window's finite step losses (NaN when none was finite)."""
    values = [float(v) for v in self._losses]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def startup_block(rows: Mapping[str, str], title: str) -> str:
  """A title line and aligned 'name  value' rows, printed once before training starts."""
  width = max(len(k) for k in rows) if rows else 0
  return '\n'.join([title] + [f'  {k:<{width}}  {v}' for k, v in rows.items()])


def progress(items: Iterable[Any], what: str, every_s: float = 30.0,
             count: Any = None, total: float | None = None, unit: str = '') -> Iterator[Any]:
  """Yields the items, printing 'what: n [of total] unit, elapsed' at most every `every_s`.

  `count(item)` says how much an item adds (default 1). Nothing is printed for work that ends
  before the first `every_s`, so short loops stay silent.
  """
  start = last = time.perf_counter()
  done = 0.0
  for item in items:
    yield item
    done += 1 if count is None else count(item)
    now = time.perf_counter()
    if now - last >= every_s:
      last = now
      of = f' of {format_count(total)}' if total else ''
      pct = f' ({100 * done / total:.0f}%)' if total else ''
      say(f'{what}: {format_count(done)}{of} {unit}{pct}, {now - start:.0f} s'.replace('  ', ' '))


def _data_line(config: Any) -> str:
  d = config.data
  where = {'embedded': 'embedded corpus',
           'tfds': f'TFDS {d.tfds_name} in {d.data_dir or "$TFDS_DATA_DIR"}',
           'text_folder': f'text folder {d.text_dir}'}.get(d.source, f'data.source={d.source}')
  tokenizer = d.tokenizer or f'the default ({d.tokenizer_vocab_size} pieces)'
  return f'{where}, {d.layout} layout, tokenizer {tokenizer}'


def run_header(config: Any, mesh: Any, abstract_params: Any, workdir: str,
               resumed_from: str | None, total_steps: int,
               extra: Mapping[str, str] | None = None) -> str:
  """The start-up block of a training run: model, size, tokens, devices, data, workdir, and
  the `extra` rows (the MFU peak and its source, a schedule changed on resume)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import allocator  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import xla_flags  # pylint: disable=import-outside-toplevel
  m, o = config.model, config.optim
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(abstract_params)]
  batch, length = o.global_batch_size, config.data.max_length
  dev = jax.devices()
  kinds = sorted({d.device_kind for d in dev})
  mesh_text = ' x '.join(f'{k} {v}' for k, v in dict(mesh.shape).items())
  rows = {
      'model': (f'{config.get("size_name", "?")} {m.norm_type}: {m.num_layers} layers, hidden '
                f'{m.hidden_size}, vocab {m.vocab_size}, {m.param_dtype}/{m.compute_dtype}'),
      'parameters': f'{format_count(sum(sizes))} ({sum(sizes):,}, embedding and head included)',
      'tokens/step': (f'{batch * length:,} ({batch} x {length}); {total_steps} steps = '
                      f'{format_count(batch * length * total_steps)} tokens'),
      'devices': (f'{len(dev)} x {", ".join(kinds)} ({dev[0].platform}) on '
                  f'{jax.process_count()} process(es); mesh {mesh_text}'),
      'data': _data_line(config),
      'workdir': workdir,
      'resumed from': resumed_from or 'nothing (a new run)',
      'allocator': allocator.describe(),
      'XLA_FLAGS': xla_flags.describe(),
      **(extra or {}),
  }
  return startup_block(rows, f'gpas_jax: training {config.get("size_name", "")} '
                             f'{m.norm_type}'.rstrip())
