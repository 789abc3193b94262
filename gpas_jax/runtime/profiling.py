"""Where a compiled step's time goes: a profiler trace of a few steps, summarised per op.

`capture` runs steps under `jax.profiler.trace` (the directory opens in TensorBoard's profile
plugin or, via its perfetto_trace.json.gz, in ui.perfetto.dev). `summarize` reads that Perfetto
trace with the step's HLO text: the time of every XLA op (an asynchronous op, such as an Eigen
dot, from its start to its `end:` event), the dots grouped by shape with the FLOP/s they reach,
the other ops grouped by the model source line they come from, and how busy each runtime thread
was. `python -m gpas_jax.perf.bench --profile_dir DIR` prints it for the benchmark's step;
`config.profile` captures a trace during training.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable

from gpas_jax import storage

_INSTR = re.compile(r'^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$', re.M)
_COMPUTATION = re.compile(r'^%(\S+) \(.*?\{\n(.*?)\n\}', re.M | re.S)
_ASYNC_OPCODES = ('dot', 'convolution')
_DOT = re.compile(r'%(\S+) = \S+ dot\(%([^,\s]+), %([^,\s)]+)\)(.*)$', re.M)


@dataclasses.dataclass
class OpGroup:
  """Ops of one kind: time per step summed over their runs, and FLOPs per step for dots."""
  key: str
  ms_per_step: float = 0.0
  count: int = 0
  flops_per_step: float = 0.0

  @property
  def gflops_per_s(self) -> float:
    """FLOP/s while these ops ran (time summed over threads), in GFLOP/s."""
    return self.flops_per_step / self.ms_per_step / 1e6 if self.ms_per_step else 0.0


@dataclasses.dataclass
class Summary:
  """A step's profile: op groups and runtime thread use, per step."""
  steps: int
  step_ms: float
  dots: list[OpGroup]
  others: list[OpGroup]
  thread_busy: list[float]  # fraction of the traced window each runtime thread was working
  trace_file: str

  @property
  def dot_ms(self) -> float:
    """Dot time per step, summed over threads."""
    return sum(g.ms_per_step for g in self.dots)

  @property
  def other_ms(self) -> float:
    """Time of every other op per step, summed over threads."""
    return sum(g.ms_per_step for g in self.others)


def capture(step: Callable[[], object], steps: int, trace_dir: str) -> list[float]:
  """Runs `step` (which must block until done) `steps` times under a trace; their wall times."""
  import jax  # pylint: disable=import-outside-toplevel
  times = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
  return times


def latest_trace(trace_dir: str) -> str:
  """The newest Perfetto trace under trace_dir; raises naming the directory if there is none."""
  files = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir!r}: capture with '
                            'jax.profiler.trace(..., create_perfetto_trace=True) first.')
  return max(files, key=os.path.getmtime)


def _dims(shape: str) -> list[int]:
  m = re.search(r'\[([\d,]*)\]', shape)
  return [int(x) for x in m.group(1).split(',') if x] if m else []


