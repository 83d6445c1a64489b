"""disam_jax.harness.fast_conv: equal to lax.conv_general_dilated (and to a NumPy convolution), CPU-only paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from disam_jax.harness import fast_conv, models

_DN = ("NHWC", "HWIO", "NHWC")


def _data(x_shape, w_shape, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(dtype)
  w = rng.standard_normal(w_shape).astype(dtype)
  return x, w


def _value_and_grads(conv, x, w, cot, **kwargs):
  """Forward value and (dx, dw) of <conv(x, w), cot> (a fixed random cotangent, not a symmetric one)."""
  f = lambda x, w: conv(x, w, **kwargs)
  y, vjp = jax.vjp(jax.jit(f), x, w)
  return (y, *vjp(cot))


def _numpy_conv(x, w, strides, pads):
  """Hand-written NHWC/HWIO cross-correlation in float64, and its weight gradient for a cotangent."""
  x = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // strides[0] + 1
  wo = (x.shape[2] - kw) // strides[1] + 1
  windows = np.stack(
    [
      np.stack(
        [
          x[:, i : i + (ho - 1) * strides[0] + 1 : strides[0], j : j + (wo - 1) * strides[1] + 1 : strides[1], :]
          for j in range(kw)
        ],
        0,
      )
      for i in range(kh)
    ],
    0,
  )  # [kh, kw, N, Ho, Wo, Cin]
  y = np.einsum("ijnhwc,ijco->nhwo", windows, w.astype(np.float64))
  weight_grad = lambda cot: np.einsum("ijnhwc,nhwo->ijco", windows, cot.astype(np.float64))
  return y, weight_grad


def _numpy_input_grad(x_shape, w, cot, strides, pads):
  """dx of <conv(x, w), cot> by scattering each output's cot @ W[i, j]^T back to the input rows it read."""
  n, h, wd, cin = x_shape
  kh, kw = w.shape[:2]
  dx_pad = np.zeros((n, h + sum(pads[0]), wd + sum(pads[1]), cin))
  for oy in range(cot.shape[1]):
    for ox in range(cot.shape[2]):
      for i in range(kh):
        for j in range(kw):
          dx_pad[:, oy * strides[0] + i, ox * strides[1] + j, :] += cot[:, oy, ox, :] @ w[i, j].T.astype(np.float64)
  return dx_pad[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + wd, :]


CASES = [  # (x shape, w shape, strides, padding): strides, paddings and kernel sizes the harness models use
  ((3, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
  ((3, 9, 9, 4), (3, 3, 4, 5), (2, 2), ((1, 1), (1, 1))),
  ((2, 10, 11, 3), (7, 7, 3, 6), (2, 2), ((3, 3), (3, 3))),
  ((3, 8, 8, 4), (1, 1, 4, 6), (2, 2), "VALID"),
  ((3, 8, 7, 4), (3, 3, 4, 5), (1, 2), "SAME"),
  ((2, 9, 9, 2), (3, 2, 2, 3), (2, 1), ((0, 2), (1, 0))),
  ((2, 11, 10, 3), (2, 2, 3, 4), (3, 3), ((0, 0), (1, 0))),  # kernel smaller than the stride: rows never read
  ((2, 12, 9, 3), (5, 3, 3, 4), (3, 2), ((2, 1), (0, 2))),
  ((2, 8, 8, 4), (1, 1, 4, 3), (2, 2), ((1, 1), (0, 1))),  # a padded 1x1
]


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_equals_lax_conv_forward_and_gradients(x_shape, w_shape, strides, padding):
  x, w = _data(x_shape, w_shape)
  kwargs = dict(window_strides=strides, padding=padding, dimension_numbers=_DN)
  ref_y = lax.conv_general_dilated(x, w, **kwargs)
  cot = np.random.default_rng(1).standard_normal(ref_y.shape).astype(np.float32)
  got = _value_and_grads(fast_conv.conv_general_dilated, x, w, cot, **kwargs)
  ref = _value_and_grads(lax.conv_general_dilated, x, w, cot, **kwargs)
  for name, a, b in zip(("y", "dx", "dw"), got, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()), err_msg=name)


def test_weight_gradient_equals_numpy_convolution():
  x, w = _data((3, 9, 9, 4), (3, 3, 4, 5))
  pads = ((1, 1), (1, 1))
  y_np, weight_grad = _numpy_conv(x, w, (2, 2), pads)
  cot = np.random.default_rng(2).standard_normal(y_np.shape).astype(np.float32)
  y, _, dw = _value_and_grads(
    fast_conv.conv_general_dilated, x, w, cot, window_strides=(2, 2), padding=pads, dimension_numbers=_DN
  )
  np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, weight_grad(cot), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [c for c in CASES if c[2] != (1, 1)])
