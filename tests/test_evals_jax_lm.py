"""The JAX backend of lm-eval: its numbers are the training forward pass's, in a few fixed shapes.

A 2-layer pre_gpas model (hidden 32, vocab 512, perturbed baseline init, seed 0) and the tests'
default tokenizer; contexts up to 3x the 32-token context, so left truncation is exercised.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpas_jax.evals import jax_lm
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib
from tests.helpers import perturbed_state_dict
from tests.helpers import tiny_train_config

T = 32
CFG = model_lib.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2, norm_type='pre_gpas', post_num=1)


class _Req:
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope='module')
def sp():
  from gpas_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.get_tokenizer(tiny_train_config())


@pytest.fixture(scope='module')
def model():
  return interop.from_torch_state_dict(perturbed_state_dict(CFG), CFG)


def _pairs(n=10, seed=0):
  """(context, continuation) token lists: most contexts longer than T (truncated: one reference
  shape), three short ones; continuations of 1..9 tokens."""
  rng = np.random.default_rng(seed)
  lengths = [3, 9, 17] + rng.integers(T, 3 * T, n - 3).tolist()
  return [(rng.integers(3, 512, k).tolist(), rng.integers(3, 512, rng.integers(1, 10)).tolist())
          for k in lengths]


@jax.jit
def _logits(state, ids):
  return nnx.merge(*state)(ids)


def _forward(model, ids):
  """The model's logits of unpadded ids (jitted: one compile per length, not one per op)."""
  return _logits(nnx.split(model), jnp.asarray(ids, jnp.int32))


def _reference(model, ctx, cont):
  """-(the training loss's weighted sum) over the continuation's targets of the unpadded window,
  and whether each of them is the argmax."""
  whole = jnp.asarray([(ctx + cont)[-(T + 1):]], jnp.int32)
  logits = _forward(model, whole)
  w = np.zeros(whole.shape, np.float32)
  w[0, whole.shape[1] - 1 - len(cont):whole.shape[1] - 1] = 1  # position t predicts token t+1
  loss, _ = model_lib.lm_loss(logits, whole, weights_BxT=jnp.asarray(w))
  greedy = np.argmax(np.asarray(logits[0, :-1]), -1) == np.asarray(whole[0, 1:])
  return -float(loss), bool(np.all(greedy[w[0, :-1] > 0]))


def test_loglikelihood_is_the_training_forward_pass_sum_over_the_continuation(model, sp):
  lm = jax_lm.JaxLM(model, sp, T, batch_size=4)
  pairs = _pairs()
  got = lm._loglikelihood_tokens([(('', ''), c, x) for c, x in pairs])
  want = [_reference(model, c, x) for c, x in pairs]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=2e-6, atol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]
  # A one-token continuation that is the argmax is greedy; the same request is not when the
  # continuation is any other token.
  ctx = pairs[0][0]
  logits = np.asarray(_forward(model, [ctx[-T:]]))[0, -1]
  best, worst = int(np.argmax(logits)), int(np.argmin(logits))
  (ll_best, g_best), (ll_worst, g_worst) = lm._loglikelihood_tokens(
      [(('', ''), ctx, [best]), (('', ''), ctx, [worst])])
  assert g_best and not g_worst and ll_best > ll_worst
  np.testing.assert_allclose(ll_best, jax.nn.log_softmax(logits)[best], rtol=1e-5)


def test_requests_are_scored_in_a_few_fixed_shapes(model, sp):
  lm = jax_lm.JaxLM(model, sp, T, batch_size=4)
  lm._loglikelihood_tokens([(('', ''), c, x) for c, x in _pairs(n=20, seed=1)])
  assert jax_lm.buckets(T) == [16, 32] and jax_lm.buckets(100) == [16, 32, 64, 100]
  assert lm.shapes_run <= {(4, 16), (4, 32)}