class _Hlo:
  """The parts of an HLO module's text that attribute an op: shapes, dots, source lines."""

  def __init__(self, text: str):
    self.module = re.match(r'HloModule (\S+?),', text).group(1)
    self.shape, self.opcode, self.line = {}, {}, {}
    for m in _INSTR.finditer(text):  # line: the whole instruction, metadata included
      self.shape[m.group(1)], self.opcode[m.group(1)], self.line[m.group(1)] = m.group(2, 3, 0)
    self.body = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(text)}
    self.frames = self._frames(text)

  @staticmethod
  def _frames(text: str) -> dict[int, str]:
    """stack_frame_id -> 'file.py:line function' from the module's source tables, if any."""
    def table(name):
      m = re.search(rf'^{name}\n((?:\d+ .*\n)+)', text, re.M)
      rows = m.group(1).splitlines() if m else []
      return {int(r.split(' ', 1)[0]): r.split(' ', 1)[1] for r in rows}
    files, funcs = table('FileNames'), table('FunctionNames')
    locs, frames = table('FileLocations'), table('StackFrames')
    out = {}
    for fid, frame in frames.items():
      try:
        loc = locs[int(re.search(r'file_location_id=(\d+)', frame).group(1))]
        path = files[int(re.search(r'file_name_id=(\d+)', loc).group(1))].strip('"')
        func = funcs[int(re.search(r'function_name_id=(\d+)', loc).group(1))].strip('"')
        line = re.search(r' line=(\d+)', loc).group(1)
        out[fid] = f'{os.path.basename(path)}:{line} {func}'
      except (KeyError, AttributeError):
        continue
    return out

  def dot(self, op: str) -> tuple[str, float] | None:
    """(group key, FLOPs) if `op` is a dot or a fusion around one, else None."""
    line = self.line.get(op, '')
    calls = re.search(r'calls=%([^,\s]+)', line)
    if self.opcode.get(op) == 'dot':
      text = line
    else:
      text = self.body.get(calls.group(1), '') if calls else ''
    m = _DOT.search(text)
    if not m:
      return None
    out, lhs, _, rest = m.groups()
    lhs_dims = _dims(self.shape.get(lhs, ''))
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest).group(1)
    k = 1
    for c in filter(None, contracting.split(',')):
      k *= lhs_dims[int(c)]
    out_shape = self.shape.get(out, '').split('{')[0]
    flops = 2.0 * k
    for d in _dims(out_shape):
      flops *= d
    lhs_shape = 'x'.join(map(str, lhs_dims))
    return f'{out_shape} <- lhs [{lhs_shape}] contracting {{{contracting}}}', flops

  def source(self, op: str) -> str:
    """The model source line an op comes from (its op_name if the module has no source table)."""
    line = self.line.get(op, '')
    frame = re.search(r'stack_frame_id=(\d+)', line)
    if frame and int(frame.group(1)) in self.frames:
      return self.frames[int(frame.group(1))]
    name = re.search(r'op_name="([^"]+)"', line)
    return name.group(1).split('/')[-1] if name else op


