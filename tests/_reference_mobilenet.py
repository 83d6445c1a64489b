"""Independent NumPy (float64, NCHW, torch layouts) forward of torchvision's mobilenet_v2, for the tests.

Written from torchvision's definition (Conv2dNormActivation, InvertedResidual, inverted_residual_setting), applied
to a torchvision state dict ({key: array}); shares no code with disam_jax.harness.models.
"""

import numpy as np


def conv_nchw(x, w, stride, pad, groups=1):
  """torch.nn.functional.conv2d in NumPy float64: x [n, c, h, w], w [o, c/groups, kh, kw]."""
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  oh = (h + 2 * pad - kh) // stride + 1
  ow = (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((n, o, oh, ow))
  og = o // groups
  for i in range(kh):
    for j in range(kw):
      win = x[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
      if groups == 1:
        out += np.einsum("nchw,oc->nohw", win, w[:, :, i, j])
      elif groups == c and cg == 1 and og == 1:
        out += win * w[:, 0, i, j][None, :, None, None]
      else:
        raise NotImplementedError
  return out


def bn(x, sd, p, eps=1e-5):
  g, b, m, v = (sd[p + k].astype(np.float64) for k in ("weight", "bias", "running_mean", "running_var"))
  c = lambda a: a[None, :, None, None]
  return (x - c(m)) / np.sqrt(c(v) + eps) * c(g) + c(b)


relu6 = lambda x: np.clip(x, 0, 6)

SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def forward(sd, x_nhwc):
  """(activations NHWC after features[0], features[1], ..., features[18]; logits) of x_nhwc in [0, 1]."""
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  x = ((x_nhwc - mean) / std).transpose(0, 3, 1, 2).astype(np.float64)
  w = lambda k: sd[k].astype(np.float64)
  acts = []
  x = relu6(bn(conv_nchw(x, w("features.0.0.weight"), 2, 1), sd, "features.0.1."))
  acts.append(x)
  idx, cin = 1, 32
  for t, c, n, s in SETTING:
    for i in range(n):
      stride = s if i == 0 else 1
      p = f"features.{idx}.conv."
      y, k = x, 0
      if t != 1:
        y = relu6(bn(conv_nchw(y, w(p + "0.0.weight"), 1, 0), sd, p + "0.1."))
        k = 1
      hidden = y.shape[1]
      y = relu6(bn(conv_nchw(y, w(p + f"{k}.0.weight"), stride, 1, groups=hidden), sd, p + f"{k}.1."))
      y = bn(conv_nchw(y, w(p + f"{k + 1}.weight"), 1, 0), sd, p + f"{k + 2}.")
      x = x + y if (stride == 1 and cin == c) else y
      cin = c
      acts.append(x)
      idx += 1
  x = relu6(bn(conv_nchw(x, w("features.18.0.weight"), 1, 0), sd, "features.18.1."))
  acts.append(x)
  feats = x.mean(axis=(2, 3))
  logits = feats @ w("classifier.1.weight").T + w("classifier.1.bias")
  return [a.transpose(0, 2, 3, 1) for a in acts], logits


def state_dict_shapes(num_classes=1000):
  """(key, shape) of torchvision.models.mobilenet_v2(num_classes=...).state_dict(), in order."""
  out = []

  def conv_bn(prefix, cin, cout, k, groups=1):
    out.append((prefix + "0.weight", (cout, cin // groups, k, k)))
    bn_(prefix + "1.", cout)

  def bn_(prefix, c):
    out.extend(
      [
        (prefix + "weight", (c,)),
        (prefix + "bias", (c,)),
        (prefix + "running_mean", (c,)),
        (prefix + "running_var", (c,)),
        (prefix + "num_batches_tracked", ()),
      ]
    )

  conv_bn("features.0.", 3, 32, 3)
  idx, cin = 1, 32
  for t, c, n, _s in SETTING:
    for _i in range(n):
      p, k, hidden = f"features.{idx}.conv.", 0, cin * t
      if t != 1:
        conv_bn(p + "0.", cin, hidden, 1)
        k = 1
      conv_bn(p + f"{k}.", hidden, hidden, 3, groups=hidden)
      out.append((p + f"{k + 1}.weight", (c, hidden, 1, 1)))
      bn_(p + f"{k + 2}.", c)
      idx, cin = idx + 1, c
  conv_bn("features.18.", cin, 1280, 1)
  out += [("classifier.1.weight", (num_classes, 1280)), ("classifier.1.bias", (num_classes,))]
  return out


def random_state_dict(seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in state_dict_shapes(num_classes):
    if key.endswith("num_batches_tracked"):
      sd[key] = np.asarray(0, np.int64)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      sd[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif key.endswith(".weight") and len(shape) == 1:
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      sd[key] = (rng.normal(size=shape) * 0.1).astype(np.float32)
  return sd
