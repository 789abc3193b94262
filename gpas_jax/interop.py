"""PyTorch / HF state dicts and directories, with the baseline's parameter names, both ways."""

import json
import os
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax import model as model_lib

# Our layout <-> torch's Linear [out, in]; D hidden, H heads, K head dim, F ffn.
_QKV = ('q_proj', 'k_proj', 'v_proj')


class StateDictError(ValueError):
  """A state dict that does not fit the model; the message lists every bad key."""


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


def to_torch_state_dict(model: model_lib.Transformer) -> dict[str, np.ndarray]:
  """The model's parameters under the baseline's names and torch layouts, as numpy arrays."""
  params = nnx.state(model, nnx.Param).to_pure_dict()
  out = {}
  for name, (path, idx) in _name_map(model.config, params).items():
    a = np.asarray(jax.device_get(_get(params, path)))
    if idx is not None:
      a = a[idx]
    out[name] = np.array(_to_torch_layout(str(path[-1]), a), order="C")  # 0-d stays 0-d
  return out


def _to_numpy(v: Any) -> np.ndarray:
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
    return {k: _to_numpy(v) for k, v in load_file(path).items()}
  import torch  # pylint: disable=import-outside-toplevel
  sd = torch.load(path, map_location='cpu', weights_only=True)
  return {k: _to_numpy(v) for k, v in sd.items()}


def from_torch_state_dict(state_dict: Mapping[str, Any] | str,
                          model_config: Any) -> model_lib.Transformer:
  """Builds our model from a baseline state dict (a dict, or a .safetensors/.bin/.pt path)."""
  cfg = model_lib.ModelConfig.from_config(model_config)
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict_file(os.fspath(state_dict))
  create = lambda: model_lib.Transformer(cfg, nnx.Rngs(params=0))
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  pure = abs_params.to_pure_dict()
  names = _name_map(cfg, pure)
  missing = sorted(set(names) - set(state_dict))
  extra = sorted(set(state_dict) - set(names))
  bad_shape = []
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
    a = _from_torch_layout(str(path[-1]), _to_numpy(state_dict[name]),
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
  # Non-trained state (fixed gates, LNS constants) comes from the config, not the state dict.
  if jax.tree.leaves(abs_rest):
    abs_rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()
  return nnx.merge(graphdef, abs_params, abs_rest)


def model_config_from_hf(hf_config: Mapping[str, Any], norm_type: str,
                         post_num: int = 0, **overrides: Any) -> model_lib.ModelConfig:
  """Our model config from a baseline JSON config (HF LlamaConfig keys)."""
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
      rope_theta=hf_config.get('rope_theta', 10000.0),
      norm_type=norm_type, post_num=post_num)
  values.update(overrides)
  return model_lib.ModelConfig.from_config(values)


def hf_config_from_model(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """A baseline-style config.json (HF LlamaConfig keys) for our model config."""
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_heads,
      'rms_norm_eps': cfg.rms_eps, 'rope_theta': cfg.rope_theta, 'hidden_act': 'silu',
      'max_sequence_length': 1024, 'pad_token_id': -1, 'bos_token_id': 0, 'eos_token_id': 1,
      'tie_word_embeddings': False, 'torch_dtype': cfg.param_dtype,
      'norm_type': cfg.norm_type, 'post_num': cfg.post_num,
  }


def save_safetensors(model: model_lib.Transformer, path: str) -> None:
  """Writes the model as a `.safetensors` file the baseline loads with strict=True."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(to_torch_state_dict(model), path)


def save_hf_directory(model: model_lib.Transformer, directory: str) -> None:
  """Writes `config.json` and `model.safetensors`, as HF `save_pretrained` lays them out."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config_from_model(model.config), f, indent=2)
  save_safetensors(model, os.path.join(directory, 'model.safetensors'))


def load_hf_directory(directory: str, norm_type: str | None = None,
                      post_num: int | None = None, **overrides: Any) -> model_lib.Transformer:
  """Loads a `save_pretrained` directory (config.json + .safetensors or pytorch_model.bin)."""
  with open(os.path.join(directory, 'config.json'), encoding='utf-8') as f:
    hf = json.load(f)
  norm_type = norm_type or hf.get('norm_type')
  if not norm_type:
    raise ValueError(f'{directory}/config.json names no norm_type; pass it (e.g. --norm_type '
                     'pre_gpas), as the baseline takes it on its command line.')
  post_num = hf.get('post_num', 0) if post_num is None else post_num
  cfg = model_config_from_hf(hf, norm_type, post_num, **overrides)
  for fname in ('model.safetensors', 'pytorch_model.bin'):
    path = os.path.join(directory, fname)
    if os.path.exists(path):
      return from_torch_state_dict(path, cfg)
  raise FileNotFoundError(f'{directory} has neither model.safetensors nor pytorch_model.bin.')
