"""Exports carry the modeling code of every architecture and the run's tokenizer for transformers.

Each of the eleven norm types (and GPAS/LNS options) is written as `hf_tools export` writes it and
loaded with AutoModelForCausalLM(trust_remote_code=True) on transformers 4.31 (the pin): logits
equal ours (fp32 both sides: a few ulps); the authors' side (the torch port, stock LLaMA where it
represents the model) still loads the same directory.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpas_jax.baseline import hf_export
from gpas_jax.baseline import hf_modeling
from gpas_jax.baseline import torch_model
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib
from tests.helpers import tiny_train_config

torch.set_num_threads(1)
T = 32
BASE = model_lib.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=3,
                             num_heads=2, post_num=1)
IDS = np.array([[5, 6, 7, 9, 500, 2, 9, 11], [1, 2, 3, 4, 5, 0, 0, 0]], np.int64)
CASES = [dict(norm_type=n) for n in torch_model.NORM_TYPES] + [
    dict(norm_type='pre_gpas', gate_per_sublayer=True, gate_act='tanh', gate_init=0.3),
    dict(norm_type='lns_gpas', lns_mode='fixed')]


@pytest.fixture(scope='module')
def sp():
  from gpas_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.get_tokenizer(tiny_train_config())


def _export(cfg, sp, out):
  """A model of cfg with perturbed weights, written as hf_tools export writes a run."""
  ref = torch_model.RefModel(torch_model.ref_config_from_hf(interop.hf_config_from_model(cfg)),
                             seed=1)
  rng = np.random.default_rng(0)
  sd = {k: (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) if 'norm' in k or 'gate' in k
        else v for k, v in torch_model.state_dict_numpy(ref).items()}
  model = interop.from_torch_state_dict(sd, cfg)
  interop.save_hf_directory(model, str(out))
  hf_export.add_code_and_tokenizer(str(out), cfg, sp, T)
  return model


@pytest.mark.parametrize('options', CASES, ids=lambda o: '-'.join(map(str, o.values())))
def test_every_architecture_loads_through_transformers_with_our_logits(tmp_path, sp, options):
  import transformers  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(BASE, **options)
  model = _export(cfg, sp, tmp_path)
  ours = np.asarray(model(jnp.asarray(IDS, jnp.int32)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)
  assert type(hf).__name__ == hf_export.ARCHITECTURE
  with torch.no_grad():
    theirs = hf(torch.from_numpy(IDS)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5 * np.abs(ours).max())
  hf_json = json.loads((tmp_path / 'config.json').read_text())
  assert hf_json['max_position_embeddings'] == T
  stock = not interop.baseline_gaps(cfg)['transformers.LlamaForCausalLM']
  assert hf_json['architectures'] == ['LlamaForCausalLM' if stock else hf_export.ARCHITECTURE]
  # The authors' side still loads the same directory: the port of their model (strict).
  with torch.no_grad():
    port = torch_model.load_hf_directory(str(tmp_path))(torch.from_numpy(IDS)).numpy()
  np.testing.assert_allclose(port, ours, rtol=0, atol=2e-5 * np.abs(ours).max())
  if not stock:  # stock transformers refuses it instead of dropping the gates
    with pytest.raises(ValueError, match='trust_remote_code'):
      transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=False)


def test_stock_llama_still_loads_a_pre_export(tmp_path, sp):
  import transformers  # pylint: disable=import-outside-toplevel
  model = _export(dataclasses.replace(BASE, norm_type='pre'), sp, tmp_path)
  llama, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path),
                                                              output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  ours = np.asarray(model(jnp.asarray(IDS, jnp.int32)))
  with torch.no_grad():
    theirs = llama(torch.from_numpy(IDS)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5 * np.abs(ours).max())


def test_the_tokenizer_loads_with_the_run_s_ids_and_no_bos(tmp_path, sp):
  import transformers  # pylint: disable=import-outside-toplevel
  _export(BASE, sp, tmp_path)
  from gpas_jax.data import sources, tokenizer  # pylint: disable=import-outside-toplevel
  texts = [t[:400] for t in tokenizer.split_texts(sources.open_split(tiny_train_config(),
                                                                     'validation'))][:40]
  texts += ['', ' ', 'a  b\n\n\tc ', ' leading', 'über naïve 東京 \u2581x', 'x</s>y']
  fast = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  slow = transformers.AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
  assert type(fast).__name__ == 'LlamaTokenizerFast' and len(fast) == sp.vocab_size()
  for tok in (fast, slow):
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        sp.eos_id(), sp.pad_id(), sp.unk_id())
    for t in texts[:-1]:  # the last names </s>: a special token to transformers
      assert tok(t)['input_ids'] == sp.encode(t), t
    assert tok.decode(sp.encode(texts[0])) == texts[0]
  assert hf_modeling.MODEL_TYPE == hf_export.MODEL_TYPE


def test_merges_follow_the_piece_scores(sp):
  merges = hf_export._merges(sp)  # pylint: disable=protected-access
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  ranks = [sp.get_score(vocab[m.replace(' ', '')]) for m in merges]
  assert ranks == sorted(ranks, reverse=True) and len(merges) > 100


def test_greedy_generation_through_transformers_is_ours(tmp_path, sp):
  import transformers  # pylint: disable=import-outside-toplevel
  model = _export(BASE, sp, tmp_path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)
  ids = [5, 6, 7, 9]
  for _ in range(5):
    ids.append(int(np.argmax(np.asarray(model(jnp.asarray([ids], jnp.int32)))[0, -1])))
  out = hf.generate(torch.tensor([ids[:4]]), max_new_tokens=5, do_sample=False,
                    eos_token_id=None, pad_token_id=sp.pad_id())
  assert out[0].tolist() == ids
  with pytest.raises(ValueError, match='left-padded'):
    hf(torch.tensor([[0, 5, 6]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_a_unigram_tokenizer_exports_for_the_slow_tokenizer(tmp_path, sp):
  import transformers  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import sources, tokenizer  # pylint: disable=import-outside-toplevel
  texts = [t[:300] for t in tokenizer.split_texts(sources.open_split(tiny_train_config(),
                                                                     'validation'))][:60]
  uni = tokenizer.train_tokenizer(texts, 400, tmp_path / 'uni.model')
  assert not hf_export.is_bpe(uni) and hf_export.is_bpe(sp)
  _export(BASE, uni, tmp_path / 'hf')
  assert not (tmp_path / 'hf' / 'tokenizer.json').exists()
  slow = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'), use_fast=False)
  for t in texts[:5] + ['a  b\n c']:
    assert slow(t)['input_ids'] == uni.encode(t)
