"""Tests for disam_jax.harness.models.

References are independent of the code under test: parameter counts of torchvision
and of DomainBed's MNIST_CNN worked out by hand, BatchNorm statistics recomputed
from a NumPy convolution, and PyTorch-layout weights applied with NumPy.

Speed: models are initialized with RBG keys (threefry compiles its random-bit
kernel once per parameter shape eagerly, ~1 s each on CPU), kept small (``width``)
and shared through ``_model``; each compiled function is built once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disam_jax.harness import models
from disam_jax.harness.models import apply_model, create_model, functional_model

BN_MOMENTUM = 0.9


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.cache
def _model(name, input_shape, num_classes, seed=0, **kwargs):
  """Shared instances; tests that change a model work on ``nnx.clone`` of it."""
  return create_model(name, num_classes=num_classes, input_shape=input_shape, rngs=_rngs(seed), **kwargs)


def _param_count(model):
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _abstract_model(name, input_shape, num_classes, **kwargs):
  """Shapes only (no initialization compute)."""
  return nnx.eval_shape(
    lambda: create_model(name, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0), **kwargs)
  )


def _np(v):
  return np.asarray(v[...] if isinstance(v, nnx.Variable) else v, dtype=np.float64)


def _assert_states_equal(a, b):
  def raw(leaf):  # RNG keys (dropout streams) compare by their key data
    return np.asarray(jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)

  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(raw(x), raw(y))


def _conv_nhwc(x, kernel, stride=1, pad=1):
  """Cross-correlation with symmetric zero padding (PyTorch's Conv2d), HWIO kernel."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      window = x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride, :]
      out = out + np.einsum("nhwc,co->nhwo", window, kernel[i, j])
  return out


# --------------------------------------------------------------------- registry


def test_registry_names():
  assert set(models.MODELS) == {"mlp", "mnist_cnn", "resnet18", "resnet50", "mobilenet_v2", "vit_tiny"}


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match="resnet18") as err:
    create_model("resnet19", num_classes=2, input_shape=(8, 8, 3), rngs=_rngs())
  assert "resnet19" in str(err.value) and "mnist_cnn" in str(err.value)


def test_bad_input_shapes():
  with pytest.raises(ValueError, match="height, width, channels"):
    create_model("mlp", num_classes=2, input_shape=(8, 8), rngs=_rngs())
  with pytest.raises(ValueError, match="patches"):
    create_model("vit_tiny", num_classes=2, input_shape=(30, 30, 3), rngs=_rngs(), patch_size=4)


