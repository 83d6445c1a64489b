"""Faster convolutions on the CPU backend: compiler options plus gradients in the forward's layout.

Two things, both applied on the CPU backend only (GPU and TPU keep XLA's kernels and gradients):

* ``compiler_options()``: the per-``jax.jit`` compiler options that turn XLA:CPU's YNNPACK fusions off
  (``xla_cpu_experimental_ynn_fusion_type=''``; jaxlib 0.10.2 sends convolutions and dots to YNNPACK by default,
  whose convolution gradients were the slow part of a convnet step); pass them as ``jax.jit(f, compiler_options=...)``
  or ``jitted.lower(...).compile(compiler_options=...)``. ``None`` on other backends. Per jit, not process-wide
  ``XLA_FLAGS``: the rest of a program is unaffected.
* ``conv_general_dilated``: ``lax.conv_general_dilated`` with the same signature and forward value, whose gradients
  on CPU are stride-1 convolutions in the forward's own layout (NHWC input, HWIO kernel, dim_labels
  ``b01f_01io->b01f``), the only layout XLA:CPU runs through its Eigen kernels wherever the convolution sits:

  - input gradient: per spatial phase ``r`` of the stride ``s``, a stride-1 correlation of ``dy`` with the taps
    ``W[r::s]`` flipped and transposed, the phases interleaved (XLA's own convolves ``dy`` dilated by ``s``: ``s^2``
    times the arithmetic);
  - weight gradient: per phase ``a`` of the stride, the input phase ``x_pad[a::s]`` laid out ``[Cin, H, W, N]``
    convolved with ``dy`` laid out ``[Ho, Wo, N, Cout]`` (XLA's own contracts over the batch in a
    ``f01b_i01o->01bf`` convolution); a 1x1 kernel's is one GEMM ``[Cin, N*Ho*Wo] @ [N*Ho*Wo, Cout]``.

  Inside a ``lax.cond`` branch XLA:CPU does not re-layout a convolution: there its own weight gradient ran 100x and
  its input gradient 5x slower than in the main computation (a full DISAM step under ``perturb_every`` took 27 s
  instead of 0.9 s on the DomainBed MNIST CNN). With these gradients a convolution's backward pass costs the same
  inside a cond as outside (benchmarks/results/fast_conv_layers.md). The convolutions accumulate in float32
  (float64 for float64 inputs) and return the inputs' dtype. Only NHWC/HWIO, undilated, ungrouped calls take this
  path (depthwise convolutions do not); every other call is ``lax.conv_general_dilated`` unchanged.

``use_fast_conv(model)`` sets ``conv_general_dilated`` on every ``nnx.Conv`` of a model; the harness models
(``disam_jax.harness.models.create_model``) do so by default and the harness compiles its steps with
``compiler_options()``. Forward and both gradients equal ``lax.conv_general_dilated`` to 1e-5, and a NumPy
scatter of ``dy`` for the input gradient (tests/test_harness_fast_conv.py).

Example::

  >>> import jax, jax.numpy as jnp
  >>> from disam_jax.harness import fast_conv
  >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  >>> f = lambda w: fast_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
  ...                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()
  >>> jax.jit(jax.grad(f), compiler_options=fast_conv.compiler_options()).lower(w).compile()(w).shape
  (3, 3, 3, 4)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "conv_general_dilated", "use_fast_conv"]

# The YNNPACK library fusions off: convolutions and dots go to XLA's own CPU kernels.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_NHWC = ("NHWC", "HWIO", "NHWC")


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """The compiler options for a ``jax.jit`` on ``backend`` (default: JAX's default backend).

  Returns a copy of ``CPU_COMPILER_OPTIONS`` on 'cpu', ``None`` (XLA's defaults) on any other backend.
  """
  backend = backend or jax.default_backend()
  return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else None


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == _NHWC


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _standard_conv(lhs, rhs, pads, precision):
  """A stride-1 NHWC/HWIO convolution accumulating in float32 or wider, in ``lhs``'s dtype.

  Every convolution of the CPU backward pass below has this form (dim_labels ``b01f_01io->b01f``), the one XLA:CPU
  runs through its Eigen kernels wherever it sits, inside a ``lax.cond`` branch too.
  """
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  out = lax.conv_general_dilated(
    lhs, rhs, (1, 1), pads, dimension_numbers=_NHWC, precision=precision, preferred_element_type=acc
  )
  return out.astype(lhs.dtype)


def _pad_spatial(x, padding):
  """``x [N, H, W, C]`` zero-padded by ``padding = ((lo, hi), (lo, hi))`` on H and W (negative values crop)."""
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


def _pointwise_weight_grad(x, dy, *, strides, padding, precision):
  """``dW [1, 1, Cin, Cout]`` of a 1x1 convolution as one GEMM ``[Cin, N*Ho*Wo] @ [N*Ho*Wo, Cout]``."""
  n, ho, wo, cout = dy.shape
  (sh, sw) = strides
  xp = _pad_spatial(x, padding)
  window = xp[:, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw, :].reshape(n * ho * wo, -1)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  dw = lax.dot_general(
    window, dy.reshape(n * ho * wo, cout), (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=acc
  )
  return dw[None, None].astype(x.dtype)


def _phase_weight_grad(x, dy, *, kernel_shape, strides, padding, precision):
  """``dW [kh, kw, Cin, Cout]`` as ``sh * sw`` standard convolutions whose features are the batch.

  Per spatial axis, tap ``i = a + m*s`` reads the input row ``(o + m)*s + a``, i.e. row ``o + m`` of the input's
  phase ``a`` (``x_pad[a::s]``): ``dW[a + m*s] = sum_{n, o} x_pad[a::s][n, o + m]^T dy[n, o]``, a stride-1 VALID
  convolution of the phase laid out ``[Cin, H, W, N]`` with ``dy`` laid out ``[Ho, Wo, N, Cout]`` as its kernel.
  XLA's own weight gradient is one convolution with the batch as contracting dimension (dim_labels
  ``f01b_i01o->01bf``), which XLA:CPU runs as a naive loop inside a ``lax.cond`` (100x slower).
  """
  kh, kw, cin, cout = kernel_shape
  _, ho, wo, _ = dy.shape
  (sh, sw) = strides
  xp = _pad_spatial(x, padding)
  kernel = jnp.transpose(dy, (1, 2, 0, 3))  # [Ho, Wo, N, Cout]
  dw = jnp.zeros(kernel_shape, x.dtype)
  for a in range(min(sh, kh)):
    for b in range(min(sw, kw)):
      mh, mw = len(range(a, kh, sh)), len(range(b, kw, sw))
      phase = xp[:, a::sh, b::sw, :][:, : ho + mh - 1, : wo + mw - 1, :]
      out = _standard_conv(jnp.transpose(phase, (3, 1, 2, 0)), kernel, ((0, 0), (0, 0)), precision)  # [Cin,mh,mw,Cout]
      dw = dw.at[a::sh, b::sw].set(jnp.transpose(out, (1, 2, 0, 3)))
  return dw


def _phase_input_grad(dy, w, *, input_shape, strides, padding, precision):
  """``dx [N, H, W, Cin]`` as ``sh * sw`` standard convolutions of ``dy``, interleaved.

  With ``x_pad`` the padded input, ``y[o] = sum_i x_pad[o*s + i] W[i]`` (per spatial axis), so an input row
  ``p = q*s + r`` gets ``dx_pad[p] = sum_m dy[q - m] W[r + m*s]^T``: for each phase ``r`` a stride-1 correlation
  of ``dy`` with the taps ``W[r::s]`` flipped and transposed. XLA's own input gradient convolves ``dy`` dilated by
  ``s`` (``s^2`` times the arithmetic on CPU) with a kernel laid out ``01oi``, which XLA:CPU runs 5x slower inside
  a ``lax.cond``; the phases do the forward's arithmetic in the forward's layout.
  """
  n, h, wd, cin = input_shape
  _, ho, wo, cout = dy.shape
  kh, kw = w.shape[:2]
  (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)) = strides, padding
  flipped = lambda taps: jnp.swapaxes(taps[::-1, ::-1], 2, 3)  # [Mh, Mw, Cout, Cin]
  if (sh, sw) == (1, 1):  # one phase, padded to give exactly the H x W input rows
    return _standard_conv(dy, flipped(w), ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w)), precision)
  qh, qw = -(-(h + lo_h + hi_h) // sh), -(-(wd + lo_w + hi_w) // sw)  # rows/columns per phase
  phases = []
  for rh in range(sh):
    row = []
    for rw in range(sw):
      taps = w[rh::sh, rw::sw]  # [Mh, Mw, Cin, Cout]
      mh, mw = taps.shape[:2]
      if mh == 0 or mw == 0:  # a kernel smaller than the stride never reads these rows
        row.append(jnp.zeros((n, qh, qw, cin), dy.dtype))
        continue
      # "full" correlation, cut or extended to qh x qw
      row.append(_standard_conv(dy, flipped(taps), ((mh - 1, qh - ho), (mw - 1, qw - wo)), precision))
    phases.append(jnp.stack(row, axis=3))  # [N, qh, qw, sw, Cin]
  dx_pad = jnp.stack(phases, axis=2).reshape(n, qh * sh, qw * sw, cin)  # row q*sh + rh, column q*sw + rw
  return dx_pad[:, lo_h : lo_h + h, lo_w : lo_w + wd, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  xla_input_grad = lambda dy, w: jax.vjp(lambda a: _xla_conv(a, w, strides, padding, precision), x)[1](dy)[0]
  xla_weight_grad = lambda x, dy: jax.vjp(lambda b: _xla_conv(x, b, strides, padding, precision), w)[1](dy)[0]
  phase_input_grad = functools.partial(
    _phase_input_grad, input_shape=x.shape, strides=strides, padding=padding, precision=precision
  )
  if w.shape[:2] == (1, 1):
    cpu_weight_grad = functools.partial(_pointwise_weight_grad, strides=strides, padding=padding, precision=precision)
  else:
    cpu_weight_grad = functools.partial(
      _phase_weight_grad, kernel_shape=w.shape, strides=strides, padding=padding, precision=precision
    )
  dx = lax.platform_dependent(dy, w, cpu=phase_input_grad, default=xla_input_grad)
  dw = lax.platform_dependent(x, dy, cpu=cpu_weight_grad, default=xla_weight_grad)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  out_sharding=None,
  **kwargs,
):
  """``lax.conv_general_dilated`` (same arguments, same result) with gradients in the forward's layout on CPU.

  Args:
    lhs: input ``[N, H, W, Cin]`` for the fast path.
    rhs: kernel ``[kh, kw, Cin, Cout]`` for the fast path, same dtype as ``lhs``.
    window_strides, padding, ...: as ``lax.conv_general_dilated``; ``padding`` a string ('SAME', 'VALID', ...)
      or ``((lo, hi), (lo, hi))``.

  Returns:
    ``[N, Ho, Wo, Cout]``: exactly ``lax.conv_general_dilated``'s forward value. Calls that are not NHWC/HWIO,
    undilated, ungrouped, of one dtype and without ``preferred_element_type``, an ``out_sharding`` or further
    keyword arguments are passed to ``lax.conv_general_dilated`` unchanged, gradients included. (``nnx.Conv``
    always passes ``out_sharding``, ``None`` unless the user sets one.)
  """
  plain = (
    _is_nhwc(dimension_numbers)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and feature_group_count == 1
    and batch_group_count == 1
    and preferred_element_type is None
    and out_sharding is None
    and not kwargs
    and jnp.ndim(lhs) == 4
    and jnp.ndim(rhs) == 4
    and jnp.result_type(lhs) == jnp.result_type(rhs)
  )
  if not plain:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
      **({} if out_sharding is None else {"out_sharding": out_sharding}),
      **kwargs,
    )
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(jnp.shape(lhs)[1:3], jnp.shape(rhs)[:2], strides, padding)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  return _conv(lhs, rhs, strides, padding, precision)


def use_fast_conv(model: nnx.Module) -> int:
  """Sets ``conv_general_dilated`` on every ``nnx.Conv`` in ``model`` (in place); returns how many.

  The function is a static attribute of each module, so it travels in the model's graphdef (``nnx.split``).
  """
  count = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = conv_general_dilated
      count += 1
  return count
