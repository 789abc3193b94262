"""Export and import: every model option through a directory, strict loads into PyTorch models.

The stock model is transformers 4.31.0's LlamaForCausalLM (the baseline's pin); the GPAS model
is gpas_jax.baseline.torch_model, the port of the baseline's code.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpas_jax.baseline import torch_model
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib

torch.set_num_threads(1)
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # local directories only; never the network
BASE = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                             num_heads=2, norm_type='pre_gpas', post_num=1)
IDS = np.array([[5, 6, 7, 9, 63, 2, 9, 11], [1, 2, 3, 4, 5, 0, 0, 0]], np.int32)

# Each case sets options away from their defaults; `differs` names the fields whose default
# value, with the same weights, gives other logits (so losing them on export is visible there).
CASES = {
    'tanh_scanned': (dict(gate_act='tanh'), ('gate_act',)),
    'fixed_gelu_gates': (dict(gate_act='gelu', gate_init=0.4, gate_learnable=False),
                         ('gate_act',)),
    'per_sublayer_sandwich_looped': (dict(norm_type='sandwich_gpas', gate_per_sublayer=True,
                                          gate_act='sigmoid', scan_layers=False), ('gate_act',)),
    'lns_fixed_leaky': (dict(norm_type='lns_gpas', lns_mode='fixed', gate_act='leaky_relu',
                             gate_init=-0.2), ('lns_mode', 'gate_act')),
    'mix_post_num_2': (dict(norm_type='post_pre_gpas', post_num=2, gate_act='scale_silu',
                            scan_layers=False), ('gate_act',)),
    'deeppost_identity': (dict(norm_type='deeppost_gpas', gate_act='identity'), ('gate_act',)),
    'bf16': (dict(param_dtype='bfloat16', compute_dtype='bfloat16', gate_act='relu',
                  remat_policy='full', attention_impl='einsum'), ()),
    'bf16_compute': (dict(compute_dtype='bfloat16', rms_eps=1e-5, rope_theta=500.0), ()),
}


def _perturbed(cfg: model_lib.ModelConfig, seed: int = 0) -> model_lib.Transformer:
  """A model with nonzero trained gates and perturbed gains (fixed gates keep their value)."""
  model = model_lib.create_model(cfg, seed)
  sd = interop.to_torch_state_dict(model)
  rng = np.random.default_rng(seed)
  for k, v in sd.items():
    trained_gate = k.endswith('gate') and cfg.gate_learnable
    if trained_gate or k.endswith('norm.weight'):
      noise = rng.normal(0, 0.3, v.shape)
      sd[k] = (v.astype(np.float32) + noise).astype(v.dtype)
  return interop.from_torch_state_dict(sd, cfg)


def _ref_config(cfg: model_lib.ModelConfig) -> torch_model.RefConfig:
  """The port's config built from ours field by field (not from the exported config.json)."""
  return torch_model.RefConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, norm_type=cfg.norm_type, post_num=cfg.post_num,
      rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, gate_act=cfg.gate_act,
      lns_mode=cfg.lns_mode, gate_per_sublayer=cfg.gate_per_sublayer, gate_init=cfg.gate_init,
      gate_learnable=cfg.gate_learnable)


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(IDS.astype(np.int64)))
  return (out.logits if hasattr(out, 'logits') else out).float().numpy()