@pytest.mark.parametrize("side, patch", [(32, 4), (28, 2), (8, 1), (64, 8), (224, 16), (30, 3), (96, 8)])
def test_vit_patch_follows_the_input_size(side, patch):
  """The smallest patch dividing the side into at most 14 x 14 = 196 tokens (hand-computed divisors)."""
  assert models.vit_patch_size(side, side) == patch
  if side <= 64:
    model = create_model("vit_tiny", num_classes=2, input_shape=(side, side, 3), rngs=_rngs(), depth=1, dim=8, heads=2)
    assert model.backbone.patch_size == patch
    assert model.backbone.pos_embed.shape[1] == (side // patch) ** 2 + 1


def test_vit_refuses_an_input_no_patch_fits_saying_what_to_write():
  with pytest.raises(ValueError, match="patch_size=P .* multiple of 16"):
    models.vit_patch_size(197, 197)  # prime: patches of 1 (38809 tokens) or of 197 (1 token)


def test_vit_at_224px_needs_megabytes_not_hundreds_of_gibibytes():
  """The compiled train-mode forward and backward of vit_tiny at 224 px, batch 8: temp memory with the derived patch
  (16: 197 tokens) against the old fixed patch 4 (3137 tokens), compiled only."""

  def temp_bytes(**options):
    model = nnx.eval_shape(
      lambda: create_model("vit_tiny", num_classes=10, input_shape=(224, 224, 3), rngs=_rngs(), **options)
    )
    graphdef, params, model_state = functional_model(model)
    x = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
    loss = lambda p, x: jnp.sum(apply_model(graphdef, p, model_state, x, train=True)[0])
    return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes

  derived, fixed = temp_bytes(), temp_bytes(patch_size=4)
  print(f"vit_tiny 224 px batch 8 temp: derived patch {derived / 2**20:.0f} MiB, patch 4 {fixed / 2**30:.1f} GiB")
  assert derived < 2**30 < fixed and fixed > 50 * derived


# (name, input_shape, num_classes, kwargs): each model on a typical input, made small.
REGISTRY_CASES = [
  ("mlp", (28, 28, 2), 2, ()),  # ColoredMNIST-shaped
  ("mnist_cnn", (28, 28, 1), 10, ()),
  ("mnist_cnn", (8, 8, 1), 10, ()),  # sklearn digits
  ("resnet18", (16, 16, 3), 3, (("width", 8),)),  # small-input stem
  ("vit_tiny", (32, 32, 3), 10, ()),
]


FIRST_KERNEL = {
  "mlp": ("layers", 0, "kernel"),
  "mnist_cnn": ("conv1", "kernel"),
  "resnet18": ("conv1", "kernel"),
  "resnet50": ("conv1", "kernel"),
  "vit_tiny": ("patch_embed", "kernel"),
}


@pytest.mark.parametrize(
  "name,input_shape,num_classes,kwargs", REGISTRY_CASES, ids=[f"{c[0]}-{c[1][0]}px" for c in REGISTRY_CASES]
)
def test_model_forward_and_grad_under_jit(name, input_shape, num_classes, kwargs):
  model = _model(name, input_shape, num_classes, **dict(kwargs))
  graphdef, params, model_state = functional_model(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *input_shape)), jnp.float32)
  labels = jnp.array([0, 1])

  def loss_fn(params, model_state, x):
    logits, new_state = apply_model(graphdef, params, model_state, x, train=True)
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
    return loss, (logits, new_state)

  (loss, (logits, new_state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, model_state, x)
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits))) and np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  grad_leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.all(np.isfinite(g)) for g in grad_leaves)
  assert np.any(np.asarray(grads["classifier"]["kernel"][...]) != 0)
  first_layer = grads["backbone"]
  for key in FIRST_KERNEL[name]:
    first_layer = first_layer[key]
  assert np.any(np.asarray(first_layer[...]) != 0)  # gradients reach the input layer
  # The new state can be a scan/loop carry: same structure as the one passed in.
  assert jax.tree.structure(new_state) == jax.tree.structure(model_state)


