"""The PyTorch side: benchmarks/torch_disam.py's steps on the same model, batch and data."""

from __future__ import annotations

import numpy as np

from benchmarks.step_cost.config import LAM, LR, MOMENTUM, NUM_CLASSES, RHO


class TorchCase:
  """A PyTorch training step from benchmarks/torch_disam.py on the same model, batch and data."""

  framework = "torch"

  def __init__(self, label: str, model_name: str, shape, model_kwargs, x, y):
    import torch

    from benchmarks import torch_disam as td

    self.label = label
    algorithm = {"torch_erm": "erm", "torch_sam": "sam"}.get(label, "disam")
    per_domain = "per_sample" if label == "torch_disam_per_sample" else "grouped"
    num_domains, per_domain_batch = x.shape[:2]
    n = num_domains * per_domain_batch
    torch.manual_seed(0)
    model = td.build_model(model_name, num_classes=NUM_CLASSES, input_shape=shape, **model_kwargs)
    self.step, _ = td.make_train_step(
      model,
      algorithm,
      num_domains=num_domains,
      rho=RHO,
      lam=LAM,
      per_domain=per_domain,
      base="sgd",
      lr=LR,
      momentum=MOMENTUM,
    )
    self.x = torch.from_numpy(np.ascontiguousarray(x.reshape(n, *shape)))
    self.y = torch.from_numpy(y.reshape(n).astype(np.int64))
    self.domain_ids = torch.arange(num_domains).repeat_interleave(per_domain_batch)
    self.loss = None
    self.times: list[float] = []

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.loss = self.step(self.x, self.y, self.domain_ids)

  def final_loss(self) -> float:
    return float(self.loss)