def _union_ms(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, None
  start = None
  for a, b in sorted(intervals):
    if end is None or a > end:
      if end is not None:
        total += end - start
      start, end = a, b
    else:
      end = max(end, b)
  return (total + (end - start)) / 1e3 if end is not None else 0.0


def summarize(trace_file: str, hlo_text: str, steps: int, step_ms: float = 0.0) -> Summary:
  """Per-op times of the module `hlo_text` in a Perfetto trace of `steps` steps."""
  hlo = _Hlo(hlo_text)
  with gzip.open(trace_file, 'rt') as f:
    events = json.load(f)['traceEvents']
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  regions = collections.defaultdict(list)
  for e in events:
    if e.get('ph') != 'X':
      continue
    name, args = e['name'], e.get('args', {})
    if args.get('hlo_module') == hlo.module and args.get('hlo_op') in hlo.shape:
      starts[args['hlo_op']].append(e)
    elif name.startswith('end: ') and name[5:] in hlo.shape:
      ends[name[5:]].append(e)
    elif name.startswith('ThreadpoolListener::'):
      regions[e['tid']].append(e)
  dots: dict[str, OpGroup] = {}
  others: dict[str, OpGroup] = {}
  busy = collections.defaultdict(list)
  for op, runs in starts.items():
    runs.sort(key=lambda e: e['ts'])
    done = sorted(ends.get(op, []), key=lambda e: e['ts'])
    dot = hlo.dot(op)
    group = (dots.setdefault(dot[0], OpGroup(dot[0])) if dot else
             others.setdefault(hlo.source(op), OpGroup(hlo.source(op))))
    # XLA:CPU runs an unfused dot (Eigen) asynchronously: its event marks the launch, its work
    # ends at its 'end:' event. Other ops' events span their work ('end:' may come later, when
    # the executor gets to it).
    is_async = hlo.opcode[op] in _ASYNC_OPCODES and len(done) == len(runs)
    for i, e in enumerate(runs):
      finish = e['ts'] + e['dur']
      if is_async and done[i]['ts'] >= e['ts']:
        finish = max(finish, done[i]['ts'] + done[i]['dur'])
      group.ms_per_step += (finish - e['ts']) / 1e3 / steps
      busy[e['tid']].append((e['ts'], e['ts'] + e['dur']))
    group.count += len(runs) // steps
    if dot:
      group.flops_per_step += dot[1] * len(runs) / steps
  for tid, evs in regions.items():  # a thread lent to another op's parallel loop is working too
    opened = None
    for e in sorted(evs, key=lambda e: e['ts']):
      if e['name'].endswith('StartRegion'):
        opened = e['ts']
      elif e['name'].endswith('StopRegion') and opened is not None:
        busy[tid].append((opened, e['ts']))
        opened = None
  spans = [iv for ivs in busy.values() for iv in ivs]
  window = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e3 if spans else 0.0
  per_thread = collections.Counter(e['tid'] for runs in starts.values() for e in runs)
  # The runtime's worker threads; the caller's thread runs a few ops, then waits.
  threads = [t for t, n in per_thread.items() if n >= 0.1 * sum(per_thread.values())]
  thread_busy = sorted((_union_ms(busy[t]) / window if window else 0.0 for t in threads),
                       reverse=True)
  order = lambda groups: sorted(groups.values(), key=lambda g: -g.ms_per_step)
  return Summary(steps, step_ms, order(dots), order(others), thread_busy, trace_file)


def format_summary(s: Summary, top: int = 12) -> str:
  """The summary as a few tables of text."""
  lines = [f'profile of {s.steps} steps: {s.trace_file}',
           f'step {s.step_ms:.1f} ms; runtime threads busy '
           + ' / '.join(f'{b:.0%}' for b in s.thread_busy)
           + ' of the traced time (times below are summed over threads)']
  flops = sum(g.flops_per_step for g in s.dots)
  lines.append(f'dots: {s.dot_ms:.1f} ms/step, {flops / 1e9:.2f} GFLOP/step, '
               f'{flops / s.dot_ms / 1e6 if s.dot_ms else 0:.1f} GFLOP/s per thread (an '
               'asynchronous dot counts from launch to end, sharing the threads with other ops)')
  lines.append(f'  {"ms/step":>8} {"n":>3} {"GFLOP/s":>8}  output <- operand')
  for g in s.dots[:top]:
    lines.append(f'  {g.ms_per_step:8.1f} {g.count:3d} {g.gflops_per_s:8.1f}  {g.key}')
  lines.append(f'other ops: {s.other_ms:.1f} ms/step, by source line')
  for g in s.others[:top]:
    lines.append(f'  {g.ms_per_step:8.1f} {g.count:3d}  {g.key}')
  return '\n'.join(lines)


class TraceWindow:
  """A profiler trace of train steps start .. start + count - 1 (1-based, as logged)."""

  def __init__(self, start: int, count: int, trace_dir: str):
    self.start, self.count, self.trace_dir = start, count, trace_dir
    self.active = False
    self._local = None  # the profiler writes local files; a bucket gets a copy at close()

  def before(self, step_number: int) -> None:
    """Called before running step `step_number`: starts the trace at the first one."""
    if self.start and step_number == self.start and not self.active:
      import jax  # pylint: disable=import-outside-toplevel
      target = self.trace_dir
      if storage.is_url(target):
        self._local = target = tempfile.mkdtemp(prefix='gpas_jax_trace_')
      jax.profiler.start_trace(target, create_perfetto_trace=True)
      self.active = True

  def due(self, step_number: int) -> bool:
    """True after dispatching the last traced step: wait for it, then close()."""
    return self.active and step_number >= self.start + self.count - 1

  def close(self) -> None:
    """Stops an open trace (a run that ends inside the window)."""
    if self.active:
      import jax  # pylint: disable=import-outside-toplevel
      jax.profiler.stop_trace()
      self.active = False
      if self._local:
        storage.copy_tree(self._local, self.trace_dir)
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None
