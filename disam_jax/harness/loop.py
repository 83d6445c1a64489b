"""One (algorithm, held-out domain, seed) run: `run_cell`, the loop that keeps the device busy.

Owns the training loop and its host side: the jitted steps shared by an experiment's runs (`_compile`), the batch
prefetcher, the evaluator (training-domain validation and held-out accuracy), the metrics.jsonl line of a step, the
checkpoints (the latest and the best) and exact resume of one run, model selection (`select_best`) and the run's
`CellResult`. The experiment around it (data, every combination, the run directory) is `experiment.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from disam_jax.harness import algorithms as algorithms_lib
from disam_jax.harness import data as data_lib
from disam_jax.harness import distributed, fast_conv, feeds
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.steps import (
  TrainState,
  _all_finite_jit,
  init_train_state,
  make_eval_counts,
  make_eval_step,
  make_train_step,
)

__all__ = ["CellResult", "TrainingDiverged", "run_cell", "select_best"]


# Notices of a resumed run (a checkpoint skipped, metrics lines lost), under the name `disam-train` prints them from.
_log = logging.getLogger("disam_jax.harness.train")


class TrainingDiverged(RuntimeError):
  """Training produced a non-finite loss or parameters. The message names the step and the domain losses."""


@dataclasses.dataclass
class CellResult:
  """The outcome of one run.

  Attributes:
    algorithm, held_out, seed: which run.
    steps: steps trained.
    selected: the evaluation with the best mean training-domain validation accuracy (earliest on ties):
      ``{"step", "val_acc", "test_acc"}``.
    last: the evaluation at the last step, same keys.
    evals: every evaluation: ``{"step", "val_acc": {domain: acc}, "val_acc_mean", "test_acc", "test_accs"}``
      (`test_acc`: the first held-out part; `test_accs`: every held-out part by name, e.g. a held-out domain's
      80% and 20%: `experiment.held_out_parts`).
    seconds: wall time of the training (this session's part, when resumed).
    directory: the run's directory.
    sample: the hyperparameter draw of a search (0: the defaults; set by `experiment.run_experiment`).
    val_domain: the second held-out domain of a leave-one-domain-out validation run (None: one held-out domain).
    hparams: the searched hyperparameters' values of this draw (None when not recorded).
  """

  algorithm: str
  held_out: str
  seed: int
  steps: int
  selected: dict[str, Any]
  last: dict[str, Any]
  evals: list[dict[str, Any]]
  seconds: float
  directory: str
  sample: int = 0
  val_domain: str | None = None
  hparams: dict[str, Any] | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _summary(record: dict[str, Any]) -> dict[str, Any]:
  return {"step": record["step"], "val_acc": record["val_acc_mean"], "test_acc": record["test_acc"]}


def select_best(evals: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Training-domain validation: the evaluation with the highest mean validation accuracy, earliest on ties."""
  if not evals:
    raise ValueError("No evaluation to select from.")
  best = evals[0]
  for record in evals[1:]:
    if record["val_acc_mean"] > best["val_acc_mean"]:
      best = record
  return best


def _float(x) -> float:
  return float(np.asarray(x))


def _mechanism(metrics: dict[str, Any], train_domains: Sequence[str]) -> dict[str, Any]:
  """The metrics line's `perturbation_weights` {domain: c_i} and `sam_cosine` (None when not computed)."""
  out = {}
  if "perturbation_weights" in metrics:
    out["perturbation_weights"] = dict(zip(train_domains, (float(v) for v in metrics["perturbation_weights"])))
  if "sam_cosine" in metrics:
    cosine = _float(metrics["sam_cosine"])
    out["sam_cosine"] = cosine if math.isfinite(cosine) else None
  return out


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops the lines of steps after `last_step` (written after the checkpoint a resumed run restarts from).

  A line cut by a kill ends the file; everything after it is from the lost part too. Lines lost before
  `last_step` (a truncated or overwritten file) are said on the log: those steps will have no metrics line.
  """
  if not os.path.exists(path):
    _log.warning(f"{path} is missing: steps 0-{last_step} of this run will have no metrics line")
    return
  with open(path, errors="replace") as f:
    lines = [line for line in f if line.strip()]
  kept, last = [], -1
  for line in lines:
    try:
      step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
      break
    if step > last_step:
      break
    kept.append(line)
    last = step
  if last < last_step:
    _log.warning(
      f"{path} is unreadable after step {last} (line {len(kept) + 1}), before the checkpoint of step "
      f"{last_step}: steps {last + 1}-{last_step} of this run will have no metrics line"
    )
  with open(path, "w") as f:
    f.writelines(kept)


class _LoopStep:
  """A training step as the loop calls it: `run(leaves, batch) -> (leaves, packed metrics)`.

  The same step as `make_train_step`'s, jitted over the flat leaves of the `TrainState` (the host flattens and
  unflattens nothing per step: the model's `nnx.Variable` nodes cost a Python call each, every step, as a pytree
  argument) and with its metrics concatenated into one float32 vector (one device-to-host read per step instead of
  one per metric). `unpack(vector)` gives the metrics dict back, as numpy arrays of their shapes; the layout is
  recorded when the step is traced. Built per state structure (`for_tree`) and cached with the jitted step.
  """

  def __init__(self, train_step: Callable):
    self._train_step = train_step
    # treedef -> (the jitted step, its metrics' (name, shape) in packing order, filled in when it is traced)
    self._runs: dict[Any, tuple[Callable, list[tuple[str, tuple[int, ...]]]]] = {}

  def for_tree(self, treedef: Any) -> Callable:
    if treedef not in self._runs:
      layout: list[tuple[str, tuple[int, ...]]] = []

      def run(leaves, batch):
        state, metrics = self._train_step(jax.tree.unflatten(treedef, leaves), batch)
        names = sorted(metrics)
        layout[:] = [(name, tuple(metrics[name].shape)) for name in names]  # at trace time: static shapes
        packed = jnp.concatenate([jnp.ravel(metrics[name]).astype(jnp.float32) for name in names])
        return jax.tree.leaves(state), packed

      self._runs[treedef] = (jax.jit(run, donate_argnums=0, compiler_options=fast_conv.compiler_options()), layout)
    return self._runs[treedef][0]

  def unpack(self, treedef: Any, packed: Any) -> dict[str, np.ndarray]:
    values, out, start = np.asarray(packed), {}, 0
    for name, shape in self._runs[treedef][1]:
      size = math.prod(shape)
      out[name] = values[start : start + size].reshape(shape)
      start += size
    return out


@dataclasses.dataclass
class _Compiled:
  """Jitted functions shared by every run of an experiment with the same model and algorithm.

  `train_steps[alg](state, batch) -> (state, metrics)` is the pure step, jitted; the loop runs `loop_steps[alg]`,
  the same step over flat leaves with packed metrics (`_LoopStep`), compiled on its own when first called.
  """

  graphdef: Any
  txs: dict[str, Any]
  train_steps: dict[str, Callable]
  eval_step: Callable
  penalties: dict[str, Any] | None = None  # algorithm -> its training-loss penalty (None: none)
  loop_steps: dict[str, _LoopStep] | None = None


# Jitted steps by (graphdef, algorithm, hparams, num_domains): repeated experiments in one process (a notebook, the
# tests, resuming) reuse the compiled code. The model state's structure follows from the graphdef; its values only
# seed `tx.init`'s aux slot, which `init_train_state` overwrites.
_STEP_CACHE: dict[tuple, tuple[Any, Callable, Any, _LoopStep]] = {}


_EVAL_CACHE: dict[Any, Callable] = {}


def _compile(
  config: ExperimentConfig, graphdef: Any, model_state: Any, num_domains: int, trainable_mask: Any = None
) -> _Compiled:
  txs, steps, penalties, loop_steps = {}, {}, {}, {}
  hparams = config.hparams.for_run(config.steps)  # anneal steps left at None: DomainBed's fraction of the run
  for name in config.algorithms:
    key = (graphdef, name, hparams, num_domains, config.train_only)  # the mask follows from graphdef and train_only
    if key not in _STEP_CACHE:
      if len(_STEP_CACHE) >= 32:
        _STEP_CACHE.clear()
      tx = algorithms_lib.make_optimizer(
        name, hparams, num_domains=num_domains, aux_example=model_state, trainable_mask=trainable_mask
      )
      penalty = algorithms_lib.make_penalty(name, hparams)
      step = make_train_step(graphdef, tx, penalty)
      _STEP_CACHE[key] = (
        tx,
        jax.jit(step, donate_argnums=0, compiler_options=fast_conv.compiler_options()),
        penalty,
        _LoopStep(step),
      )
    txs[name], steps[name], penalties[name], loop_steps[name] = _STEP_CACHE[key]
  if graphdef not in _EVAL_CACHE:
    if len(_EVAL_CACHE) >= 32:
      _EVAL_CACHE.clear()
    _EVAL_CACHE[graphdef] = jax.jit(make_eval_step(graphdef), compiler_options=fast_conv.compiler_options())
  return _Compiled(graphdef, txs, steps, _EVAL_CACHE[graphdef], penalties, loop_steps)


def run_cell(
  config: ExperimentConfig,
  algorithm: str,
  split: data_lib.DomainSplit,
  seed: int,
  init: tuple[Any, Any],
  compiled: _Compiled,
  directory: str,
  *,
  resume: bool = False,
  on_step: Callable[[int, dict[str, Any]], None] | None = None,
  mesh: Any | None = None,
) -> CellResult:
  """Trains `algorithm` on `split` for `config.steps` steps, evaluating and checkpointing every `eval_every`.

  Writes `directory/metrics.jsonl` (one line per step: loss, per-domain losses, variance, perturbation and gradient
  norms, wall time; at evaluation steps also the validation and held-out accuracies), `directory/checkpoints/`
  (the latest and the best checkpoint) and `directory/result.json`.

  The device never waits on the host between evaluations: the step donates the training state, the next batch is
  gathered while the current step runs, and each step's metrics are read one step later (evaluation steps are read
  at once), as one vector with the state passed as its flat leaves (`_LoopStep`). Divergence is still reported at
  the step it happened, before any checkpoint of a later step.

  Args:
    config: the experiment configuration (steps, eval_every, hparams, eval_batch_size are used).
    algorithm: the algorithm name (a key of `compiled.train_steps`).
    split: the data split (one held-out domain).
    seed: seeds the batch stream.
    init: `(params, model_state)` to start from.
    compiled: jitted steps from `_compile`.
    directory: this run's directory.
    resume: continue from the latest checkpoint in `directory` if there is one (otherwise start fresh). The
      resumed run ends with exactly the parameters of an uninterrupted one.
    on_step: called after every step with `(step, metrics)` (host floats); an exception raised there stops
      training (the checkpoints written so far remain).
    mesh: a `distributed.data_mesh()` to train data-parallel over every device of every process: the batch is
      sharded along the per-domain batch axis (each process gathers only its slice), the state is replicated,
      and only process 0 writes metrics and results (every process takes part in checkpointing). The step equals
      the one-device step on the whole batch.

  Raises:
    TrainingDiverged: a non-finite loss, per-domain loss or gradient, or non-finite parameters at an evaluation.
  """
  from disam_jax.harness.checkpoint import CheckpointStore, write_json

  os.makedirs(directory, exist_ok=True)
  held_out = split.test_domains[0]
  sampler, _, draw = _batch_source(config, split, seed, mesh)
  make_state = lambda params, model_state: init_train_state(
    params, model_state, compiled.txs[algorithm], (compiled.penalties or {}).get(algorithm)
  )
  # On a mesh, the state is created in its target shardings (`init` is placed already: `init_model`'s `mesh`) and a
  # checkpoint is restored into them: nothing is whole on one device, nothing goes through the host.
  state = make_state(*init) if mesh is None else distributed.init_sharded(make_state, mesh, *init)
  main_process = distributed.is_main_process()
  eval_feed = _eval_feed(config, split, mesh)
  evaluate = _evaluator(config, algorithm, eval_feed, held_out, seed, compiled, mesh)
  store = CheckpointStore(os.path.join(directory, "checkpoints"))
  metrics_path = os.path.join(directory, "metrics.jsonl")
  start = time.perf_counter()
  try:
    latest, state, evals, log = _open_run(store, state, sampler, metrics_path, resume=resume, main_process=main_process)
    # The step donates its state: train on a copy, never on the caller's `init` (shared by the cell's algorithms;
    # jit forwards leaves it does not change, so init_sharded's output may hold them).
    state = jax.tree.map(jnp.copy, state)
    batches = _Prefetcher(sampler, draw)
    with log:
      host = _HostSide(
        log,
        store,
        batches,
        evaluate,
        evals,
        list(split.train_domains),
        held_out,
        start,
        f"{algorithm}, held-out {held_out}, seed {seed}",
        on_step,
      )
      if latest is None:  # step 0: the initialization, as DomainBed's first evaluation
        host.checkpoint(evaluate(state, 0), state, 0, {})
      _train_steps(compiled.loop_steps[algorithm], state, batches, config, host)
  finally:
    store.close()
    _close_feeds(sampler, eval_feed)

  result = CellResult(
    algorithm=algorithm,
    held_out=held_out,
    seed=seed,
    steps=config.steps,
    selected=_summary(select_best(evals)),
    last=_summary(evals[-1]),
    evals=evals,
    seconds=round(time.perf_counter() - start, 3),
    directory=directory,
  )
  if main_process:
    write_json(os.path.join(directory, "result.json"), result.to_json())
  return result


def _batch_source(config: ExperimentConfig, split: data_lib.DomainSplit, seed: int, mesh: Any | None):
  """`(sampler, place, draw)`: the run's training feed (`feeds.TrainFeed`: in memory, or streamed through grain for
  a split of record indices; with `--batching merged` the merged stream, `_merged_batch_source`), `place(state)`
  on the devices, and `draw()` of the next batch on the devices (under a mesh: this process reads only its slice of
  the global batch, assembled by `distributed.global_batch`)."""
  if config.hparams.batching == "merged":
    return _merged_batch_source(config, split, seed, mesh)
  if split.records is not None:
    from disam_jax.harness import streaming

    sampler = streaming.StreamedTrainFeed(
      split.records,
      split.train,
      config.hparams.batch_size,
      seed,
      augment=config.augment,
      workers=_data_workers(config),
      domain_names=split.train_domains,
    )
  else:
    sampler = data_lib.DomainBatchSampler(
      split.train, config.hparams.batch_size, seed, domain_names=split.train_domains
    )
  if mesh is not None:
    local = distributed.local_batch_slice(config.hparams.batch_size, mesh)
    place = lambda state: distributed.place_state(state, mesh)  # replicated, or FSDP with an fsdp axis
    draw = lambda: distributed.global_batch(mesh, sampler.next(local), config.hparams.batch_size)
  else:
    place = lambda state: state
    draw = sampler.next  # numpy: the jitted step's own dispatch puts it on the device (a Python device_put costs more)
  return sampler, place, draw


def _merged_batch_source(config: ExperimentConfig, split: data_lib.DomainSplit, seed: int, mesh: Any | None):
  """`_batch_source` of `--batching merged`: one shuffled stream over the training domains, `batch_size * M`
  examples per step (`data.MergedBatchSampler`), each batch `(x [B, ...], y [B], domain ids [B])`; on a mesh the
  batch axis is split over every device (B must be a multiple of the device count)."""
  if split.records is not None:
    raise ValueError(
      "--batching merged needs an in-memory dataset, not one streamed from an image folder: drop "
      "--batching merged (the default --batching balanced) for it."
    )
  batch = config.hparams.batch_size * len(split.train)
  sampler = data_lib.MergedBatchSampler(split.train, batch, seed, domain_names=split.train_domains)
  if mesh is None:
    return sampler, (lambda state: state), sampler.next
  local = distributed.local_flat_slice(batch, mesh)
  draw = lambda: distributed.global_flat_batch(mesh, sampler.next(local), batch)
  return sampler, (lambda state: distributed.place_state(state, mesh)), draw


def _data_workers(config: ExperimentConfig) -> int:
  if config.data_workers is not None:
    return config.data_workers
  from disam_jax.harness import streaming

  return streaming.default_workers()


def _close_feeds(*feeds_) -> None:
  """Stops the grain workers of streamed feeds (in-memory feeds have nothing to close)."""
  for feed in feeds_:
    close = getattr(feed, "close", None)
    if close is not None:
      close()


def _open_run(
  store: Any,
  state: TrainState,
  sampler: data_lib.DomainBatchSampler,
  metrics_path: str,
  *,
  resume: bool,
  main_process: bool,
):
  """`(latest step or None, state, evals, metrics log)`: a resumed run's checkpoint restored (its sampler state
  into `sampler`, its metrics lines after it dropped), or a fresh start; the log opened for appending or anew (on
  `os.devnull` but on process 0).

  Raises:
    UnreadableCheckpoint: `resume` and no readable checkpoint among several.
  """
  restored = store.restore_latest(state) if resume else None  # UnreadableCheckpoint if none is readable
  if restored is None:
    if resume and main_process and os.path.exists(metrics_path) and os.path.getsize(metrics_path):
      _log.warning(
        f"{store.directory} holds no checkpoint although {metrics_path} has lines: training this run again from step 0"
      )
    return None, state, [], open(metrics_path if main_process else os.devnull, "w")
  latest, state, meta, notes = restored
  for note in notes:
    _log.warning(f"{note}; resuming from step {latest}, the latest readable checkpoint")
  sampler.restore(meta["sampler"])
  if main_process:
    _truncate_metrics(metrics_path, latest)
  return latest, state, list(meta["evals"]), open(metrics_path if main_process else os.devnull, "a")


class _HostSide:
  """The host's part of a run's steps: each step's metrics line checked and logged, and at evaluation steps the
  evaluation and the checkpoint. `evals` (the evaluations so far) grows in place."""

  def __init__(
    self,
    log,
    store,
    batches: _Prefetcher,
    evaluate: Callable,
    evals: list[dict[str, Any]],
    train_domains: Sequence[str],
    held_out: str,
    start: float,
    context: str,
    on_step: Callable[[int, dict[str, Any]], None] | None,
  ):
    self.log, self.store, self.batches, self.evaluate, self.evals = log, store, batches, evaluate, evals
    self.train_domains, self.held_out, self.start, self.context, self.on_step = (
      train_domains,
      held_out,
      start,
      context,
      on_step,
    )

  def checkpoint(self, record: dict[str, Any], state: TrainState, step: int, line: dict[str, Any]) -> None:
    """Logs `line` with the evaluation `record`, then checkpoints. The log is flushed first: every metrics line up
    to a checkpoint is on disk before it, so a run killed after the checkpoint resumes with all of them."""
    self.evals.append(record)
    line.update(
      step=step,
      eval={
        "val_acc": record["val_acc"],
        "val_acc_mean": record["val_acc_mean"],
        "test_acc": {self.held_out: record["test_acc"]},
      },
    )
    self.log.write(json.dumps(line) + "\n")
    self.log.flush()
    # The sampler's state before the batches prefetched for later steps: a resumed run draws them again. The store
    # keeps this checkpoint while it is the latest or the best by `val_acc_mean` (as `select_best`).
    self.store.save(
      step,
      state,
      {"step": step, "sampler": self.batches.sampler_state(), "evals": self.evals},
      val_acc_mean=record["val_acc_mean"],
    )

  def finish(self, step: int, metrics: dict[str, Any], state: TrainState | None = None) -> None:
    """The host's part of a step: check, log, evaluate and checkpoint (`state`: the state after `step`)."""
    line = _step_line(metrics, step, self.train_domains, self.start, self.store, context=self.context)
    if state is not None:
      self.checkpoint(self.evaluate(state, step), state, step, line)
    else:
      self.log.write(json.dumps(line) + "\n")
    if self.on_step is not None:
      self.on_step(step, line)


