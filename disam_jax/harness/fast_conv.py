"""Faster convolutions on the CPU backend: compiler options plus a GEMM weight gradient.

XLA:CPU in jaxlib 0.10.2 sends convolutions and dots to YNNPACK by default. On the 2-core AVX2/AVX-512 EPYC this
project is measured on, YNNPACK's convolution weight gradients run at 10-50 GFLOP/s where the same convolution
through XLA's own (Eigen) kernels runs at 40-100 (benchmarks/results/step_cost.md): a DomainBed MNIST CNN step
takes half the time without it. Two things, both applied on the CPU backend only (GPU and TPU keep XLA's kernels):

* ``compiler_options()``: the per-``jax.jit`` compiler options that turn the YNNPACK fusions off
  (``xla_cpu_experimental_ynn_fusion_type=''``); pass them as ``jax.jit(f, compiler_options=...)`` or compile with
  ``jitted.lower(...).compile(compiler_options=...)``. ``None`` on other backends. Per jit, not process-wide
  ``XLA_FLAGS``: the rest of a program is unaffected.
* ``conv_general_dilated``: ``lax.conv_general_dilated`` with the same signature whose *weight gradient* runs as
  one GEMM per kernel offset instead of XLA's weight-gradient convolution (which on CPU transposes the input and
  the output gradient into a convolution with the batch as contracting dimension)::

      dW[i, j] = sum_{n, y, x} x_pad[n, y*s + i, x*s + j, :]^T dy[n, y, x, :]      ([Cin, Cout], K = N*Ho*Wo)

  The forward pass and the input gradient are XLA's own. The GEMMs accumulate in float32 (float64 for float64
  inputs) and the result is cast back to the kernel's dtype. Only NHWC/HWIO, undilated, one feature group and one
  batch group take this path; every other call is ``lax.conv_general_dilated`` unchanged. On a non-CPU backend the
  weight gradient is XLA's (selected at lowering time with ``lax.platform_dependent``).

``use_fast_conv(model)`` sets ``conv_general_dilated`` on every ``nnx.Conv`` of a model; the harness models
(``disam_jax.harness.models.create_model``) do so by default and the harness compiles its steps with
``compiler_options()``. Forward and both gradients equal ``lax.conv_general_dilated`` to 1e-5
(tests/test_harness_fast_conv.py).

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
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = ['CPU_COMPILER_OPTIONS', 'compiler_options', 'conv_general_dilated', 'use_fast_conv']

# The YNNPACK library fusions off: convolutions and dots go to XLA's own CPU kernels.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def compiler_options(backend: Optional[str] = None) -> Optional[dict[str, Any]]:
  """The compiler options for a ``jax.jit`` on ``backend`` (default: JAX's default backend).

  Returns a copy of ``CPU_COMPILER_OPTIONS`` on 'cpu', ``None`` (XLA's defaults) on any other backend.
  """
  backend = backend or jax.default_backend()
  return dict(CPU_COMPILER_OPTIONS) if backend == 'cpu' else None


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == _NHWC


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _gemm_weight_grad(x, dy, *, kernel_shape, strides, padding, precision):
  """``dW [kh, kw, Cin, Cout]`` as kh * kw GEMMs ``[Cin, N*Ho*Wo] @ [N*Ho*Wo, Cout]`` (see the module docstring)."""
  kh, kw, cin, cout = kernel_shape
  n, ho, wo, _ = dy.shape
  sh, sw = strides
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  d = dy.reshape(n * ho * wo, cout)
  span = ((ho - 1) * sh + 1, (wo - 1) * sw + 1)

  def offset_grad(k):  # [Cin, Cout] for kernel offset k = i * kw + j
    i, j = k // kw, k % kw
    window = lax.dynamic_slice(xp, (0, i, j, 0), (n, span[0], span[1], cin))[:, ::sh, ::sw, :]
    # The barrier stops XLA from fusing the strided slice into the dot: a fused dot is emitted as a slow loop
    # nest instead of a GEMM call.
    window = lax.optimization_barrier(window.reshape(n * ho * wo, cin))
    return lax.dot_general(window, d, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=acc)

  # A loop, not kh * kw unrolled GEMMs: one window of the input is alive at a time (unrolled, XLA schedules all
  # the slices first and the step's temporary memory grows by up to kh * kw input copies).
  return lax.map(offset_grad, jnp.arange(kh * kw)).reshape(kernel_shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  (dx,) = jax.vjp(lambda a: _xla_conv(a, w, strides, padding, precision), x)[1](dy)
  xla_weight_grad = lambda x, dy: jax.vjp(lambda b: _xla_conv(x, b, strides, padding, precision), w)[1](dy)[0]
  gemm_weight_grad = functools.partial(_gemm_weight_grad, kernel_shape=w.shape, strides=strides, padding=padding,
                                       precision=precision)
  dw = lax.platform_dependent(x, dy, cpu=gemm_weight_grad, default=xla_weight_grad)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
  """``lax.conv_general_dilated`` (same arguments, same result) with a GEMM weight gradient on CPU.

  Args:
    lhs: input ``[N, H, W, Cin]`` for the fast path.
    rhs: kernel ``[kh, kw, Cin, Cout]`` for the fast path, same dtype as ``lhs``.
    window_strides, padding, ...: as ``lax.conv_general_dilated``; ``padding`` a string ('SAME', 'VALID', ...)
      or ``((lo, hi), (lo, hi))``.

  Returns:
    ``[N, Ho, Wo, Cout]``: exactly ``lax.conv_general_dilated``'s forward value. Calls that are not NHWC/HWIO,
    undilated, ungrouped, of one dtype and without ``preferred_element_type`` or further keyword arguments are
    passed to ``lax.conv_general_dilated`` unchanged, gradients included.
  """
  plain = (
      _is_nhwc(dimension_numbers)
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type is None and not kwargs
      and jnp.ndim(lhs) == 4 and jnp.ndim(rhs) == 4 and jnp.result_type(lhs) == jnp.result_type(rhs)
  )
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type, **kwargs)
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