def test_resnet50_forward_on_tiny_inputs():
  # One forward only: the 53-layer backward pass takes long to compile on CPU.
  model = _model("resnet50", (8, 8, 3), 3, width=4)
  assert model.n_features == 4 * 8 * 4
  graphdef, params, model_state = functional_model(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  logits, new_state = jax.jit(functools.partial(apply_model, graphdef, train=True))(params, model_state, x)
  assert logits.shape == (2, 3) and np.all(np.isfinite(np.asarray(logits)))
  assert jax.tree.structure(new_state) == jax.tree.structure(model_state)


def test_resnet18_imagenet_stem_on_224_inputs():
  model = _model("resnet18", (224, 224, 3), 7, width=8)
  assert not model.backbone.small_input_stem
  assert model.backbone.conv1.kernel.shape == (7, 7, 3, 8)
  graphdef, params, model_state = functional_model(model)
  x = jnp.ones((1, 224, 224, 3), jnp.float32) * 0.5
  logits, _ = jax.jit(functools.partial(apply_model, graphdef, train=False))(params, model_state, x)
  assert logits.shape == (1, 7) and np.all(np.isfinite(np.asarray(logits)))


def test_stem_choice_follows_input_height():
  assert _abstract_model("resnet18", (64, 64, 3), 2).backbone.small_input_stem
  assert not _abstract_model("resnet18", (65, 65, 3), 2).backbone.small_input_stem
  assert not _abstract_model("resnet18", (32, 32, 3), 2, small_input_stem=False).backbone.small_input_stem


# -------------------------------------------------------------- parameter counts


def test_resnet_parameter_counts_match_torchvision():
  # torchvision.models.resnet18() / resnet50() with 1000 classes; BatchNorm counted
  # as weight + bias (running statistics are buffers there, BatchStat here).
  assert _param_count(_abstract_model("resnet18", (224, 224, 3), 1000)) == 11_689_512
  assert _param_count(_abstract_model("resnet50", (224, 224, 3), 1000)) == 25_557_032
  # The small-input stem swaps the 7x7x3x64 stem kernel for a 3x3x3x64 one.
  assert _param_count(_abstract_model("resnet18", (32, 32, 3), 1000)) == 11_689_512 - (49 - 9) * 3 * 64
  stats = nnx.state(_abstract_model("resnet18", (224, 224, 3), 1000), nnx.BatchStat)
  assert len(jax.tree.leaves(stats)) == 2 * 20  # 17 conv BNs + 3 downsample BNs


def test_mnist_cnn_matches_domainbed():
  # DomainBed networks.MNIST_CNN: Conv2d(C,64,3,1,padding=1), Conv2d(64,128,3,stride=2,
  # padding=1), Conv2d(128,128,3,1,padding=1) x2, GroupNorm(8,64), GroupNorm(8,128) x3,
  # AdaptiveAvgPool2d(1); then the classifier Linear(128, num_classes).
  model = _abstract_model("mnist_cnn", (28, 28, 1), 10)
  b = model.backbone
  assert [b.conv1.kernel.shape, b.conv2.kernel.shape, b.conv3.kernel.shape, b.conv4.kernel.shape] == [
    (3, 3, 1, 64),
    (3, 3, 64, 128),
    (3, 3, 128, 128),
    (3, 3, 128, 128),
  ]
  assert [n.num_groups for n in (b.norm0, b.norm1, b.norm2, b.norm3)] == [8, 8, 8, 8]
  assert [n.scale.shape[0] for n in (b.norm0, b.norm1, b.norm2, b.norm3)] == [64, 128, 128, 128]
  assert model.classifier.kernel.shape == (128, 10)
  expected = (
    (9 * 1 * 64 + 64) + (9 * 64 * 128 + 128) + 2 * (9 * 128 * 128 + 128) + 2 * 64 + 3 * 2 * 128 + (128 * 10 + 10)
  )
  assert expected == 371_850
  assert _param_count(model) == expected
  assert nnx.state(model, nnx.Not(nnx.Param)) == nnx.State({})  # no BatchNorm, no RNG state


@pytest.mark.parametrize("size,expected", [(28, 14), (8, 4)])
def test_mnist_cnn_strided_conv_pads_like_torch(size, expected):
  model = _model("mnist_cnn", (size, size, 1), 10)
  x = np.random.default_rng(1).normal(size=(2, size, size, 1))
  h1 = np.asarray(model.backbone.conv1(jnp.asarray(x, jnp.float32)))
  h2 = np.asarray(model.backbone.conv2(jnp.asarray(h1)))
  assert h2.shape == (2, expected, expected, 128)
  # PyTorch's padding=1 pads both sides; Flax's 'SAME' at stride 2 would pad one.
  reference = _conv_nhwc(h1.astype(np.float64), _np(model.backbone.conv2.kernel), stride=2)
  reference += _np(model.backbone.conv2.bias)
  np.testing.assert_allclose(h2, reference, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute():
  model = create_model(
    "mlp", num_classes=3, input_shape=(4, 4, 1), rngs=_rngs(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
  )
  assert model.classifier.kernel.dtype == jnp.bfloat16
  logits = model(jnp.ones((2, 4, 4, 1)))
  assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 3)


# -------------------------------------------------- BatchNorm in the functional form

BN_SHAPE = (16, 16, 3)


def _bn_model():
  return _model("resnet18", BN_SHAPE, 3, width=8)


@functools.cache
def _bn_setup():
  """A resnet18 with non-trivial running statistics, its split, a batch, jitted passes."""
  model = nnx.clone(_bn_model())
  rng = np.random.default_rng(2)
  old_mean = rng.normal(size=8).astype(np.float32)
  old_var = rng.uniform(0.5, 2.0, size=8).astype(np.float32)
  model.backbone.bn1.mean[...] = old_mean
  model.backbone.bn1.var[...] = old_var
  graphdef, params, model_state = functional_model(model)
  x = rng.normal(size=(4, *BN_SHAPE)).astype(np.float32)
  train = jax.jit(functools.partial(apply_model, graphdef, train=True))
  evaluate = jax.jit(functools.partial(apply_model, graphdef, train=False))
  return model, graphdef, params, model_state, x, old_mean, old_var, train, evaluate


def _expected_stem_statistics(params, x, old_mean, old_var):
  # The stem BN follows the stem convolution (3x3, stride 1, padding 1, no bias).
  conv = _conv_nhwc(x.astype(np.float64), _np(params["backbone"]["conv1"]["kernel"]))
  batch_mean = conv.mean(axis=(0, 1, 2))
  batch_var = conv.var(axis=(0, 1, 2))  # biased, as Flax (and unlike torch's running_var)
  return (
    BN_MOMENTUM * old_mean + (1 - BN_MOMENTUM) * batch_mean,
    BN_MOMENTUM * old_var + (1 - BN_MOMENTUM) * batch_var,
  )


def _stem_stats(model_state):
  bn = model_state["backbone"]["bn1"]
  return _np(bn["mean"]), _np(bn["var"])


def test_train_mode_updates_running_statistics_like_numpy():
  model, _, params, model_state, x, old_mean, old_var, train, _ = _bn_setup()
  model.eval()
  _, new_state = train(params, model_state, x)
  want_mean, want_var = _expected_stem_statistics(params, x, old_mean, old_var)
  got_mean, got_var = _stem_stats(new_state)
  np.testing.assert_allclose(got_mean, want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_var, want_var, rtol=1e-4, atol=1e-5)
  # Pure: neither the states passed in nor the model were touched, nor its mode.
  np.testing.assert_array_equal(_stem_stats(model_state)[0], old_mean)
  np.testing.assert_array_equal(np.asarray(model.backbone.bn1.var[...]), old_var)
  assert model.backbone.bn1.use_running_average


def test_stateful_train_and_eval_modes():
  model = models.ResNet(num_classes=3, input_shape=BN_SHAPE, rngs=_rngs(), width=8, stage_sizes=(1,))
  x = jnp.asarray(np.random.default_rng(7).normal(size=(4, *BN_SHAPE)), jnp.float32)
  model.eval()
  model(x)
  np.testing.assert_array_equal(np.asarray(model.backbone.bn1.mean[...]), np.zeros(8))
  model.train()
  model(x)
  assert not np.allclose(np.asarray(model.backbone.bn1.mean[...]), 0.0)


def test_apply_model_outside_jit_is_pure_too():
  # Outside jit nnx.merge would hand the caller's Variable objects to the module;
  # a one-stage ResNet keeps this eager test fast.
  model = models.ResNet(num_classes=3, input_shape=BN_SHAPE, rngs=_rngs(), width=8, stage_sizes=(1,))
  graphdef, params, model_state = functional_model(model)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(4, *BN_SHAPE)), jnp.float32)
  _, new_state = apply_model(graphdef, params, model_state, x, train=True)
  assert not np.allclose(_stem_stats(new_state)[0], 0.0)
  np.testing.assert_array_equal(_stem_stats(model_state)[0], np.zeros(8))
  np.testing.assert_array_equal(np.asarray(model.backbone.bn1.mean[...]), np.zeros(8))
  _, same_state = apply_model(graphdef, params, model_state, x, train=False)
  assert same_state is model_state


