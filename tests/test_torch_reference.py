"""The PyTorch DISAM of benchmarks/torch_disam.py, checked without JAX.

* It reproduces the reference trajectories of tests/data/disam_reference_v1.json (tanh MLP, 3 domains x 8,
  SGD momentum 0.9 + coupled weight decay) after 1 and 10 steps, with both per-domain loss layouts.
* The grouped and per-sample per-domain computations give the same variance on an equal-count batch.
* lam = 0 is one SAM step computed here by hand.
* BatchNorm running statistics come from the unperturbed pass only; every model builds and steps.

Skipped where torch is not installed.
"""

import copy
import json
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `benchmarks` is not an installed package; import it from the checkout
  sys.path.insert(0, str(_ROOT))
from benchmarks import torch_disam as td  # noqa: E402

REFERENCE = pathlib.Path(__file__).parent / "data" / "disam_reference_v1.json"
TOL = 2e-5


@pytest.fixture(scope="module")
def reference():
  return json.loads(REFERENCE.read_text())


class TanhMLP(nn.Module):
  """logits = tanh(x @ w1.T + b1) @ w2.T + b2, parameters named as in the reference file."""

  def __init__(self, p):
    super().__init__()
    for k, v in p.items():
      setattr(self, k, nn.Parameter(torch.tensor(v, dtype=torch.float32)))

  def forward(self, x):
    return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def _batch(ref):
  x = torch.tensor(ref["x"], dtype=torch.float32)  # [M, b, d]
  y = torch.tensor(ref["y"], dtype=torch.int64)  # [M, b]
  m, b = y.shape
  return x.reshape(m * b, -1), y.reshape(-1), torch.arange(m).repeat_interleave(b), m


def _run_steps(model, opt, x, y, domain_ids, m, per_domain, steps):
  for _ in range(steps):
    opt.zero_grad()
    td.perturbation_loss(
      model(x), y, lam=opt.lam, num_domains=m, domain_ids=domain_ids, per_domain=per_domain
    ).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("per_domain", td.PER_DOMAIN_MODES)
@pytest.mark.parametrize("case_index", range(6))
def test_reference_trajectories(reference, case_index, per_domain):
  case = reference["cases"][case_index]
  base = case["base"]
  assert base["kind"] == "sgd" and not base["nesterov"]
  x, y, domain_ids, m = _batch(reference)
  model = TanhMLP(reference["params_init"])
  opt = td.TorchDISAM(
    model.parameters(),
    torch.optim.SGD,
    rho=case["rho"],
    lam=case["lam"],
    adaptive=case["adaptive"],
    lr=base["learning_rate"],
    momentum=base["momentum"],
    weight_decay=base["weight_decay_coupled"],
  )
  for steps_done, key in ((1, "params_after_1_step"), (10, "params_after_10_steps")):
    _run_steps(model, opt, x, y, domain_ids, m, per_domain, 1 if steps_done == 1 else 9)
    for name, expected in case[key].items():
      got = getattr(model, name).detach().numpy()
      np.testing.assert_allclose(
        got, np.asarray(expected, np.float32), rtol=0, atol=TOL, err_msg=f"case {case_index} {key} {name}"
      )


def test_the_reference_is_not_trivial(reference):
  """Guard: DISAM's trajectories move away from SAM's and from the initial point (else the test proves little)."""
  cases = reference["cases"]
  sam, disam = cases[0]["params_after_10_steps"], cases[2]["params_after_10_steps"]
  assert cases[0]["lam"] == 0 and cases[2]["lam"] > 0
  gap = max(np.max(np.abs(np.subtract(sam[k], disam[k]))) for k in sam)
  assert gap > 10 * TOL


