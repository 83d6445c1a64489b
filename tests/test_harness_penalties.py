"""Tests for disam_jax.harness.penalties: CORAL, V-REx and Fishr against a NumPy restatement of DomainBed.

The references below re-type DomainBed's definitions (domainbed/algorithms.py: ``AbstractMMD.mmd`` with the
``mean_cov`` kernel and its pair average, ``VREx.update``, ``Fishr._get_grads_var_per_domain`` and
``_compute_distance_grads_var``; domainbed/lib/misc.py: ``MovingAverage`` and ``l2_between_dicts``) in float64
NumPy, with the per-example gradients of the linear head written out by hand (BackPACK's ``BatchGrad`` of the
summed cross-entropy: `dW_n = z_n (softmax_n - onehot_n)^T`, `db_n = softmax_n - onehot_n`). Gradients are checked
against central finite differences of the NumPy references.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from disam_jax.harness import penalties

jax.config.update("jax_enable_x64", False)

M, B, F, C = 3, 6, 5, 4


def _inputs(seed, m=M, b=B):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(m, b, F)) * rng.uniform(0.5, 2.0, size=(m, 1, F)) + rng.normal(size=(m, 1, F))
  y = rng.integers(0, C, (m, b))
  return z, y


def _head_params(seed=10):
  rng = np.random.default_rng(seed)
  return {"kernel": rng.normal(size=(F, C)) * 0.5, "bias": rng.normal(size=(C,)) * 0.1}


def _head(hp, z):
  return z @ hp["kernel"] + hp["bias"]


# --------------------------------------------------------------------------------------------- NumPy restatements


def np_coral(features):
  """DomainBed AbstractMMD.update with kernel_type 'mean_cov', on a list of [b, F] domain feature arrays."""

  def mmd(x, y):
    mean_x, mean_y = x.mean(0, keepdims=True), y.mean(0, keepdims=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = cent_x.T @ cent_x / (len(x) - 1)
    cova_y = cent_y.T @ cent_y / (len(y) - 1)
    return ((mean_x - mean_y) ** 2).mean() + ((cova_x - cova_y) ** 2).mean()

  penalty, nmb = 0.0, len(features)
  for i in range(nmb):
    for j in range(i + 1, nmb):
      penalty += mmd(features[i], features[j])
  if nmb > 1:
    penalty /= nmb * (nmb - 1) / 2
  return penalty


def np_vrex(losses):
  losses = np.asarray(losses, np.float64)
  return ((losses - losses.mean()) ** 2).mean()


class NpMovingAverage:
  """domainbed.lib.misc.MovingAverage(ema, oneminusema_correction=True)."""

  def __init__(self, ema):
    self.ema, self.ema_data, self._updates = ema, {}, 0

  def update(self, dict_data):
    out = {}
    for name, data in dict_data.items():
      data = data.reshape(1, -1)
      previous = np.zeros_like(data) if self._updates == 0 else self.ema_data[name]
      ema_data = self.ema * previous + (1 - self.ema) * data
      out[name] = ema_data / (1 - self.ema)
      self.ema_data[name] = ema_data.copy()
    self._updates += 1
    return out


def np_l2_between_dicts(d1, d2):
  keys = sorted(d1)
  return ((np.concatenate([d1[k].ravel() for k in keys]) - np.concatenate([d2[k].ravel() for k in keys])) ** 2).mean()


def np_head_grads(hp, z, y):
  """Per-example gradients of the cross-entropy of a linear head, by hand: {'weight': [n, F*C], 'bias': [n, C]}."""
  logits = z @ hp["kernel"] + hp["bias"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = p - np.eye(C)[y]
  return {"weight": (z[:, :, None] * d[:, None, :]).reshape(len(z), -1), "bias": d}


def np_fishr_step(hp, features, labels, emas):
  """One Fishr penalty (DomainBed's compute_fishr_penalty) with one MovingAverage per domain (updated in place)."""
  m, b = labels.shape
  grads = np_head_grads(hp, features.reshape(m * b, -1), labels.reshape(-1))
  per_domain = [{} for _ in range(m)]
  for name, g in grads.items():
    for d in range(m):
      env = g[d * b : (d + 1) * b]
      per_domain[d][name] = ((env - env.mean(0, keepdims=True)) ** 2).mean(0)
  per_domain = [emas[d].update(per_domain[d]) for d in range(m)]
  mean = {name: np.stack([per_domain[d][name] for d in range(m)]).mean(0) for name in per_domain[0]}
  return sum(np_l2_between_dicts(per_domain[d], mean) for d in range(m)) / m


def _finite_difference(f, x, index, h=1e-5):
  up, down = x.copy(), x.copy()
  up[index] += h
  down[index] -= h
  return (f(up) - f(down)) / (2 * h)


# -------------------------------------------------------------------------------------------------------- CORAL


@pytest.mark.parametrize("m", [2, 3, 4])
def test_coral_equals_domainbed_mean_cov_penalty_averaged_over_pairs(m):
  z, _ = _inputs(m, m=m)
  got = penalties.coral_penalty(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(float(got), np_coral(list(z)), rtol=1e-5)


def test_coral_gradient_matches_finite_differences_of_the_reference():
  z, _ = _inputs(1)
  grad = np.asarray(jax.grad(penalties.coral_penalty)(jnp.asarray(z, jnp.float32)))
  for index in [(0, 0, 0), (1, 3, 2), (2, 5, 4)]:
    expected = _finite_difference(lambda v: np_coral(list(v)), z, index)
    np.testing.assert_allclose(grad[index], expected, rtol=1e-3, atol=1e-6)


def test_coral_of_one_domain_is_zero_and_bf16_features_accumulate_in_float32():
  z, _ = _inputs(2)
  assert float(penalties.coral_penalty(jnp.asarray(z[:1], jnp.float32))) == 0.0
  got = penalties.coral_penalty(jnp.asarray(z, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
    float(got), np_coral(list(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float64))), rtol=1e-4
  )


@pytest.mark.parametrize("m, b, f", [(2, 3, 1), (5, 7, 6), (16, 4, 3)])
def test_coral_in_o_m_f2_equals_the_pairwise_reference_to_1e6(m, b, f):
  """The pair-free form (M sum ||a_i - mean a||^2) against DomainBed's pair loop, in float64 and in float32."""
  rng = np.random.default_rng(m * 100 + b)
  # domains with nearly equal statistics: where M sum ||C_i||^2 - ||sum C_i||^2 would cancel in float32
  z = rng.normal(size=(m, b, f)) + 3.0 + 0.01 * rng.normal(size=(m, 1, f))
  expected = np_coral(list(z))
  with jax.enable_x64(True):
    np.testing.assert_allclose(float(penalties.coral_penalty(jnp.asarray(z, jnp.float64))), expected, rtol=1e-6)
  got32 = float(penalties.coral_penalty(jnp.asarray(z, jnp.float32)))
  expected32 = np_coral(list(np.asarray(z, np.float32).astype(np.float64)))
  np.testing.assert_allclose(got32, expected32, rtol=1e-4)


# -------------------------------------------------------------------------------------------------------- V-REx


def test_vrex_penalty_and_its_weight_schedule():
  losses = np.array([0.3, 1.7, 0.9, 2.4])
  np.testing.assert_allclose(
    float(penalties.vrex_penalty(jnp.asarray(losses, jnp.float32))), np_vrex(losses), rtol=1e-6
  )
  pen = penalties.vrex(vrex_lambda=10.0, anneal_steps=500)
  # DomainBed: penalty_weight = vrex_lambda if update_count >= anneal_iters else 1.0; Adam reset at == anneal.
  assert [float(pen.weight(jnp.asarray(s))) for s in (0, 499, 500, 501)] == [1.0, 1.0, 10.0, 10.0]
  assert pen.reset_step == 500


# -------------------------------------------------------------------------------------------------------- Fishr


def test_fishr_gradient_variance_and_penalty_equal_domainbed_over_three_steps():
  hp = _head_params()
  ema = 0.95
  emas = [NpMovingAverage(ema) for _ in range(M)]
  pen = penalties.fishr(fishr_lambda=1000.0, ema=ema, anneal_steps=1500)
  state = pen.init(M, hp)
  assert state.shape == (M, F * C + C)
  for step in range(3):
    z, y = _inputs(20 + step)
    outputs = penalties.DomainOutputs(
      jnp.asarray(z, jnp.float32), jnp.asarray(y), None, _head, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), hp)
    )
    got, state = pen.value(outputs, state)
    np.testing.assert_allclose(float(got), np_fishr_step(hp, z, y, emas), rtol=1e-5)
  # DomainBed: weight 0 before penalty_anneal_iters, lambda from it on; Adam reset there (if != 0).
  assert [float(pen.weight(jnp.asarray(s))) for s in (0, 1499, 1500)] == [0.0, 0.0, 1000.0]
  assert pen.reset_step == 1500 and penalties.fishr(anneal_steps=0).reset_step is None


