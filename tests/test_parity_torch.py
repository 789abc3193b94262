"""Parity with the PyTorch baseline for all eleven norm types: logits, loss, every gradient."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpas_jax.baseline import torch_model
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib

torch.set_num_threads(1)
NORM_TYPES = model_lib.blocks.FORMS.keys() | {'post_pre', 'post_pre_gpas'}
V, D, F, L, H, T = 96, 32, 56, 3, 4, 12


def _ref_model(norm_type: str, dtype: torch.dtype, lns_mode: str = 'init',
               **gate_options) -> torch_model.RefModel:
  cfg = torch_model.RefConfig(vocab_size=V, hidden_size=D, intermediate_size=F,
                              num_hidden_layers=L, num_attention_heads=H, norm_type=norm_type,
                              post_num=1, lns_mode=lns_mode, **gate_options)
  ref = torch_model.RefModel(cfg, seed=1).to(dtype)
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():  # nonzero gates and perturbed gains, so every path is exercised
    for name, p in ref.named_parameters():
      if name.endswith('gate') or 'norm' in name:
        p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
  return ref


def _ids() -> np.ndarray:
  ids = np.random.default_rng(3).integers(2, V - 1, size=(2, T))
  ids[0, 4] = V - 1  # the frozen embedding row
  ids[1, -3:] = 0  # right padding with the pad id
  ids[0, 7] = 0
  return ids


def _torch_side(ref, ids):
  ids_t = torch.from_numpy(ids)
  logits = ref(ids_t)
  loss = torch_model.loss_fn(logits, ids_t)
  loss.backward()
  grads = {k: p.grad.detach().numpy().copy() for k, p in ref.named_parameters()
           if p.requires_grad}
  return logits.detach().numpy(), loss.item(), grads


def _jax_side(model, ids):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest)(jnp.asarray(ids))
    return model_lib.lm_loss(logits, jnp.asarray(ids))[0], logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  grad_model = nnx.merge(graphdef, grads, rest)
  sd = interop.to_torch_state_dict(grad_model)
  if not model.config.gate_learnable:  # fixed gates are exported, but have no gradient
    sd = {k: v for k, v in sd.items() if not k.endswith('gpas_block.gate')}
  return np.asarray(logits), float(loss), sd


def _rel(a, b) -> float:
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _compare(norm_type, jdtype, tdtype, tol, gate_tol, lns_mode='init', **gate_options):
  ref = _ref_model(norm_type, tdtype, lns_mode, **gate_options)
  sd = torch_model.state_dict_numpy(ref)
  cfg = model_lib.ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L,
                              num_heads=H, norm_type=norm_type, post_num=1, lns_mode=lns_mode,
                              param_dtype=jdtype, compute_dtype=jdtype, **gate_options)
  model = interop.from_torch_state_dict(sd, cfg)
  ids = _ids()
  t_logits, t_loss, t_grads = _torch_side(ref, ids)
  j_logits, j_loss, j_grads = _jax_side(model, ids)
  assert set(j_grads) == set(t_grads)
  errors = {'logits': _rel(j_logits, t_logits), 'loss': abs(j_loss - t_loss) / abs(t_loss)}
  gates = sorted(k for k in t_grads if k.endswith('gate'))
  for k in t_grads:
    if k not in gates or gate_tol is None:
      errors[k] = _rel(j_grads[k], t_grads[k])
  if gates and gate_tol is not None:
    errors['gates'] = _rel(np.array([j_grads[k] for k in gates]),
                           np.array([t_grads[k] for k in gates]))
  worst = max(errors, key=errors.get)
  print(f'{norm_type} {jdtype}: largest relative error {errors[worst]:.2e} ({worst})')
  bad = {k: v for k, v in errors.items() if v > (gate_tol if k == 'gates' else tol)}
  assert not bad, bad
  # The frozen row gets no gradient on either side.
  assert np.all(t_grads['model.embed_tokens.weight'][-1] == 0)
  assert np.all(j_grads['model.embed_tokens.weight'][-1] == 0)


@pytest.mark.parametrize('norm_type', sorted(NORM_TYPES))
def test_parity_float64(norm_type):
  with jax.enable_x64(True):
    _compare(norm_type, 'float64', torch.float64, tol=1e-10, gate_tol=None)


@pytest.mark.parametrize('norm_type', sorted(NORM_TYPES))
def test_parity_float32(norm_type):
  _compare(norm_type, 'float32', torch.float32, tol=1e-5, gate_tol=1e-3)


@pytest.mark.parametrize('norm_type', ['lns', 'lns_gpas'])
def test_parity_lns_fixed_multiplier(norm_type):
  with jax.enable_x64(True):
    _compare(norm_type, 'float64', torch.float64, tol=1e-10, gate_tol=None, lns_mode='fixed')


GATE_OPTIONS = {
    'init_and_tanh': ('pre_gpas', dict(gate_init=0.6, gate_act='tanh')),
    'fixed_gelu': ('post_pre_gpas', dict(gate_init=0.3, gate_learnable=False, gate_act='gelu')),
    'per_sublayer_sigmoid': ('sandwich_gpas', dict(gate_per_sublayer=True, gate_act='sigmoid')),
    'per_sublayer_deeppost': ('deeppost_gpas', dict(gate_per_sublayer=True, gate_init=-0.5)),
}


@pytest.mark.parametrize('case', sorted(GATE_OPTIONS))
def test_parity_gate_options_float64(case):
  norm_type, options = GATE_OPTIONS[case]
  with jax.enable_x64(True):
    _compare(norm_type, 'float64', torch.float64, tol=1e-10, gate_tol=None, **options)


def test_export_loads_strictly_into_the_torch_model_and_round_trips(tmp_path):
  ref = _ref_model('post_pre_gpas', torch.float32)
  cfg = model_lib.ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L,
                              num_heads=H, norm_type='post_pre_gpas', post_num=1)
  model = model_lib.create_model(cfg, seed=5)
  path = str(tmp_path / 'model.safetensors')
  interop.save_safetensors(model, path)
  torch_model.load_numpy_state_dict(ref, interop.load_state_dict_file(path))
  ids = _ids()
  np.testing.assert_allclose(model(jnp.asarray(ids)), ref(torch.from_numpy(ids)).detach().numpy(),
                             rtol=1e-5, atol=1e-5)
  torch.save(ref.state_dict(), tmp_path / 'pytorch_model.bin')
  again = interop.from_torch_state_dict(str(tmp_path / 'pytorch_model.bin'), cfg)
  for k, v in interop.to_torch_state_dict(model).items():
    np.testing.assert_array_equal(interop.to_torch_state_dict(again)[k], v)
