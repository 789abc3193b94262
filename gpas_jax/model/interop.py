"""PyTorch / HF state dicts and directories, with the baseline's parameter names, both ways."""

import dataclasses
import json
import os
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax.model import transformer as model_lib

# Our layout <-> torch's Linear [out, in]; D hidden, H heads, K head dim, F ffn.
_QKV = ('q_proj', 'k_proj', 'v_proj')
_INV_FREQ = 'model.layers.{}.self_attn.rotary_emb.inv_freq'


class StateDictError(ValueError):
  """A state dict that does not fit the model; the message lists every bad key."""


def _is_gate(path: tuple, _) -> bool:
  return bool(path) and path[-1] == 'gate'


# What a state dict holds: the parameters and every gate under `gpas_block.gate`, fixed
# (non-learnable) gates included (baseline.torch_model holds one as a requires_grad=False parameter). Other
# non-trained state (LNS multipliers) is computed from the config.
_EXPORTED = nnx.Any(nnx.Param, _is_gate)


def _to_torch_layout(name: str, a: np.ndarray) -> np.ndarray:
  if name in _QKV:  # [D, H, K] -> [H*K, D]
    return a.reshape(a.shape[0], -1).T
  if name == 'o_proj':  # [H, K, D] -> [D, H*K]
    return a.reshape(-1, a.shape[-1]).T
  if name in ('gate_proj', 'up_proj', 'down_proj'):
    return a.T
  return a