def test_fishr_gradient_matches_finite_differences_of_the_reference():
  """DomainBed backpropagates through the head gradients (create_graph=True) into the features and the head."""
  hp = _head_params()
  z0, y0 = _inputs(30)
  z, y = _inputs(31)
  ema = 0.9
  pen = penalties.fishr(ema=ema)

  hp32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), hp)
  _, state = pen.value(penalties.DomainOutputs(jnp.asarray(z0, jnp.float32), y0, None, _head, hp32), pen.init(M, hp32))

  def ours(features, head_params):
    return pen.value(penalties.DomainOutputs(features, y, None, _head, head_params), state)[0]

  previous = [NpMovingAverage(ema) for _ in range(M)]
  np_fishr_step(hp, z0, y0, previous)  # the moving averages from the previous step: data, no gradient

  def reference(features, head_params):
    return np_fishr_step(head_params, features, y, copy.deepcopy(previous))

  g_z, g_hp = jax.grad(ours, argnums=(0, 1))(jnp.asarray(z, jnp.float32), hp32)
  for index in [(0, 1, 2), (2, 4, 0)]:
    expected = _finite_difference(lambda v: reference(v, hp), z, index)
    np.testing.assert_allclose(np.asarray(g_z)[index], expected, rtol=2e-3, atol=1e-7)
  for index in [(1, 2), (4, 0)]:
    expected = _finite_difference(lambda k: reference(z, {**hp, "kernel": k}), hp["kernel"], index)
    np.testing.assert_allclose(np.asarray(g_hp["kernel"])[index], expected, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fishr_closed_form_of_the_linear_head_equals_per_example_gradients_to_1e6(with_bias):
  """linear_head's closed-form variances against the hand-written per-example gradients (NumPy, float64) and
  against the generic per-example path (vmap of grad) of the same head, in float64; and its penalty's gradient."""
  hp = _head_params()
  if not with_bias:
    hp = {"kernel": hp["kernel"]}
  z, y = _inputs(40)
  m, b = y.shape
  logits = z.reshape(m * b, F) @ hp["kernel"] + hp.get("bias", 0.0)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = p - np.eye(C)[y.reshape(-1)]
  per_example = {
    "kernel": (z.reshape(m * b, F)[:, :, None] * d[:, None, :]).reshape(m, b, -1),
    "bias": d.reshape(m, b, C),
  }
  expected = np.concatenate([per_example[k].var(axis=1) for k in sorted(hp)], axis=1)  # tree order: bias, kernel
  generic = lambda params, features: features @ params["kernel"] + params.get("bias", 0.0)
  with jax.enable_x64(True):
    hp64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), hp)
    closed = penalties.fishr_domain_gradient_variance(penalties.linear_head, hp64, jnp.asarray(z), jnp.asarray(y))
    vmapped = penalties.fishr_domain_gradient_variance(generic, hp64, jnp.asarray(z), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(closed), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(closed), np.asarray(vmapped), rtol=1e-6, atol=1e-12)
    pen = penalties.fishr(ema=0.9)
    state = jnp.asarray(np.random.default_rng(1).uniform(0, 0.1, (m, expected.shape[1])))

    def value(head, features, params):
      return pen.value(penalties.DomainOutputs(features, jnp.asarray(y), None, head, params), state)[0]

    for argnum in (1, 2):
      g_closed = jax.grad(value, argnums=argnum)(penalties.linear_head, jnp.asarray(z), hp64)
      g_vmapped = jax.grad(value, argnums=argnum)(generic, jnp.asarray(z), hp64)
      for a, v in zip(jax.tree.leaves(g_closed), jax.tree.leaves(g_vmapped)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(v), rtol=1e-6, atol=1e-12)
  # float32 (what the harness runs): close to the float64 reference
  closed32 = penalties.fishr_domain_gradient_variance(
    penalties.linear_head,
    jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), hp),
    jnp.asarray(z, jnp.float32),
    jnp.asarray(y),
  )
  assert closed32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(closed32), expected, rtol=2e-4, atol=1e-6)


