"""DISAM in PyTorch (CPU), written from the paper, for timing against ``disam_jax``.

Zhang et al., "Domain-Inspired Sharpness-Aware Minimization Under Domain Shifts", ICLR 2024
(arXiv 2405.18861), Algorithm 1 / Eq. 6-8. One step, with per-domain mean losses ``L_i(w)``:

    loss_p = CE(batch, w) - lam * Var_pop(L_1 .. L_M)         # perturbation objective
    g_p    = grad loss_p
    eps    = rho * g_p / (||g_p|| + 1e-12)                     # adaptive: rho * w^2 * g_p / (|| |w| g_p || + 1e-12)
    g      = grad CE(batch, w + eps)                           # plain loss at the perturbed point
    w     <- base_optimizer step with g, taken at w (eps removed first)

``lam = 0`` is SAM exactly. This module is a benchmark peer of ``disam_jax``: the models match
``disam_jax.harness.models`` (NHWC float inputs, same layers and widths), the step is the same algorithm,
and ``time_torch_step`` times whole steps (forward + backward + optimizer) with ``time.perf_counter``.

BatchNorm (resnet18): running statistics are updated by the unperturbed pass only, for SAM and DISAM
alike (the perturbed pass still normalizes with its own batch statistics, as in training mode), which is
the convention ``disam_jax`` uses.

Run ``python -m benchmarks.torch_disam`` for a table of ERM / SAM / DISAM step times on this machine.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
  "TorchDISAM",
  "MODEL_NAMES",
  "build_model",
  "domain_losses_grouped",
  "domain_losses_per_sample",
  "perturbation_loss",
  "make_train_step",
  "time_torch_step",
]

PER_DOMAIN_MODES = ("grouped", "per_sample")
ALGORITHMS = ("erm", "sam", "disam")


# ----------------------------------------------------------------------------- per-domain losses


def domain_losses_grouped(per_sample_ce: torch.Tensor, num_domains: int) -> torch.Tensor:
  """Per-domain mean losses ``[M]`` from per-sample losses laid out domain-major ``[M*b]``.

  The batch is ``[M, b, ...]`` flattened to ``[M*b, ...]``: one forward pass, one
  ``cross_entropy(reduction='none')``, a reshape to ``[M, b]`` and a mean over ``b``.
  """
  return per_sample_ce.view(num_domains, -1).mean(dim=1)


def domain_losses_per_sample(logits: torch.Tensor, y: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
  """The authors' public code, as it effectively runs: one masked loss per *sample*, ``[n]``.

  Their trainer builds the list of domains as ``set(domain_labels)`` with ``domain_labels`` a tensor.
  Iterating a tensor yields 0-d tensors, and tensors hash by identity (``id``), not by value, so the
  "set" holds n distinct objects -- one per sample -- instead of M domain labels. The loss is then
  computed once per entry: ``cross_entropy(logits[domain_ids == d], y[domain_ids == d])``. Entry i is
  the mean loss of sample i's domain, so the list holds ``L_{d(i)}`` n times, and its variance is the
  count-weighted variance ``sum_i (n_i/n) (L_i - Lbar_n)^2`` (equal to the uniform one when every
  domain has the same count).

  Why it is slow: instead of one loss over the batch, it runs n times (a comparison over all n ids,
  two boolean-mask gathers, a cross-entropy) in the forward pass, and autograd replays n
  index-backward (scatter of a gradient into a fresh zero ``[n, C]`` tensor) + cross-entropy-backward
  chains in the backward pass: O(n^2 C) memory traffic and ~10 n small kernel launches, each
  paying Python and dispatcher overhead that dwarfs its arithmetic. The cost grows with the batch
  size n, not with the number of domains M.

  We iterate ``domain_ids`` in order (the same n entries ``set(domain_ids)`` yields, in a
  deterministic order; the variance does not depend on the order).
  """
  losses = []
  for d in domain_ids:  # == the entries of set(domain_ids): one per sample
    mask = domain_ids == d
    losses.append(F.cross_entropy(logits[mask], y[mask]))
  return torch.stack(losses)


def perturbation_loss(
  logits: torch.Tensor,
  y: torch.Tensor,
  *,
  lam: float,
  num_domains: int,
  domain_ids: torch.Tensor | None = None,
  per_domain: str = "grouped",
) -> torch.Tensor:
  """DISAM's perturbation objective: ``CE(batch, mean) - lam * Var_pop(per-domain losses)``.

  ``per_domain='grouped'`` requires a domain-major equal-count batch (``[M*b]``);
  ``per_domain='per_sample'`` uses ``domain_ids`` (any counts) as the authors' code does.
  With ``lam == 0`` this is the plain mean cross-entropy (SAM) and no domain losses are computed.
  """
  if lam == 0.0:
    return F.cross_entropy(logits, y)
  if per_domain == "grouped":
    per_sample_ce = F.cross_entropy(logits, y, reduction="none")
    domain_losses = domain_losses_grouped(per_sample_ce, num_domains)
    ce = per_sample_ce.mean()
  elif per_domain == "per_sample":
    if domain_ids is None:
      raise ValueError("per_domain='per_sample' needs domain_ids")
    ce = F.cross_entropy(logits, y)
    domain_losses = domain_losses_per_sample(logits, y, domain_ids)
  else:
    raise ValueError(f"per_domain must be one of {PER_DOMAIN_MODES}, got {per_domain!r}")
  return ce - lam * domain_losses.var(unbiased=False)


# ----------------------------------------------------------------------------- the optimizer


class TorchDISAM:
  """SAM-style two-step wrapper around a ``torch.optim`` base optimizer.

  Usage per step::

      perturbation_loss(model(x), y, lam=opt.lam, ...).backward()
      opt.first_step(zero_grad=True)      # w <- w + eps
      F.cross_entropy(model(x), y).backward()
      opt.second_step(zero_grad=True)     # w <- w - eps; base step with the gradient at w + eps

  ``lam = 0`` is SAM. Weight decay, momentum etc. live only in the base optimizer (e.g.
  ``torch.optim.SGD(..., weight_decay=wd)`` is coupled decay, applied at w, not at w + eps).
  """

  def __init__(
    self,
    params: Iterable[torch.nn.Parameter],
    base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
    *,
    rho: float = 0.05,
    lam: float = 0.1,
    adaptive: bool = False,
    **base_kwargs: Any,
  ):
    if rho < 0:
      raise ValueError(f"rho must be >= 0, got {rho}")
    self.params = [p for p in params if p.requires_grad]
    self.base_optimizer = base_optimizer_cls(self.params, **base_kwargs)
    self.rho = float(rho)
    self.lam = float(lam)
    self.adaptive = bool(adaptive)
    self._eps: list[torch.Tensor | None] | None = None

  def zero_grad(self, set_to_none: bool = True) -> None:
    self.base_optimizer.zero_grad(set_to_none=set_to_none)

  @torch.no_grad()
  def first_step(self, zero_grad: bool = False) -> None:
    """``w <- w + eps`` from the gradient of the perturbation loss held in ``p.grad``."""
    with_grad = [p for p in self.params if p.grad is not None]
    if self.adaptive:
      norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.abs() * p.grad) for p in with_grad]))
    else:
      norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
    scale = self.rho / (norm + 1e-12)
    self._eps = []
    for p in self.params:
      if p.grad is None:
        self._eps.append(None)
        continue
      e = p.grad * scale
      if self.adaptive:
        e.mul_(p.square())
      p.add_(e)
      self._eps.append(e)
    if zero_grad:
      self.zero_grad()

  @torch.no_grad()
  def second_step(self, zero_grad: bool = False) -> None:
    """``w <- w - eps``, then the base optimizer's step with ``p.grad`` (the gradient at w + eps)."""
    if self._eps is None:
      raise RuntimeError("second_step() called without first_step()")
    for p, e in zip(self.params, self._eps):
      if e is not None:
        p.sub_(e)
    self._eps = None
    self.base_optimizer.step()
    if zero_grad:
      self.zero_grad()

  def state_dict(self) -> dict:
    return self.base_optimizer.state_dict()


