"""The PyTorch port of the GPAS baseline's model (HF-LLaMA style), written from its code.

The eleven residual forms, its initialisation and loss, and its state dicts both ways; the
training loop is torch_train.py. Used by the parity tests, compare and the bench.

An optional part of the package: it needs `pip install torch==2.13.0` (the `torch` extra).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

NORM_TYPES = ('pre', 'pre_gpas', 'post', 'deeppost', 'deeppost_gpas', 'sandwich',
              'sandwich_gpas', 'post_pre', 'post_pre_gpas', 'lns', 'lns_gpas')

GATE_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'silu': F.silu,
    'identity': lambda g: g,
    'relu': F.relu,
    'tanh': torch.tanh,
    'leaky_relu': lambda g: F.leaky_relu(g, 0.01),
    'scale_silu': lambda g: torch.sigmoid(8 * g) * g,
    'sigmoid': torch.sigmoid,
    'gelu': F.gelu,  # Exact (erf) GELU, torch's default.
}

_DEEPNORM_SCALED = ('v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
_EMBED_STD = math.sqrt(2 / 5)  # "Spike No More" embedding init.
_LINEAR_STD = 0.02


@dataclasses.dataclass
class RefConfig:
  """Model hyper-parameters, named as in the baseline's LlamaConfig."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  norm_type: str = 'pre'
  post_num: int = 0
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  gate_act: str = 'silu'
  lns_mode: str = 'init'  # 'init': learnable gains start at 1/sqrt(l+1); 'fixed': constant multiplier.
  gate_per_sublayer: bool = False
  gate_init: float = 0.0
  gate_learnable: bool = True  # False: a fixed g (a Parameter with requires_grad=False).

  def __post_init__(self):
    if self.norm_type not in NORM_TYPES:
      raise ValueError(f'unknown norm_type {self.norm_type!r}')
    if self.gate_act not in GATE_ACTS:
      raise ValueError(f'unknown gate_act {self.gate_act!r}')
    if self.lns_mode not in ('init', 'fixed'):
      raise ValueError(f'unknown lns_mode {self.lns_mode!r}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError('hidden_size must be divisible by num_attention_heads')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def use_gpas(self) -> bool:
    return self.norm_type.endswith('_gpas')

  @property
  def lns_fixed(self) -> bool:
    return self.norm_type.startswith('lns') and self.lns_mode == 'fixed'

  @property
  def lns_init(self) -> bool:
    return self.norm_type.startswith('lns') and self.lns_mode == 'init'

  def layer_form(self, layer_idx: int) -> str:
    """Returns the layer's skeleton: 'pre', 'post', 'deeppost' or 'sandwich'."""
    nt = self.norm_type.removesuffix('_gpas')
    if nt == 'post_pre':
      return 'post' if layer_idx < self.post_num else 'pre'
    return nt if nt in ('post', 'deeppost', 'sandwich') else 'pre'


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
  """Upcasts to at least float32 (float64 stays float64)."""
  return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
  """HF LlamaRMSNorm; the statistics run in at least float32."""

  def __init__(self, hidden_size: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(hidden_size))
    self.variance_epsilon = eps

  def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(_compute_dtype(input_dtype))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
  """HF rotary tables [T, head_dim] for positions 0..T-1, built in at least float32."""
  cdtype = _compute_dtype(dtype)
  inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(cdtype) / head_dim))
  t = torch.arange(seq_len, dtype=torch.int64).to(cdtype)
  freqs = torch.outer(t, inv_freq)
  emb = torch.cat((freqs, freqs), dim=-1)  # Halves, not interleaved pairs.
  return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
  """Maps the halves (x1, x2) of the last dim to (-x2, x1)."""
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """Rotates x [..., T, head_dim] by position."""
  return x * cos + rotate_half(x) * sin


