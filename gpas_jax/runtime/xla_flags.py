"""config.xla_flags: XLA flags of a config, added to XLA_FLAGS before JAX starts its backend.

Some XLA:CPU settings are faster for one model shape and slower for another, so they belong to
the config that was measured, not to every run. configs/bench_cpu.py sets
`--xla_cpu_experimental_ynn_fusion_type=reduce`: XLA:CPU (this jaxlib) hands dots and reductions
to YNNPACK by default (`individual_dot,reduce`); with dots on XLA's own Eigen kernels and the
reductions still on YNNPACK its train step is 4.6% [2.8%, 7.4%] faster, while the tiny config's
is 1-4% slower and the 71m-shaped one's unchanged (docs/PERFORMANCE.md).

`apply(config)` appends the config's flags to os.environ['XLA_FLAGS'], except a flag the
environment already sets (the user's XLA_FLAGS wins). train.py and the benchmark call it before
the first computation: a backend already running would ignore them, so that raises.
"""

import os
from typing import Any, MutableMapping


def parse(text: str) -> list[str]:
  """The flags of config.xla_flags; raises ValueError naming a word that is not a --flag."""
  flags = text.split()
  for flag in flags:
    if not flag.startswith('--') or len(flag) < 3 or flag.startswith('--='):
      raise ValueError(
          f'xla_flags={text!r}: {flag!r} is not an XLA flag; give space-separated --name=value '
          "flags, e.g. --config.xla_flags='--xla_cpu_experimental_ynn_fusion_type=reduce'.")
  return flags


def _name(flag: str) -> str:
  return flag.split('=', 1)[0]


def _names_set(environ: MutableMapping[str, str]) -> set[str]:
  return {_name(part) for part in environ.get('XLA_FLAGS', '').split()}


def add_flags(flags: list[str], environ: MutableMapping[str, str]) -> list[str]:
  """Appends to environ's XLA_FLAGS the flags it does not set already; returns those added."""
  current = environ.get('XLA_FLAGS', '')
  set_already = _names_set(environ)
  added = [f for f in flags if _name(f) not in set_already]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current.strip()] + added).strip()
  return added


def apply(config: Any, environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Adds config.xla_flags to XLA_FLAGS before any JAX backend starts; returns those added."""
  flags = parse(config.get('xla_flags', '') or '')
  env = os.environ if environ is None else environ
  added = add_flags(flags, env)
  if added and environ is None and _backends_started():
    raise RuntimeError(f'xla_flags {added} were set after JAX started its backend, which '
                       'ignores them; apply them before the first computation.')
  return added


def not_in_effect(config: Any, environ: MutableMapping[str, str] | None = None) -> list[str]:
  """config.xla_flags that XLA_FLAGS lacks (a caller started JAX without applying them)."""
  names = _names_set(os.environ if environ is None else environ)
  return [f for f in parse(config.get('xla_flags', '') or '') if _name(f) not in names]


def describe(environ: MutableMapping[str, str] | None = None) -> str:
  """The XLA_FLAGS this process runs with, or 'none'."""
  env = os.environ if environ is None else environ
  return env.get('XLA_FLAGS', '').strip() or 'none'


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False