@pytest.mark.parametrize('case', sorted(CASES))
def test_every_model_option_survives_export_and_loads_strictly_into_the_port(tmp_path, case):
  options, differs = CASES[case]
  cfg = dataclasses.replace(BASE, **options)
  assert all(getattr(cfg, k) != getattr(BASE, k) or k == 'norm_type' for k in options)
  model = _perturbed(cfg)
  interop.save_hf_directory(model, str(tmp_path))
  back = interop.load_hf_directory(str(tmp_path))  # nothing but the directory
  assert back.config == cfg, {k: (getattr(back.config, k), v) for k, v in options.items()}
  sd, sd_back = interop.to_torch_state_dict(model), interop.to_torch_state_dict(back)
  assert sd.keys() == sd_back.keys()
  for k in sd:
    assert sd[k].dtype == sd_back[k].dtype and np.array_equal(sd[k], sd_back[k]), k
  gates = [k for k in sd if k.endswith('gpas_block.gate')]
  assert len(gates) == cfg.num_layers  # fixed gates are exported too
  assert all(sd[k].shape == ((2,) if cfg.gate_per_sublayer else ()) for k in gates)
  ours = np.asarray(model(jnp.asarray(IDS)), np.float32)
  np.testing.assert_array_equal(np.asarray(back(jnp.asarray(IDS)), np.float32), ours)

  # The port, built from our config (not the file's), loads the safetensors file strictly.
  ref = torch_model.RefModel(_ref_config(cfg)).to(getattr(torch, cfg.param_dtype))
  torch_model.load_numpy_state_dict(
      ref, interop.load_state_dict_file(str(tmp_path / 'model.safetensors')))
  assert all(p.requires_grad == cfg.gate_learnable for p in
             (dict(ref.named_parameters())[k] for k in gates))
  # And the port built from config.json alone computes the same function.
  from_file = torch_model.load_hf_directory(str(tmp_path))
  # bf16 on both sides rounds each op differently: a few bf16 ulps (2^-8) of logits ~0.5.
  tol = 5e-2 if cfg.compute_dtype == 'bfloat16' else 2e-5
  for m in (ref, from_file):
    np.testing.assert_allclose(ours, _torch_logits(m), rtol=0, atol=tol * np.abs(ours).max())
  # Each listed option matters: its default changes the logits well beyond the tolerance.
  for k in differs:
    default = dataclasses.replace(cfg, **{k: getattr(model_lib.ModelConfig(), k)})
    other = np.asarray(interop.from_torch_state_dict(sd, default)(jnp.asarray(IDS)), np.float32)
    assert np.abs(other - ours).max() > 10 * tol * np.abs(ours).max(), k


def test_config_json_says_which_models_can_load_it():
  rows = {}
  for case, options in (('pre', dict(norm_type='pre')), ('lns', dict(norm_type='lns')),
                        ('pre_gpas', {}), ('per_sublayer', dict(gate_per_sublayer=True)),
                        ('lns_fixed', dict(norm_type='lns', lns_mode='fixed'))):
    hf = json.loads(json.dumps(interop.hf_config_from_model(dataclasses.replace(BASE, **options))))
    loads = hf['gpas_jax_loads_into']
    rows[case] = (loads['transformers.LlamaForCausalLM'], loads['gpas_baseline'])
    assert bool(loads['why_not']) == (not all(rows[case]))
    assert interop.model_config_from_hf(hf) == dataclasses.replace(BASE, **options)
  assert rows == {'pre': (True, True), 'lns': (True, True), 'pre_gpas': (False, True),
                  'per_sublayer': (False, False), 'lns_fixed': (False, False)}


@pytest.mark.parametrize('norm_type', ['pre', 'lns'])
def test_transformers_4_31_llama_loads_the_export_with_the_same_logits(tmp_path, norm_type):
  import transformers  # pylint: disable=import-outside-toplevel
  assert transformers.__version__ == '4.31.0'  # the baseline's pin (requirements-test.txt)
  cfg = dataclasses.replace(BASE, norm_type=norm_type)
  model = _perturbed(cfg, seed=1)
  interop.save_hf_directory(model, str(tmp_path))
  llama, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path),
                                                              output_loading_info=True)
  assert info == {'missing_keys': [], 'unexpected_keys': [], 'mismatched_keys': [],
                  'error_msgs': []}
  ours = np.asarray(model(jnp.asarray(IDS)))
  theirs = _torch_logits(llama.eval())
  # fp32 on both sides; different matmul blocking: a few ulps of logits ~0.3.
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * np.abs(ours).max())
  # The weights are not the default init: the comparison is of this model.
  assert np.abs(theirs - _torch_logits(transformers.LlamaForCausalLM(llama.config))).max() > 1e-2
  # Strict load_state_dict into 4.31's module (its RoPE buffers included) works too.
  fresh = transformers.LlamaForCausalLM(llama.config)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in interop.load_state_dict_file(
      str(tmp_path / 'model.safetensors')).items()}, strict=True)
  np.testing.assert_array_equal(_torch_logits(fresh), theirs)


def test_gpas_export_is_refused_by_stock_llama_and_rope_buffers_are_checked(tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  model = _perturbed(BASE)
  interop.save_hf_directory(model, str(tmp_path))
  _, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
  assert sorted(info['unexpected_keys']) == [f'model.layers.{i}.gpas_block.gate' for i in range(3)]
  sd = interop.load_state_dict_file(str(tmp_path / 'model.safetensors'))
  assert interop.from_torch_state_dict(sd, BASE).config == BASE  # buffers checked and dropped
  with pytest.raises(interop.StateDictError, match=r'layers\.1\.self_attn\.rotary_emb.*theta'):
    interop.from_torch_state_dict(sd, dataclasses.replace(BASE, rope_theta=500.0))