def test_eval_mode_uses_running_statistics_and_keeps_them():
  _, _, params, model_state, x, _, _, train, evaluate = _bn_setup()
  logits, same_state = evaluate(params, model_state, x)
  _assert_states_equal(same_state, model_state)
  # Running statistics make each example's logits independent of the rest of the batch...
  x_other = x.copy()
  x_other[1:] = np.random.default_rng(3).normal(size=x_other[1:].shape)
  logits_other, _ = evaluate(params, model_state, x_other)
  np.testing.assert_allclose(np.asarray(logits_other[0]), np.asarray(logits[0]), rtol=1e-5, atol=1e-6)
  # ...which batch statistics (train mode) do not,
  train_logits, _ = train(params, model_state, x)
  train_logits_other, _ = train(params, model_state, x_other)
  assert not np.allclose(np.asarray(train_logits_other[0]), np.asarray(train_logits[0]), atol=1e-4)
  # and eval logits follow the running statistics.
  shifted = jax.tree.map(lambda v: v + 0.5, model_state)
  logits_shifted, _ = evaluate(params, shifted, x)
  assert not np.allclose(np.asarray(logits_shifted), np.asarray(logits), atol=1e-4)


def test_two_passes_keep_the_first_pass_statistics():
  """The SAM/DISAM pattern: unperturbed and perturbed pass from the same state."""
  _, graphdef, params, model_state, x, old_mean, old_var, _, _ = _bn_setup()

  @jax.jit
  def sharpness_aware_passes(params, model_state, x):
    _, first_state = apply_model(graphdef, params, model_state, x, train=True)
    perturbed = jax.tree.map(lambda p: 1.3 * p + 0.01, params)
    _, second_state = apply_model(graphdef, perturbed, model_state, x, train=True)
    return first_state, second_state

  first, second = sharpness_aware_passes(params, model_state, x)
  want_mean, want_var = _expected_stem_statistics(params, x, old_mean, old_var)
  np.testing.assert_allclose(_stem_stats(first)[0], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(_stem_stats(first)[1], want_var, rtol=1e-4, atol=1e-5)
  # The perturbed pass sees other statistics in every BatchNorm: keeping them (or
  # updating twice) would be observable.
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    assert not np.allclose(np.asarray(a), np.asarray(b))
  # And the second pass did not start from the first pass's state.
  perturbed_params = jax.tree.map(lambda p: 1.3 * p + 0.01, params)
  want_second, _ = _expected_stem_statistics(perturbed_params, x, old_mean, old_var)
  np.testing.assert_allclose(_stem_stats(second)[0], want_second, rtol=1e-4, atol=1e-5)


def test_freeze_bn_and_dropout_state():
  model = create_model(
    "resnet18", num_classes=3, input_shape=BN_SHAPE, rngs=_rngs(), width=8, dropout=0.5, freeze_bn=True
  )
  graphdef, params, model_state = functional_model(model)
  stats = nnx.state(model, nnx.BatchStat)
  rng_state = nnx.state(model, nnx.RngState)
  assert jax.tree.leaves(rng_state)  # the dropout stream lives in model_state
  x = np.random.default_rng(4).normal(size=(4, *BN_SHAPE)).astype(np.float32)
  train = jax.jit(functools.partial(apply_model, graphdef, train=True))
  logits1, state1 = train(params, model_state, x)
  logits2, state2 = train(params, state1, x)
  # Frozen BN: running statistics untouched in train mode...
  for got, want in zip(
    jax.tree.leaves(nnx.state(nnx.merge(graphdef, params, state2), nnx.BatchStat)), jax.tree.leaves(stats)
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # ...and used: an example's train logits ignore the other examples (same dropout mask).
  x_other = x.copy()
  x_other[1:] = 0.0
  logits1_other, _ = train(params, model_state, x_other)
  np.testing.assert_allclose(np.asarray(logits1_other[0]), np.asarray(logits1[0]), rtol=1e-5, atol=1e-6)
  # Dropout: the returned state advances the stream, giving a new mask next step;
  assert not np.allclose(np.asarray(logits1), np.asarray(logits2))
  # eval mode is deterministic.
  evaluate = jax.jit(functools.partial(apply_model, graphdef, train=False))
  e1, kept = evaluate(params, state2, x)
  e2, _ = evaluate(params, model_state, x)
  np.testing.assert_allclose(np.asarray(e1), np.asarray(e2), rtol=1e-6)
  _assert_states_equal(kept, state2)  # eval mode returns the state it was given


# ------------------------------------------------------------------------ weights


def test_save_and_load_round_trip(tmp_path):
  source = nnx.clone(_bn_model())
  source.backbone.layer1[0].bn1.mean[...] = 0.25  # a non-default running statistic
  path = tmp_path / "weights.npz"
  saved = models.save_weights(source, path)
  assert path.exists()
  assert {
    "backbone/conv1/kernel",
    "backbone/layer1/0/bn1/mean",
    "backbone/layer2/0/downsample/0/kernel",
    "classifier/kernel",
    "classifier/bias",
  } <= set(saved)
  with np.load(path) as archive:
    assert set(archive.files) == set(saved)
    assert archive["backbone/conv1/kernel"].shape == (3, 3, 3, 8)  # HWIO

  target = create_model("resnet18", num_classes=3, input_shape=BN_SHAPE, rngs=_rngs(seed=1), width=8)
  loaded = models.load_pretrained(target, str(path), strict=True)
  assert loaded == sorted(saved)
  for (path_a, a), (path_b, b) in zip(nnx.to_flat_state(nnx.state(source)), nnx.to_flat_state(nnx.state(target))):
    assert path_a == path_b
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_load_skips_a_head_of_another_shape(tmp_path):
  path = tmp_path / "mlp.npz"
  source = _model("mlp", (4, 4, 1), 10)
  models.save_weights(source, path)
  target = create_model("mlp", num_classes=3, input_shape=(4, 4, 1), rngs=_rngs(seed=1))
  head_before = np.asarray(target.classifier.kernel[...]).copy()
  with pytest.warns(UserWarning, match="classifier/kernel"):
    loaded = models.load_pretrained(target, path)
  assert loaded == [
    "backbone/layers/0/bias",
    "backbone/layers/0/kernel",
    "backbone/layers/1/bias",
    "backbone/layers/1/kernel",
  ]
  np.testing.assert_array_equal(
    np.asarray(target.backbone.layers[1].kernel[...]), np.asarray(source.backbone.layers[1].kernel[...])
  )
  np.testing.assert_array_equal(np.asarray(target.classifier.kernel[...]), head_before)


def test_strict_load_reports_key_and_shapes(tmp_path):
  path = tmp_path / "mlp.npz"
  models.save_weights(_model("mlp", (4, 4, 1), 10), path)
  target = create_model("mlp", num_classes=3, input_shape=(4, 4, 1), rngs=_rngs(seed=1))
  with pytest.raises(ValueError, match=r"classifier/bias.*\(3,\).*\(10,\)"):
    models.load_pretrained(target, path, strict=True)
  wider = create_model("mlp", num_classes=10, input_shape=(4, 4, 1), rngs=_rngs(), depth=3)
  with pytest.raises(ValueError, match="backbone/layers/2"):
    models.load_pretrained(wider, path, strict=True)  # missing key


def test_load_errors(tmp_path):
  model = _model("mlp", (4, 4, 1), 10)
  with pytest.raises(FileNotFoundError):
    models.load_pretrained(model, tmp_path / "absent.npz")
  unrelated = tmp_path / "unrelated.npz"
  np.savez(unrelated, **{"conv1/weight": np.zeros((3, 3))})
  with pytest.raises(ValueError, match="none of the 1 keys"):
    models.load_pretrained(model, unrelated)
  torchvision_file = tmp_path / "tv.npz"
  np.savez(torchvision_file, **{"conv1.weight": np.zeros((3, 3))})
  with pytest.raises(ValueError, match="torchvision-layout.*MLP has no torchvision counterpart.*mobilenet_v2"):
    models.load_pretrained(model, torchvision_file)


def test_convert_torchvision_layout(tmp_path):
  """PyTorch-layout weights, applied with PyTorch's conventions in NumPy, after conversion."""
  rng = np.random.default_rng(5)
  conv_oihw = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
  fc_out_in = rng.normal(size=(3, 64)).astype(np.float32)
  fc_bias = rng.normal(size=3).astype(np.float32)
  state_dict = {
    "conv1.weight": conv_oihw,
    "bn1.weight": np.full(8, 2.0, np.float32),
    "bn1.bias": np.zeros(8, np.float32),
    "bn1.running_mean": np.ones(8, np.float32),
    "bn1.running_var": np.full(8, 3.0, np.float32),
    "bn1.num_batches_tracked": np.array(7),
    "layer2.0.downsample.0.weight": rng.normal(size=(16, 8, 1, 1)).astype(np.float32),
    "fc.weight": fc_out_in,
    "fc.bias": fc_bias,
  }
  converted = models.convert_torchvision_resnet(state_dict)
  assert set(converted) == {
    "backbone/conv1/kernel",
    "backbone/bn1/scale",
    "backbone/bn1/bias",
    "backbone/bn1/mean",
    "backbone/bn1/var",
    "backbone/layer2/0/downsample/0/kernel",
    "classifier/kernel",
    "classifier/bias",
  }
  assert converted["backbone/layer2/0/downsample/0/kernel"].shape == (1, 1, 8, 16)
  path = tmp_path / "tv.npz"
  np.savez(path, **converted)
  model = nnx.clone(_bn_model())
  assert len(models.load_pretrained(model, path, strict=False)) == len(converted)
  np.testing.assert_array_equal(np.asarray(model.backbone.bn1.var[...]), np.full(8, 3.0))

  x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  ours = np.asarray(model.backbone.conv1(jnp.asarray(x)))
  x_nchw = np.pad(x.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.float64)
  torch_out = np.zeros((2, 8, 5, 5))
  for i in range(3):
    for j in range(3):
      torch_out += np.einsum("nchw,oc->nohw", x_nchw[:, :, i : i + 5, j : j + 5], conv_oihw[:, :, i, j])
  np.testing.assert_allclose(ours, torch_out.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)

  features = rng.normal(size=(2, 64)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(model.classifier(jnp.asarray(features))), features @ fc_out_in.T + fc_bias, rtol=1e-4, atol=1e-4
  )


# ------------------------------------------------------ torchvision checkpoints, MobileNetV2

from tests import _pth_files, _reference_mobilenet  # noqa: E402
from tests.test_harness_weight_files import mobilenet_v2_path  # noqa: E402

# ImageNet classes of the published checkpoint's top-5 on scikit-image's photos (224 px center crop of the
# 256-px resize), from the independent NumPy forward in tests/_reference_mobilenet.py: Egyptian cat, tiger cat,
# tabby, lynx, plastic bag; espresso, consomme, cup, soup bowl, coffee mug; space shuttle, drilling platform,
# missile, obelisk, torch.
PHOTO_TOP5 = {
  "chelsea": [285, 282, 281, 287, 728],
  "coffee": [967, 925, 968, 809, 504],
  "rocket": [812, 540, 657, 682, 862],
}


def _imagenet_crop(image):
  from PIL import Image

  im = Image.fromarray(image).convert("RGB")
  w, h = im.size
  s = 256 / min(w, h)
  im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
  w, h = im.size
  left, top = (w - 224) // 2, (h - 224) // 2
  return np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255


def _loaded_model(name, path, num_classes, input_shape, **kwargs):
  """A model whose every variable comes from `path` (strict): built abstractly, no initialization compute."""
  model = _abstract_model(name, input_shape, num_classes, **kwargs)
  loaded = models.load_pretrained(model, path, strict=True)
  model.eval()
  return model, loaded


def test_mobilenet_v2_parameter_count_matches_torchvision():
  model = _abstract_model("mobilenet_v2", (224, 224, 3), 1000)
  assert _param_count(model) == 3_504_872  # torchvision.models.mobilenet_v2()
  converted = models.convert_torchvision(
    {k: np.zeros(s, np.float32) for k, s in _reference_mobilenet.state_dict_shapes()}, head="classifier.1"
  )
  variables = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}
  assert {k: v.shape for k, v in converted.items()} == variables  # every key and shape, both ways


def test_mobilenet_v2_from_a_torchvision_checkpoint_equals_numpy(tmp_path):
  """A random torchvision-layout state dict written as .pth, loaded strictly; logits vs the NumPy forward."""
  sd = _reference_mobilenet.random_state_dict(seed=1, num_classes=10)
  _pth_files.write_zip_pth(tmp_path / "mnv2.pth", sd)
  model, _ = _loaded_model("mobilenet_v2", tmp_path / "mnv2.pth", 10, (32, 32, 3))
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  _, expected = _reference_mobilenet.forward(sd, x)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(x))), expected, rtol=1e-4, atol=1e-4)