# ----------------------------------------------------------------------------- models (NHWC in)


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
  return x.permute(0, 3, 1, 2).contiguous()


class MLP(nn.Module):
  """``flatten -> [Linear(hidden) -> ReLU] * depth -> Linear(num_classes)`` (DomainBed's MLP)."""

  def __init__(self, num_classes: int, input_shape: Sequence[int], hidden: int = 256, depth: int = 2):
    super().__init__()
    h, w, c = input_shape
    widths = [h * w * c] + [hidden] * depth
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
      layers += [nn.Linear(a, b), nn.ReLU()]
    self.backbone = nn.Sequential(*layers)
    self.classifier = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    return self.classifier(self.backbone(x.reshape(x.shape[0], -1)))


class MNISTCNN(nn.Module):
  """DomainBed's ``MNIST_CNN`` + linear head: 4 conv3x3 (64, 128/2, 128, 128), each ReLU -> GroupNorm(8)."""

  def __init__(self, num_classes: int, input_shape: Sequence[int]):
    super().__init__()
    c = input_shape[2]
    self.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1)
    self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
    self.conv3 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
    self.conv4 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
    self.norm0 = nn.GroupNorm(8, 64)
    self.norm1 = nn.GroupNorm(8, 128)
    self.norm2 = nn.GroupNorm(8, 128)
    self.norm3 = nn.GroupNorm(8, 128)
    self.classifier = nn.Linear(128, num_classes)

  def forward(self, x):
    x = _nhwc_to_nchw(x)
    x = self.norm0(F.relu(self.conv1(x)))
    x = self.norm1(F.relu(self.conv2(x)))
    x = self.norm2(F.relu(self.conv3(x)))
    x = self.norm3(F.relu(self.conv4(x)))
    return self.classifier(x.mean(dim=(2, 3)))  # AdaptiveAvgPool2d((1, 1)) + flatten


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck (the stride on the 3x3 convolution), as ``disam_jax``'s."""

  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    cout = planes * self.expansion
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
  """ResNet with BatchNorm: BasicBlock (2, 2, 2, 2) by default (ResNet-18), or ``block=Bottleneck,
  stage_sizes=(3, 4, 6, 3)`` (ResNet-50, registry name 'resnet50'). CIFAR stem (conv3x3/1, no max-pool) for
  inputs of height <= 64, as ``disam_jax``'s resnets pick for 32x32 inputs; else ImageNet stem."""

  def __init__(
    self,
    num_classes: int,
    input_shape: Sequence[int],
    width: int = 64,
    small_input_stem: bool | None = None,
    block: type = BasicBlock,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
  ):
    super().__init__()
    h, _, c = input_shape
    self.small_input_stem = h <= 64 if small_input_stem is None else bool(small_input_stem)
    if self.small_input_stem:
      self.conv1 = nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False)
    else:
      self.conv1 = nn.Conv2d(c, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for stage, num_blocks in enumerate(stage_sizes):
      planes = width * 2**stage
      blocks = []
      for i in range(num_blocks):
        blocks.append(block(cin, planes, 2 if (stage > 0 and i == 0) else 1))
        cin = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.classifier = nn.Linear(cin, num_classes)
    for m in self.modules():  # torchvision's initialization
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(_nhwc_to_nchw(x))))
    if not self.small_input_stem:
      x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage in range(self.num_stages):
      x = getattr(self, f"layer{stage + 1}")(x)
    return self.classifier(x.mean(dim=(2, 3)))