def _train_steps(
  loop_step: _LoopStep, state: TrainState, batches: _Prefetcher, config: ExperimentConfig, host: _HostSide
) -> None:
  """Steps `state` (from its step to `config.steps`), keeping the device busy: each step is dispatched before the
  host gathers the next batch and reads the previous step's metrics (by then finished: the device has the new step
  queued behind it). Evaluation steps are finished before the next dispatch, since the next step donates the state
  they evaluate. The state travels as its flat leaves and the metrics as one vector (`_LoopStep`)."""
  step = int(state.step)
  leaves, treedef = jax.tree.flatten(state)
  run = loop_step.for_tree(treedef)
  unpack = lambda packed: loop_step.unpack(treedef, packed)
  pending = None
  while step < config.steps:
    leaves, packed = run(leaves, batches.next())
    step += 1
    if step < config.steps:
      batches.prefetch()
    if pending is not None:
      host.finish(pending[0], unpack(pending[1]))
      pending = None
    if step % config.eval_every == 0 or step == config.steps:
      host.finish(step, unpack(packed), jax.tree.unflatten(treedef, leaves))
    else:
      pending = (step, packed)


class _Prefetcher:
  """Batches drawn one step ahead, so the host gathers the next batch while the device runs the current step.

  `sampler_state()` is the sampler's state before the first batch not yet handed out: what a checkpoint records,
  so that a resumed run draws the prefetched batch again.
  """

  def __init__(self, sampler: feeds.TrainFeed, draw: Callable[[], Any]):
    self._sampler, self._draw = sampler, draw
    self._ahead: tuple[dict[str, Any], Any] | None = None

  def prefetch(self) -> None:
    if self._ahead is None:
      before = self._sampler.state()
      self._ahead = (before, self._draw())

  def next(self) -> Any:
    self.prefetch()
    batch = self._ahead[1]
    self._ahead = None
    return batch

  def sampler_state(self) -> dict[str, Any]:
    return self._ahead[0] if self._ahead is not None else self._sampler.state()


