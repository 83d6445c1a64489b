"""Networks for the domain-generalization harness, in Flax NNX.

A registry (``MODELS``) of DomainBed's networks plus a small ViT, and the two
helpers the training step uses to run a model as a pure function:

* ``functional_model(model)`` splits a model into ``(graphdef, params,
  model_state)``: ``params`` are the ``nnx.Param`` variables (what the optimizer
  and the sharpness-aware perturbation act on), ``model_state`` is everything
  else (BatchNorm running statistics, dropout RNG counters; possibly empty).
* ``apply_model(graphdef, params, model_state, x, train=...)`` is pure: it
  returns the logits and the new ``model_state`` instead of mutating anything.

Why the split matters for SAM/DISAM: a sharpness-aware step evaluates the model
twice, once at the weights and once at the perturbed weights. Calling a
BatchNorm network twice in train mode would update its running statistics twice,
the second time with statistics of a model that is never deployed (davda54/sam
#17, #30). With ``apply_model`` the training code keeps the ``model_state`` from
the unperturbed pass and throws away the perturbed pass's one. Feeding both
passes the same ``model_state`` also gives them the same dropout mask.

Every model takes NHWC float inputs, returns logits ``[n, num_classes]`` and is
built as ``backbone`` (the featurizer, DomainBed's ``Featurizer``) followed by
an optional dropout and ``classifier`` (an ``nnx.Linear``). ``model.n_features``
is the backbone's output width. Models start in train mode (NNX's default);
switch with ``model.train()`` / ``model.eval()``.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = create_model('mnist_cnn', num_classes=10, input_shape=(28, 28, 1),
  ...                      rngs=nnx.Rngs(0))
  >>> graphdef, params, model_state = functional_model(model)
  >>> logits, model_state = apply_model(graphdef, params, model_state,
  ...                                   jnp.zeros((2, 28, 28, 1)), train=True)
  >>> logits.shape
  (2, 10)
"""

from __future__ import annotations

import functools
import importlib
import os
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disam_jax.harness import fast_conv as _fast_conv

__all__ = [
  "MODELS",
  "PRECISIONS",
  "DomainModel",
  "FeaturizerClassifier",
  "LinenFeaturizer",
  "check_model",
  "create_model",
  "resolve_model",
  "functional_model",
  "apply_model",
  "apply_model_with_head",
  "Head",
  "save_weights",
  "load_pretrained",
  "convert_torchvision",
  "convert_torchvision_resnet",
  "MLP",
  "MNISTCNN",
  "ResNet",
  "BasicBlock",
  "Bottleneck",
  "MobileNetV2",
  "Adapter",
  "ViT",
  "vit_patch_size",
]

# Torch's padding=1 for a 3x3 convolution. Flax's 'SAME' agrees with it at stride 1
# but pads only the bottom/right side at stride 2, which shifts the sampling grid;
# explicit padding keeps converted PyTorch weights computing the same function.
_PAD1 = ((1, 1), (1, 1))
_BN_MOMENTUM = 0.9  # running = 0.9 * running + 0.1 * batch (torch's momentum=0.1)
_BN_EPSILON = 1e-5


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
  return tuple(int(d) for d in input_shape)  # type: ignore[return-value]


