"""XLA:CPU settings measured faster for the train step, added to XLA_FLAGS before JAX starts.

XLA:CPU (this jaxlib) hands dots and reductions to YNNPACK by default
(`--xla_cpu_experimental_ynn_fusion_type` = individual_dot, reduce). On the 2-core CPU bench,
dots on XLA's own Eigen kernels with YNNPACK's reductions kept (`=reduce`) make the train step
faster: XLA's default takes 4.6% [2.8%, 7.4%] longer (docs/PERFORMANCE.md); the attention's
small batched matmuls run 30-50% faster and the large ones as fast. Turning YNNPACK off
altogether is no faster (its reductions beat XLA's). The flag only changes how XLA:CPU
compiles; other backends ignore it.

`apply_cpu_defaults()` adds the flags to os.environ['XLA_FLAGS'] unless the user set the same
flag there already (theirs wins) or set GPAS_XLA_CPU_DEFAULTS=0. train.py and the benchmark call
it at start-up; it must run before JAX creates its CPU backend (the first computation).
"""

import os
from typing import MutableMapping

OPT_OUT_ENV = 'GPAS_XLA_CPU_DEFAULTS'
# (flag, value): Eigen's dots, YNNPACK's reductions.
CPU_DEFAULTS = (('--xla_cpu_experimental_ynn_fusion_type', 'reduce'),)


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Appends CPU_DEFAULTS to environ's XLA_FLAGS where not set; returns the flags added."""
  env = os.environ if environ is None else environ
  if env.get(OPT_OUT_ENV, '1') == '0':
    return []
  current = env.get('XLA_FLAGS', '')
  set_already = {part.split('=', 1)[0] for part in current.split()}
  added = [f'{flag}={value}' for flag, value in CPU_DEFAULTS if flag not in set_already]
  if added:
    env['XLA_FLAGS'] = ' '.join([current.strip()] + added).strip()
  return added


def describe(environ: MutableMapping[str, str] | None = None) -> str:
  """The XLA_FLAGS this process runs with, or 'none'."""
  env = os.environ if environ is None else environ
  return env.get('XLA_FLAGS', '').strip() or 'none'
