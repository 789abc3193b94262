"""Training FLOPs and MFU, peak-FLOPs table, and metric writers (stdout, TensorBoard, jsonl, W&B).

FLOPs follow MaxText's `calculate_tflops_training_per_device`: model FLOPs (no remat
recompute) of fwd + bwd = 3 x forward, matmuls only (norms, SiLU, softmax, GPAS and the embedding
lookup are not counted; the untied lm_head is).
"""

import importlib.util
import math
import sys
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpas_jax import storage

# Dense (no sparsity) peak FLOP/s per chip, from the vendors' data sheets. 'tfloat32' is what
# XLA uses for float32 matmuls on NVIDIA by default; 'float32' is the non-tensor-core rate. MFU
# divides by the rate the matmuls really run at (matmul_peak).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    'tpu_v4': {'bfloat16': 275e12},
    'tpu_v5e': {'bfloat16': 197e12},
    'tpu_v5p': {'bfloat16': 459e12},
    'tpu_v6e': {'bfloat16': 918e12},
    'a100': {'bfloat16': 312e12, 'float16': 312e12, 'tfloat32': 156e12, 'float32': 19.5e12},
    'h100': {'bfloat16': 989e12, 'float16': 989e12, 'tfloat32': 494.7e12, 'float32': 67e12},
    'h100_pcie': {'bfloat16': 756e12, 'float16': 756e12, 'tfloat32': 378e12, 'float32': 51e12},
    'h200': {'bfloat16': 989e12, 'float16': 989e12, 'tfloat32': 494.7e12, 'float32': 67e12},
    # Blackwell: half the data sheets' sparse tensor-core figures (HGX B200 / GB200 per GPU).
    'b200': {'bfloat16': 2.25e15, 'float16': 2.25e15, 'tfloat32': 1.1e15},
    'gb200': {'bfloat16': 2.5e15, 'float16': 2.5e15, 'tfloat32': 1.25e15},
}


def training_flops_per_step(
    model_config: ml_collections.ConfigDict,
    batch_size: int,
    seq_len: int,
    causal: bool = True,
) -> dict[str, float]:
  """Returns the FLOPs of one training step (fwd + bwd) for `batch_size` sequences of `seq_len`.

  Keys: 'total' = 'learnable' + 'attention'; 'learnable' = 6 * matmul params * tokens, split
  into 'qkv', 'attn_out', 'mlp' and 'lm_head'; 'attention' = the QK^T and AV matmuls,
  3 * 4 * B * T^2 * D * L for full attention. With `causal=True` (default) that is halved, since
  only the lower triangle is needed; MaxText's older versions counted the full square.
  Also 'tokens' and 'matmul_params'. `batch_size` is whatever the caller counts (the global
  batch gives FLOPs per step; divide by devices for per device).
  """
  m = model_config
  d, f, n_layers, vocab = m.hidden_size, m.intermediate_size, m.num_layers, m.vocab_size
  tokens = batch_size * seq_len
  # Multi-head attention without grouped KV: q, k, v and o are all [D, D].
  qkv_params = 3 * d * d * n_layers
  out_params = d * d * n_layers
  mlp_params = 3 * d * f * n_layers  # gate, up, down (SwiGLU)
  head_params = d * vocab  # untied lm_head; the embedding lookup is a gather, no FLOPs
  attention = 3 * 4 * batch_size * seq_len**2 * d * n_layers
  if causal:
    attention /= 2
  out = {
      'qkv': 6.0 * qkv_params * tokens,
      'attn_out': 6.0 * out_params * tokens,
      'mlp': 6.0 * mlp_params * tokens,
      'lm_head': 6.0 * head_params * tokens,
      'attention': float(attention),
      'tokens': float(tokens),
      'matmul_params': float(qkv_params + out_params + mlp_params + head_params),
  }
  out['learnable'] = out['qkv'] + out['attn_out'] + out['mlp'] + out['lm_head']
  out['total'] = out['learnable'] + out['attention']
  return out


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_device: float,
        num_devices: int = 1) -> float:
  """Returns model FLOPs utilisation: achieved FLOP/s over the devices' summed peak, in [0, 1]."""
  if step_time_s <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
    raise ValueError('step_time_s, peak_flops_per_device and num_devices must be positive.')
  return flops_per_step / step_time_s / (peak_flops_per_device * num_devices)


def chip_name(device_kind: str) -> Optional[str]:
  """Maps a jax `device.device_kind` (e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3') to a key."""
  k = device_kind.lower()
  if k.startswith('tpu'):
    if 'v6' in k:
      return 'tpu_v6e'
    if 'v5' in k:
      return 'tpu_v5e' if ('lite' in k or 'v5e' in k) else 'tpu_v5p'
    if 'v4' in k:
      return 'tpu_v4'
    return None
  if 'gb200' in k:
    return 'gb200'
  if 'b200' in k:
    return 'b200'
  if 'h200' in k:  # GH200 included: the same Hopper tensor cores and clocks as H100 SXM.
    return 'h200'
  if 'h100' in k:
    return 'h100_pcie' if 'pcie' in k else 'h100'
  if 'a100' in k:
    return 'a100'
  return None


