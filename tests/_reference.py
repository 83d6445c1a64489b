"""Independent NumPy (float64) reference of the DISAM step, written from the paper, for the tests.

Model: linear softmax regression, logits = x @ W + b, per-domain loss = mean cross-entropy of the domain's
examples. Gradients are derived by hand (dL/dlogits = softmax - onehot), not by JAX.
"""

import numpy as np


def softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def domain_losses_and_grads(params, x, y, num_classes):
  """x [M, b, d], y [M, b] -> (losses [M], per-domain grads: list of dicts)."""
  w, b = params["w"], params["b"]
  losses, grads = [], []
  for xi, yi in zip(x, y):
    p = softmax(xi @ w + b)
    onehot = np.eye(num_classes)[yi]
    losses.append(-np.mean(np.log(p[np.arange(len(yi)), yi])))
    d = (p - onehot) / len(yi)
    grads.append({"w": xi.T @ d, "b": d.sum(axis=0)})
  return np.array(losses), grads


def combine(grads, coeffs):
  return {k: sum(c * g[k] for c, g in zip(coeffs, grads)) for k in grads[0]}


def disam_gradient(params, x, y, num_classes, rho, lam, adaptive=False):
  """The sharpness-aware gradient g = grad L(w + eps) of one DISAM step (Eq. 6-8), uniform weights."""
  losses, grads = domain_losses_and_grads(params, x, y, num_classes)
  m = len(losses)
  # g_p = grad[mean_i L_i - lam * (1/M) sum_i (L_i - mean)^2], expanded by the chain rule by hand.
  coeffs = [1.0 / m - lam * (2.0 / m) * (li - losses.mean()) for li in losses]
  g_p = combine(grads, coeffs)
  if adaptive:
    norm = np.sqrt(sum(np.sum((np.abs(params[k]) * g_p[k]) ** 2) for k in params))
    eps = {k: rho * params[k] ** 2 * g_p[k] / (norm + 1e-12) for k in params}
  else:
    norm = np.sqrt(sum(np.sum(g_p[k] ** 2) for k in params))
    eps = {k: rho * g_p[k] / (norm + 1e-12) for k in params}
  perturbed = {k: params[k] + eps[k] for k in params}
  _, pgrads = domain_losses_and_grads(perturbed, x, y, num_classes)
  return combine(pgrads, [1.0 / m] * m), g_p


class SGDMomentumWithDecay:
  """optax.chain(add_decayed_weights(wd), sgd(lr, momentum)) by hand."""

  def __init__(self, lr, momentum, wd):
    self.lr, self.momentum, self.wd, self.trace = lr, momentum, wd, None

  def step(self, params, grad):
    g = {k: grad[k] + self.wd * params[k] for k in params}
    if self.trace is None:
      self.trace = {k: np.zeros_like(v) for k, v in params.items()}
    self.trace = {k: g[k] + self.momentum * self.trace[k] for k in params}
    return {k: params[k] - self.lr * self.trace[k] for k in params}


class Adam:
  """optax.adam(lr) by hand (b1 0.9, b2 0.999, eps 1e-8, bias-corrected)."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.b1, self.b2, self.eps, self.t, self.mu, self.nu = lr, b1, b2, eps, 0, None, None

  def step(self, params, grad):
    if self.mu is None:
      self.mu = {k: np.zeros_like(v) for k, v in params.items()}
      self.nu = {k: np.zeros_like(v) for k, v in params.items()}
    self.t += 1
    self.mu = {k: self.b1 * self.mu[k] + (1 - self.b1) * grad[k] for k in params}
    self.nu = {k: self.b2 * self.nu[k] + (1 - self.b2) * grad[k] ** 2 for k in params}
    out = {}
    for k in params:
      mhat = self.mu[k] / (1 - self.b1**self.t)
      vhat = self.nu[k] / (1 - self.b2**self.t)
      out[k] = params[k] - self.lr * mhat / (np.sqrt(vhat) + self.eps)
    return out
