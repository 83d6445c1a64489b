"""The harness's ViT (``vit_tiny``) computes the same function as benchmarks/torch_disam.py's PyTorch peer.

The step-cost benchmark compares their step times, which only means something if the two are the same network.
Both are checked against a NumPy forward written here from the architecture's description (patch 4 -> Linear
over flattened (p, p, c) patches, class token + position embedding, pre-LN blocks with eps 1e-6, 3-head
softmax attention scaled by 1/sqrt(head_dim), tanh-approximate GELU MLP, final LayerNorm, class-token readout),
on the JAX model's weights; the PyTorch peer gets the same weights converted to its layout and must agree too,
forward and gradient. The PyTorch half skips when torch is not installed.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disam_jax.harness.models import apply_model, create_model, functional_model

_SHAPE = (16, 16, 3)  # 16 tokens + class token: small, the same code path as 32x32
_KW = dict(dim=24, depth=2, heads=3, patch_size=4)  # the harness derives 2 at 16 px: pinned to the peer's 4
_HAS_TORCH = importlib.util.find_spec("torch") is not None


def _jax_vit():
  model = create_model(
    "vit_tiny", num_classes=5, input_shape=_SHAPE, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **_KW
  )
  graphdef, params, state = functional_model(model)
  # Non-trivial LayerNorm affine parameters and biases (initialized to 1 and 0), so a swapped or dropped
  # scale/bias shows up.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)
  return graphdef, params, state


def _weights(params):
  """The JAX parameters as a flat dict of NumPy arrays keyed by '/'-joined paths."""
  return {
    "/".join(str(k) for k in path): np.asarray(v[...] if hasattr(v, "get_value") else v, np.float64)
    for path, v in nnx.to_flat_state(params)
  }


def _layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _numpy_vit(w, x, *, patch=_KW["patch_size"], depth=_KW["depth"], heads=_KW["heads"]):
  n, h, wd, c = x.shape
  x = x.reshape(n, h // patch, patch, wd // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, -1, patch * patch * c) @ w["backbone/patch_embed/kernel"] + w["backbone/patch_embed/bias"]
  cls = np.broadcast_to(w["backbone/cls_token"], (n, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + w["backbone/pos_embed"]
  for i in range(depth):
    b = lambda name: w[f"backbone/blocks/{i}/{name}"]
    y = _layer_norm(x, b("norm1/scale"), b("norm1/bias"))
    q, k, v = (
      np.einsum("btd,dnh->bnth", y, b(f"attention/{p}/kernel")) + b(f"attention/{p}/bias")[:, None]
      for p in ("query", "key", "value")
    )
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = a @ v  # [n, heads, t, head_dim]
    x = x + np.einsum("bnth,nhd->btd", o, b("attention/out/kernel")) + b("attention/out/bias")
    y = _layer_norm(x, b("norm2/scale"), b("norm2/bias"))
    y = _gelu_tanh(y @ b("fc1/kernel") + b("fc1/bias")) @ b("fc2/kernel") + b("fc2/bias")
    x = x + y
  x = _layer_norm(x, w["backbone/norm/scale"], w["backbone/norm/bias"])
  return x[:, 0] @ w["classifier/kernel"] + w["classifier/bias"]


def _inputs(n=3):
  return np.random.default_rng(2).standard_normal((n, *_SHAPE)).astype(np.float32)


def test_jax_vit_matches_a_numpy_forward():
  graphdef, params, state = _jax_vit()
  x = _inputs()
  logits, _ = apply_model(graphdef, params, state, jnp.asarray(x), train=True)
  expected = _numpy_vit(_weights(params), x.astype(np.float64))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def _torch_state_dict(w, depth=_KW["depth"]):
  """The JAX weights in the PyTorch peer's layout (nn.Linear weights are [out, in])."""
  import torch

  sd = {
    "patch_embed.weight": w["backbone/patch_embed/kernel"].T,
    "patch_embed.bias": w["backbone/patch_embed/bias"],
    "cls_token": w["backbone/cls_token"],
    "pos_embed": w["backbone/pos_embed"],
    "norm.weight": w["backbone/norm/scale"],
    "norm.bias": w["backbone/norm/bias"],
    "classifier.weight": w["classifier/kernel"].T,
    "classifier.bias": w["classifier/bias"],
  }
  for i in range(depth):
    b = lambda name: w[f"backbone/blocks/{i}/{name}"]
    for p in ("query", "key", "value"):
      kernel = b(f"attention/{p}/kernel")  # [dim, heads, head_dim]
      sd[f"blocks.{i}.attention.{p}.weight"] = kernel.reshape(kernel.shape[0], -1).T
      sd[f"blocks.{i}.attention.{p}.bias"] = b(f"attention/{p}/bias").reshape(-1)
    out = b("attention/out/kernel")  # [heads, head_dim, dim]
    sd[f"blocks.{i}.attention.out.weight"] = out.reshape(-1, out.shape[-1]).T
    sd[f"blocks.{i}.attention.out.bias"] = b("attention/out/bias")
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
      sd[f"blocks.{i}.{theirs}.weight"] = b(f"{ours}/scale")
      sd[f"blocks.{i}.{theirs}.bias"] = b(f"{ours}/bias")
    for fc in ("fc1", "fc2"):
      sd[f"blocks.{i}.{fc}.weight"] = b(f"{fc}/kernel").T
      sd[f"blocks.{i}.{fc}.bias"] = b(f"{fc}/bias")
  return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in sd.items()}


@pytest.mark.skipif(not _HAS_TORCH, reason="torch not installed (the 'bench' extra): the PyTorch peer is not checked")
def test_torch_peer_computes_the_same_vit():
  import torch

  root = pathlib.Path(__file__).resolve().parents[1]
  if str(root) not in sys.path:  # `benchmarks` is not an installed package; import it from the checkout
    sys.path.insert(0, str(root))
  from benchmarks import torch_disam as td

  graphdef, params, state = _jax_vit()
  w = _weights(params)
  peer = td.build_model("vit_tiny", num_classes=5, input_shape=_SHAPE, **_KW)
  assert sum(p.numel() for p in peer.parameters()) == sum(int(v.size) for v in w.values())
  peer.load_state_dict(_torch_state_dict(w), strict=True)
  x = _inputs()
  np.testing.assert_allclose(
    peer(torch.from_numpy(x)).detach().numpy(), _numpy_vit(w, x.astype(np.float64)), rtol=1e-4, atol=1e-4
  )

  # The gradient of the same loss with respect to the same weight, in both frameworks.
  labels = np.array([0, 3, 4])

  def jax_loss(p):
    logits, _ = apply_model(graphdef, p, state, jnp.asarray(x), train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

  grads = _weights(jax.grad(jax_loss)(params))
  loss = torch.nn.functional.cross_entropy(peer(torch.from_numpy(x)), torch.from_numpy(labels))
  loss.backward()
  np.testing.assert_allclose(loss.detach().item(), float(jax_loss(params)), rtol=1e-5)
  np.testing.assert_allclose(
    peer.blocks[0].fc1.weight.grad.numpy(), grads["backbone/blocks/0/fc1/kernel"].T, rtol=1e-3, atol=1e-5
  )
  np.testing.assert_allclose(
    peer.blocks[1].attention.query.weight.grad.numpy(),
    grads["backbone/blocks/1/attention/query/kernel"].reshape(_KW["dim"], -1).T,
    rtol=1e-3,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    peer.patch_embed.weight.grad.numpy(), grads["backbone/patch_embed/kernel"].T, rtol=1e-3, atol=1e-5
  )
