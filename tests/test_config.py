"""Config files load and validate; every bad config is rejected with its message."""

import glob
import importlib
import os

import pytest

from configs import base
from gpas_jax import config as config_lib
from gpas_jax import model as model_lib

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                     '*.py'))
                      if not os.path.basename(p).startswith('_'))  # not the package's __init__


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_validates(path):
  mod = importlib.import_module('configs.' + os.path.basename(path)[:-3])
  config_lib.validate(mod.get_config())


def test_sizes_match_the_baseline_table():
  from configs import llama_71m, llama_7b, llama_100m
  c = llama_71m.get_config()
  assert (c.model.hidden_size, c.model.intermediate_size, c.model.num_layers,
          c.model.num_heads) == (512, 1368, 12, 8)
  assert (c.optim.lr, c.num_train_steps, c.optim.warmup_steps) == (1e-3, 10_000, 1_000)
  c7 = llama_7b.get_config()
  assert c7.optim.grad_clip == 1.0 and c7.optim.gate_clip == 0.01
  assert c7.optim.global_batch_size == 2048 and c7.model.remat_policy == 'full'
  assert llama_100m.get_config().model.vocab_size == 32100


BAD = [
    (('model', 'norm_type', 'post_gpas'), r"model.norm_type='post_gpas' is not supported.*pre_gpas"),
    (('model', 'gate_act', 'swish'), r"model.gate_act='swish'.*silu, identity, relu"),
    (('model', 'num_heads', 7), r'hidden_size=512 is not divisible by model.num_heads=7'),
    (('model', 'post_num', 13), r'post_num=13 is outside 0..model.num_layers=12'),
    (('model', 'post_num', -1), r'post_num=-1 is outside'),
    (('model', 'vocab_size', 2), r'vocab_size=2 is too small for the special ids.*at least 3'),
    (('model', 'remat_policy', 'some'), r'remat_policy.*none, full, save_dots'),
    (('optim', 'micro_batches', 3), r'global_batch_size=512 is not divisible by optim.micro_batches=3'),
    (('data', 'max_length', 1), r'max_length=1 must be at least 2'),
]


@pytest.mark.parametrize('override,message', BAD, ids=[b[0][1] + str(b[0][2]) for b in BAD])
def test_bad_config_raises_naming_the_field(override, message):
  c = base.get_config()
  section, field, value = override
  c[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_odd_head_dim_is_rejected_before_building():
  c = base.get_config()
  c.model.hidden_size, c.model.num_heads = 24, 8  # head dim 3
  with pytest.raises(config_lib.ConfigError, match='= 3 is odd'):
    model_lib.create_model(c.model)