# jax_default_matmul_precision values -> the passes a float32 matmul runs as. TPU: one bf16
# pass by default ('bfloat16'), 3 ('high', bf16_3x) or 6 ('highest': float32 to round-off).
# NVIDIA (Ampere and later): TF32 tensor cores by default and at 'high', the float32 units at
# 'highest'; 'bfloat16' runs them in bf16.
_TPU_F32 = {None: ('bfloat16', 1), 'default': ('bfloat16', 1), 'fastest': ('bfloat16', 1),
            'bfloat16': ('bfloat16', 1), 'high': ('bfloat16', 3), 'bfloat16_3x': ('bfloat16', 3),
            'tensorfloat32': ('bfloat16', 3), 'highest': ('bfloat16', 6), 'float32': ('bfloat16', 6)}
_GPU_F32 = {None: 'tfloat32', 'default': 'tfloat32', 'fastest': 'tfloat32', 'high': 'tfloat32',
            'tensorfloat32': 'tfloat32', 'bfloat16': 'bfloat16', 'bfloat16_3x': 'tfloat32',
            'highest': 'float32', 'float32': 'float32'}


def matmul_peak(device_kind: str, dtype: str = 'bfloat16',
                precision: Optional[str] = None) -> tuple[Optional[float], str]:
  """(peak FLOP/s of the matmuls of `dtype` as they really run on this chip, how they run).

  A float32 matmul under JAX's default precision runs as TF32 on NVIDIA tensor cores (~495
  TFLOP/s on an H100, not its 67 TFLOP/s float32 rate) and as one bf16 pass on a TPU;
  `precision` (jax_default_matmul_precision; None: the default) changes that. None for a chip
  with no data-sheet entry."""
  name = chip_name(device_kind)
  if name is None:
    return None, f'no peak known for {device_kind}'
  dt = str(jnp.dtype(dtype)) if dtype != 'tfloat32' else dtype
  table = PEAK_FLOPS[name]
  if dt != 'float32':
    return table.get(dt), f'{dt} matmuls'
  how = "JAX's default precision" if precision is None else f'matmul precision {precision}'
  if name.startswith('tpu'):
    key, passes = _TPU_F32.get(precision, ('bfloat16', 6))
    runs = 'one bf16 pass' if passes == 1 else f'{passes} bf16 passes'
    return table[key] / passes, f'float32 matmuls as {runs} ({how})'
  key = _GPU_F32.get(precision, 'float32')
  return table.get(key), f'float32 matmuls as {key} ({how})'


def peak_flops(device_kind: Optional[str] = None, dtype: str = 'bfloat16',
               precision: Optional[str] = None) -> Optional[float]:
  """Returns the peak FLOP/s of `dtype` matmuls on a device kind (default: jax.devices()[0]) as
  they run at `precision` (matmul_peak), or None."""
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  return matmul_peak(device_kind, dtype, precision)[0]


def format_duration(seconds: float) -> str:
  """Returns a short duration such as '45s', '12m05s' or '3h02m'."""
  if not math.isfinite(seconds):
    return '?'
  s = int(round(max(0.0, seconds)))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{(s % 3600) // 60:02d}m'


def _si(x: float) -> str:
  """Returns 12.3k / 4.56M style numbers for throughput."""
  for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= div:
      return f'{x / div:.3g}{suffix}'
  return f'{x:.3g}'


# Known keys for the stdout line, in display order: key -> (label, formatter).
_STDOUT_FORMATS = {
    'loss': ('loss', lambda v: f'{v:.4f}'),
    'eval_loss': ('eval_loss', lambda v: f'{v:.4f}'),
    'eval_ppl': ('eval_ppl', lambda v: f'{v:.2f}'),
    'eval_loss_baseline': ('eval_loss_baseline', lambda v: f'{v:.4f}'),
    'eval_ppl_baseline': ('eval_ppl_baseline', lambda v: f'{v:.2f}'),
    'lr': ('lr', lambda v: f'{v:.2e}'),
    'grad_norm': ('gnorm', lambda v: f'{v:.3g}'),
    'tokens_per_s': ('tok/s', _si),
    'step_time_s': ('step_time', lambda v: f'{v * 1e3:.0f}ms'),
    'mfu': ('mfu', lambda v: f'{100 * v:.1f}%'),
    'eta_s': ('eta', format_duration),
    'elapsed_s': ('elapsed', format_duration),
}


def _to_python(value: Any) -> Any:
  """Converts a scalar (Python, numpy or jax) to a JSON-able Python value."""
  if isinstance(value, (str, bool, int)) and not isinstance(value, np.generic):
    return value
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f'metric values must be scalars, got shape {arr.shape}.')
  item = arr.reshape(()).item()
  if isinstance(item, (bool, int, str)):
    return item
  return float(item)


