"""Key-path names: every kind of jax key, and the checksum keys saved checkpoints rely on."""

from flax import nnx
import jax
import numpy as np

from gpas_jax.train import integrity
from gpas_jax.train import optim
from gpas_jax import tree_paths


def test_every_key_kind_and_the_saved_format():
  tree = {'opt_state': (None, {'mu': [np.zeros(1), {'lm_head': np.zeros(2)}]})}
  paths = [tree_paths.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  assert paths == ['opt_state/1/mu/0', 'opt_state/1/mu/1/lm_head']
  assert integrity.path_str is tree_paths.path_str  # fingerprints keep their saved keys
  assert tree_paths.key_name(jax.tree_util.GetAttrKey('value')) == 'value'
  assert tree_paths.key_name(jax.tree_util.FlattenedIndexKey(3)) == 3
  # The optimizer's names drop nnx's trailing `.value`: an nnx.Param leaf reads 'w', not 'w/value'.
  (path, _), = jax.tree_util.tree_leaves_with_path({'w': nnx.Param(np.zeros(1))})
  assert optim.path_str(path) == 'w' and optim.is_gate_path(
      jax.tree_util.tree_leaves_with_path({'gpas': {'gate': nnx.Param(np.zeros(()))}})[0][0])
