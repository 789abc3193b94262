"""What an export adds for transformers: the modeling code of its architecture, and its tokenizer.

Beside config.json + model.safetensors (the baseline's names, which the authors' code loads):
  hf_modeling.py, torch_model.py   the code `trust_remote_code=True` runs (config.json auto_map)
  tokenizer.model                  the run's SentencePiece model
  tokenizer.json                   the same model for `tokenizers` (the fast tokenizer): written
                                   here, because transformers 4.31's conversion renames ids 0-2
                                   to LLaMA's <unk> <s> </s> (ours are T5's <pad> </s> <unk>);
                                   BPE models only (a unigram one loads with use_fast=False)
  tokenizer_config.json            LlamaTokenizer over it: no BOS (none was trained), no EOS added
  special_tokens_map.json
config.json gains `auto_map`, `max_position_embeddings` (the run's data.max_length, where lm-eval
truncates) and, where stock LLaMA cannot compute the model, `architectures` and `model_type` of
the class that can, so stock transformers refuses it instead of dropping the gates.
"""

import json
import pathlib
from typing import Any

from absl import logging

from gpas_jax import storage
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib

CODE_FILES = ('hf_modeling.py', 'torch_model.py')
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')
ARCHITECTURE = 'GpasLlamaForCausalLM'
MODEL_TYPE = 'gpas_llama'  # hf_modeling.MODEL_TYPE (that file runs without the package)
AUTO_MAP = {'AutoConfig': 'hf_modeling.GpasLlamaConfig',
            'AutoModelForCausalLM': f'hf_modeling.{ARCHITECTURE}'}


def hf_config(hf: dict[str, Any], cfg: model_lib.ModelConfig, max_length: int) -> dict[str, Any]:
  """config.json with the code's entry points and the context the run trained with."""
  out = dict(hf, auto_map=AUTO_MAP, max_position_embeddings=max_length)
  if interop.baseline_gaps(cfg)['transformers.LlamaForCausalLM']:
    out.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE)
  return out


def _merges(sp: Any) -> list[str]:
  """BPE merges as transformers' SentencePieceExtractor orders them: by the merged piece's score
  (highest first), then by the ids of its two halves."""
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  found = []
  for piece, i in vocab.items():
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    found += [(sp.get_score(i), l, r) for l, r in local]
  found.sort(key=lambda m: -m[0])  # stable: ties keep the order above
  return [f'{l} {r}' for _, l, r in found]


def is_bpe(sp: Any) -> bool:
  """Whether a SentencePiece model is BPE (the default tokenizer; T5's spiece.model is unigram)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
  return proto.trainer_spec.model_type == proto.trainer_spec.BPE


def tokenizer_json(sp: Any) -> dict[str, Any]:
  """The SentencePiece BPE model as a `tokenizers` BPE with byte fallback (LLaMA's layout)."""
  n = sp.get_piece_size()
  special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
  added = [{'id': i, 'content': sp.id_to_piece(i), 'single_word': False, 'lstrip': False,
            'rstrip': False, 'normalized': False, 'special': True} for i in special]
  return {
      'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
      'normalizer': {'type': 'Sequence', 'normalizers': [
          {'type': 'Prepend', 'prepend': '\u2581'},
          {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '\u2581'}]},
      'pre_tokenizer': None,
      'post_processor': {'type': 'TemplateProcessing',
                         'single': [{'Sequence': {'id': 'A', 'type_id': 0}}],
                         'pair': [{'Sequence': {'id': 'A', 'type_id': 0}},
                                  {'Sequence': {'id': 'B', 'type_id': 1}}],
                         'special_tokens': {}},
      'decoder': {'type': 'Sequence', 'decoders': [
          {'type': 'Replace', 'pattern': {'String': '\u2581'}, 'content': ' '},
          {'type': 'ByteFallback'}, {'type': 'Fuse'},
          {'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0}]},
      'model': {'type': 'BPE', 'dropout': None, 'unk_token': sp.id_to_piece(sp.unk_id()),
                'continuing_subword_prefix': None, 'end_of_word_suffix': None, 'fuse_unk': True,
                'byte_fallback': True,
                'vocab': {sp.id_to_piece(i): i for i in range(n)}, 'merges': _merges(sp)},
  }


def tokenizer_config(sp: Any, max_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(tokenizer_config.json, special_tokens_map.json) of LlamaTokenizer over the run's model."""
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
  # No BOS was trained: transformers 4.31's LlamaTokenizerFast needs one named, so it names the
  # EOS that ends the document before (never added: add_bos_token=False). It is also what an
  # empty context is conditioned on, by lm-eval's hf backend (its BOS) and ours (its EOS).
  special = {'eos_token': piece(sp.eos_id()), 'unk_token': piece(sp.unk_id()),
             'pad_token': piece(sp.pad_id()), 'bos_token': piece(sp.bos_id()) or piece(sp.eos_id())}
  config = dict(special, tokenizer_class='LlamaTokenizer', add_bos_token=False,
                add_eos_token=False, model_max_length=max_length, legacy=True,
                clean_up_tokenization_spaces=False, sp_model_kwargs={})
  return config, {k: v for k, v in special.items() if v is not None}


def add_code_and_tokenizer(out_dir: str, cfg: model_lib.ModelConfig, sp: Any,
                           max_length: int) -> None:
  """Adds the modeling code and the tokenizer to an export written by interop.save_hf_directory."""
  here = pathlib.Path(__file__).parent
  for name in CODE_FILES:
    storage.write_text(storage.join(out_dir, name), (here / name).read_text(encoding='utf-8'))
  path = storage.join(out_dir, 'config.json')
  storage.write_json(path, hf_config(storage.read_json(path), cfg, max_length))
  storage.write_bytes(storage.join(out_dir, 'tokenizer.model'), sp.serialized_model_proto())
  if is_bpe(sp):
    storage.write_text(storage.join(out_dir, 'tokenizer.json'),
                       json.dumps(tokenizer_json(sp), ensure_ascii=False))
  else:  # transformers 4.31 converts BPE models only: the slow tokenizer reads tokenizer.model
    logging.warning('The run\'s tokenizer is not BPE: the export has no tokenizer.json; load it '
                    'with AutoTokenizer.from_pretrained(dir, use_fast=False) (lm-eval: '
                    'use_fast_tokenizer=False).')
  config, special = tokenizer_config(sp, max_length)
  storage.write_json(storage.join(out_dir, 'tokenizer_config.json'), config)
  storage.write_json(storage.join(out_dir, 'special_tokens_map.json'), special)