class RefAttention(nn.Module):
  """Multi-head causal self-attention with RoPE, no biases."""

  def __init__(self, cfg: RefConfig):
    super().__init__()
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.head_dim = cfg.head_dim
    self.q_proj = nn.Linear(d, d, bias=False)
    self.k_proj = nn.Linear(d, d, bias=False)
    self.v_proj = nn.Linear(d, d, bias=False)
    self.o_proj = nn.Linear(d, d, bias=False)

  def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    shape = (b, t, self.num_heads, self.head_dim)
    q = self.q_proj(x).view(shape).transpose(1, 2)
    k = self.k_proj(x).view(shape).transpose(1, 2)
    v = self.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # SDPA, plain causal, as the baseline calls it: it ignores the (right) padding mask.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class RefMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: RefConfig):
    super().__init__()
    self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPASBlock(nn.Module):
  """gpas(x; g) = x - act(g) * x.detach(): scales the forward, leaves d/dx the identity."""

  def __init__(self, act: str = 'silu', per_sublayer: bool = False, init: float = 0.0,
               learnable: bool = True):
    super().__init__()
    self.act = GATE_ACTS[act]
    # A fixed gate stays a Parameter (requires_grad=False): it is in the state dict either way.
    self.gate = nn.Parameter(torch.full((2,) if per_sublayer else (), float(init)),
                             requires_grad=learnable)

  def forward(self, x: torch.Tensor, sublayer: int = 0) -> torch.Tensor:
    g = self.gate[sublayer] if self.gate.dim() else self.gate
    return x - self.act(g) * x.detach()


class RefDecoderLayer(nn.Module):
  """One decoder layer in any of the eleven residual forms (README: model.norm_type)."""

  def __init__(self, cfg: RefConfig, layer_idx: int):
    super().__init__()
    self.form = cfg.layer_form(layer_idx)
    self.use_gpas = cfg.use_gpas
    self.self_attn = RefAttention(cfg)
    self.mlp = RefMLP(cfg)
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if self.form in ('pre', 'sandwich'):
      self.input_layernorm = norm()
    self.post_attention_layernorm = norm()
    if self.form == 'sandwich':
      self.pre_feedforward_layernorm = norm()
    if self.form != 'pre':
      self.post_feedforward_layernorm = norm()
    if self.use_gpas:
      self.gpas_block = GPASBlock(cfg.gate_act, cfg.gate_per_sublayer, cfg.gate_init,
                                  cfg.gate_learnable)
    self.alpha = (2 * cfg.num_hidden_layers) ** 0.25 if self.form == 'deeppost' else None
    # Original LNS paper: the N1/N2 outputs times a constant (python float).
    self.lns_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.lns_fixed else None

  def _g(self, x: torch.Tensor, sublayer: int) -> torch.Tensor:
    return self.gpas_block(x, sublayer) if self.use_gpas else x

  def _shortcut(self, x: torch.Tensor, sublayer: int) -> torch.Tensor:
    x = self._g(x, sublayer)
    return x if self.alpha is None else self.alpha * x

  def _pre_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    y = norm(x)
    return y if self.lns_scale is None else y * self.lns_scale

  def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if self.form == 'pre':
      h = self._g(x + self.self_attn(self._pre_norm(self.input_layernorm, x), cos, sin), 0)
      return self._g(h + self.mlp(self._pre_norm(self.post_attention_layernorm, h)), 1)
    if self.form == 'sandwich':
      a = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
      h = self._g(x + a, 0)
      f = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
      return self._g(h + f, 1)
    # Post-LN family: GPAS (if any) scales the shortcut only, before DeepNorm's alpha.
    h = self.post_attention_layernorm(self._shortcut(x, 0) + self.self_attn(x, cos, sin))
    return self.post_feedforward_layernorm(self._shortcut(h, 1) + self.mlp(h))


class RefDecoder(nn.Module):
  """LlamaModel: embedding, decoder layers, final RMSNorm."""

  def __init__(self, cfg: RefConfig):
    super().__init__()
    self.config = cfg
    # pad_token_id = -1 in the baseline configs: row V-1 is zero and gets no gradient.
    self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.vocab_size - 1)
    self.layers = nn.ModuleList(RefDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    h = self.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, h.dtype)
    cos, sin = cos.to(h.device), sin.to(h.device)
    for layer in self.layers:
      h = layer(h, cos, sin)
    return self.norm(h)


class RefModel(nn.Module):
  """LlamaForCausalLM: input_ids [B, T] -> logits [B, T, V], untied lm_head."""

  def __init__(self, cfg: RefConfig, seed: int = 0):
    super().__init__()
    self.config = cfg
    self.model = RefDecoder(cfg)
    self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    init_weights(self, seed)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    return self.lm_head(self.model(input_ids))