def _from_torch_layout(name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if name in _QKV + ('o_proj', 'gate_proj', 'up_proj', 'down_proj'):
    return a.T.reshape(shape)
  return a


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _hf_name(layer: int, path: tuple) -> str:
  name = f'model.layers.{layer}.' + '.'.join(str(p) for p in path)
  return name + '.weight' if str(path[-1]).endswith('_proj') else name


def _name_map(cfg: model_lib.ModelConfig, params: Mapping) -> dict[str, tuple[tuple, int | None]]:
  """HF name -> (path in our pure param dict, layer index into a scanned stack or None)."""
  names = {
      'model.embed_tokens.weight': (('embed_tokens',), None),
      'model.norm.weight': (('norm', 'weight'), None),
      'lm_head.weight': (('lm_head',), None),
  }
  for s, (_, _, start, count) in enumerate(model_lib.stack_plan(cfg)):
    layers = params['stacks'][s]['layers']
    for i in range(count):
      block = layers if cfg.scan_layers else layers[i]
      for path in _flatten(block):
        full = ('stacks', s, 'layers') + (path if cfg.scan_layers else (i,) + path)
        names[_hf_name(start + i, path)] = (full, i if cfg.scan_layers else None)
  return names


def _get(tree: Mapping, path: tuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def rope_inv_freq(cfg: model_lib.ModelConfig) -> np.ndarray:
  """The RoPE frequencies 1 / theta^(2i/K) [K/2] in the param dtype, as transformers 4.31 holds
  them (a persistent buffer, cast by the baseline's model.to(dtype))."""
  k = cfg.head_dim
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
  return inv.astype(np.float32).astype(jnp.dtype(cfg.param_dtype))


def rope_buffer_matches(got: np.ndarray, rope_theta: float, head_dim: int) -> bool:
  """Whether a stored inv_freq buffer is this RoPE's, to the precision of its dtype."""
  want = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  rtol = 1e-5 if np.dtype(got.dtype).itemsize >= 4 else 1e-2  # bf16/fp16: one ulp is <= 2^-7
  return got.shape == want.shape and np.allclose(got.astype(np.float64), want, rtol=rtol, atol=0)


def to_torch_state_dict(model: model_lib.Transformer,
                        buffers: bool = False) -> dict[str, np.ndarray]:
  """The model's parameters and gates under the baseline's names and torch layouts, as numpy.

  buffers=True adds each layer's `self_attn.rotary_emb.inv_freq`: transformers 4.31 (the
  baseline's pin) registers it as a persistent buffer, so its strict load_state_dict needs it.
  """
  params = nnx.state(model, _EXPORTED).to_pure_dict()
  out = {}
  for name, (path, idx) in _name_map(model.config, params).items():
    a = np.asarray(jax.device_get(_get(params, path)))
    if idx is not None:
      a = a[idx]
    out[name] = np.array(_to_torch_layout(str(path[-1]), a), order="C")  # 0-d stays 0-d
  if buffers:
    for i in range(model.config.num_layers):
      out[_INV_FREQ.format(i)] = rope_inv_freq(model.config)
  return out


def _check_rope_buffers(state_dict: Mapping[str, Any],
                        cfg: model_lib.ModelConfig) -> tuple[dict[str, Any], list[str]]:
  """The state dict without transformers' RoPE buffers, and the buffers that disagree with cfg."""
  bad = []
  names = {_INV_FREQ.format(i) for i in range(cfg.num_layers)}
  rest = {}
  for k, v in state_dict.items():
    if k not in names:
      rest[k] = v
      continue
    if not rope_buffer_matches(to_numpy(v), cfg.rope_theta, cfg.head_dim):
      bad.append(f'{k}: RoPE frequencies of another rope_theta or head dim (expected '
                 f'rope_theta={cfg.rope_theta}, head dim {cfg.head_dim})')
  return rest, bad


def to_numpy(v: Any) -> np.ndarray:
  """A numpy array of a numpy, torch (bf16 included, via ml_dtypes) or array-like value."""
  if isinstance(v, np.ndarray):
    return v
  if type(v).__module__.startswith('torch'):
    import torch  # pylint: disable=import-outside-toplevel
    t = v.detach().cpu()
    if t.dtype == torch.bfloat16:
      import ml_dtypes  # pylint: disable=import-outside-toplevel
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(v)


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file or a torch `.bin`/`.pt` (weights_only) into numpy arrays."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'state dict file {path!r} does not exist.')
  if path.endswith('.safetensors'):
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    return {k: to_numpy(v) for k, v in load_file(path).items()}
  import torch  # pylint: disable=import-outside-toplevel
  sd = torch.load(path, map_location='cpu', weights_only=True)
  return {k: to_numpy(v) for k, v in sd.items()}


def from_torch_state_dict(state_dict: Mapping[str, Any] | str,
                          model_config: Any) -> model_lib.Transformer:
  """Builds our model from a baseline state dict (a dict, or a .safetensors/.bin/.pt path).

  transformers' RoPE buffers (`rotary_emb.inv_freq`), where present, are checked and dropped.
  """
  cfg = model_lib.ModelConfig.from_config(model_config)
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict_file(os.fspath(state_dict))
  state_dict, bad_shape = _check_rope_buffers(state_dict, cfg)
  create = lambda: model_lib.Transformer(cfg, nnx.Rngs(params=0))
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(create), _EXPORTED, ...)
  pure = abs_params.to_pure_dict()
  names = _name_map(cfg, pure)
  missing = sorted(set(names) - set(state_dict))
  extra = sorted(set(state_dict) - set(names))
  for name, (path, idx) in names.items():
    if name not in state_dict:
      continue
    shape = _get(pure, path).shape
    shape = shape[1:] if idx is not None else shape
    want = _to_torch_layout(str(path[-1]), np.empty(shape, np.int8)).shape
    got = tuple(np.shape(state_dict[name]))
    if got != want:
      bad_shape.append(f'{name}: got {got}, expected {want}')
  if missing or extra or bad_shape:
    raise StateDictError(
        f'state dict does not fit norm_type={cfg.norm_type!r}, {cfg.num_layers} layers:\n'
        f'  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(extra)}): {extra}\n'
        f'  mis-shaped ({len(bad_shape)}): {bad_shape}')
  dtype = jnp.dtype(cfg.param_dtype)
  filled: dict[tuple, list | np.ndarray] = {}
  for name, (path, idx) in names.items():
    shape = _get(pure, path).shape
    a = _from_torch_layout(str(path[-1]), to_numpy(state_dict[name]),
                           shape[1:] if idx is not None else shape)
    if idx is None:
      filled[path] = a
    else:
      filled.setdefault(path, [None] * shape[0])[idx] = a
  for path, v in filled.items():
    value = np.stack(v) if isinstance(v, list) else v
    parent = _get(pure, path[:-1])
    parent[path[-1]] = jnp.asarray(value.astype(np.float32) if value.dtype != dtype else value,
                                   dtype=dtype)
  abs_params.replace_by_pure_dict(pure)
  # Other non-trained state (LNS multipliers) comes from the config, not the state dict.
  if jax.tree.leaves(abs_rest):
    abs_rest = jax.jit(lambda: nnx.split(create(), _EXPORTED, ...)[2])()
  return nnx.merge(graphdef, abs_params, abs_rest)


# ModelConfig fields with an HF LlamaConfig key of their own; every other field is written to
# config.json under its own name (HF's PretrainedConfig keeps unknown keys as attributes).
_HF_KEYS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
            'intermediate_size': 'intermediate_size', 'num_layers': 'num_hidden_layers',
            'num_heads': 'num_attention_heads', 'rms_eps': 'rms_norm_eps',
            'rope_theta': 'rope_theta'}