class _Classifier(nnx.Module):
  """``backbone -> [dropout] -> classifier``; subclasses build ``backbone``."""

  backbone: nnx.Module
  n_features: int

  def _init_head(self, num_classes, dropout, dtype, param_dtype, rngs):
    # No Dropout module at rate 0, so such models carry no RNG state.
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.classifier = nnx.Linear(self.n_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def head_inputs(self, x: jax.Array) -> jax.Array:
    """The classifier's input ``[n, n_features]``: backbone features after the optional dropout."""
    features = self.backbone(x)
    if self.dropout is not None:
      features = self.dropout(features)
    return features

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.classifier(self.head_inputs(x))


# ----------------------------------------------------------------------------- MLP


class _MLPBackbone(nnx.Module):
  def __init__(self, n_inputs, hidden, depth, dtype, param_dtype, rngs):
    widths = [n_inputs] + [hidden] * depth
    self.layers = nnx.List(
      [nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
    )

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


class MLP(_Classifier):
  """``flatten -> [Dense(hidden) -> relu] * depth -> Dense(num_classes)``.

  DomainBed's MLP (used for ColoredMNIST-style inputs). ``dropout`` applies to the
  features before the classifier.
  """

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    hidden: int = 256,
    depth: int = 2,
    dropout: float = 0.0,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    h, w, c = _check_input_shape(input_shape)
    self.backbone = _MLPBackbone(h * w * c, hidden, depth, dtype, param_dtype, rngs)
    self.n_features = hidden
    self._init_head(num_classes, dropout, dtype, param_dtype, rngs)


# ----------------------------------------------------------------------- MNIST CNN


class _MNISTCNNBackbone(nnx.Module):
  # Layer names follow DomainBed's conv1..conv4; its GroupNorms are called bn0..bn3
  # there and norm0..norm3 here.

  def __init__(self, in_channels, dtype, param_dtype, rngs):
    conv = functools.partial(
      nnx.Conv, kernel_size=(3, 3), padding=_PAD1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    norm = functools.partial(nnx.GroupNorm, num_groups=8, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv(in_channels, 64, strides=1)
    self.conv2 = conv(64, 128, strides=2)
    self.conv3 = conv(128, 128, strides=1)
    self.conv4 = conv(128, 128, strides=1)
    self.norm0 = norm(64)
    self.norm1 = norm(128)
    self.norm2 = norm(128)
    self.norm3 = norm(128)

  def __call__(self, x):
    x = self.norm0(nnx.relu(self.conv1(x)))
    x = self.norm1(nnx.relu(self.conv2(x)))
    x = self.norm2(nnx.relu(self.conv3(x)))
    x = self.norm3(nnx.relu(self.conv4(x)))
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))


class MNISTCNN(_Classifier):
  """DomainBed's ``MNIST_CNN`` featurizer plus a linear classifier.

  ``conv3x3(64) -> relu -> GroupNorm(8)``, ``conv3x3(128, stride 2) -> relu ->
  GroupNorm(8)``, two more ``conv3x3(128) -> relu -> GroupNorm(8)``, global average
  pool, ``Dense(num_classes)``. Convolutions have biases and torch's padding=1; no
  BatchNorm, so ``model_state`` is empty. Works for any input of at least 2x2
  pixels (8x8 digits, 28x28 MNIST).
  """

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    dropout: float = 0.0,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    _, _, c = _check_input_shape(input_shape)
    self.backbone = _MNISTCNNBackbone(c, dtype, param_dtype, rngs)
    self.n_features = 128
    self._init_head(num_classes, dropout, dtype, param_dtype, rngs)


# ------------------------------------------------ pretrained-backbone building blocks

# torchvision's ImageNet preprocessing: images in [0, 1], then (x - mean) / std per RGB channel.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_INPUT_NORMS = ("none", "imagenet")


def _check_input_norm(input_norm, channels):
  if input_norm not in _INPUT_NORMS:
    raise ValueError(f"input_norm must be one of {_INPUT_NORMS}, got {input_norm!r}")
  if input_norm == "imagenet" and channels != 3:
    raise ValueError(f"input_norm='imagenet' needs RGB inputs (3 channels), got {channels}")
  return input_norm


def _normalize_input(x, input_norm):
  if input_norm == "imagenet":
    mean = jnp.asarray(_IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(_IMAGENET_STD, x.dtype)
    x = (x - mean) / std
  return x


class Adapter(nnx.Module):
  """A residual bottleneck adapter for parameter-efficient fine-tuning: ``x + up(relu(down(x)))``.

  ``down``: 1x1 convolution ``C -> dim``; ``up``: 1x1 convolution ``dim -> C`` initialized to zero, so a model
  with adapters computes exactly its pretrained function until the adapters train (Houlsby et al. 2019; the
  convolutional form of Conv-Adapter). Inputs NHWC ``[n, h, w, C]``; ``2 * C * dim + dim + C`` parameters.
  """

  def __init__(self, channels: int, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.down = nnx.Conv(channels, dim, (1, 1), padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up = nnx.Conv(
      dim,
      channels,
      (1, 1),
      padding="VALID",
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      kernel_init=nnx.initializers.zeros_init(),
    )

  def __call__(self, x):
    return x + self.up(nnx.relu(self.down(x)))


def _adapter(adapter_dim, channels, dtype, param_dtype, rngs):
  if adapter_dim < 0:
    raise ValueError(f"adapter_dim must be >= 0 (0: no adapters), got {adapter_dim}")
  if not adapter_dim:
    return None
  return Adapter(channels, adapter_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _with_adapter(adapter, x):
  return x if adapter is None else adapter(x)


# -------------------------------------------------------------------------- ResNet


class _FrozenBatchNorm(nnx.BatchNorm):
  """BatchNorm that always uses (and never updates) its running statistics."""

  def __call__(self, x, use_running_average=None, **kwargs):
    return super().__call__(x, use_running_average=True, **kwargs)


class _ResNetLayers:
  """Layer factories shared by the blocks (torchvision's initialization)."""

  def __init__(self, freeze_bn, dtype, param_dtype, rngs, adapter_dim=0):
    self.adapter = functools.partial(_adapter, adapter_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = functools.partial(
      nnx.Conv,
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
    )
    self.norm = functools.partial(
      _FrozenBatchNorm if freeze_bn else nnx.BatchNorm,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def downsample(self, cin, cout, stride):
    return nnx.List([self.conv(cin, cout, (1, 1), strides=stride, padding="VALID"), self.norm(cout)])


def _shortcut(downsample, x):
  if downsample is None:
    return x
  conv, norm = downsample
  return norm(conv(x))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, layers: _ResNetLayers):
    cout = planes * self.expansion
    self.conv1 = layers.conv(cin, planes, (3, 3), strides=stride, padding=_PAD1)
    self.bn1 = layers.norm(planes)
    self.conv2 = layers.conv(planes, cout, (3, 3), padding=_PAD1)
    self.bn2 = layers.norm(cout)
    needs_projection = stride != 1 or cin != cout
    self.downsample = layers.downsample(cin, cout, stride) if needs_projection else None
    self.adapter = layers.adapter(cout)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return _with_adapter(self.adapter, nnx.relu(y + _shortcut(self.downsample, x)))


class Bottleneck(nnx.Module):
  """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

  expansion = 4

  def __init__(self, cin, planes, stride, layers: _ResNetLayers):
    cout = planes * self.expansion
    self.conv1 = layers.conv(cin, planes, (1, 1), padding="VALID")
    self.bn1 = layers.norm(planes)
    self.conv2 = layers.conv(planes, planes, (3, 3), strides=stride, padding=_PAD1)
    self.bn2 = layers.norm(planes)
    self.conv3 = layers.conv(planes, cout, (1, 1), padding="VALID")
    self.bn3 = layers.norm(cout)
    needs_projection = stride != 1 or cin != cout
    self.downsample = layers.downsample(cin, cout, stride) if needs_projection else None
    self.adapter = layers.adapter(cout)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return _with_adapter(self.adapter, nnx.relu(y + _shortcut(self.downsample, x)))


class _ResNetBackbone(nnx.Module):
  # Attribute names mirror torchvision (conv1, bn1, layer1..layer4, downsample/0|1)
  # so that `convert_torchvision_resnet` is a renaming plus transposes.

  def __init__(
    self,
    block,
    stage_sizes,
    in_channels,
    width,
    small_input_stem,
    freeze_bn,
    dtype,
    param_dtype,
    rngs,
    adapter_dim=0,
    input_norm="none",
  ):
    layers = _ResNetLayers(freeze_bn, dtype, param_dtype, rngs, adapter_dim)
    self.input_norm = _check_input_norm(input_norm, in_channels)
    self.small_input_stem = small_input_stem
    if small_input_stem:
      self.conv1 = layers.conv(in_channels, width, (3, 3), strides=1, padding=_PAD1)
    else:
      self.conv1 = layers.conv(in_channels, width, (7, 7), strides=2, padding=((3, 3), (3, 3)))
    self.bn1 = layers.norm(width)
    cin = width
    for stage, num_blocks in enumerate(stage_sizes):
      planes = width * 2**stage
      blocks = []
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(block(cin, planes, stride, layers))
        cin = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
    self.num_stages = len(stage_sizes)
    self.n_features = cin

  def __call__(self, x):
    x = _normalize_input(x, self.input_norm)
    x = nnx.relu(self.bn1(self.conv1(x)))
    if not self.small_input_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)
    for stage in range(self.num_stages):
      for block in getattr(self, f"layer{stage + 1}"):
        x = block(x)
    return jnp.mean(x, axis=(1, 2))


class ResNet(_Classifier):
  """ResNet-18/50 (torchvision layout) with ``nnx.BatchNorm`` (momentum 0.9, eps 1e-5).

  Stem: for inputs taller than 64 pixels, ImageNet's ``conv7x7/2 -> BN -> relu ->
  maxpool3x3/2``; for inputs of height <= 64, the CIFAR-style ``conv3x3/1 -> BN ->
  relu`` without max-pool (keeps resolution on small images and avoids max-pool,
  whose backward pass is slow on XLA CPU). Override with ``small_input_stem``.

  Args:
    num_classes: classifier outputs.
    input_shape: ``(height, width, channels)``.
    rngs: initialization RNGs (``dropout`` stream used when ``dropout > 0``).
    block: ``BasicBlock`` or ``Bottleneck``.
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)``.
    width: channels of the stem and of the first stage (64 in the paper); smaller
      values give fast test models.
    dropout: dropout rate before the classifier (DomainBed's ``resnet_dropout``).
    small_input_stem: ``None`` picks by input height as above.
    freeze_bn: BatchNorm always normalizes with its running statistics and never
      updates them, in train mode too (its scale and bias still train).
      DomainBed's ResNet does this (``freeze_bn``) when fine-tuning ImageNet
      weights; the default, False, is standard BatchNorm.
    adapter_dim: if > 0, an `Adapter` of this bottleneck width after every block
      (``backbone/layerI/J/adapter``), zero-initialized, for parameter-efficient
      fine-tuning (``--train-only adapters``).
    input_norm: ``'imagenet'`` standardizes [0, 1] RGB inputs with ImageNet's mean
      and std first (what torchvision's weights expect); ``'none'`` (default) does not.
    dtype, param_dtype: computation and parameter dtypes (Flax semantics).

  Loads torchvision checkpoints (``resnet18-f37072fd.pth``, ``resnet50-0676ba61.pth``)
  with `load_pretrained`: torchvision's ``fc`` is our ``classifier``.
  """

  torchvision_head = "fc"

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    block: type = BasicBlock,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    width: int = 64,
    dropout: float = 0.0,
    small_input_stem: bool | None = None,
    freeze_bn: bool = False,
    adapter_dim: int = 0,
    input_norm: str = "none",
    dtype=None,
    param_dtype=jnp.float32,
  ):
    h, _, c = _check_input_shape(input_shape)
    if small_input_stem is None:
      small_input_stem = h <= 64
    self.backbone = _ResNetBackbone(
      block,
      tuple(stage_sizes),
      c,
      width,
      bool(small_input_stem),
      freeze_bn,
      dtype,
      param_dtype,
      rngs,
      adapter_dim,
      input_norm,
    )
    self.n_features = self.backbone.n_features
    self._init_head(num_classes, dropout, dtype, param_dtype, rngs)

  def last_block(self) -> nnx.Module:
    """The last residual block (``--train-only last_block``)."""
    return getattr(self.backbone, f"layer{self.backbone.num_stages}")[-1]


# --------------------------------------------------------------------- MobileNetV2


def _make_divisible(v, divisor=8):
  # torchvision's _make_divisible: round to a multiple of divisor, never below 90% of v.
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn(layers, cin, cout, kernel, stride=1, groups=1):
  """torchvision's Conv2dNormActivation without the activation: ``[conv, bn]`` (keys ``.0``, ``.1``)."""
  pad = ((kernel - 1) // 2,) * 2
  return nnx.List(
    [
      layers.conv(cin, cout, (kernel, kernel), strides=stride, padding=(pad, pad), feature_group_count=groups),
      layers.norm(cout),
    ]
  )


def _conv_bn_relu6(conv_bn, x):
  conv, bn = conv_bn
  return jax.nn.relu6(bn(conv(x)))


class _InvertedResidual(nnx.Module):
  # torchvision's InvertedResidual: conv = [expand 1x1 ConvBNReLU6 (if t != 1), depthwise 3x3 ConvBNReLU6,
  # project 1x1 conv, BN]; residual connection when stride 1 and cin == cout.

  def __init__(self, cin, cout, stride, expand_ratio, layers):
    hidden = int(round(cin * expand_ratio))
    self.use_residual = stride == 1 and cin == cout
    parts = [_conv_bn(layers, cin, hidden, 1)] if expand_ratio != 1 else []
    parts += [
      _conv_bn(layers, hidden, hidden, 3, stride, groups=hidden),
      layers.conv(hidden, cout, (1, 1), padding="VALID"),
      layers.norm(cout),
    ]
    self.conv = nnx.List(parts)
    self.adapter = layers.adapter(cout)

  def __call__(self, x):
    *conv_bns, project, bn = self.conv
    y = x
    for conv_bn in conv_bns:
      y = _conv_bn_relu6(conv_bn, y)
    y = bn(project(y))
    return _with_adapter(self.adapter, x + y if self.use_residual else y)


# torchvision's inverted_residual_setting: expansion t, channels c, repeats n, first stride s.
_MOBILENET_V2_SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


class _MobileNetV2Backbone(nnx.Module):
  # features[0] stem ConvBNReLU6 3x3/2, features[1..17] inverted residuals, features[18] ConvBNReLU6 1x1 to 1280:
  # the attribute names and indices of torchvision's mobilenet_v2, so a checkpoint loads by renaming.

  def __init__(self, in_channels, width_mult, freeze_bn, adapter_dim, input_norm, dtype, param_dtype, rngs):
    layers = _ResNetLayers(freeze_bn, dtype, param_dtype, rngs, adapter_dim)
    self.input_norm = _check_input_norm(input_norm, in_channels)
    cin = _make_divisible(32 * width_mult)
    self.n_features = _make_divisible(1280 * max(1.0, width_mult))
    features = [_conv_bn(layers, in_channels, cin, 3, 2)]
    for t, c, n, s in _MOBILENET_V2_SETTING:
      cout = _make_divisible(c * width_mult)
      for i in range(n):
        features.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t, layers))
        cin = cout
    features.append(_conv_bn(layers, cin, self.n_features, 1))
    self.features = nnx.List(features)

  def __call__(self, x):
    x = _normalize_input(x, self.input_norm)
    stem, *blocks, last = self.features
    x = _conv_bn_relu6(stem, x)
    for block in blocks:
      x = block(x)
    x = _conv_bn_relu6(last, x)
    return jnp.mean(x, axis=(1, 2))


class MobileNetV2(_Classifier):
  """MobileNetV2 (Sandler et al. 2018) with torchvision's layout, for fine-tuning its ImageNet checkpoint.

  ``features``: a 3x3/2 stem (32 channels), 17 inverted-residual blocks (expansion 6 except the first, depthwise
  3x3 convolutions, ReLU6, linear bottlenecks), a 1x1 convolution to 1280 channels; global average pool;
  ``classifier`` (torchvision's ``classifier.1``). 3.50M parameters at 1000 classes. Convolutions pad like torch;
  BatchNorm momentum 0.9 (torch's 0.1), eps 1e-5. Output stride 32: works on any input of at least 1x1.

  Args:
    num_classes, input_shape, rngs: as every model.
    width_mult: channel multiplier (1.0 for the published weights).
    dropout: dropout before the classifier (torchvision trains with 0.2; default 0).
    freeze_bn: BatchNorm always uses (never updates) its running statistics.
    adapter_dim: if > 0, an `Adapter` after every inverted-residual block (``backbone/features/K/adapter``).
    input_norm: ``'imagenet'`` (default: what the published weights expect) standardizes [0, 1] RGB inputs with
      ImageNet's mean and std; ``'none'`` feeds inputs unchanged.
    dtype, param_dtype: computation and parameter dtypes.

  ``load_pretrained(model, 'mobilenet_v2-b0353104.pth')`` loads torchvision's checkpoint.
  """

  torchvision_head = "classifier.1"

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    width_mult: float = 1.0,
    dropout: float = 0.0,
    freeze_bn: bool = False,
    adapter_dim: int = 0,
    input_norm: str = "imagenet",
    dtype=None,
    param_dtype=jnp.float32,
  ):
    _, _, c = _check_input_shape(input_shape)
    self.backbone = _MobileNetV2Backbone(c, width_mult, freeze_bn, adapter_dim, input_norm, dtype, param_dtype, rngs)
    self.n_features = self.backbone.n_features
    self._init_head(num_classes, dropout, dtype, param_dtype, rngs)

  def last_block(self) -> nnx.Module:
    """The last stage of ``features`` (the 1x1 convolution to 1280 channels and its BatchNorm)."""
    return self.backbone.features[-1]


# ----------------------------------------------------------------------------- ViT


class _EncoderBlock(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

  def __init__(self, dim, heads, mlp_dim, dtype, param_dtype, rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      heads, dim, decode=False, dtype=dtype, param_dtype=param_dtype, keep_rngs=False, rngs=rngs
    )
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class _ViTBackbone(nnx.Module):
  def __init__(self, input_shape, patch_size, dim, depth, heads, mlp_ratio, pool, dtype, param_dtype, rngs):
    h, w, c = input_shape
    if h % patch_size or w % patch_size:
      raise ValueError(f"input {h}x{w} is not divisible into {patch_size}x{patch_size} patches")
    if pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    self.patch_size = patch_size
    self.pool = pool
    num_tokens = (h // patch_size) * (w // patch_size) + (pool == "cls")
    # A linear map of flattened (p, p, c) patches: the same function as a p x p
    # stride-p convolution, and a plain matmul on CPU.
    self.patch_embed = nnx.Linear(patch_size * patch_size * c, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim), param_dtype)) if pool == "cls" else None
    self.pos_embed = nnx.Param(init(rngs.params(), (1, num_tokens, dim), param_dtype))
    self.blocks = nnx.List([_EncoderBlock(dim, heads, mlp_ratio * dim, dtype, param_dtype, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    n, h, w, c = x.shape
    p = self.patch_size
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(x.reshape(n, (h // p) * (w // p), p * p * c))
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed[...].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)


_VIT_MAX_TOKENS = 196  # ViT-B/16's 14 x 14 at 224 px


def vit_patch_size(height: int, width: int, max_tokens: int = _VIT_MAX_TOKENS, min_tokens: int = 16) -> int:
  """The smallest patch side dividing both sides into at most `max_tokens` (and at least `min_tokens`) patches.

  32 px -> 4 (64 tokens, the CIFAR-size ViT-Tiny), 28 px -> 2 (196), 8 px -> 1 (64), 64 px -> 8 (64), 224 px -> 16
  (196, ViT/16). Attention memory grows with the square of the token count: a fixed patch of 4 at 224 px makes
  3136 tokens and needs hundreds of GiB of step memory.

  Raises:
    ValueError: no common divisor gives `min_tokens` to `max_tokens` patches (the message says which patch or
      image size to write).
  """
  for p in range(1, min(height, width) + 1):
    if height % p == 0 and width % p == 0 and min_tokens <= (height // p) * (width // p) <= max_tokens:
      return p
  raise ValueError(
    f"vit_tiny: no patch size divides a {height}x{width} input into {min_tokens} to {max_tokens} "
    "patches; "
    "give --model-option patch_size=P (P dividing both sides) or an --image-size that is a multiple "
    "of 16 (e.g. 224)"
  )


class ViT(_Classifier):
  """A small Vision Transformer (defaults: ViT-Tiny width; on 32x32 images patch 4 -> 64 tokens).

  Patches of ``patch_size`` (default: `vit_patch_size` of the input, at most 196 tokens; 4 at 32 px, 16 at
  224 px) (+ class token), dim 192, 6 pre-LN blocks with 3 heads and a 4x MLP, final LayerNorm, class-token (or
  ``pool='mean'``) readout, ``Dense``.
  """

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    patch_size: int | None = None,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: int = 4,
    pool: str = "cls",
    dropout: float = 0.0,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    shape = _check_input_shape(input_shape)
    if patch_size is None:
      patch_size = vit_patch_size(shape[0], shape[1])
    self.backbone = _ViTBackbone(shape, patch_size, dim, depth, heads, mlp_ratio, pool, dtype, param_dtype, rngs)
    self.n_features = dim
    self._init_head(num_classes, dropout, dtype, param_dtype, rngs)


# ------------------------------------------------------------------------ registry

MODELS: dict[str, Callable[..., nnx.Module]] = {
  "mlp": MLP,
  "mnist_cnn": MNISTCNN,
  "resnet18": functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
  "resnet50": functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
  "mobilenet_v2": MobileNetV2,
  "vit_tiny": ViT,
}

PRECISIONS = ("float32", "bf16")


def create_model(
  name: str,
  *,
  num_classes: int,
  input_shape: tuple[int, int, int],
  rngs: nnx.Rngs,
  fast_conv: bool = True,
  precision: str = "float32",
  **kwargs: Any,
) -> nnx.Module:
  """Builds the registry model ``name``, or the user's own model ``'package.module:factory'``.

  Args:
    name: a key of ``MODELS`` ('mlp', 'mnist_cnn', 'resnet18', 'resnet50', 'mobilenet_v2', 'vit_tiny'), or
      ``'package.module:factory'`` (see `resolve_model`): ``factory(num_classes=, input_shape=, rngs=,
      **kwargs)`` returns an ``nnx.Module`` satisfying `DomainModel`, or a ``flax.linen.Module`` featurizer
      (``x [n, H, W, C] -> [n, F]``) that the harness runs through Flax's NNX bridge under a linear classifier
      (`LinenFeaturizer`, `FeaturizerClassifier`). The result is checked (`check_model`).
    num_classes: number of logits.
    input_shape: ``(height, width, channels)`` of one NHWC example.
    rngs: ``nnx.Rngs`` for initialization (and dropout, if any).
    fast_conv: every ``nnx.Conv`` uses ``fast_conv.conv_general_dilated`` (the same
      function as ``lax.conv_general_dilated``, whose gradients on the CPU backend are
      convolutions in the forward's layout; other backends keep XLA's). ``False``: Flax's default.
    precision: ``'float32'``, or ``'bf16'``: the model computes in bfloat16 (``dtype=jnp.bfloat16`` is passed to
      the constructor) while its parameters stay float32 (``param_dtype``), and so do the optimizer state, the
      losses (the step casts the logits) and BatchNorm's running statistics.
    **kwargs: model options, e.g. ``hidden`` (mlp), ``width``/``dropout`` (resnets),
      ``depth``/``dim`` (vit_tiny), ``dtype``/``param_dtype`` (all).

  Returns:
    The model, in train mode.

  Raises:
    ValueError: unknown ``name``, an unknown ``precision``, a ``dtype``/``param_dtype`` that contradicts it, or a
      user model that does not satisfy `DomainModel` (the message names what is missing).

  Initialization runs eagerly and JAX compiles the random-number kernel once per
  distinct parameter shape: on a busy 2-core CPU a ResNet-50 took 23 s to build
  with ``nnx.Rngs(0)`` (threefry keys) and 10 s with
  ``nnx.Rngs(jax.random.key(0, impl='rbg'))`` (other random values, same
  distributions).
  """
  factory = resolve_model(name)
  kwargs = _precision_options(precision, kwargs)
  input_shape = tuple(input_shape)
  try:
    model = factory(num_classes=num_classes, input_shape=input_shape, rngs=rngs, **kwargs)
  except TypeError as e:
    if name in MODELS or precision == "float32" or "dtype" not in str(e):
      raise
    raise ValueError(
      f"model {name!r}: --precision bf16 calls the factory with dtype=jnp.bfloat16, which it does "
      f"not take ({e}); add a dtype argument and pass it to its layers"
    ) from None
  if name not in MODELS:
    model = _user_model(name, model, num_classes, input_shape, rngs, kwargs.get("dtype"))
    check_model(model, num_classes=num_classes, input_shape=input_shape, name=name)
  if fast_conv:
    _fast_conv.use_fast_conv(model)
  return model


def _precision_options(precision: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  """`kwargs` with ``dtype=bfloat16`` for ``precision='bf16'`` (refusing a contradicting dtype/param_dtype)."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
  if precision == "float32":
    return dict(kwargs)
  for key, wanted in (("dtype", jnp.bfloat16), ("param_dtype", jnp.float32)):
    if key in kwargs and jnp.dtype(kwargs[key]) != jnp.dtype(wanted):
      raise ValueError(
        f"precision bf16 computes in bfloat16 with float32 parameters; drop the model option "
        f"{key}={kwargs[key]} (or use precision float32)"
      )
  return {**kwargs, "dtype": jnp.bfloat16}


# ------------------------------------------------------------------ the user's own model


@typing.runtime_checkable
class DomainModel(Protocol):
  """What the harness needs of a model (every registry model satisfies it; `check_model` checks a user's).

  An ``nnx.Module`` (``model.train()`` / ``model.eval()`` switch dropout and BatchNorm) with:

  Attributes:
    n_features: int, the width ``F`` of the classifier's input.
    classifier: an ``nnx.Module`` ``[n, F] -> [n, num_classes]`` holding ``nnx.Param`` variables, stored as the
      attribute ``classifier`` (so its parameters sit under ``params['classifier']``): CORAL and Fishr read its
      inputs, Fishr differentiates it (in closed form when it is an ``nnx.Linear``), ``--train-only head``
      selects it.

  Methods:
    head_inputs(x [n, H, W, C]) -> [n, F]: the classifier's input (features after any dropout).
    __call__(x [n, H, W, C]) -> [n, num_classes]: the logits, ``classifier(head_inputs(x))``.

  Optional: ``last_block() -> nnx.Module`` (for ``--train-only last_block``), ``torchvision_head`` (the
  classifier's name in a torchvision state dict, for ``--pretrained`` torchvision files).
  """

  n_features: int
  classifier: nnx.Module

  def head_inputs(self, x: jax.Array) -> jax.Array: ...

  def __call__(self, x: jax.Array) -> jax.Array: ...


def resolve_model(name: str) -> Callable[..., Any]:
  """The constructor of model ``name``: ``MODELS[name]``, or ``factory`` of ``'package.module:factory'`` (imported
  with ``importlib``; ``factory`` may be a dotted attribute path such as ``Class.create``).

  Raises:
    ValueError: an unknown name, a module that cannot be imported, or a factory it lacks or that is not callable.
  """
  if name in MODELS:
    return MODELS[name]
  module_name, sep, attr = str(name).partition(":")
  if not sep:
    raise ValueError(
      f"Unknown model {name!r}; valid: {', '.join(sorted(MODELS))}, or package.module:factory "
      "for your own model (see docs/harness.md)"
    )
  if not module_name or not attr:
    raise ValueError(f"model {name!r}: write package.module:factory (e.g. mypkg.nets:build)")
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
      f"model {name!r}: cannot import {module_name!r} ({e}); make it importable (installed or on "
      "PYTHONPATH, on every host)"
    ) from None
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"model {name!r}: {module_name} has no attribute {attr!r}")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f"model {name!r}: {attr} is a {type(obj).__name__}, not a callable factory")
  return obj


class FeaturizerClassifier(_Classifier):
  """``backbone -> [dropout] -> nnx.Linear classifier``: a `DomainModel` around any featurizer.

  Args:
    backbone: an ``nnx.Module`` ``x [n, H, W, C] -> [n, n_features]`` (e.g. a `LinenFeaturizer`).
    n_features: its output width.
    num_classes, rngs, dropout, dtype, param_dtype: as for the registry models.
  """

  def __init__(
    self,
    backbone: nnx.Module,
    *,
    n_features: int,
    num_classes: int,
    rngs: nnx.Rngs,
    dropout: float = 0.0,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.backbone = backbone
    self.n_features = int(n_features)
    self._init_head(num_classes, dropout, dtype, param_dtype, rngs)


class LinenFeaturizer(nnx.Module):
  """A ``flax.linen.Module`` featurizer as an NNX module, through ``flax.nnx.bridge.ToNNX``.

  Its ``params`` become ``nnx.Param`` (trained and perturbed), its other collections (``batch_stats``) model
  state, updated in train mode only. If the Linen ``__call__`` takes a ``train`` argument it receives
  ``True`` in train mode and ``False`` in eval mode (``model.train()`` / ``model.eval()``); its ``dropout`` RNG
  stream comes from ``rngs``. Initialized on zeros of ``input_shape`` (with ``train=False``).

  Attributes:
    n_features: the featurizer's output width (from the initialization's output, which must be ``[1, F]``).
  """

  def __init__(self, module: Any, *, input_shape: Sequence[int], rngs: nnx.Rngs):
    import inspect

    from flax.nnx import bridge

    streams = nnx.Rngs(params=rngs.params(), dropout=rngs.dropout() if "dropout" in rngs else rngs())
    self.linen = bridge.ToNNX(module, rngs=streams)
    self.takes_train = "train" in inspect.signature(module.__call__).parameters
    self.use_running_average = False  # nnx's train()/eval() set it
    x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    self.linen.lazy_init(x, **self._mode(False))
    out = self.linen(x, **self._mode(False))
    if getattr(out, "ndim", None) != 2:
      raise ValueError(
        f"the Linen featurizer {type(module).__name__} returns shape {getattr(out, 'shape', out)} "
        f"for one input of shape {tuple(input_shape)}; it must return features [n, F]"
      )
    self.n_features = int(out.shape[1])

  def _mode(self, train: bool) -> dict[str, Any]:
    return {"train": train} if self.takes_train else {}

  def __call__(self, x):
    from flax.core.scope import DenyList

    train = not self.use_running_average
    return self.linen(x, mutable=DenyList("params") if train else False, **self._mode(train))


def _user_model(
  name: str, model: Any, num_classes: int, input_shape: tuple[int, ...], rngs: nnx.Rngs, dtype: Any
) -> Any:
  """A user's factory output as a `DomainModel`: Linen featurizers get the bridge and a linear classifier."""
  try:
    from flax import linen
  except ImportError:  # pragma: no cover - flax ships linen
    linen = None
  if linen is not None and isinstance(model, linen.Module):
    backbone = LinenFeaturizer(model, input_shape=input_shape, rngs=rngs)
    return FeaturizerClassifier(
      backbone, n_features=backbone.n_features, num_classes=num_classes, rngs=rngs, dtype=dtype
    )
  return model


def check_model(model: Any, *, num_classes: int, input_shape: Sequence[int], name: str = "the model") -> None:
  """Checks that ``model`` satisfies `DomainModel`, abstractly (shapes only, nothing computed).

  Raises:
    ValueError: one message naming everything missing or mis-shaped.
  """
  where = f"model {name!r} ({type(model).__name__})"
  if not isinstance(model, nnx.Module):
    raise ValueError(
      f"{where}: the factory must return an nnx.Module satisfying "
      "disam_jax.harness.models.DomainModel, or a flax.linen.Module featurizer x -> [n, F]"
    )
  problems = []
  n_features = getattr(model, "n_features", None)
  if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1:
    problems.append(f"n_features (an int > 0, the classifier's input width; has {n_features!r})")
  if not callable(getattr(model, "head_inputs", None)):
    problems.append("head_inputs(x) -> [n, n_features] (the classifier's input)")
  classifier = getattr(model, "classifier", None)
  if not isinstance(classifier, nnx.Module) or not jax.tree.leaves(nnx.state(classifier, nnx.Param)):
    problems.append(
      "classifier (an nnx.Module [n, n_features] -> [n, num_classes] with nnx.Param weights, e.g. nnx.Linear)"
    )
  if not problems:
    problems = _shape_problems(model, num_classes, tuple(input_shape), n_features)
  if problems:
    raise ValueError(f"{where} does not satisfy disam_jax.harness.models.DomainModel: it needs " + "; ".join(problems))


def _shape_problems(model: nnx.Module, num_classes: int, input_shape: tuple[int, ...], n_features: int) -> list:
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2,) + input_shape, jnp.float32)

  def shapes(state, x):
    m = nnx.merge(graphdef, state, copy=True)
    features = m.head_inputs(x)
    return features, m.classifier(features), m(x)

  try:
    features, head_logits, logits = jax.eval_shape(shapes, state, x)
  except Exception as e:  # the user's code failed on a batch of two inputs: say so with its own message
    return [
      f"head_inputs/classifier/__call__ to run on inputs [2, {', '.join(map(str, input_shape))}] "
      f"(they raised {type(e).__name__}: {e})"
    ]
  problems = []
  if features.shape != (2, n_features):
    problems.append(f"head_inputs(x) -> [n, n_features] = [2, {n_features}] (returns {list(features.shape)})")
  for what, got in (("classifier(head_inputs(x))", head_logits), ("__call__(x)", logits)):
    if got.shape != (2, num_classes):
      problems.append(f"{what} -> [n, num_classes] = [2, {num_classes}] (returns {list(got.shape)})")
  return problems


# --------------------------------------------------------------- functional form


def functional_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """Splits ``model`` into ``(graphdef, params, model_state)``.

  ``params`` holds the ``nnx.Param`` variables; ``model_state`` everything else
  (``nnx.BatchStat`` running statistics, dropout RNG counters), possibly empty.
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, params, model_state


def apply_model(
  graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, x: jax.Array, *, train: bool
) -> tuple[jax.Array, nnx.State]:
  """Runs the model as a pure function (usable inside ``jax.jit``/``jax.grad``).

  Args:
    graphdef, params, model_state: from ``functional_model``; ``params`` may be
      perturbed or traced.
    x: NHWC inputs.
    train: ``True`` uses batch statistics in BatchNorm and active dropout, and
      returns the updated running statistics / RNG counters; ``False`` uses the
      running averages, no dropout, and returns ``model_state`` itself.

  Returns:
    ``(logits, new_model_state)``; ``new_model_state`` has the structure of
    ``model_state``. Nothing passed in is mutated, so a caller can run several
    passes from the same ``model_state`` and keep whichever result it wants.
  """
  model = _merged(graphdef, params, model_state, train)
  return model(x), _new_model_state(model, model_state, train)


def _merged(graphdef, params, model_state, train: bool) -> nnx.Module:
  # copy=True: without it the merged module would share (and its BatchNorm would
  # write into) the Variable objects of the states passed in.
  model = nnx.merge(graphdef, params, model_state, copy=True)
  if train:
    model.train()
  else:
    model.eval()
  return model


def _new_model_state(model, model_state, train: bool):
  return nnx.state(model, nnx.Not(nnx.Param)) if train else model_state


class Head(NamedTuple):
  """The classifier head of one forward pass (``apply_model_with_head``).

  Attributes:
    features: ``[n, n_features]`` the classifier's inputs (after dropout).
    apply: ``apply(head_params, z [k, n_features]) -> logits [k, num_classes]``,
      the classifier as a pure function (`penalties.linear_head`, in float32, for an ``nnx.Linear``).
    params: the classifier's parameters: the very arrays of ``params``, so a
      function of them is differentiated with respect to the model's parameters.
  """

  features: jax.Array
  apply: Callable[[Any, jax.Array], jax.Array]
  params: Any


def apply_model_with_head(
  graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, x: jax.Array, *, train: bool
) -> tuple[jax.Array, Head, nnx.State]:
  """``apply_model`` that also returns the classifier head: ``(logits, Head, new_model_state)``.

  For penalties on the features (CORAL) or on per-example gradients of the head
  (Fishr). Same forward pass, same logits as ``apply_model``.
  """
  model = _merged(graphdef, params, model_state, train)
  features = model.head_inputs(x)
  logits = model.classifier(features)
  head_graphdef, head_params = nnx.split(model.classifier)
  if type(model.classifier) is nnx.Linear:  # Fishr's per-example head gradients in closed form
    from disam_jax.harness.penalties import linear_head as apply
  else:
    apply = lambda hp, z: nnx.merge(head_graphdef, hp)(z)
  return logits, Head(features, apply, head_params), _new_model_state(model, model_state, train)


# ------------------------------------------------------------------------ weights

# Saved: parameters and running statistics; not RNG keys/counters.
_WEIGHTS = nnx.Not(nnx.RngState)


def _weight_variables(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
  flat = nnx.to_flat_state(nnx.state(model, _WEIGHTS))
  return {"/".join(str(k) for k in path): (path, var) for path, var in flat}


def save_weights(model: nnx.Module, path: str | os.PathLike) -> list[str]:
  """Writes the model's weights to ``path`` in the ``load_pretrained`` .npz format.

  The file is written at ``path`` exactly (no '.npz' appended). Returns the keys.
  """
  arrays = {key: np.asarray(jax.device_get(var.get_value())) for key, (_, var) in _weight_variables(model).items()}
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return sorted(arrays)


def _is_torchvision_layout(keys) -> bool:
  return bool(keys) and all("/" not in k for k in keys) and any("." in k for k in keys)


def load_pretrained(model: nnx.Module, path: str | os.PathLike, *, strict: bool = False) -> list[str]:
  """Loads weights from a local file into ``model`` in place (no download).

  Files are read by `disam_jax.harness.weight_files.read_weights` (no torch needed, no
  code from the file ever runs): ``.pth``/``.pt`` (``torch.save``'d state dicts, read by
  a restricted unpickler), ``.safetensors``, ``.npz`` (``allow_pickle=False``). Two key
  layouts are recognized:

  * torchvision's (keys with dots, e.g. ``layer1.0.conv1.weight``, ``features.0.0.weight``):
    converted by `convert_torchvision` for models that mirror torchvision (``resnet18``,
    ``resnet50``, ``mobilenet_v2``; the model's ``torchvision_head`` names the classifier).
    E.g. torchvision's ``resnet50-0676ba61.pth`` (DomainBed's ImageNet initialization) or
    ``mobilenet_v2-b0353104.pth``.
  * ours: ``'/'.join`` of the variable's path in the NNX state, e.g.
    ``'backbone/conv1/kernel'``, ``'backbone/layer1/0/bn1/mean'``, ``'classifier/bias'``,
    with Flax layouts: convolution kernels ``[kh, kw, in, out]`` (HWIO), dense kernels
    ``[in, out]``, norm ``scale``/``bias``, BatchNorm ``mean``/``var``. ``save_weights``
    writes it (as .npz).

  Args:
    model: the model to fill.
    path: the weights file.
    strict: if True, every key of the model and of the file must match with equal
      shapes. If False, keys whose shapes differ (typically the classifier head of
      a model with another number of classes, or an ImageNet stem loaded into the
      small-input stem) are skipped with a warning and keep their initial values,
      file keys the model lacks are ignored, and model keys the file lacks (e.g.
      adapters) keep their initial values.

  Returns:
    The sorted list of loaded keys (in our layout).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: an unsupported or unsafe file (`weight_files.WeightFileError`); a
      torchvision-layout file for a model without torchvision's layout; in strict mode, a
      shape mismatch (naming the key and both shapes) or a missing/unexpected key; in any
      mode, a non-empty file of which no key could be loaded (a wrong file or a naming
      mismatch, never silently ignored).
  """
  path = os.fspath(path)
  arrays = _read_in_our_layout(model, path)
  variables = _weight_variables(model)
  _check_keys(arrays, variables, path, strict)
  updates, loaded = [], []
  for key in sorted(arrays.keys() & variables.keys()):
    state_path, var = variables[key]
    if tuple(var.shape) != tuple(arrays[key].shape):
      continue
    updates.append((state_path, var.replace(jnp.asarray(arrays[key], dtype=var.dtype))))
    loaded.append(key)
  if arrays and not loaded:
    raise ValueError(
      f"none of the {len(arrays)} keys in {path!r} matches the model "
      f"(file keys e.g. {sorted(arrays)[:3]}, model keys e.g. {sorted(variables)[:3]})"
    )
  nnx.update(model, nnx.from_flat_state(updates))
  return loaded


def _read_in_our_layout(model: nnx.Module, path: str) -> dict[str, np.ndarray]:
  """`load_pretrained`'s file read, a torchvision-layout file converted for a `model` that mirrors torchvision
  (warning, at `load_pretrained`'s caller, when the model does not standardize its inputs as torchvision's do)."""
  from disam_jax.harness.weight_files import read_weights

  arrays = read_weights(path)
  if _is_torchvision_layout(arrays.keys()):
    head = getattr(model, "torchvision_head", None)
    if head is None:
      raise ValueError(
        f"{path!r} is a torchvision-layout state dict (keys like {next(iter(arrays))!r}), but "
        f"{type(model).__name__} has no torchvision counterpart; models that load torchvision "
        "checkpoints: resnet18, resnet50, mobilenet_v2"
      )
    if getattr(getattr(model, "backbone", None), "input_norm", "imagenet") == "none":
      warnings.warn(
        "torchvision's weights expect inputs standardized with ImageNet's mean and std; build the model "
        "with input_norm='imagenet' (--model-option input_norm=imagenet)",
        stacklevel=3,
      )
    arrays = convert_torchvision(arrays, head=head)
  return arrays


def _check_keys(arrays: Mapping[str, Any], variables: dict[str, Any], path: str, strict: bool) -> None:
  """`load_pretrained`'s key check: in `strict` mode every key on both sides with equal shapes (ValueError naming
  the first difference); otherwise a warning, at `load_pretrained`'s caller, listing the keys skipped for their
  shapes."""
  mismatched = []
  for key in sorted(arrays.keys() & variables.keys()):
    model_shape = tuple(variables[key][1].shape)
    file_shape = tuple(arrays[key].shape)
    if model_shape != file_shape:
      if strict:
        raise ValueError(f"shape mismatch for {key!r}: model has {model_shape}, {path!r} has {file_shape}")
      mismatched.append(f"{key} (model {model_shape}, file {file_shape})")
  missing = sorted(variables.keys() - arrays.keys())
  unexpected = sorted(arrays.keys() - variables.keys())
  if strict and (missing or unexpected):
    raise ValueError(f"keys do not match {path!r}: missing from file {missing}, not in model {unexpected}")
  if mismatched:
    warnings.warn(f"load_pretrained skipped keys with other shapes: {mismatched}", stacklevel=3)


def convert_torchvision(state_dict: Mapping[str, Any], *, head: str) -> dict[str, np.ndarray]:
  """Maps a torchvision ``state_dict`` (values as NumPy arrays) to our keys and layouts.

  ``<module path>.weight`` of a convolution -> ``backbone/<module/path>/kernel``, transposed
  OIHW -> HWIO (depthwise ``[C, 1, kh, kw]`` -> ``[kh, kw, 1, C]``, Flax's grouped layout);
  BatchNorm ``weight``/``bias``/``running_mean``/``running_var`` -> ``scale``/``bias``/``mean``/
  ``var``; the classifier ``<head>.*`` (``'fc'`` for ResNets, ``'classifier.1'`` for
  MobileNetV2) -> ``classifier/*``, its weight transposed ``(out, in)`` -> ``(in, out)``;
  ``num_batches_tracked`` is dropped. Torch's ``running_var`` (the unbiased batch variance)
  is used as is: in evaluation both frameworks normalize with the stored value.
  """
  renamed_leaves = {"running_mean": "mean", "running_var": "var", "bias": "bias"}
  head_modules = head.split(".")
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    *modules, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    if leaf == "weight":
      if value.ndim == 4:
        leaf, value = "kernel", value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:
        leaf, value = "kernel", value.T
      else:
        leaf = "scale"
    elif leaf in renamed_leaves:
      leaf = renamed_leaves[leaf]
    else:
      raise ValueError(f"unexpected torchvision key {key!r}")
    prefix = ["classifier"] if modules == head_modules else ["backbone", *modules]
    out["/".join(prefix + [leaf])] = np.ascontiguousarray(value)
  return out


def convert_torchvision_resnet(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """`convert_torchvision` for torchvision ResNets (classifier ``fc``).

  Load the result into a model built with ``small_input_stem=False`` (ImageNet stem).
  """
  return convert_torchvision(state_dict, head="fc")