def test_strided_input_gradient_equals_numpy_scatter(x_shape, w_shape, strides, padding):
  x, w = _data(x_shape, w_shape)
  pads = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding) if isinstance(padding, str) else padding
  y_np, _ = _numpy_conv(x, w, strides, pads)
  cot = np.random.default_rng(2).standard_normal(y_np.shape).astype(np.float32)
  _, dx, _ = _value_and_grads(
    fast_conv.conv_general_dilated, x, w, cot, window_strides=strides, padding=padding, dimension_numbers=_DN
  )
  np.testing.assert_allclose(dx, _numpy_input_grad(x_shape, w, cot, strides, pads), rtol=1e-5, atol=1e-4)


def _grad_hlo(conv, x, w, strides, under_cond=False, **kwargs):
  f = lambda x, w: (conv(x, w, window_strides=strides, padding="SAME", **kwargs) ** 2).sum()
  g = jax.grad(f, argnums=(0, 1))
  if under_cond:  # as in disam(..., perturb_every=k): the gradient on one branch of a lax.cond
    g = lambda x, w, g=g: lax.cond(x.sum() > 0, g, lambda x, w: (x, w), x, w)
  return jax.jit(g).lower(x, w).compile(compiler_options=fast_conv.compiler_options()).as_text()


def _conv_dim_labels(hlo):
  return re.findall(r" convolution\([^\n]*?dim_labels=(\S+?),", hlo)


@pytest.mark.parametrize("w_shape,strides", [((3, 3, 4, 5), (1, 1)), ((3, 3, 4, 5), (2, 2)), ((7, 7, 4, 5), (2, 2))])
@pytest.mark.parametrize("under_cond", [False, True])
def test_cpu_gradients_are_standard_layout_convolutions(w_shape, strides, under_cond):
  """XLA:CPU runs a convolution through Eigen only in the forward's layout; inside a lax.cond it runs XLA's own
  weight gradient (f01b_i01o->01bf) 100x and its input gradient 5x slower (benchmarks/results/fast_conv_layers.md)."""
  assert jax.default_backend() == "cpu"
  x, w = _data((2, 9, 9, 4), w_shape)
  ref, fast = (
    _grad_hlo(c, x, w, strides, under_cond, dimension_numbers=_DN)
    for c in (lax.conv_general_dilated, fast_conv.conv_general_dilated)
  )
  if under_cond:  # outside a cond, XLA's layout assignment transposes the operands itself
    assert set(_conv_dim_labels(ref)) - {"b01f_01io->b01f"}
  assert set(_conv_dim_labels(fast)) == {"b01f_01io->b01f"} and "lhs_dilate" not in fast


def test_pointwise_gradients_are_gemms_on_cpu():
  # 1x1 stride 2 (a ResNet downsample): XLA runs both gradients as convolutions, ours are GEMMs.
  x, w = _data((2, 8, 8, 4), (1, 1, 4, 5))
  ref = _grad_hlo(lax.conv_general_dilated, x, w, (2, 2), dimension_numbers=_DN)
  fast = _grad_hlo(fast_conv.conv_general_dilated, x, w, (2, 2), dimension_numbers=_DN)
  assert ref.count(" convolution(") == 3 and " dot(" not in ref  # forward, dx, dw
  assert fast.count(" convolution(") == 1 and fast.count(" dot(") == 2  # forward


