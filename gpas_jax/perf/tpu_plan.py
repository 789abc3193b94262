"""The train and eval steps compiled by the XLA:TPU compiler (libtpu) for a Cloud TPU slice.

With libtpu installed, `jax.experimental.topologies.get_topology_desc` gives abstract TPU devices
on any host, CPU-only included; `jit(...).lower(...).compile()` over a mesh of them runs the TPU
compiler, whose `memory_analysis()` (per chip) and `cost_analysis()` (per chip: flops, bytes
accessed, `optimal_seconds`) are read back by xla_plan, the report TPU and GPU plans share (its
loop correction, roofline step and MFU). The TPU compiler refuses a program larger than HBM; its
refusal's figures are reported.
"""

import importlib.util
import os
from typing import Any

from gpas_jax.perf import xla_plan

GIB = xla_plan.GIB

# Cloud TPU accelerator types -> (topology, chip config). v5e/v6e count chips; v4/v5p count
# TensorCores, two per chip, as Google's names do (v5p-128 = 64 chips, 4x4x4).
SLICES = {
    'v5e-8': 'v5e:2x4', 'v5e-64': 'v5e:8x8', 'v5e-256': 'v5e:16x16',
    'v5p-8': 'v5p:2x2x1', 'v5p-32': 'v5p:2x2x4', 'v5p-128': 'v5p:4x4x4',
    'v6e-8': 'v6e:2x4', 'v6e-256': 'v6e:16x16', 'v4-32': 'v4:2x2x4',
}
# HBM per chip (GiB), the metrics.PEAK_FLOPS key and HBM bandwidth (bytes/s) of each generation.
CHIPS = {'v4': (32, 'tpu_v4', 1.2e12), 'v5e': (16, 'tpu_v5e', 8.19e11),
         'v5p': (95, 'tpu_v5p', 2.765e12), 'v6e': (32, 'tpu_v6e', 1.64e12)}
# The report's shared parts (tpu_search, tpu_table and the tests read them here too).
loop_ratio, sequential_passes = xla_plan.loop_ratio, xla_plan.sequential_passes
corrected_cost, _oom_bytes = xla_plan.corrected_cost, xla_plan.oom_bytes


def libtpu_available() -> bool:
  """Whether libtpu (the `tpu` extra) is installed: the TPU compiler can run here."""
  return importlib.util.find_spec('libtpu') is not None


def resolve_topology(name: str) -> tuple[str, str]:
  """'v5e-256' or 'v5e:16x16' -> ('v5e:16x16', 'v5e'); raises ValueError naming the fix."""
  topo = SLICES.get(name.lower(), name.lower())
  gen = topo.split(':')[0]
  if ':' not in topo or gen not in CHIPS:
    raise ValueError(f'--topology {name!r}: give a slice ({", ".join(SLICES)}) or '
                     f'<generation>:<shape> with a generation of {", ".join(CHIPS)}, e.g. v5e:16x16.')
  return topo, gen


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The abstract devices of num_slices slices of a topology (libtpu's compiler targets them)."""
  if not libtpu_available():
    raise RuntimeError("the TPU compiler needs libtpu: pip install -e '.[tpu]' (the fake-CPU "
                       'plan runs without it: drop --topology).')
  # libtpu locks /tmp/libtpu_lockfile for the one process that may drive the host's TPU; a
  # compile-only process drives none, so several (test workers, a table run) may load it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topo, gen = resolve_topology(topology)
  kwargs: dict[str, Any] = {'num_slices': num_slices} if num_slices > 1 else {}
  if gen in ('v4', 'v5p'):
    kwargs['chip_config_name'] = 'megacore'  # one device per chip, as on the TPU VM
  with xla_plan.quiet_fd2():
    return list(topologies.get_topology_desc(topology_name=topo, platform='tpu', **kwargs).devices)


def check_topology(topology: str, num_slices: int = 1) -> None:
  """Raises ValueError naming the fix where the TPU compiler refuses the topology (v5e:3x3)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')  # the host's own backend: no TPU to attach here
  topo, _ = resolve_topology(topology)
  if not libtpu_available():
    return  # tpu_devices names the missing extra
  try:
    tpu_devices(topology, num_slices)
  except Exception as e:  # pylint: disable=broad-except  # the compiler's own refusal
    raise ValueError(f'--topology {topology} ({topo}) is not a shape the TPU compiler knows: '
                     f'{str(e).split(": ", 1)[-1].strip()}. Use a slice name (v5e-8, v5p-128, '
                     '...) or a shape whose sides are multiples of a host\'s chips (v5e:4x4).'
                     ) from None


def hbm_bytes(gen: str) -> float:
  """A chip's HBM in bytes."""
  return CHIPS[gen][0] * GIB


def peak_flops(gen: str) -> float:
  """A chip's dense bf16 peak FLOP/s (metrics.PEAK_FLOPS)."""
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  return metrics.PEAK_FLOPS[CHIPS[gen][1]]['bfloat16']


def target(topology: str, num_slices: int = 1, devices: list | None = None) -> xla_plan.Target:
  """The TPU compiler's target: num_slices slices of a topology; the fit is against all of HBM
  (the compiler itself refuses a program larger)."""
  topo, gen = resolve_topology(topology)
  return xla_plan.Target(
      compiler='tpu', topology=topo, num_slices=num_slices,
      devices=devices or tpu_devices(topo, num_slices), chip=gen, memory_bytes=hbm_bytes(gen),
      peak_flops=peak_flops(gen), hbm_bandwidth=CHIPS[gen][2],
      cost=lambda compiled: xla_plan.cost_dict(compiled.cost_analysis()))


def compile_steps(config, topology: str, num_slices: int = 1, with_eval: bool = True,
                  devices: list | None = None) -> dict[str, Any]:
  """Compiles config's train (and eval) step for a slice with the TPU compiler; the report."""
  return xla_plan.compile_steps(config, target(topology, num_slices, devices), with_eval)