class _Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (as Flax's MultiHeadAttention)."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query = nn.Linear(dim, dim)
    self.key = nn.Linear(dim, dim)
    self.value = nn.Linear(dim, dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, x):
    n, t, d = x.shape
    split = lambda z: z.view(n, t, self.heads, d // self.heads).transpose(1, 2)
    a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
    return self.out(a.transpose(1, 2).reshape(n, t, d))


class _EncoderBlock(nn.Module):
  """Pre-LayerNorm block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` (tanh-approximate GELU, as jax)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attention = _Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, dim)

  def forward(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class ViT(nn.Module):
  """Small ViT on NHWC images: patch 4 (a Linear over flattened (p, p, c) patches), dim 192, 3 heads,
  MLP ratio 4, class token + learned position embedding, pre-LN blocks, final LayerNorm, cls readout.

  ``depth`` defaults to 6, the default of ``disam_jax``'s ``vit_tiny``; pass ``depth=4`` for a shallower one.
  """

  def __init__(
    self,
    num_classes: int,
    input_shape: Sequence[int],
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: int = 4,
  ):
    super().__init__()
    h, w, c = input_shape
    if h % patch_size or w % patch_size:
      raise ValueError(f"input {h}x{w} is not divisible into {patch_size}x{patch_size} patches")
    self.patch_size = patch_size
    self.patch_embed = nn.Linear(patch_size * patch_size * c, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, (h // patch_size) * (w // patch_size) + 1, dim) * 0.02)
    self.blocks = nn.Sequential(*[_EncoderBlock(dim, heads, mlp_ratio * dim) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.classifier = nn.Linear(dim, num_classes)

  def forward(self, x):
    n, h, w, c = x.shape
    p = self.patch_size
    x = x.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(x.reshape(n, (h // p) * (w // p), p * p * c))
    x = torch.cat([self.cls_token.expand(n, 1, -1), x], dim=1) + self.pos_embed
    x = self.norm(self.blocks(x))
    return self.classifier(x[:, 0])


_MODELS: dict[str, Callable[..., nn.Module]] = {
  "mlp": MLP,
  "mnist_cnn": MNISTCNN,
  "resnet18": ResNet18,
  "resnet50": functools.partial(ResNet18, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
  "vit_tiny": ViT,
}
MODEL_NAMES = tuple(_MODELS)


def build_model(name: str, *, num_classes: int, input_shape: Sequence[int], **model_kwargs: Any) -> nn.Module:
  """Builds ``name`` in {'mlp', 'mnist_cnn', 'resnet18', 'resnet50', 'vit_tiny'}; takes NHWC float inputs.

  ``model_kwargs`` use the same names as ``disam_jax.harness.models``: ``hidden``/``depth`` (mlp),
  ``width``/``small_input_stem``/``stage_sizes`` (resnets), ``patch_size``/``dim``/``depth``/``heads``/``mlp_ratio``
  (vit_tiny).
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
  return _MODELS[name](num_classes, tuple(int(d) for d in input_shape), **model_kwargs)


# ----------------------------------------------------------------------------- training steps


class _FreezeBatchNormStats:
  """Within the block, train-mode BatchNorm normalizes with batch statistics but leaves its running
  statistics untouched (momentum 0: ``running = 1 * running + 0 * batch``)."""

  def __init__(self, model: nn.Module):
    self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

  def __enter__(self):
    self.saved = [bn.momentum for bn in self.bns]
    for bn in self.bns:
      bn.momentum = 0.0

  def __exit__(self, *exc):
    for bn, m in zip(self.bns, self.saved):
      bn.momentum = m


def make_train_step(
  model: nn.Module,
  algorithm: str,
  *,
  num_domains: int,
  rho: float = 0.05,
  lam: float = 0.1,
  adaptive: bool = False,
  per_domain: str = "grouped",
  base: str = "sgd",
  lr: float = 0.01,
  momentum: float = 0.9,
  weight_decay: float = 0.0,
) -> tuple[Callable[..., torch.Tensor], Any]:
  """Returns ``(step, optimizer)``; ``step(x, y, domain_ids)`` runs one full training step in place
  and returns the loss it computed at the unperturbed weights (for SAM/DISAM, the perturbation
  objective). ``algorithm``: 'erm', 'sam' (DISAM with lam=0) or
  'disam'. ``base``: 'sgd' (momentum, coupled weight decay) or 'adam'."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  if per_domain not in PER_DOMAIN_MODES:
    raise ValueError(f"per_domain must be one of {PER_DOMAIN_MODES}, got {per_domain!r}")
  if base == "sgd":
    base_cls, base_kwargs = torch.optim.SGD, dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
  elif base == "adam":
    base_cls, base_kwargs = torch.optim.Adam, dict(lr=lr, weight_decay=weight_decay)
  else:
    raise ValueError(f"base must be 'sgd' or 'adam', got {base!r}")
  model.train()

  if algorithm == "erm":
    opt = base_cls(model.parameters(), **base_kwargs)

    def erm_step(x, y, domain_ids=None):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
      return loss.detach()

    return erm_step, opt

  opt = TorchDISAM(
    model.parameters(), base_cls, rho=rho, lam=0.0 if algorithm == "sam" else lam, adaptive=adaptive, **base_kwargs
  )
  freeze_bn = _FreezeBatchNormStats(model)

  def sharpness_aware_step(x, y, domain_ids=None):
    opt.zero_grad(set_to_none=True)
    loss_p = perturbation_loss(
      model(x), y, lam=opt.lam, num_domains=num_domains, domain_ids=domain_ids, per_domain=per_domain
    )
    loss_p.backward()
    opt.first_step(zero_grad=True)
    with freeze_bn:  # BN running statistics: from the unperturbed pass only
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.second_step(zero_grad=True)
    return loss_p.detach()

  return sharpness_aware_step, opt


def time_torch_step(
  model_name: str,
  algorithm: str,
  *,
  num_domains: int,
  per_domain_batch: int,
  input_shape: Sequence[int],
  num_classes: int,
  repeats: int,
  warmup: int,
  threads: int,
  per_domain: str = "grouped",
  adaptive: bool = False,
  seed: int = 0,
  rho: float = 0.05,
  lam: float = 0.1,
  base: str = "sgd",
  lr: float = 0.01,
  model_kwargs: dict[str, Any] | None = None,
  x: np.ndarray | None = None,
  y: np.ndarray | None = None,
) -> dict[str, Any]:
  """Times whole training steps (forward + backward + optimizer) of ``model_name`` on CPU.

  The batch is ``num_domains * per_domain_batch`` examples laid out domain-major (``[M, b]``
  flattened); by default random N(0, 1) NHWC inputs and uniform labels from ``seed``, or pass
  ``x`` (float32 ``[n, H, W, C]`` or ``[M, b, H, W, C]``) and ``y`` to use the same batch as the JAX
  side. ``warmup`` untimed steps, then ``repeats`` timed ones (``time.perf_counter``).

  Returns ``{"min_ms", "median_ms", "times_ms", "torch_version", "threads", ...}`` (wall time, plus
  ``cpu_times_ms``: process CPU time per step, the configuration and ``num_params``).
  """
  if repeats < 1:
    raise ValueError("repeats must be >= 1")
  torch.set_num_threads(int(threads))
  torch.manual_seed(seed)
  n = num_domains * per_domain_batch
  shape = tuple(int(d) for d in input_shape)
  if x is None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=n)
  elif y is None:
    raise ValueError("pass y together with x")
  xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(n, *shape)
  yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).reshape(n)
  domain_ids = torch.arange(num_domains).repeat_interleave(per_domain_batch)

  model = build_model(model_name, num_classes=num_classes, input_shape=shape, **(model_kwargs or {}))
  step, _ = make_train_step(
    model,
    algorithm,
    num_domains=num_domains,
    rho=rho,
    lam=lam,
    adaptive=adaptive,
    per_domain=per_domain,
    base=base,
    lr=lr,
  )
  for _ in range(warmup):
    step(xt, yt, domain_ids)
  times, cpu_times = [], []
  for _ in range(repeats):
    c0 = time.process_time()
    t0 = time.perf_counter()
    loss = step(xt, yt, domain_ids)
    times.append((time.perf_counter() - t0) * 1e3)
    cpu_times.append((time.process_time() - c0) * 1e3)
  if not math.isfinite(float(loss)):
    raise FloatingPointError(f"non-finite loss {float(loss)} while timing {model_name}/{algorithm}")
  return {
    "min_ms": min(times),
    "median_ms": statistics.median(times),
    "times_ms": times,
    # CPU time of the whole process (all threads) per step: less sensitive than wall time to other
    # processes on a shared machine; with threads=1 it is close to the compute time of the step.
    "cpu_times_ms": cpu_times,
    "torch_version": torch.__version__,
    "threads": torch.get_num_threads(),
    "model": model_name,
    "algorithm": algorithm,
    "per_domain": per_domain if algorithm == "disam" else None,
    "adaptive": adaptive,
    "num_domains": num_domains,
    "per_domain_batch": per_domain_batch,
    "input_shape": list(shape),
    "num_classes": num_classes,
    "num_params": sum(p.numel() for p in model.parameters()),
  }


# ----------------------------------------------------------------------------- CLI table

_DEFAULT_SHAPES = {"mlp": (28, 28, 1), "mnist_cnn": (28, 28, 1), "resnet18": (32, 32, 3), "vit_tiny": (32, 32, 3)}


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(_DEFAULT_SHAPES), choices=list(_DEFAULT_SHAPES))
  ap.add_argument("--num-domains", type=int, default=4)
  ap.add_argument("--per-domain-batch", type=int, default=32)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant per round")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant per round")
  ap.add_argument(
    "--rounds",
    type=int,
    default=3,
    help="the four variants are timed round-robin this many times, so that load from other "
    "processes on a shared machine hits them alike; min and median are over all rounds",
  )
  ap.add_argument(
    "--clock",
    choices=("wall", "cpu"),
    default="wall",
    help="wall: time.perf_counter (the benchmark's measure); cpu: process CPU time, steadier "
    "when other processes load the machine (best with --threads 1)",
  )
  args = ap.parse_args(argv)
  key = "times_ms" if args.clock == "wall" else "cpu_times_ms"

  variants = [
    ("ERM", "erm", "grouped"),
    ("SAM", "sam", "grouped"),
    ("DISAM grouped", "disam", "grouped"),
    ("DISAM per_sample", "disam", "per_sample"),
  ]
  print(
    f"torch {torch.__version__}, threads={args.threads}, M={args.num_domains} domains x "
    f"{args.per_domain_batch} per domain, {args.num_classes} classes, SGD(momentum 0.9), "
    f"rho 0.05, lam 0.1; {args.clock} ms per step: min (median) over {args.rounds} rounds x {args.repeats} steps, "
    f"{args.warmup} warm-up per round; ratios of minima"
  )
  header = (
    f"{'model':<10} {'input':<9} {'ERM':>18} {'SAM':>18} {'DISAM grouped':>18} "
    f"{'DISAM per_sample':>18} {'grp/ERM':>8} {'grp/SAM':>8} {'ps/ERM':>8} {'ps/SAM':>8}"
  )
  print(header)
  print("-" * len(header))
  for name in args.models:
    shape = _DEFAULT_SHAPES[name]
    times: dict[str, list[float]] = {label: [] for label, *_ in variants}
    for _ in range(args.rounds):
      for label, algo, mode in variants:
        times[label] += time_torch_step(
          name,
          algo,
          num_domains=args.num_domains,
          per_domain_batch=args.per_domain_batch,
          input_shape=shape,
          num_classes=args.num_classes,
          repeats=args.repeats,
          warmup=args.warmup,
          threads=args.threads,
          per_domain=mode,
        )[key]
    best = {k: min(v) for k, v in times.items()}
    cells = " ".join(f"{best[k]:8.1f} ({statistics.median(times[k]):7.1f})" for k, *_ in variants)
    g, p = best["DISAM grouped"], best["DISAM per_sample"]
    print(
      f"{name:<10} {'x'.join(map(str, shape)):<9} {cells} {g / best['ERM']:8.2f} {g / best['SAM']:8.2f} "
      f"{p / best['ERM']:8.2f} {p / best['SAM']:8.2f}   (load avg {os.getloadavg()[0]:.1f})",
      flush=True,
    )


if __name__ == "__main__":
  main()