def _step_line(
  metrics: dict[str, Any], step: int, train_domains: Sequence[str], start: float, store: Any, *, context: str
) -> dict[str, Any]:
  """The metrics.jsonl line of a step from its metrics (host arrays: `_LoopStep.unpack`'s).

  Raises:
    TrainingDiverged: a non-finite loss, gradient norm or per-domain loss, naming the last good checkpoint.
  """
  domain_losses = [float(v) for v in metrics["domain_losses"]]
  values = [_float(metrics["loss"]), _float(metrics["grad_norm"])] + domain_losses
  if not all(math.isfinite(v) for v in values):
    listing = ", ".join(f"{d}: {v:.4g}" for d, v in zip(train_domains, domain_losses))
    good = store.latest_step()
    raise TrainingDiverged(
      f"Training diverged at step {step} ({context}): loss "
      f"{values[0]:.4g}, gradient norm {values[1]:.4g}, per-domain losses {{{listing}}}. "
      f"The last good checkpoint is step {good} in {store.directory}. Lower --lr or --rho."
    )
  line = {
    "step": step,
    "loss": values[0],
    "domain_losses": dict(zip(train_domains, domain_losses)),
    "variance": _float(metrics["variance"]),
    "perturbation_norm": _float(metrics["perturbation_norm"]),
    "grad_norm": values[1],
    "time": round(time.perf_counter() - start, 4),
    **_mechanism(metrics, train_domains),
  }
  if "penalty" in metrics:
    line.update(penalty=_float(metrics["penalty"]), objective=_float(metrics["objective"]))
  return line