def test_text_requests_split_as_the_hf_backend_splits_them(model, sp):
  """TemplateLM's split: context tokens, then the whole's remaining tokens; a trailing space of
  the context moves to the continuation; an empty context is conditioned on EOS (no BOS)."""
  lm = jax_lm.JaxLM(model, sp, T, batch_size=4)
  ctx, cont = 'Question: what does the function return? ', 'None'
  (ll, _), = lm.loglikelihood([_Req(ctx, cont)], disable_tqdm=True)
  ctx_ids = sp.encode(ctx.rstrip())
  whole = sp.encode(ctx.rstrip() + ' ' + cont)
  assert whole[:len(ctx_ids)] == ctx_ids
  np.testing.assert_allclose(ll, _reference(model, ctx_ids, whole[len(ctx_ids):])[0], rtol=1e-5)
  (ll0, _), = lm.loglikelihood([_Req('', cont)], disable_tqdm=True)
  np.testing.assert_allclose(ll0, _reference(model, [sp.eos_id()], sp.encode(cont))[0],
                             rtol=1e-5)
  assert lm.prefix_token_id == sp.eos_id() == 1 and lm.tok_encode('a b')[0] != sp.bos_id()


def test_rolling_loglikelihood_covers_every_token_once(model, sp):
  lm = jax_lm.JaxLM(model, sp, T, batch_size=4)
  short = 'A short page.'
  (got,) = lm.loglikelihood_rolling([_Req(short)])
  np.testing.assert_allclose(got, _reference(model, [sp.eos_id()], sp.encode(short))[0],
                             rtol=1e-5)
  long_text = ' '.join(['The quick brown fox jumps over the lazy dog.'] * 12)
  ids = sp.encode(long_text)
  assert len(ids) > 2 * T
  # Disjoint windows of T targets: the first conditioned on EOS, each next one on the T - k
  # tokens before it (lm-eval's rolling windows, max_seq_len=T, context_len=1).
  want = _reference(model, [sp.eos_id()], ids[:T])[0]
  for start in range(T, len(ids), T):
    want += _reference(model, ids[:start], ids[start:start + T])[0]
  (got,) = lm.loglikelihood_rolling([_Req(long_text)])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_greedy_generation_stops_at_until_and_max_gen_toks(model, sp):
  lm = jax_lm.JaxLM(model, sp, T, batch_size=2)
  prompt = 'def f(x):'
  ids = sp.encode(prompt)
  want = []
  for _ in range(4):  # argmax step by step on the unpadded sequence
    nxt = int(np.argmax(np.asarray(_forward(model, [ids + want]))[0, -1]))
    if nxt == sp.eos_id():
      break
    want.append(nxt)
  text = sp.decode(want)
  got = lm.generate_until([_Req(prompt, {'until': [], 'max_gen_toks': 4}),
                           _Req('x' + prompt, {'until': [], 'max_gen_toks': 2})])
  assert got[0] == text and len(sp.encode(got[1])) <= 3
  if text.strip():
    stop = text.strip()[-1]
    (cut,) = lm.generate_until([_Req(prompt, {'until': [stop], 'max_gen_toks': 4})])
    assert cut == text.split(stop)[0]


def test_a_live_state_on_a_mesh_scores_as_one_device(model, sp):
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  c = tiny_train_config(**{'model.norm_type': 'pre_gpas', 'mesh.data': 2})
  s = steps.setup(c, jax.devices()[:2])
  state = steps.init_state(s)
  live = jax_lm.JaxLM(nnx_merge(s, state), sp, T, batch_size=4, mesh=s.mesh, rules=s.rules)
  one = jax_lm.JaxLM(jax.device_put(nnx_merge(s, state), jax.devices()[0]), sp, T, batch_size=4)
  reqs = [(('', ''), c_, x) for c_, x in _pairs(n=6, seed=2)]
  np.testing.assert_allclose([r[0] for r in live._loglikelihood_tokens(reqs)],
                             [r[0] for r in one._loglikelihood_tokens(reqs)], rtol=1e-5)


def nnx_merge(s, state):
  return nnx.merge(s.graphdef, state['params'], s.rest)


def test_a_continuation_longer_than_the_context_is_refused():
  with pytest.raises(ValueError, match='exceeds'):
    jax_lm.window([1, 2], list(range(3, 3 + T + 1)), T)
  w = jax_lm.window(list(range(100)), [7, 8], T)
  assert len(w.ids) == T and w.targets[-2:] == [7, 8] and w.ids[-1] == 7 and w.count == 2
  assert dataclasses.asdict(jax_lm.window([5], [6], T)) == {'ids': [5], 'targets': [6],
                                                             'count': 1}