def test_registry_models_hand_fishr_the_closed_form_head():
  from flax import nnx

  from disam_jax.harness import models

  model = models.create_model("mlp", num_classes=C, input_shape=(2, 2, 1), rngs=nnx.Rngs(0), hidden=F)
  graphdef, params, model_state = models.functional_model(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2, 2, 1)), jnp.float32)
  logits, head, _ = models.apply_model_with_head(graphdef, params, model_state, x, train=True)
  assert head.apply is penalties.linear_head
  np.testing.assert_allclose(np.asarray(head.apply(head.params, head.features)), np.asarray(logits), rtol=1e-6)


# ------------------------------------------------------------------------------------------- add_penalty, reset_at


def test_add_penalty_shifts_every_present_domain_and_leaves_the_variance():
  from disam_jax import DomainLosses, domain_objective

  losses = DomainLosses(jnp.array([2.0, 9.0, 0.0]), jnp.array([4.0, 6.0, 0.0]))  # third domain absent
  shifted = penalties.add_penalty(losses, 0.25)
  _, _, loss, var = domain_objective(losses)
  means, _, loss2, var2 = domain_objective(shifted)
  np.testing.assert_allclose(np.asarray(means), [0.75, 1.75, 0.0])
  np.testing.assert_allclose(float(loss2), float(loss) + 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(var2), float(var), rtol=1e-6)


