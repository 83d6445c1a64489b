"""A drop-in `conv_general_dilated` whose weight gradient runs as GEMMs: the CPU workaround tried by step_cost.

Why: on XLA:CPU (jaxlib 0.10.2, 2-core AVX2) the forward convolution of our small convnets runs at ~80-90
GFLOP/s, but the *weight gradient* convolution that autodiff emits (a convolution with the batch as the
contracting dimension and a 3x3 output window) runs at 3-20 GFLOP/s: 3.5x the forward time on a 14x14x128
layer, 12x on a 32x32x64 one. The XLA flags that route work to oneDNN / XNNPACK / YNNPACK did not change that
(see docs/performance.md). A dense GEMM of the same size runs at 110-140 GFLOP/s, so here the weight gradient is
written as one GEMM per kernel offset:

    dW[i, j] = sum_{n, y, x} x_pad[n, y*s + i, x*s + j, :]^T dy[n, y, x, :]      (kh * kw GEMMs, K = N*Ho*Wo)

in a loop over the kh * kw offsets (one input window alive at a time). The strided slice feeding each GEMM sits
behind `lax.optimization_barrier`, which stops XLA from fusing the slice
into the dot (a fused dot is emitted as a slow loop nest instead of an Eigen GEMM call). The forward pass and the
input gradient are XLA's own. Only NHWC/HWIO, no dilation, one feature group; anything else falls back to
`lax.conv_general_dilated` unchanged.

Use: `use_gemm_weight_grad(model)` sets it on every `nnx.Conv` of a model (a static attribute, so it travels in
the graphdef). It is a benchmark experiment, not part of the package: the numbers in docs/performance.md show
what it buys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = ['gemm_weight_grad_conv', 'use_gemm_weight_grad']

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == _NHWC


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda a: lax.conv_general_dilated(a, w, strides, padding, dimension_numbers=_NHWC), x)
  (dx,) = input_vjp(dy)
  kh, kw, cin, cout = w.shape
  n, ho, wo, _ = dy.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  d = dy.reshape(n * ho * wo, cout)
  span = ((ho - 1) * sh + 1, (wo - 1) * sw + 1)

  def offset_grad(k):  # [cin, cout] for kernel offset k = i * kw + j
    i, j = k // kw, k % kw
    window = lax.dynamic_slice(xp, (0, i, j, 0), (n, span[0], span[1], cin))[:, ::sh, ::sw, :]
    window = lax.optimization_barrier(window.reshape(n * ho * wo, cin))
    return jnp.dot(window.T, d, preferred_element_type=jnp.float32)

  # A loop, not kh * kw unrolled GEMMs: one window of the input is alive at a time (unrolled, XLA schedules all
  # nine slices first and the step's temporary memory triples).
  dw = lax.map(offset_grad, jnp.arange(kh * kw)).reshape(kh, kw, cin, cout).astype(w.dtype)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def gemm_weight_grad_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                          preferred_element_type=None, out_sharding=None):
  """`lax.conv_general_dilated` with the same signature; NHWC/HWIO undilated convs get the GEMM weight gradient."""
  plain = (
      _is_nhwc(dimension_numbers)
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type is None and out_sharding is None
  )
  if not plain:
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                  precision=precision, preferred_element_type=preferred_element_type)
    if out_sharding is not None:
      kwargs['out_sharding'] = out_sharding
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), padding)


def use_gemm_weight_grad(model: nnx.Module) -> int:
  """Sets `gemm_weight_grad_conv` on every `nnx.Conv` in `model` (in place); returns how many."""
  count = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = gemm_weight_grad_conv
      count += 1
  return count