class MetricWriter:
  """Writes scalar metrics to stdout, workdir/metrics.jsonl, TensorBoard and W&B.

  Only process 0 writes; on other processes every method is a no-op. metrics.jsonl is a
  storage.JsonlLog (local or gs://): a resumed run continues it from `resume_step`, the records
  of later steps (trained again) dropped, so no step repeats. Each line is one JSON object with 'step' and
  the scalars as Python numbers; non-finite floats are the strings 'nan', 'inf', '-inf'
  (`float()` reads them back). TensorBoard events go to workdir/tensorboard.
  """

  def __init__(
      self,
      workdir: str,
      *,
      process_index: int = 0,
      stdout: bool = True,
      jsonl: bool = True,
      tensorboard: bool = False,
      wandb: bool = False,
      wandb_project: str = 'gpas_jax',
      wandb_config: Optional[Mapping[str, Any]] = None,
      total_steps: Optional[int] = None,
      stream: Any = None,
      resume_step: Optional[int] = None,
  ):
    """Opens the enabled sinks; raises ImportError if W&B is asked for but not installed."""
    if wandb and importlib.util.find_spec('wandb') is None:
      # Checked on every process so that a misconfigured run fails everywhere, not just on 0.
      raise ImportError('config.logging.wandb=True but wandb is not installed: '
                        'run `pip install wandb` or set config.logging.wandb=False.')
    self.active = process_index == 0
    self.workdir = workdir
    self.total_steps = total_steps
    self._stdout = stdout
    self._stream = stream
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if not self.active:
      return
    if jsonl:
      self._jsonl = storage.JsonlLog(storage.join(workdir, 'metrics.jsonl'), resume_step)
    if tensorboard:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._tb = tensorboardX.SummaryWriter(logdir=storage.join(workdir, 'tensorboard'))
    if wandb:
      import wandb as wandb_lib  # pylint: disable=import-outside-toplevel
      self._wandb = wandb_lib.init(project=wandb_project, dir=workdir,
                                   config=dict(wandb_config or {}), resume='allow')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str,
                  process_index: Optional[int] = None, **kwargs: Any) -> 'MetricWriter':
    """Builds a writer from config.logging (tensorboard, wandb, wandb_project)."""
    if process_index is None:
      process_index = jax.process_index()
    log = config.logging
    return cls(workdir, process_index=process_index, tensorboard=bool(log.tensorboard),
               wandb=bool(log.wandb), wandb_project=log.wandb_project,
               wandb_config=config.to_dict(), total_steps=config.num_train_steps, **kwargs)

  def format_line(self, step: int, scalars: Mapping[str, Any]) -> str:
    """Returns the one-line stdout summary: known keys nicely, then the rest as key=value."""
    head = f'step {step}' + (f'/{self.total_steps}' if self.total_steps else '')
    parts = [head]
    for key, (label, fmt) in _STDOUT_FORMATS.items():
      if key in scalars:
        v = scalars[key]
        parts.append(f'{label} {fmt(v) if isinstance(v, (int, float)) else v}')
    series: dict[str, list[float]] = {}
    for key, v in scalars.items():
      if '/' in key:  # per-layer series (gate/3): a range on stdout, every value in the files
        series.setdefault(key.split('/', 1)[0], []).append(v)
      elif key not in _STDOUT_FORMATS:
        # 'name value' like the known keys, so one line reads one way
        parts.append(f'{key} {v:.4g}' if isinstance(v, float) else f'{key} {v}')
    for name, values in series.items():
      parts.append(f'{name} {min(values):.4g}..{max(values):.4g}')
    return ' | '.join(parts)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one step's scalars to every enabled sink."""
    if not self.active:
      return
    step = int(step)
    values = {k: _to_python(v) for k, v in scalars.items()}
    if self._stdout:
      print(self.format_line(step, values), file=self._stream or sys.stdout, flush=True)
    if self._jsonl is not None:
      self._jsonl.write({'step': step, **{k: storage.encode(v) for k, v in values.items()}})
    numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    if self._tb is not None:
      for k, v in numeric.items():
        self._tb.add_scalar(k, float(v), global_step=step)
    if self._wandb is not None:
      self._wandb.log(numeric, step=step)

  def flush(self) -> None:
    """Flushes the file and TensorBoard sinks (in a bucket: rewrites metrics.jsonl)."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes every sink; later writes are ignored."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None
    self.active = False

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
