"""Tests for `--batching merged` (issue 31): the released DISAM code's batches.

The references are independent of the harness: the batch stream is checked against a hand-written NumPy stream
without replacement per epoch (a PyTorch ``DataLoader(ConcatDataset, shuffle=True, drop_last=True)``: a fresh
permutation of all examples per epoch, the tail dropped), and the step's domain statistics against a NumPy
per-domain mean of the cross-entropy over the domain ids, from the model's own logits.
"""

import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from disam_jax.harness import algorithms, data, distributed, experiment, loop
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import run_experiment
from disam_jax.harness.models import apply_model
from disam_jax.harness.steps import init_model, init_train_state, make_train_step
from tests._runs import metrics_lines, run_killed_at

SIZES = (5, 3, 4)  # examples per training domain: N = 12


def _domains():
  """Three domains whose pixels name the example: x[..., 0] = 100 * domain + index, y = index % 10."""
  out = []
  for d, n in enumerate(SIZES):
    x = np.zeros((n, 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = 100 * d + np.arange(n)
    out.append((x, (np.arange(n) % 10).astype(np.int32)))
  return out


def _reference_stream(seed, batch, steps):
  """Global example indices (into the domains laid end to end) of the first `steps` batches, written out as a
  DataLoader(shuffle=True, drop_last=True) over the concatenation draws them."""
  rng, n, out = np.random.default_rng(seed), sum(SIZES), []
  while len(out) < steps:
    order = rng.permutation(n)
    out += [order[k * batch : (k + 1) * batch] for k in range(n // batch)]
  return out[:steps]


def _decode(x):
  """(domain, index in domain) of each example of a batch `x [B, 2, 2, 1]`."""
  code = x[:, 0, 0, 0].astype(int)
  return code // 100, code % 100


@pytest.mark.parametrize("batch", [5, 12, 1])
def test_merged_batches_are_a_shuffled_stream_without_replacement_per_epoch(batch):
  sampler = data.MergedBatchSampler(_domains(), batch, seed=3)
  starts = np.cumsum((0,) + SIZES[:-1])
  for picks in _reference_stream(3, batch, 9):
    x, y, ids = sampler.next()
    assert x.shape == (batch, 2, 2, 1) and y.dtype == np.int32 and ids.dtype == np.int32
    domain, index = _decode(x)
    np.testing.assert_array_equal(starts[domain] + index, picks)  # the reference's examples, in its order
    np.testing.assert_array_equal(ids, domain)  # each example carries its own domain's id
    np.testing.assert_array_equal(y, index % 10)


def test_an_epoch_never_repeats_an_example_and_drops_its_tail():
  sampler = data.MergedBatchSampler(_domains(), 5, seed=0)  # 12 examples: 2 batches per epoch, 2 dropped
  for _ in range(4):
    epoch = [sampler.next() for _ in range(2)]
    codes = np.concatenate([x[:, 0, 0, 0] for x, _, _ in epoch])
    assert len(set(codes.tolist())) == 10


def test_the_local_slice_is_that_slice_of_the_global_batch():
  full, part = data.MergedBatchSampler(_domains(), 8, seed=1), data.MergedBatchSampler(_domains(), 8, seed=1)
  for _ in range(4):
    whole, mine = full.next(), part.next(slice(2, 6))
    for a, b in zip(whole, mine):
      np.testing.assert_array_equal(a[2:6], b)


@pytest.mark.parametrize("taken", [0, 1, 2, 3, 5])  # mid-epoch and at epoch boundaries (2 batches per epoch)
def test_state_through_json_resumes_the_identical_stream(taken):
  sampler = data.MergedBatchSampler(_domains(), 5, seed=7)
  for _ in range(taken):
    sampler.next()
  state = json.loads(json.dumps(sampler.state()))
  expected = [sampler.next() for _ in range(5)]
  resumed = data.MergedBatchSampler(_domains(), 5, seed=99)
  resumed.restore(state)
  for want in expected:
    for a, b in zip(want, resumed.next()):
      np.testing.assert_array_equal(a, b)


def test_bad_batches_and_foreign_states_are_refused():
  with pytest.raises(ValueError, match="between 1 and the 12 training examples"):
    data.MergedBatchSampler(_domains(), 13, seed=0)
  merged, balanced = data.MergedBatchSampler(_domains(), 5, seed=0), data.DomainBatchSampler(_domains(), 2, seed=0)
  with pytest.raises(ValueError, match="resume with the run's own --batching"):
    merged.restore(balanced.state())
  with pytest.raises(ValueError, match="resume with the run's own --batching"):
    balanced.restore(merged.state())
  with pytest.raises(ValueError, match="merged batches of 6"):
    merged.restore(data.MergedBatchSampler(_domains(), 6, seed=0).state())


# ---------------------------------------------------------------------------------------------------------------------
# The train step's flat path
# ---------------------------------------------------------------------------------------------------------------------


def _model(m, algorithm="disam", **hparams):
  graphdef, params, model_state = init_model(
    "mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 16}
  )
  tx = algorithms.make_optimizer(
    algorithm, HParams(lr=1e-2, rho=0.05, lam=0.5, **hparams), num_domains=m, aux_example=model_state
  )
  return graphdef, params, model_state, tx


def _ce(logits, y):
  """Per-example cross-entropy in float64 NumPy."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]


def test_flat_step_statistics_are_numpy_per_domain_means_with_an_absent_domain():
  m, rng = 4, np.random.default_rng(0)
  x = rng.random((10, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, 10).astype(np.int32)
  ids = np.array([0, 2, 2, 0, 3, 3, 3, 0, 2, 0], np.int32)  # domain 1 absent, uneven counts
  graphdef, params, model_state, tx = _model(m)
  step = jax.jit(make_train_step(graphdef, tx))
  state = init_train_state(params, model_state, tx)
  logits, _ = apply_model(graphdef, params, model_state, x, train=True)
  ce = _ce(logits, y)
  means = np.array([ce[ids == d].mean() if np.any(ids == d) else 0.0 for d in range(m)])
  present = np.array([0, 2, 3])
  loss = means[present].mean()
  variance = ((means[present] - loss) ** 2).mean()
  _, metrics = step(state, (x, y, ids))
  np.testing.assert_allclose(metrics["domain_losses"], means, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["variance"], variance, rtol=1e-4)
  assert np.all(np.isfinite(np.asarray(metrics["grad_norm"])))


@pytest.mark.parametrize("algorithm", ["erm", "sam", "disam", "disam_gsam"])
def test_count_domain_weights_make_the_loss_the_batch_mean_as_the_released_code(algorithm):
  """--domain-weights count: `L` is the merged batch's mean cross-entropy and the variance weighs each present
  domain by its count (the released code's `get_domain_loss`); uniform weights give a different `L` here."""
  m, rng = 4, np.random.default_rng(3)
  x = rng.random((10, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, 10).astype(np.int32)
  ids = np.array([0, 2, 2, 0, 3, 3, 3, 0, 2, 0], np.int32)  # domain 1 absent; counts 4, 0, 3, 3
  graphdef, params, model_state, tx = _model(m, algorithm, domain_weights="count")
  logits, _ = apply_model(graphdef, params, model_state, x, train=True)
  ce = _ce(logits, y)
  counts = np.bincount(ids, minlength=m)
  means = np.array([ce[ids == d].mean() if counts[d] else 0.0 for d in range(m)])
  loss = ce.mean()
  variance = np.sum(counts / counts.sum() * (means - loss) ** 2)
  _, metrics = jax.jit(make_train_step(graphdef, tx))(init_train_state(params, model_state, tx), (x, y, ids))
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["variance"], variance, rtol=1e-4)
  assert abs(loss - means[counts > 0].mean()) > 1e-4  # the two weightings differ on this batch


def test_a_flat_batch_holding_a_balanced_one_steps_as_the_balanced_batch():
  m, b, rng = 3, 4, np.random.default_rng(1)
  x = rng.random((m, b, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, (m, b)).astype(np.int32)
  graphdef, params, model_state, tx = _model(m)
  step = jax.jit(make_train_step(graphdef, tx))
  grouped, g_metrics = step(init_train_state(params, model_state, tx), (x, y))
  ids = np.repeat(np.arange(m, dtype=np.int32), b)
  flat, f_metrics = step(
    init_train_state(params, model_state, tx), (x.reshape((m * b,) + x.shape[2:]), y.reshape(-1), ids)
  )
  for a, c in zip(jax.tree.leaves(grouped.params), jax.tree.leaves(flat.params)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_metrics["variance"], f_metrics["variance"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The loop: configuration, exact resume, a mesh
# ---------------------------------------------------------------------------------------------------------------------


def _config(**overrides):
  base = ExperimentConfig(
    algorithms=("disam",),
    held_out=("75",),
    seeds=(0,),
    steps=8,
    eval_every=4,
    model="mlp",
    model_kwargs={"hidden": 16},
    hparams=HParams(batch_size=4, batching="merged"),
  )
  return dataclasses.replace(base, **overrides)


def _lines(run_dir):
  return metrics_lines(run_dir, "75")


def test_a_merged_run_resumes_exactly_and_differs_from_a_balanced_run(tmp_path):
  config = _config()
  full = run_experiment(config, str(tmp_path / "full"), progress=False)

  run_killed_at(config, str(tmp_path / "cut"), 6)
  resumed = run_experiment(config, str(tmp_path / "cut"), progress=False, resume=True)
  assert _lines(str(tmp_path / "full")) == _lines(str(tmp_path / "cut"))
  assert full[0].evals == resumed[0].evals
  balanced = dataclasses.replace(config, hparams=dataclasses.replace(config.hparams, batching="balanced"))
  run_experiment(balanced, str(tmp_path / "balanced"), progress=False)
  assert _lines(str(tmp_path / "full"))[1]["loss"] != _lines(str(tmp_path / "balanced"))[1]["loss"]


def test_a_merged_run_on_a_four_device_mesh_equals_one_device(tmp_path):
  config = _config(steps=4, eval_every=2)
  one = run_experiment(config, str(tmp_path / "one"), progress=False)
  mesh = distributed.data_mesh(jax.devices()[:4])
  sharded = run_experiment(config, str(tmp_path / "mesh"), progress=False, mesh=mesh)
  for a, b in zip(_lines(str(tmp_path / "one")), _lines(str(tmp_path / "mesh"))):
    assert a.keys() == b.keys() and a["step"] == b["step"]
    if "loss" in a:
      np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
      np.testing.assert_allclose(
        list(a["domain_losses"].values()), list(b["domain_losses"].values()), rtol=1e-5, atol=1e-6
      )
    assert a.get("eval") == b.get("eval")
  assert [e["val_acc"] for e in one[0].evals] == [e["val_acc"] for e in sharded[0].evals]


def test_a_merged_batch_the_devices_do_not_divide_is_refused(tmp_path):
  config = _config(hparams=HParams(batch_size=3, batching="merged"))  # 3 x 5 domains = 15 examples, 4 devices
  with pytest.raises(distributed.DistributedError, match="merged batch of 15 examples .* divisible by .* 4"):
    run_experiment(config, str(tmp_path / "run"), progress=False, mesh=distributed.data_mesh(jax.devices()[:4]))


def test_penalties_and_streamed_folders_are_refused_with_what_to_write():
  with pytest.raises(ValueError, match="coral: a penalty needs per-domain batches .* --batching balanced"):
    _config(algorithms=("disam", "coral")).validate()
  with pytest.raises(ValueError, match="batching must be one of balanced, merged"):
    HParams(batching="mixed").validate()
  with pytest.raises(ValueError, match="domain_weights must be one of uniform, count"):
    HParams(domain_weights="size").validate()
  config = _config()
  folder = types.SimpleNamespace(name="folder", domains=("0", "15", "75"), streamed=True)
  with pytest.raises(ValueError, match="folder is streamed .* --batching merged needs an in-memory dataset"):
    experiment.check_data(config, folder)
  split = experiment._cell_split(config, experiment.load_data(config, 0), "75", 0)
  with pytest.raises(ValueError, match="--batching merged needs an in-memory dataset"):
    loop._batch_source(config, dataclasses.replace(split, records=object()), 0, None)


def test_the_cli_flags_set_the_batching_and_the_domain_weights():
  from disam_jax.harness import cli

  args = cli.build_parser().parse_args(["--batching", "merged", "--domain-weights", "count", "--algorithm", "sam"])
  hparams = cli.config_from_args(args).hparams
  assert (hparams.batching, hparams.domain_weights) == ("merged", "count")
  hparams = cli.config_from_args(cli.build_parser().parse_args([])).hparams
  assert (hparams.batching, hparams.domain_weights) == ("balanced", "uniform")


def test_on_a_mesh_each_device_holds_its_quarter_of_the_merged_batch():
  config = _config()  # 4 x 5 domains = 20 examples
  split = experiment._cell_split(config, experiment.load_data(config, 0), "75", 0)
  mesh = distributed.data_mesh(jax.devices()[:4])
  sampler, _, draw = loop._batch_source(config, split, 0, mesh)
  x, y, ids = draw()
  want = data.MergedBatchSampler(split.train, 20, 0).next()
  for placed, full in zip((x, y, ids), want):
    assert placed.shape == full.shape and len(placed.addressable_shards) == 4
    for shard in placed.addressable_shards:
      assert shard.data.shape[0] == 5
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_a_sharded_flat_step_with_an_absent_domain_equals_one_device():
  """The flat batch split over 4 devices (3 rows each), domain 1 absent: the per-domain sums cross the devices."""
  m, rng = 4, np.random.default_rng(2)
  x = rng.random((12, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, 12).astype(np.int32)
  ids = np.array([0, 2, 2, 0, 3, 3, 3, 0, 2, 0, 0, 3], np.int32)
  graphdef, params, model_state, tx = _model(m)
  step = jax.jit(make_train_step(graphdef, tx))
  one, one_metrics = step(init_train_state(params, model_state, tx), (x, y, ids))
  mesh = distributed.data_mesh(jax.devices()[:4])
  batch = jax.device_put((x, y, ids), distributed.flat_batch_sharding(mesh))
  state = distributed.place_state(init_train_state(params, model_state, tx), mesh)
  four, four_metrics = step(state, batch)
  assert four_metrics["domain_losses"][1] == 0
  for name in ("domain_losses", "loss", "variance", "grad_norm"):
    np.testing.assert_allclose(four_metrics[name], one_metrics[name], rtol=1e-5, atol=1e-6)
  for a, c in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