def test_reset_at_reinitializes_the_optimizer_right_before_that_update():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = [{"w": jnp.array([0.3 * k, -0.1 + k])} for k in range(4)]
  tx = penalties.reset_at(optax.adam(0.1), 2)
  state = tx.init(params)
  ref = optax.adam(0.1)
  ref_state = ref.init(params)
  for k, g in enumerate(grads):
    if k == 2:
      ref_state = ref.init(params)
    u, state = tx.update(g, state, params)
    v, ref_state = ref.update(g, ref_state, params)
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(v["w"]), rtol=1e-6)
  never = penalties.reset_at(optax.adam(0.1), 2)
  s = never.init(params)
  u0, s = never.update(grads[0], s, params)
  u1, s = never.update(grads[1], s, params)
  u2, _ = never.update(grads[2], s, params)
  ref_state = ref.init(params)
  for g in grads[:3]:
    v, ref_state = ref.update(g, ref_state, params)
  assert not np.allclose(np.asarray(u2["w"]), np.asarray(v["w"]))  # without the reset the update would differ


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: penalties.coral(-1.0), "mmd_gamma must be a finite number >= 0"),
    (lambda: penalties.vrex(anneal_steps=1.5), "vrex anneal_steps must be an integer >= 0"),
    (lambda: penalties.fishr(ema=1.0), "fishr ema must be in [0, 1)"),
  ],
)
def test_bad_hyperparameters_are_refused(make, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
    make()