def test_other_backends_keep_xla_gradients():
  for w_shape in ((3, 3, 4, 5), (1, 1, 4, 5)):
    x, w = _data((2, 8, 8, 4), w_shape)
    f = lambda x, w: fast_conv.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=_DN).sum()
    text = jax.jit(jax.grad(f, argnums=(0, 1))).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.convolution") == 2 and "dot_general" not in text, w_shape  # dx and dw
    assert "lhs_dilate = [2, 2]" in text


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(feature_group_count=2),
    dict(rhs_dilation=(2, 2)),
    dict(lhs_dilation=(2, 1), padding=((1, 1), (1, 1))),
    dict(dimension_numbers=("NCHW", "OIHW", "NCHW")),
    dict(preferred_element_type=jnp.float32),
  ],
)
def test_unsupported_calls_are_lax_conv(kwargs):
  kwargs = dict(dict(dimension_numbers=_DN), **kwargs)
  groups = kwargs.get("feature_group_count", 1)
  if kwargs["dimension_numbers"][0] == "NCHW":
    x, w = _data((2, 4, 8, 8), (6, 4 // groups, 3, 3))
  else:
    x, w = _data((2, 8, 8, 4), (3, 3, 4 // groups, 6))
  kw = dict(dict(window_strides=(1, 1), padding="SAME"), **kwargs)
  ref_y = lax.conv_general_dilated(x, w, **kw)
  cot = np.random.default_rng(3).standard_normal(ref_y.shape).astype(np.float32)
  for a, b in zip(
    _value_and_grads(fast_conv.conv_general_dilated, x, w, cot, **kw),
    _value_and_grads(lax.conv_general_dilated, x, w, cot, **kw),
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("w_shape,strides", [((3, 3, 8, 4), (1, 1)), ((3, 3, 8, 4), (2, 2)), ((1, 1, 8, 4), (2, 2))])
def test_low_precision_keeps_dtype_and_accumulates_in_float32(dtype, w_shape, strides):
  x, w = _data((64, 8, 8, 8), w_shape)  # 1,024 to 4,096 terms per weight-gradient entry
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  pads = lax.padtype_to_pads((8, 8), w_shape[:2], strides, "SAME")
  xf, wf = np.asarray(x, np.float32), np.asarray(w, np.float32)
  y_np, weight_grad = _numpy_conv(xf, wf, strides, pads)
  cot = np.ones(y_np.shape)
  y, dx, dw = _value_and_grads(
    fast_conv.conv_general_dilated,
    x,
    w,
    jnp.asarray(cot, dtype),
    window_strides=strides,
    padding="SAME",
    dimension_numbers=_DN,
  )
  assert y.dtype == dx.dtype == dw.dtype == dtype
  # float32 accumulation: only the final rounding to the low-precision dtype (2^-8 relative for bfloat16)
  for got, exact in ((dw, weight_grad(cot)), (dx, _numpy_input_grad(x.shape, wf, cot, strides, pads))):
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2**-7, atol=2e-2)


def test_float64():
  with jax.enable_x64(True):
    x, w = _data((2, 7, 7, 3), (3, 3, 3, 4), dtype=np.float64)
    _, weight_grad = _numpy_conv(x, w, (2, 2), ((1, 1), (1, 1)))
    cot = np.random.default_rng(4).standard_normal((2, 4, 4, 4))
    y, dx, dw = _value_and_grads(
      fast_conv.conv_general_dilated,
      jnp.asarray(x),
      jnp.asarray(w),
      jnp.asarray(cot),
      window_strides=(2, 2),
      padding=((1, 1), (1, 1)),
      dimension_numbers=_DN,
    )
    assert dw.dtype == jnp.float64
    np.testing.assert_allclose(dw, weight_grad(cot), rtol=1e-12, atol=1e-12)


def test_compiler_options_only_on_cpu():
  assert fast_conv.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert fast_conv.compiler_options("gpu") is None and fast_conv.compiler_options("tpu") is None
  opts = fast_conv.compiler_options()
  opts["x"] = 1  # a copy: callers cannot change the module's constant
  assert "x" not in fast_conv.CPU_COMPILER_OPTIONS
  x, w = _data((2, 8, 8, 4), (3, 3, 4, 5))
  text = (
    jax.jit(
      lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN),
      compiler_options=fast_conv.compiler_options(),
    )
    .lower(x, w)
    .compile()
    .as_text()
  )
  assert "__ynn" not in text


def test_use_fast_conv_and_harness_models_default():
  model = models.create_model("resnet18", num_classes=3, input_shape=(16, 16, 3), rngs=nnx.Rngs(0))
  convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
  assert len(convs) == 20 and all(m.conv_general_dilated is fast_conv.conv_general_dilated for m in convs)
  plain = models.create_model("mnist_cnn", num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0), fast_conv=False)
  assert all(
    m.conv_general_dilated is lax.conv_general_dilated for _, m in nnx.iter_graph(plain) if isinstance(m, nnx.Conv)
  )
  assert fast_conv.use_fast_conv(plain) == 4


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet18"])
def test_harness_models_take_the_fast_gradient(name):
  """Every convolution of a harness model goes through fast_conv's custom VJP (nnx.Conv's call, which always
  passes out_sharding=None, must not fall back to lax's: it did until the first fix)."""
  model = models.create_model(name, num_classes=3, input_shape=(16, 16, 3), rngs=nnx.Rngs(0))
  graphdef, params, state = models.functional_model(model)
  x = jnp.ones((2, 16, 16, 3))
  loss = lambda p: models.apply_model(graphdef, p, state, x, train=True)[0].sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  convs = sum(isinstance(m, nnx.Conv) for _, m in nnx.iter_graph(model))
  # fast_conv's backward chooses the CPU gradients with lax.platform_dependent: one platform_index per gradient
  # (dx and dw per convolution; the input layer's dx is still traced)
  assert jaxpr.count("platform_index[") == 2 * convs > 0


def test_an_out_sharding_is_passed_to_lax(monkeypatch):
  calls = []
  monkeypatch.setattr(fast_conv.lax, "conv_general_dilated", lambda *a, **k: calls.append(k))
  x, w = _data((2, 8, 8, 4), (3, 3, 4, 5))
  fast_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN, out_sharding="S")
  assert calls and calls[0]["out_sharding"] == "S"


def test_model_gradients_unchanged():
  kwargs = dict(num_classes=3, input_shape=(8, 8, 1))
  fast = models.create_model("mnist_cnn", rngs=nnx.Rngs(0), **kwargs)
  plain = models.create_model("mnist_cnn", rngs=nnx.Rngs(0), fast_conv=False, **kwargs)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 8, 8, 1)), jnp.float32)

  def grads(model):
    graphdef, params, state = models.functional_model(model)
    loss = lambda p: (models.apply_model(graphdef, p, state, x, train=True)[0] ** 2).sum()
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
