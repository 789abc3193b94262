"""Shared test helpers (no jax side effects: subprocesses import this too)."""

import os
import socket
import tempfile

# The embedded corpus and tokenizer are built once per machine and shared by the test workers
# (the builders hold a file lock), instead of once per test.
DATA_CACHE = os.environ.get('GPAS_TEST_CACHE',
                            os.path.join(tempfile.gettempdir(), 'gpas_jax_test_cache'))


def free_port() -> int:
  """A TCP port free on 127.0.0.1 (a coordinator's or a test server's)."""
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def tiny_train_config(**overrides):
  """The tiny config shrunk for tests: a few seconds of training on the embedded corpus."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.data.cache_dir = DATA_CACHE
  c.data.tokenizer_vocab_size = 512
  c.model.vocab_size = 512
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.post_num = 1
  c.data.max_length = 32
  c.data.eval_tokens = 2048
  c.data.eval_batch_size = 8
  c.optim.global_batch_size = 8
  c.num_train_steps = 6
  c.optim.warmup_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.checkpoint_async = False
  c.logging.tensorboard = False
  c.mesh.data = 1
  for key, value in overrides.items():
    section = c
    parts = key.split('.')
    for p in parts[:-1]:
      section = section[p]
    section[parts[-1]] = value
  return c


def compiler_config(fsdp: int, **overrides):
  """The tiny config as the compiler tests plan it: scanned, remat'd, pure bf16, fsdp over
  `fsdp` chips."""
  c = tiny_train_config(**{'model.scan_layers': True, 'model.remat_policy': 'full',
                           'model.param_dtype': 'bfloat16', 'model.compute_dtype': 'bfloat16',
                           'model.num_layers': 4, 'optim.global_batch_size': 16, **overrides})
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, 1
  return c


def tiny_config_file(path, **overrides) -> str:
  """Writes a config file whose get_config() is tiny_train_config(**overrides); its path."""
  lines = ['from tests.helpers import tiny_train_config', '', '',
           'def get_config():', f'  return tiny_train_config(**{overrides!r})', '']
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return str(path)


def data_config(cache_dir, **data):
  """The tiny config with its data cache in `cache_dir` and `data.<k>=v` overrides."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.data.cache_dir = str(cache_dir)
  for k, v in data.items():
    c.data[k] = v
  return c


def perturbed_state_dict(cfg, seed=0):
  """Baseline weights (PyTorch reference init) with nonzero gates and perturbed gains."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from gpas_jax.baseline import torch_model  # pylint: disable=import-outside-toplevel
  ref = torch_model.RefModel(torch_model.RefConfig(
      cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
      cfg.norm_type, cfg.post_num), seed)
  sd = torch_model.state_dict_numpy(ref)
  rng = np.random.default_rng(seed)
  for k, v in sd.items():
    if k.endswith('gate') or 'norm' in k:
      sd[k] = (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype)
  return sd


def read_tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the event files, read as TFRecords without TensorFlow."""
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out: dict[str, dict[int, float]] = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out
