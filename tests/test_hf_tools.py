"""Baseline-format export and import, parity with the PyTorch reference, and evaluation."""

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from gpas_jax.baseline import hf_tools
from gpas_jax.baseline import torch_model
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib
from tests.helpers import perturbed_state_dict
from tests.helpers import tiny_train_config

torch.set_num_threads(1)
CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                            num_heads=2, norm_type='pre_gpas', post_num=1)
IDS = np.array([[5, 6, 7, 9, 63, 2, 9, 11], [1, 2, 3, 4, 5, 0, 0, 0]], np.int32)


def _ref(cfg):
  return torch_model.RefModel(torch_model.RefConfig(
      cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
      cfg.norm_type, cfg.post_num))


def _model(cfg, seed=0):
  return interop.from_torch_state_dict(perturbed_state_dict(cfg, seed), cfg)


@pytest.mark.parametrize('norm_type,scan', [('pre_gpas', True), ('post_pre_gpas', False)])
def test_export_import_is_exact_and_loads_into_the_torch_reference(tmp_path, norm_type, scan):
  cfg = dataclasses.replace(CFG, norm_type=norm_type, scan_layers=scan)
  model = _model(cfg)
  interop.save_hf_directory(model, str(tmp_path))
  back = interop.load_hf_directory(str(tmp_path))  # norm_type and post_num from config.json
  assert back.config.norm_type == norm_type and back.config.post_num == 1
  sd, sd_back = interop.to_torch_state_dict(model), interop.to_torch_state_dict(back)
  assert sd.keys() == sd_back.keys()
  for k in sd:
    assert sd[k].dtype == sd_back[k].dtype and np.array_equal(sd[k], sd_back[k]), k
  ref = _ref(cfg)
  torch_model.load_numpy_state_dict(
      ref, interop.load_state_dict_file(str(tmp_path / 'model.safetensors')))  # strict
  with torch.no_grad():
    want = ref(torch.from_numpy(IDS.astype(np.int64))).numpy()
  np.testing.assert_allclose(np.asarray(back(jnp.asarray(IDS))), want, rtol=1e-5, atol=1e-6)


def test_export_run_and_evaluate_hf_directory(tmp_path, monkeypatch):
  sd = perturbed_state_dict(CFG)
  model = interop.from_torch_state_dict(sd, CFG)
  config = ml_collections.ConfigDict({
      'size_name': 'tiny', 'seed': 3,
      'model': {'vocab_size': 4096, 'hidden_size': 128, 'intermediate_size': 352,
                'num_layers': 4, 'num_heads': 4, 'norm_type': 'pre', 'post_num': 1},
      'data': {'pad_id': 0, 'layout': 'padded', 'max_length': 24}})
  from gpas_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import loading  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(loading, 'load_model', lambda workdir, step=None: (config, model))
  sp = tokenizer.get_tokenizer(tiny_train_config())  # the run's tokenizer goes with the export
  monkeypatch.setattr(tokenizer, 'get_tokenizer', lambda c: sp if c is config else None)
  out = hf_tools.export_run(str(tmp_path / 'run'), str(tmp_path / 'hf'), step=5)
  assert sorted(os.listdir(out)) == sorted(hf_tools.EXPORT_FILES)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['max_position_embeddings'] == 24
  with open(os.path.join(out, 'gpas_jax_export.json')) as f:
    assert json.load(f)['step'] == 5

  ids2 = IDS.copy()
  ids2[0, 3:] = 0
  batches = [{'input_ids': IDS, 'segment_ids': (IDS != 0).astype(np.int32)},
             {'input_ids': ids2, 'segment_ids': (ids2 != 0).astype(np.int32)},
             {'input_ids': np.zeros_like(IDS), 'segment_ids': np.zeros_like(IDS)}]  # no targets
  seen = {}

  def fake_batches(c):
    seen['config'] = c
    return iter(batches)

  monkeypatch.setattr('gpas_jax.data.make_eval_batches', fake_batches)
  loss, ppl = hf_tools.evaluate_hf_directory(out, config)
  # The eval config takes the checkpoint's dims (the tokenizer is checked against them).
  assert seen['config'].model.vocab_size == 64 and seen['config'].model.norm_type == 'pre_gpas'
  assert config.model.vocab_size == 4096
  ref = _ref(CFG)
  torch_model.load_numpy_state_dict(ref, sd)
  with torch.no_grad():
    per_batch = [float(torch_model.loss_fn(ref(ids_t), ids_t)) for ids_t in
                 (torch.from_numpy(b['input_ids'].astype(np.int64)) for b in batches[:2])]
  np.testing.assert_allclose(loss, np.mean(per_batch), rtol=1e-5)
  np.testing.assert_allclose(ppl, np.exp(loss), rtol=1e-12)
  assert hf_tools.evaluate_model(model, batches[1:2])[0] == pytest.approx(per_batch[1], 1e-5)