@torch.no_grad()
def init_weights(model: RefModel, seed: int) -> None:
  """The baseline's init (as model.py documents it), drawn from a private generator in
  parameter order."""
  cfg = model.config
  gen = torch.Generator().manual_seed(seed)
  deepnorm = cfg.norm_type == 'deeppost'  # deeppost_gpas keeps the plain init.
  big_l = cfg.num_hidden_layers
  for name, p in model.named_parameters():
    if name == 'model.embed_tokens.weight':
      p.normal_(0.0, _EMBED_STD, generator=gen)
      p[cfg.vocab_size - 1] = 0
    elif name.endswith('_proj.weight') and deepnorm:
      gain = (8 * big_l) ** -0.25 if name.split('.')[-2] in _DEEPNORM_SCALED else 1.0
      nn.init.xavier_normal_(p, gain=gain, generator=gen)
    elif name.endswith('_proj.weight') or name == 'lm_head.weight':
      p.normal_(0.0, _LINEAR_STD, generator=gen)
    elif name.endswith('gpas_block.gate'):
      p.fill_(cfg.gate_init)
    elif name.endswith('norm.weight'):
      p.fill_(1.0)
      m = re.match(r'model\.layers\.(\d+)\.(input|post_attention)_layernorm\.', name)
      if m and cfg.lns_init:
        p.fill_(1.0 / math.sqrt(int(m.group(1)) + 1))
    else:
      raise ValueError(f'no init rule for {name}')


def loss_fn(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
  """Mean next-token cross-entropy over targets that are not pad_id, in the logits' dtype.

  As the baseline: bf16 logits are not upcast (no .float() before the loss).
  """
  labels = input_ids.masked_fill(input_ids == pad_id, -100)
  shift_logits = logits[:, :-1]
  return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                         labels[:, 1:].reshape(-1), ignore_index=-100)


def gate_params(model: nn.Module) -> list[nn.Parameter]:
  """All trained GPAS gates, in layer order (fixed gates are not clipped or updated)."""
  return [p for n, p in model.named_parameters()
          if n.endswith('gpas_block.gate') and p.requires_grad]


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  """Copies every parameter to numpy, keyed by the baseline's names."""
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def drop_rope_buffers(model: RefModel, sd: dict) -> dict:
  """sd without transformers 4.31's persistent `rotary_emb.inv_freq` buffers, checked first.

  This port builds its RoPE tables from the config; a buffer of another theta is an error.
  """
  try:  # an export's copy of this file (transformers' remote code) runs without the package
    from gpas_jax.model import interop  # pylint: disable=import-outside-toplevel
  except ImportError:
    interop = None
  cfg = model.config
  out = {}
  for name, v in sd.items():
    if name.endswith('.self_attn.rotary_emb.inv_freq'):
      if interop and not interop.rope_buffer_matches(interop.to_numpy(v), cfg.rope_theta, cfg.head_dim):
        raise ValueError(f'{name} does not match rope_theta={cfg.rope_theta}, '
                         f'head dim {cfg.head_dim}.')
      continue
    out[name] = v
  return out


def load_numpy_state_dict(model: nn.Module, sd: dict[str, np.ndarray]) -> None:
  """Loads numpy arrays (cast to each parameter's dtype), strict=True (RoPE buffers checked)."""
  tensors = {}
  for k, v in drop_rope_buffers(model, sd).items():
    arr = np.array(v)  # A writable copy (JAX arrays come back read-only).
    if arr.dtype.name == 'bfloat16':  # ml_dtypes bf16 has no torch.from_numpy path.
      arr = arr.astype(np.float32)
    tensors[k] = torch.from_numpy(arr)
  model.load_state_dict(tensors, strict=True)


def ref_config_from_hf(hf: dict) -> RefConfig:
  """The RefConfig of a gpas_jax export's config.json (HF LlamaConfig keys plus ours)."""
  return RefConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'], num_hidden_layers=hf['num_hidden_layers'],
      num_attention_heads=hf['num_attention_heads'], norm_type=hf['norm_type'],
      post_num=hf.get('post_num', 0), rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
      rope_theta=hf.get('rope_theta', 10000.0), gate_act=hf.get('gate_act', 'silu'),
      lns_mode=hf.get('lns_mode', 'init'), gate_per_sublayer=hf.get('gate_per_sublayer', False),
      gate_init=hf.get('gate_init', 0.0), gate_learnable=hf.get('gate_learnable', True))


def load_hf_directory(directory: str) -> RefModel:
  """A gpas_jax export (config.json + model.safetensors) loaded strictly, in its param dtype."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  with open(os.path.join(directory, 'config.json'), encoding='utf-8') as f:
    hf = json.load(f)
  model = RefModel(ref_config_from_hf(hf)).to(getattr(torch, hf.get('torch_dtype', 'float32')))
  sd = load_file(os.path.join(directory, 'model.safetensors'))
  model.load_state_dict(drop_rope_buffers(model, sd), strict=True)
  return model