def _eval_feed(config: ExperimentConfig, split: data_lib.DomainSplit, mesh: Any | None = None) -> feeds.EvalFeed:
  """The run's evaluation sets: the validation part of every training domain, then the held-out domain(s); in
  memory, or streamed through grain (DomainBed's evaluation transform) for a split of record indices. On a mesh,
  each process reads only its slice of every global batch, whose size is `eval_batch_size` rounded up to a
  multiple of the device count (every device evaluates the same number of rows)."""
  parts = tuple(("val", d) for d in (split.val_domains or split.train_domains)) + tuple(
    ("test", d) for d in split.test_domains
  )
  size, where = config.eval_batch_size, {}
  if mesh is not None:
    size = -(-size // mesh.devices.size) * mesh.devices.size
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  sets = tuple(split.val) + tuple(split.test)
  if split.records is not None:
    from disam_jax.harness import streaming

    return streaming.StreamedEvalFeed(split.records, parts, sets, size, workers=_data_workers(config), **where)
  return feeds.ArrayEvalFeed(parts, sets, size, **where)


# Jitted per-batch counts (`steps.make_eval_counts`) by (graphdef, number of parts, mesh)
_COUNTS_CACHE: dict[tuple, Callable] = {}


def _eval_counts(graphdef: Any, num_parts: int, mesh: Any | None) -> Callable:
  key = (graphdef, num_parts, mesh)
  if key not in _COUNTS_CACHE:
    if len(_COUNTS_CACHE) >= 32:
      _COUNTS_CACHE.clear()
    # On a mesh the counts are replicated: every process reads the same numbers from its own devices.
    placed = {} if mesh is None else dict(out_shardings=distributed.replicated(mesh))
    _COUNTS_CACHE[key] = jax.jit(
      make_eval_counts(make_eval_step(graphdef), num_parts),
      donate_argnums=0,
      compiler_options=fast_conv.compiler_options(),
      **placed,
    )
  return _COUNTS_CACHE[key]


def _evaluator(
  config: ExperimentConfig,
  algorithm: str,
  feed: feeds.EvalFeed,
  held_out: str,
  seed: int,
  compiled: _Compiled,
  mesh: Any | None = None,
) -> Callable[[TrainState, int], dict[str, Any]]:
  """`evaluate(state, step)`: validation accuracy per training domain and held-out accuracy of `state`, over the
  batches of `feed` (`feeds.EvalFeed`).

  On a mesh, each global batch is assembled from the processes' slices and split over every device (axis 0 over
  all mesh axes, like the training batch), the parameters are used as they are placed (FSDP shards stay shards),
  and the per-part correct and total counts (`steps.make_eval_counts`) accumulate on the devices, read once per
  evaluation. Without a mesh, the same jitted counts on the default device.

  Raises (from `evaluate`):
    TrainingDiverged: the parameters are not finite.
  """
  num_parts = len(feed.parts)
  count = _eval_counts(compiled.graphdef, num_parts, mesh)
  if mesh is not None:
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    if feed.global_batch_size % mesh.devices.size:
      raise ValueError(
        f"The evaluation batch {feed.global_batch_size} is not a multiple of the "
        f"{mesh.devices.size} devices of the mesh."
      )
    glob = lambda a: jax.make_array_from_process_local_data(rows, a, (feed.global_batch_size,) + a.shape[1:])
    zeros = jax.jit(lambda: jnp.zeros([2, num_parts], jnp.int32), out_shardings=distributed.replicated(mesh))
  else:
    glob = lambda a: a  # numpy: the jitted call puts it on the device
    zeros = lambda: jnp.zeros([2, num_parts], jnp.int32)

  def evaluate(state: TrainState, step: int) -> dict[str, Any]:
    if not bool(_all_finite_jit(state.params)):
      raise TrainingDiverged(
        f"Training diverged ({algorithm}, held-out {held_out}, seed {seed}): the parameters are not finite at "
        f"step {step}. Lower --lr or --rho."
      )
    counts = zeros()
    for x, y, part in feed.batches():
      counts = count(counts, state.params, state.model_state, glob(x), glob(y), glob(part))
    if not counts.is_fully_addressable:
      counts = counts.addressable_data(0)
    correct, total = np.asarray(counts)  # the one read of the evaluation
    acc = correct / np.maximum(total, 1)
    val = {d: float(a) for (kind, d), a in zip(feed.parts, acc) if kind == "val"}
    test = {d: float(a) for (kind, d), a in zip(feed.parts, acc) if kind == "test"}
    return {
      "step": step,
      "val_acc": val,
      "val_acc_mean": float(np.mean(list(val.values()))),
      "test_acc": next(iter(test.values())),
      "test_accs": test,
    }

  return evaluate