_EXTRA_KEYS = tuple(f.name for f in dataclasses.fields(model_lib.ModelConfig)
                    if f.name not in _HF_KEYS)
_LOADS_INTO = 'gpas_jax_loads_into'


def model_config_from_hf(hf_config: Mapping[str, Any], norm_type: str | None = None,
                         post_num: int | None = None, **overrides: Any) -> model_lib.ModelConfig:
  """Our model config from a config.json (HF LlamaConfig keys, plus our fields where written).

  Precedence: explicit norm_type / post_num / overrides, then config.json, then the defaults.
  """
  heads = hf_config['num_attention_heads']
  kv_heads = hf_config.get('num_key_value_heads', heads) or heads
  if kv_heads != heads:
    raise ValueError(f'num_key_value_heads={kv_heads} != num_attention_heads={heads}: grouped-'
                     'query attention is not part of the baseline and is not supported.')
  values = dict(
      vocab_size=hf_config['vocab_size'], hidden_size=hf_config['hidden_size'],
      intermediate_size=hf_config['intermediate_size'],
      num_layers=hf_config['num_hidden_layers'], num_heads=heads,
      rms_eps=hf_config.get('rms_norm_eps', 1e-6),
      rope_theta=hf_config.get('rope_theta', 10000.0))
  values.update({k: hf_config[k] for k in _EXTRA_KEYS if k in hf_config})
  values['norm_type'] = norm_type or values.get('norm_type')
  if not values['norm_type']:
    raise ValueError('the config names no norm_type; pass it (e.g. norm_type="pre_gpas"), as '
                     'the baseline takes it on its command line.')
  if post_num is not None:
    values['post_num'] = post_num
  values.setdefault('post_num', 0)
  values.update(overrides)
  return model_lib.ModelConfig.from_config(values)