def test_mobilenet_v2_imagenet_checkpoint_on_real_photos():
  skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed (pip install scikit-image)")
  path = mobilenet_v2_path()
  from disam_jax.harness.weight_files import read_weights

  sd = read_weights(path)
  model, loaded = _loaded_model("mobilenet_v2", path, 1000, (224, 224, 3))
  assert len(loaded) == 262
  x = np.stack([_imagenet_crop(getattr(skimage_data, name)()) for name in PHOTO_TOP5])

  # first layers: the stem and the first inverted-residual block, against the NumPy forward
  reference, expected_logits = _reference_mobilenet.forward(sd, x)
  backbone = model.backbone
  h0 = models._conv_bn_relu6(backbone.features[0], models._normalize_input(jnp.asarray(x), "imagenet"))
  h1 = backbone.features[1](h0)
  np.testing.assert_allclose(np.asarray(h0), reference[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(h1), reference[1], rtol=1e-4, atol=1e-4)

  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert [int(c) for c in top5[:, 0]] == [285, 967, 812]  # Egyptian cat, espresso, space shuttle
  assert top5.tolist() == list(PHOTO_TOP5.values())


def _torchvision_resnet18_state_dict(width=8, num_classes=5, seed=0):
  """Keys and shapes of torchvision's resnet18 (at a reduced width), random values."""
  rng = np.random.default_rng(seed)
  sd = {}

  def bn(prefix, c):
    sd[prefix + "weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[prefix + "bias"] = rng.normal(size=c).astype(np.float32) * 0.1
    sd[prefix + "running_mean"] = rng.normal(size=c).astype(np.float32) * 0.1
    sd[prefix + "running_var"] = rng.uniform(0.5, 2, c).astype(np.float32)
    sd[prefix + "num_batches_tracked"] = np.asarray(100, np.int64)

  conv = lambda o, i, k: (rng.normal(size=(o, i, k, k)) * np.sqrt(2 / (i * k * k))).astype(np.float32)
  sd["conv1.weight"] = conv(width, 3, 7)
  bn("bn1.", width)
  cin = width
  for stage in range(1, 5):
    planes = width * 2 ** (stage - 1)
    for j in range(2):
      p = f"layer{stage}.{j}."
      sd[p + "conv1.weight"] = conv(planes, cin, 3)
      bn(p + "bn1.", planes)
      sd[p + "conv2.weight"] = conv(planes, planes, 3)
      bn(p + "bn2.", planes)
      if j == 0 and stage > 1:
        sd[p + "downsample.0.weight"] = conv(planes, cin, 1)
        bn(p + "downsample.1.", planes)
      cin = planes
  sd["fc.weight"] = rng.normal(size=(num_classes, cin)).astype(np.float32)
  sd["fc.bias"] = rng.normal(size=num_classes).astype(np.float32)
  return sd


def test_resnet_loads_torchvision_pth_safetensors_and_npz_alike(tmp_path):
  sd = _torchvision_resnet18_state_dict()
  files = {
    "pth": tmp_path / "r.pth",
    "legacy": tmp_path / "legacy.pth",
    "safetensors": tmp_path / "r.safetensors",
    "npz": tmp_path / "r.npz",
  }
  _pth_files.write_zip_pth(files["pth"], sd)
  _pth_files.write_legacy_pth(files["legacy"], sd)
  _pth_files.write_safetensors(files["safetensors"], sd)
  np.savez(files["npz"], **sd)
  try:
    import torch

    files["torch"] = tmp_path / "torch.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, files["torch"])
  except ImportError:
    pass
  x = np.random.default_rng(1).uniform(size=(2, 72, 72, 3)).astype(np.float32)
  outputs = {}
  for name, path in files.items():
    model, loaded = _loaded_model("resnet18", path, 5, (72, 72, 3), width=8, input_norm="imagenet")
    assert len(loaded) == len(sd) - 20  # no num_batches_tracked
    np.testing.assert_array_equal(
      np.asarray(model.backbone.layer3[0].downsample[0].kernel[...]),
      sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(np.asarray(model.backbone.layer4[1].bn2.var[...]), sd["layer4.1.bn2.running_var"])
    np.testing.assert_array_equal(np.asarray(model.classifier.kernel[...]), sd["fc.weight"].T)
    outputs[name] = np.asarray(model(jnp.asarray(x)))
  for name in files:
    np.testing.assert_array_equal(outputs[name], outputs["pth"])


def test_adapters_start_as_the_identity(tmp_path):
  sd = _torchvision_resnet18_state_dict(num_classes=4)
  _pth_files.write_zip_pth(tmp_path / "r.pth", sd)
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 72, 72, 3)), jnp.float32)
  plain = create_model("resnet18", num_classes=4, input_shape=(72, 72, 3), rngs=_rngs(), width=8, input_norm="imagenet")
  adapted = create_model(
    "resnet18", num_classes=4, input_shape=(72, 72, 3), rngs=_rngs(), width=8, adapter_dim=2, input_norm="imagenet"
  )
  for m in (plain, adapted):
    models.load_pretrained(m, tmp_path / "r.pth")
    m.eval()
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(np.asarray(forward(adapted, x)), np.asarray(forward(plain, x)), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(adapted.backbone.layer4[1].adapter.down.kernel[...])).sum() > 0  # only `up` is zero

  abstract = _abstract_model("mobilenet_v2", (32, 32, 3), 4, adapter_dim=4)
  adapters = [k for k, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param)) if "adapter" in map(str, k)]
  assert len(adapters) == 17 * 4  # down/up kernel and bias after each of the 17 inverted-residual blocks
  widths = [16] + [24] * 2 + [32] * 3 + [64] * 4 + [96] * 3 + [160] * 3 + [320]
  assert _param_count(abstract) - _param_count(_abstract_model("mobilenet_v2", (32, 32, 3), 4)) == sum(
    2 * c * 4 + 4 + c for c in widths
  )
  with pytest.raises(ValueError, match="input_norm"):
    _abstract_model("mobilenet_v2", (32, 32, 1), 4)
