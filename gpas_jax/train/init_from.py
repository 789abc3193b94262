"""config.init_from: start a run from a PyTorch / HF checkpoint in the baseline's parameter names.

Accepted: a `.bin`/`.pt` state dict (read with torch.load(weights_only=True)), a `.safetensors`
file, or a directory holding `model.safetensors` or `pytorch_model.bin` (a `save_pretrained`
folder; its config.json, when it names a norm_type or sizes, must agree with the run's config).
Only the parameters come from it: the optimizer starts fresh, at update 0. The trainer applies it
only while the workdir holds no checkpoint of its own (a resumed run continues its own state).
"""

from typing import Any

from flax import nnx
import jax
import numpy as np

from gpas_jax import storage
from gpas_jax.model import interop

_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# config.json keys (HF names) -> our model config fields that must agree.
_HF_FIELDS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
              'intermediate_size': 'intermediate_size', 'num_hidden_layers': 'num_layers',
              'num_attention_heads': 'num_heads', 'norm_type': 'norm_type', 'post_num': 'post_num'}


class InitFromError(ValueError):
  """init_from names a checkpoint that does not exist or does not fit the config."""


def weights_file(path: str) -> str:
  """The state-dict file init_from names (the file itself, or the one inside a directory)."""
  if storage.is_dir(path):
    for name in _WEIGHT_FILES:
      if storage.is_file(storage.join(path, name)):
        return storage.join(path, name)
    raise InitFromError(f'init_from={path!r} is a directory without {" or ".join(_WEIGHT_FILES)}.')
  if not storage.is_file(path):
    raise InitFromError(f'init_from={path!r} does not exist; give a .bin, .safetensors or a '
                        'save_pretrained directory.')
  if not path.endswith(('.bin', '.pt', '.pth', '.safetensors')):
    raise InitFromError(f'init_from={path!r}: expected a .bin/.pt state dict, a .safetensors '
                        'file or a save_pretrained directory.')
  return path


def _check_hf_config(directory: str, model_config: Any) -> None:
  hf = storage.read_json(storage.join(directory, 'config.json'))
  if hf is None:
    return
  diff = [f'{ours}: checkpoint {hf[key]!r}, config {getattr(model_config, ours)!r}'
          for key, ours in _HF_FIELDS.items()
          if key in hf and hf[key] != getattr(model_config, ours)]
  if diff:
    raise InitFromError(f'init_from={directory!r} holds another model than the config ('
                        + '; '.join(diff) + '); set --config.model.<field> to match it.')


def load_params(path: str, model_config: Any) -> dict[str, Any]:
  """The checkpoint as our pure parameter dict (numpy, in model_config.param_dtype).

  Raises InitFromError naming every missing, unexpected or mis-shaped tensor (both shapes).
  """
  if storage.is_dir(path):
    _check_hf_config(path, model_config)
  state_dict = interop.load_state_dict_file(weights_file(path))
  try:
    model = interop.from_torch_state_dict(state_dict, model_config)
  except interop.StateDictError as e:
    raise InitFromError(f'init_from={path!r} does not fit the config: {e}') from e
  params = nnx.split(model, nnx.Param, ...)[1].to_pure_dict()
  return jax.tree.map(np.asarray, params)


def place(params: dict[str, Any], shardings: Any) -> Any:
  """Lays host arrays (the same on every process) out as global arrays of `shardings`."""
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), params,
      shardings)