def test_grouped_and_per_sample_variance_agree_on_equal_counts():
  torch.manual_seed(0)
  m, b, c = 4, 6, 5
  logits = torch.randn(m * b, c, dtype=torch.float64, requires_grad=True)
  y = torch.randint(0, c, (m * b,))
  domain_ids = torch.arange(m).repeat_interleave(b)
  # What the authors' set() over a tensor produces: one entry per sample (hash by identity).
  assert len(set(domain_ids)) == m * b

  grouped = td.domain_losses_grouped(F.cross_entropy(logits, y, reduction="none"), m)
  per_sample = td.domain_losses_per_sample(logits, y, domain_ids)
  assert grouped.shape == (m,) and per_sample.shape == (m * b,)
  expected = torch.stack([F.cross_entropy(logits[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(m)])
  torch.testing.assert_close(grouped, expected)
  torch.testing.assert_close(per_sample, expected.repeat_interleave(b))
  var_g, var_s = grouped.var(unbiased=False), per_sample.var(unbiased=False)
  torch.testing.assert_close(var_g, var_s)
  assert var_g > 0

  # Same perturbation objective, same gradient.
  grads = []
  for mode in td.PER_DOMAIN_MODES:
    loss = td.perturbation_loss(logits, y, lam=0.5, num_domains=m, domain_ids=domain_ids, per_domain=mode)
    grads.append(torch.autograd.grad(loss, logits)[0])
  torch.testing.assert_close(grads[0], grads[1])


def test_per_sample_variance_is_count_weighted_on_unequal_counts():
  torch.manual_seed(1)
  counts = [2, 5, 9]
  domain_ids = torch.cat([torch.full((k,), i) for i, k in enumerate(counts)])
  logits = torch.randn(len(domain_ids), 3, dtype=torch.float64)
  y = torch.randint(0, 3, (len(domain_ids),))
  losses = torch.stack([F.cross_entropy(logits[domain_ids == i], y[domain_ids == i]) for i in range(3)])
  w = torch.tensor(counts, dtype=torch.float64) / sum(counts)
  weighted = (w * (losses - (w * losses).sum()) ** 2).sum()
  got = td.domain_losses_per_sample(logits, y, domain_ids).var(unbiased=False)
  torch.testing.assert_close(got, weighted)
  assert not torch.allclose(got, losses.var(unbiased=False))  # differs from the uniform variance


@pytest.mark.parametrize("adaptive", [False, True])
def test_lam_zero_is_a_hand_computed_sam_step(reference, adaptive):
  x, y, domain_ids, m = _batch(reference)
  rho, lr, mom, wd = 0.05, 0.1, 0.9, 1e-3
  model = TanhMLP(reference["params_init"])
  names = [n for n, _ in model.named_parameters()]
  w0 = [p.detach().clone() for p in model.parameters()]

  # By hand: g = grad CE(w); eps = rho g/||g|| (adaptive: rho w^2 g/|| |w| g ||); g2 = grad CE(w + eps);
  # first SGD-momentum step: buf = g2 + wd w; w - lr buf.
  def ce_at(ws):
    m_ = TanhMLP({n: v.tolist() for n, v in zip(names, ws)})
    return F.cross_entropy(m_(x), y), list(m_.parameters())

  loss, ps = ce_at(w0)
  g = torch.autograd.grad(loss, ps)
  if adaptive:
    norm = torch.sqrt(sum(((w.abs() * gi) ** 2).sum() for w, gi in zip(w0, g)))
    eps = [rho * w**2 * gi / (norm + 1e-12) for w, gi in zip(w0, g)]
  else:
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    eps = [rho * gi / (norm + 1e-12) for gi in g]
  loss2, ps2 = ce_at([w + e for w, e in zip(w0, eps)])
  g2 = torch.autograd.grad(loss2, ps2)
  expected = [w - lr * (gi + wd * w) for w, gi in zip(w0, g2)]

  opt = td.TorchDISAM(
    model.parameters(), torch.optim.SGD, rho=rho, lam=0.0, adaptive=adaptive, lr=lr, momentum=mom, weight_decay=wd
  )
  for mode in td.PER_DOMAIN_MODES:  # with lam = 0 the layout is irrelevant; run one step only once
    assert td.perturbation_loss(
      model(x), y, lam=0.0, num_domains=m, domain_ids=domain_ids, per_domain=mode
    ).item() == pytest.approx(loss.item(), abs=1e-7)
  _run_steps(model, opt, x, y, domain_ids, m, "grouped", 1)
  for name, p, e in zip(names, model.parameters(), expected):
    torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6, msg=f"{name}")
  # ... and it differs from an ERM step with the same base optimizer (the perturbation matters).
  erm = [w - lr * (gi + wd * w) for w, gi in zip(w0, g)]
  assert max((p.detach() - e).abs().max().item() for p, e in zip(model.parameters(), erm)) > 1e-5


def test_disam_positive_lam_changes_the_perturbation_not_the_descent_loss(reference):
  """With lam > 0, eps differs from SAM's; eps removed, the weights are back exactly at w before the base step."""
  x, y, domain_ids, m = _batch(reference)
  eps_by_lam = {}
  for lam in (0.0, 0.7):
    model = TanhMLP(reference["params_init"])
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = td.TorchDISAM(model.parameters(), torch.optim.SGD, rho=0.05, lam=lam, lr=0.0)
    td.perturbation_loss(model(x), y, lam=lam, num_domains=m).backward()
    opt.first_step(zero_grad=True)
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    total = torch.sqrt(sum((e**2).sum() for e in eps))
    assert total.item() == pytest.approx(0.05, rel=1e-4)  # ||eps|| = rho
    eps_by_lam[lam] = eps
    F.cross_entropy(model(x), y).backward()
    opt.second_step()  # lr 0: only removes eps
    for p, w in zip(model.parameters(), w0):
      torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-7)
  diff = max((a - b).abs().max().item() for a, b in zip(eps_by_lam[0.0], eps_by_lam[0.7]))
  assert diff > 1e-5


