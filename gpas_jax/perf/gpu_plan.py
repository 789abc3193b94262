"""The train and eval steps compiled by the XLA:GPU compiler for NVIDIA GPU nodes, on any host.

With the `gpu` extra (jax-cuda12-plugin: the compiler; nvidia-cuda-nvcc-cu12: ptxas and libdevice)
and JAX started on the CPU platform, `jax.experimental.topologies.get_topology_desc(platform=
'cuda', target_config=<a chip's description>, topology='1x<hosts>x<gpus>')` gives abstract GPUs
on `hosts` processes; `jit(...).lower(...).compile()` over a mesh of them runs the whole XLA:GPU
pipeline to the chip's code ("deviceless compilation": no GPU, no driver). The chips' descriptions
(gpu_specs/*.txtpb, package data) are XLA's target-config text of their published figures.

What is read back (xla_plan: the report TPU and GPU plans share):
- memory: `memory_analysis()` per GPU. The GPU compiler does not refuse a program larger than
  HBM (a 105 GiB program compiled for an 80 GiB H100), so the fit is this module's comparison:
  the peak against the memory a JAX process gets on the GPU, its allocator's share of HBM
  (XLA_PYTHON_CLIENT_MEM_FRACTION as the run sets it, JAX's default 0.75);
- cost: the GPU executable has no `cost_analysis()` ("GetCostAnalysis is not supported"), so
  XLA's HLO cost analysis runs on the compiled per-GPU module (jaxlib's
  hlo_module_cost_analysis): FLOPs and bytes accessed, loop bodies counted once (corrected as
  for TPU);
- the step estimate: flops / dense bf16 peak + bytes / HBM bandwidth. Collectives over NVLink
  (within a node) and InfiniBand (between nodes) are not counted.
"""

import importlib.metadata
import os
import re
from typing import Any

from gpas_jax.perf import xla_plan
from gpas_jax.runtime import cli

GIB = xla_plan.GIB
SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_specs')
# chip -> (metrics.PEAK_FLOPS key, HBM bandwidth in bytes/s from the data sheet: H100 SXM
# 3.35 TB/s, H200 4.8 TB/s, A100 SXM 80GB 2.039 TB/s).
CHIPS = {'h100': ('h100', 3.35e12), 'h200': ('h200', 4.8e12), 'a100': ('a100', 2.039e12)}
# attention_impl values a GPU plan may use: XLA's own and cuDNN's fused kernel. The latter only
# where cuDNN is installed (nvidia-cudnn-cu12, not in the gpu extra): without it JAX refuses it
# before the compiler runs ("cuDNN is not detected").
ATTENTION = ('xla', 'cudnn')
DEFAULT_MEM_FRACTION = 0.75  # JAX's preallocation of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)
_TOPOLOGY = re.compile(r'^(\w+):(\d+)x(\d+)$')


def is_gpu_topology(name: str) -> bool:
  """Whether --topology names GPU nodes ('h100:2x8') rather than a TPU slice."""
  m = _TOPOLOGY.match(name.lower())
  return bool(m) and m.group(1) in CHIPS


def _installed(*dists: str) -> bool:
  for dist in dists:  # by distribution: a plugin's module may be deferred (gpas_jax)
    try:
      importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return False
  return True


def gpu_compiler_available() -> bool:
  """Whether the gpu extra is installed: the XLA:GPU compiler can run here."""
  return _installed('jax-cuda12-plugin', 'nvidia-cuda-nvcc-cu12')


def attention_impls() -> tuple[str, ...]:
  """The attention_impl values a search tries here (cuDNN's only where it is installed)."""
  return ATTENTION if _installed('nvidia-cudnn-cu12') else ATTENTION[:1]


def resolve_topology(name: str) -> tuple[str, int, int]:
  """'h100:2x8' -> ('h100', 2 hosts, 8 GPUs per host); refuses others naming the fix."""
  m = _TOPOLOGY.match(name.lower())
  if not m or m.group(1) not in CHIPS or int(m.group(2)) < 1 or int(m.group(3)) < 1:
    raise cli.UserError(f'--topology {name!r}: give GPU nodes as <chip>:<hosts>x<gpus per host> with '
                     f'a chip of {", ".join(CHIPS)}, e.g. h100:1x8 (one node of 8) or h100:4x8.')
  return m.group(1), int(m.group(2)), int(m.group(3))