def baseline_gaps(cfg: model_lib.ModelConfig) -> dict[str, list[str]]:
  """Why each PyTorch model cannot represent `cfg` (an empty list: it loads strictly, same logits).

  'transformers.LlamaForCausalLM': stock LLaMA as of the baseline's pin (transformers 4.31.0).
  'gpas_baseline': the authors' GPAS LlamaForCausalLM (and gpas_jax.baseline.torch_model, which ports it).
  """
  stock, gpas = [], []
  if cfg.norm_type not in ('pre', 'lns'):
    stock.append(f'norm_type={cfg.norm_type!r}: stock LLaMA is Pre-LN without gates (it '
                 "represents 'pre', and 'lns' whose gains are ordinary RMSNorm weights).")
  if cfg.norm_type.startswith('lns') and cfg.lns_mode == 'fixed':
    msg = ("lns_mode='fixed': the constant 1/sqrt(l+1) multiplier is not a weight; the "
           'baseline learns gains initialised to it instead.')
    stock.append(msg)
    gpas.append(msg + ' gpas_jax.baseline.torch_model (lns_mode) represents it.')
  if cfg.rope_theta != 10000.0:
    msg = (f'rope_theta={cfg.rope_theta}: transformers 4.31 (and models built on its LLaMA '
           'code) fix the RoPE base at 10000.')
    stock.append(msg)
    gpas.append(msg + ' gpas_jax.baseline.torch_model (rope_theta) represents it.')
  if cfg.gate_per_sublayer and cfg.norm_type.endswith('_gpas'):
    gpas.append('gate_per_sublayer=True: gpas_block.gate is [2] per layer, the baseline\'s is '
                '0-d. gpas_jax.baseline.torch_model (gate_per_sublayer) represents it.')
  return {'transformers.LlamaForCausalLM': stock, 'gpas_baseline': gpas}


def hf_config_from_model(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """A baseline-style config.json (HF LlamaConfig keys) carrying every field of our config."""
  out = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_heads,
      'rms_norm_eps': cfg.rms_eps, 'rope_theta': cfg.rope_theta, 'hidden_act': 'silu',
      'max_sequence_length': 1024, 'pad_token_id': -1, 'bos_token_id': 0, 'eos_token_id': 1,
      'tie_word_embeddings': False, 'torch_dtype': cfg.param_dtype,
  }
  out.update({k: getattr(cfg, k) for k in _EXTRA_KEYS})
  gaps = baseline_gaps(cfg)
  out[_LOADS_INTO] = {'transformers.LlamaForCausalLM': not gaps['transformers.LlamaForCausalLM'],
                      'gpas_baseline': not gaps['gpas_baseline'],
                      'why_not': sorted(set(sum(gaps.values(), [])))}
  return out


def save_safetensors(model: model_lib.Transformer, path: str) -> None:
  """Writes the model as a `.safetensors` file the baseline loads with strict=True."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  # transformers' from_pretrained reads the metadata and refuses a file without format 'pt'.
  save_file(to_torch_state_dict(model, buffers=True), path, metadata={'format': 'pt'})
  # safetensors writes 0600; give it the mode of the files beside it (0666 less the umask).
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_hf_directory(model: model_lib.Transformer, directory: str) -> None:
  """Writes `config.json` and `model.safetensors`, as HF `save_pretrained` lays them out."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config_from_model(model.config), f, indent=2)
  save_safetensors(model, os.path.join(directory, 'model.safetensors'))


def load_hf_directory(directory: str, norm_type: str | None = None,
                      post_num: int | None = None, **overrides: Any) -> model_lib.Transformer:
  """Loads a `save_pretrained` directory (config.json + .safetensors or pytorch_model.bin).

  Our exports need nothing else; a baseline directory needs its norm_type (and Mix-LN post_num).
  """
  with open(os.path.join(directory, 'config.json'), encoding='utf-8') as f:
    hf = json.load(f)
  if not (norm_type or hf.get('norm_type')):
    raise ValueError(f'{directory}/config.json names no norm_type; pass it (e.g. --norm_type '
                     'pre_gpas), as the baseline takes it on its command line.')
  cfg = model_config_from_hf(hf, norm_type, post_num, **overrides)
  for fname in ('model.safetensors', 'pytorch_model.bin'):
    path = os.path.join(directory, fname)
    if os.path.exists(path):
      return from_torch_state_dict(path, cfg)
  raise FileNotFoundError(f'{directory} has neither model.safetensors nor pytorch_model.bin.')