def test_batchnorm_statistics_from_the_unperturbed_pass_only():
  torch.manual_seed(0)
  model = td.build_model("resnet18", num_classes=3, input_shape=(8, 8, 3), width=8)
  x = torch.randn(8, 8, 8, 3)
  y = torch.randint(0, 3, (8,))
  reference_model = copy.deepcopy(model).train()
  with torch.no_grad():
    reference_model(x)  # one train-mode pass at w: the expected running statistics
  step, _ = td.make_train_step(model, "disam", num_domains=2, rho=0.5, lam=0.1)
  step(x, y, torch.arange(2).repeat_interleave(4))
  bns = [(n, b) for n, b in model.named_modules() if isinstance(b, nn.BatchNorm2d)]
  ref_bns = dict((n, b) for n, b in reference_model.named_modules() if isinstance(b, nn.BatchNorm2d))
  assert bns
  for name, bn in bns:
    torch.testing.assert_close(bn.running_mean, ref_bns[name].running_mean, msg=name)
    torch.testing.assert_close(bn.running_var, ref_bns[name].running_var, msg=name)
    assert bn.momentum == 0.1  # restored after the perturbed pass


@pytest.mark.parametrize(
  "model_name,shape",
  [("mlp", (28, 28, 1)), ("mnist_cnn", (28, 28, 1)), ("resnet18", (32, 32, 3)), ("vit_tiny", (32, 32, 3))],
)
def test_models_build_and_time_every_algorithm(model_name, shape):
  for algorithm, per_domain in (("erm", "grouped"), ("sam", "grouped"), ("disam", "grouped"), ("disam", "per_sample")):
    out = td.time_torch_step(
      model_name,
      algorithm,
      num_domains=2,
      per_domain_batch=2,
      input_shape=shape,
      num_classes=7,
      repeats=1,
      warmup=0,
      threads=1,
      per_domain=per_domain,
      adaptive=algorithm == "disam",
    )
    assert set(out) >= {"min_ms", "median_ms", "times_ms", "torch_version", "threads"}
    assert len(out["times_ms"]) == 1 and out["min_ms"] > 0 and out["threads"] == 1
    assert len(out["cpu_times_ms"]) == 1 and out["cpu_times_ms"][0] >= 0
  model = td.build_model(model_name, num_classes=7, input_shape=shape)
  assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_time_torch_step_accepts_a_given_batch_and_adam():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 28, 28, 1), dtype=np.float32)  # [M, b, H, W, C]
  y = rng.integers(0, 10, size=(2, 3))
  out = td.time_torch_step(
    "mlp",
    "disam",
    num_domains=2,
    per_domain_batch=3,
    input_shape=(28, 28, 1),
    num_classes=10,
    repeats=2,
    warmup=1,
    threads=1,
    x=x,
    y=y,
    base="adam",
    lr=1e-3,
  )
  assert len(out["times_ms"]) == 2
  with pytest.raises(ValueError):
    td.time_torch_step(
      "mlp",
      "gsam",
      num_domains=2,
      per_domain_batch=3,
      input_shape=(28, 28, 1),
      num_classes=10,
      repeats=1,
      warmup=0,
      threads=1,
    )


def test_vit_depth_matches_disam_jax_default():
  vit = td.build_model("vit_tiny", num_classes=10, input_shape=(32, 32, 3))
  assert len(vit.blocks) == 6
  assert len(td.build_model("vit_tiny", num_classes=10, input_shape=(32, 32, 3), depth=4).blocks) == 4