def spec_text(chip: str) -> str:
  """The chip's description in XLA's target-config text format (package data)."""
  with open(os.path.join(SPECS, f'{chip}.txtpb'), encoding='utf-8') as f:
    return f.read()


def spec_field(chip: str, field: str) -> float:
  """A number of the chip's description (device_memory_size, memory_bandwidth, ...)."""
  return float(re.search(rf'\b{field}: ([\d.]+)', spec_text(chip)).group(1))


def mem_fraction() -> float:
  """The share of a GPU's memory JAX's allocator takes: XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75."""
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', DEFAULT_MEM_FRACTION))


def cuda_data_dir() -> str:
  """The CUDA directory XLA compiles with (ptxas, libdevice): the nvidia-cuda-nvcc-cu12 wheel's,
  as JAX finds it (CUDA_ROOT overrides it); refuses (cli.UserError, naming the fix) where it
  lacks either, so no compile falls back on a CUDA toolkit the host happens to carry."""
  from jax._src import lib  # pylint: disable=import-outside-toplevel
  path = lib.cuda_path or ''
  if not (os.path.isfile(os.path.join(path, 'bin', 'ptxas'))
          and os.path.isdir(os.path.join(path, 'nvvm', 'libdevice'))):
    where = f'CUDA_ROOT={path!r}' if os.environ.get('CUDA_ROOT') else f'{path or "none found"}'
    raise cli.UserError(f'the GPU compiler needs ptxas and libdevice ({where} lacks them): pip '
                       "install -e '.[gpu]' (nvidia-cuda-nvcc-cu12), and unset CUDA_ROOT.")
  return path


def gpu_devices(chip: str, hosts: int, gpus: int) -> list:
  """The abstract GPUs of `hosts` nodes of `gpus` chips each (process_index = the host)."""
  if not gpu_compiler_available():
    raise cli.UserError("the GPU compiler needs the gpu extra: pip install -e '.[gpu]' (the "
                       'fake-CPU plan runs without it: drop --topology).')
  import gpas_jax  # pylint: disable=import-outside-toplevel
  gpas_jax.load_gpu_plugin()
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if jax.config.jax_platforms != 'cpu':
    # The plugin's CUDA check fails on a host without a driver, and no 'cuda' topology exists.
    raise cli.UserError('the GPU compiler runs with JAX on the CPU platform: set '
                       'JAX_PLATFORMS=cpu before JAX starts.')
  cuda_data_dir()
  with xla_plan.quiet_fd2():  # the CUDA libraries' start-up: "could not find cuda drivers"
    topo = topologies.get_topology_desc(platform='cuda', target_config=spec_text(chip),
                                        topology=f'1x{hosts}x{gpus}')
  return list(topo.devices)


def hlo_cost(compiled) -> dict[str, float]:
  """XLA's HLO cost analysis of a compiled per-GPU module (flops, bytes accessed)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel
  mod = compiled.runtime_executable().hlo_modules()[0]
  cost = xla_client._xla.hlo_module_cost_analysis(  # pylint: disable=protected-access
      jax.devices('cpu')[0].client, mod)
  return xla_plan.cost_dict(cost)


def target(topology: str, devices: list | None = None) -> xla_plan.Target:
  """The GPU compiler's target: `hosts` nodes of `gpus` chips."""
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  chip, hosts, gpus = resolve_topology(topology)
  frac = mem_fraction()
  total = spec_field(chip, 'device_memory_size')
  return xla_plan.Target(
      compiler='gpu', topology=f'{chip}:{hosts}x{gpus}', num_slices=1,
      devices=devices or gpu_devices(chip, hosts, gpus), chip=chip, memory_bytes=frac * total,
      peak_flops=metrics.PEAK_FLOPS[CHIPS[chip][0]]['bfloat16'], hbm_bandwidth=CHIPS[chip][1],
      cost=hlo_cost,
      notes={'hosts': hosts, 'gpus_per_host': gpus, 'hbm_total_bytes_per_chip': total,
             'memory_fraction': frac, 'cuda_data_dir': cuda_data_dir(),
             'memory_limit': f'{frac:g} of HBM: what JAX\'s allocator takes '
                             '(XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)',
             'not_counted': 'collectives over NVLink and InfiniBand',
             'attention_impls': attention_impls()})


def compile_steps(config, topology: str, with_eval: bool = True,
                  devices: list | None = None) -> dict[str, Any]:
  """Compiles config's train (and eval) step for GPU nodes with the GPU compiler; the report."""
  return xla_plan.compile_steps(config, target(topology, devices), with_eval)
