"""Tests for disam_jax.harness.regimes: imbalance, wrong domain labels, sub-domains, inferred pseudo-domains.

Each regime is checked on a synthetic split whose images encode (true domain, index), so where every example went
is known exactly; the end-to-end test trains DISAM on inferred domains through `run_experiment`.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from disam_jax.harness import data, regimes
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import cell_directory, run_experiment

SIZES = (40, 30, 50, 20)


def _split(sizes=SIZES):
  train_parts, val_parts = [], []
  for d, n in enumerate(sizes):
    x = np.zeros((n, 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = d
    x[:, 0, 1, 0] = np.arange(n)
    train_parts.append((x, np.arange(n, dtype=np.int32) % 3))
    val_parts.append((x[:5], np.zeros(5, np.int32)))
  test = ((np.ones((7, 2, 2, 1), np.float32), np.zeros(7, np.int32)),)
  names = tuple(f"d{d}" for d in range(len(sizes)))
  return data.DomainSplit(
    train_domains=names, test_domains=("t",), train=tuple(train_parts), val=tuple(val_parts), test=test
  )


def _origins(x):
  return set(zip(x[:, 0, 0, 0].astype(int).tolist(), x[:, 0, 1, 0].astype(int).tolist()))


def _unchanged_evaluation(before, after):
  assert after.val is before.val and after.test is before.test
  assert after.val_domains == before.train_domains


def test_imbalance_keeps_a_geometric_fraction_of_each_domain():
  split = _split()
  out = regimes.imbalance(split, 8.0, seed=0)
  m = len(SIZES)
  expected = [max(1, round(n * 8.0 ** (-j / (m - 1)))) for j, n in enumerate(SIZES)]
  assert [len(x) for x, _ in out.train] == expected == [40, 15, 12, 2]
  for _d, ((x, y), (x0, _)) in enumerate(zip(out.train, split.train)):
    assert _origins(x) <= _origins(x0) and len(_origins(x)) == len(x)  # a subset, no duplicates
    np.testing.assert_array_equal(y, x[:, 0, 1, 0].astype(np.int32) % 3)  # labels travel with their images
  assert out.train_domains == split.train_domains
  _unchanged_evaluation(split, out)
  assert regimes.imbalance(split, 1.0, seed=0).train[2][0].shape[0] == SIZES[2]
  with pytest.raises(ValueError, match=">= 1"):
    regimes.imbalance(split, 0.5, seed=0)


def test_domain_label_noise_moves_exactly_that_fraction_to_other_domains():
  split = _split()
  out = regimes.shuffle_domain_labels(split, 0.3, seed=1)
  assert sum(len(x) for x, _ in out.train) == sum(SIZES)
  everything = set().union(*(_origins(x) for x, _ in out.train))
  assert everything == set().union(*(_origins(x) for x, _ in split.train))
  moved_from = np.zeros(len(SIZES), int)
  for i, (x, _) in enumerate(out.train):
    origin = x[:, 0, 0, 0].astype(int)
    for d in origin[origin != i]:
      moved_from[d] += 1
  np.testing.assert_array_equal(moved_from, [round(n * 0.3) for n in SIZES])
  _unchanged_evaluation(split, out)
  same = regimes.shuffle_domain_labels(split, 0.3, seed=1)
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(out.train, same.train))


def test_sub_domains_partition_every_domain():
  split = _split()
  out = regimes.split_domains(split, 3, seed=0)
  assert out.train_domains == tuple(f"d{d}/{j}" for d in range(len(SIZES)) for j in range(3))
  for d, n in enumerate(SIZES):
    parts = out.train[3 * d : 3 * d + 3]
    assert sorted(len(x) for x, _ in parts) == sorted(len(a) for a in np.array_split(np.arange(n), 3))
    union = set().union(*(_origins(x) for x, _ in parts))
    assert union == _origins(split.train[d][0])
  _unchanged_evaluation(split, out)
  with pytest.raises(ValueError, match="fewer than"):
    regimes.split_domains(split, 21, seed=0)


def _blobs_split():
  """Three well-separated input clusters spread evenly over four true domains."""
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]])
  parts = []
  for _d in range(4):
    blob = np.repeat(np.arange(3), [6, 9, 12])
    x = (centres[blob] + 0.1 * rng.standard_normal((len(blob), 4))).astype(np.float32).reshape(-1, 2, 2, 1)
    parts.append((x, blob.astype(np.int32)))  # label = blob, to check the clusters
  val = tuple((x[:3], y[:3]) for x, y in parts)
  return data.DomainSplit(
    train_domains=("a", "b", "c", "d"),
    test_domains=("t",),
    train=tuple(parts),
    val=val,
    test=((parts[0][0][:2], parts[0][1][:2]),),
  )


def test_inferred_domains_recover_input_clusters_deterministically():
  split = _blobs_split()
  out = regimes.infer_domains(split, 3, seed=0)
  assert out.train_domains == ("c0", "c1", "c2")
  # each pseudo-domain is one blob, largest first (blobs of 6, 9, 12 per true domain)
  assert [len(x) for x, _ in out.train] == [48, 36, 24]
  assert [set(y.tolist()) for _, y in out.train] == [{2}, {1}, {0}]
  _unchanged_evaluation(split, out)
  again = regimes.infer_domains(split, 3, seed=0)
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(out.train, again.train))
  with pytest.raises(ValueError, match=">= 2"):
    regimes.infer_domains(split, 1, seed=0)


def test_infer_domains_is_deterministic_per_seed_on_digits():
  split = data.split_dataset(data.load_dataset("rotated_digits", seed=0), "75", seed=0)
  a = regimes.infer_domains(split, 4, seed=3)
  b = regimes.infer_domains(split, 4, seed=3)
  assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a.train, b.train))
  assert sum(len(x) for x, _ in a.train) == sum(len(x) for x, _ in split.train)


def test_apply_regimes_refuses_inferred_domains_with_label_edits():
  with pytest.raises(ValueError, match="cannot be combined"):
    regimes.apply_regimes(_split(), seed=0, domain_label_noise=0.1, inferred_domains=3)
  assert regimes.apply_regimes(_split(), seed=0).train_domains == _split().train_domains


def test_disam_trains_on_inferred_domains_and_is_evaluated_on_the_true_ones(tmp_path):
  config = ExperimentConfig(
    algorithms=("disam",),
    held_out=("75",),
    seeds=(0,),
    steps=3,
    eval_every=3,
    model="mlp",
    model_kwargs={"hidden": 8},
    hparams=HParams(batch_size=8),
    infer_domains=3,
  )
  results = run_experiment(config, str(tmp_path), progress=False)
  with open(os.path.join(cell_directory(str(tmp_path), "disam", "75", 0), "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  steps = [line for line in lines if "loss" in line]
  assert list(steps[0]["domain_losses"]) == ["c0", "c1", "c2"]  # DISAM sees K = 3 domains
  assert sorted(results[0].evals[-1]["val_acc"]) == ["0", "15", "30", "45", "60"]  # selection on the true ones
  with pytest.raises(ValueError, match="cannot be combined"):
    dataclasses.replace(config, sub_domains=2).validate()


def test_cli_passes_the_regime_options():
  from disam_jax.harness import cli

  args = cli.build_parser().parse_args(["--imbalance", "4", "--domain-label-noise", "0.2", "--sub-domains", "3"])
  config = cli.config_from_args(args)
  assert (config.imbalance, config.domain_label_noise, config.sub_domains, config.infer_domains) == (4.0, 0.2, 3, 0)
  assert cli.config_from_args(cli.build_parser().parse_args(["--infer-domains", "5"])).infer_domains == 5
