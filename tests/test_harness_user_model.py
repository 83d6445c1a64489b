"""The user's own model: ``--model package.module:factory`` (`models.resolve_model`, `models.DomainModel`,
`models.check_model`) for an ``nnx.Module`` and, through Flax's NNX bridge, a Linen featurizer.

The models are defined here, in the test module, and named as ``tests.test_harness_user_model:<factory>``, as a
user names theirs. References: the Linen BatchNorm's running statistics recomputed with NumPy, the classifier's
logits recomputed from its features with NumPy.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from disam_jax.harness import algorithms, cli, models, peft, steps

HERE = __name__  # 'tests.test_harness_user_model' under pytest
SHAPE = (8, 8, 1)  # rotated digits


# ----------------------------------------------------------------------------------------- the users' models


class TinyNet(nnx.Module):
  """A user's NNX model: flatten -> Dense (no bias) -> BatchNorm -> relu -> classifier."""

  def __init__(self, *, num_classes, input_shape, rngs, hidden=16, dtype=None):
    h, w, c = input_shape
    # no bias before BatchNorm, which removes it: its gradient would be float noise, which Adam turns into steps
    self.body = nnx.Linear(h * w * c, hidden, use_bias=False, dtype=dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(hidden, dtype=dtype, rngs=rngs)
    self.classifier = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)
    self.n_features = hidden

  def head_inputs(self, x):
    return nnx.relu(self.norm(self.body(x.reshape(x.shape[0], -1))))

  def __call__(self, x):
    return self.classifier(self.head_inputs(x))


class _NoHead(nnx.Module):
  def __init__(self, *, num_classes, input_shape, rngs):
    self.body = nnx.Linear(int(np.prod(input_shape)), 4, rngs=rngs)

  def __call__(self, x):
    return self.body(x.reshape(x.shape[0], -1))


def no_head(**kwargs):
  return _NoHead(**kwargs)


def wrong_width(*, num_classes, input_shape, rngs):
  model = TinyNet(num_classes=num_classes, input_shape=input_shape, rngs=rngs)
  model.n_features = 7  # head_inputs returns 16
  return model


def not_a_module(**kwargs):
  return lambda x: x


class LinenFeaturizer(nn.Module):
  """A user's Linen featurizer: Dense -> BatchNorm -> Dropout -> relu; the harness adds the classifier."""

  hidden: int = 16
  dropout: float = 0.0
  dtype: object = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.hidden, dtype=self.dtype)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.relu(x)


def linen_featurizer(*, num_classes, input_shape, rngs, **options):
  return LinenFeaturizer(**options)


def _build(factory, **options):
  return models.create_model(
    f"{HERE}:{factory}", num_classes=3, input_shape=SHAPE, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **options
  )


def _x(n=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n,) + SHAPE), jnp.float32)


# ------------------------------------------------------------------------------------------------ contract


def test_an_nnx_model_satisfies_the_protocol_and_runs_as_the_registry_models():
  model = _build("TinyNet")
  assert isinstance(model, models.DomainModel) and isinstance(
    models.create_model("mlp", num_classes=3, input_shape=SHAPE, rngs=nnx.Rngs(0)), models.DomainModel
  )
  graphdef, params, model_state = models.functional_model(model)
  logits, head, _ = models.apply_model_with_head(graphdef, params, model_state, _x(), train=True)
  features = np.asarray(head.features, np.float64)
  kernel, bias = (np.asarray(params["classifier"][k], np.float64) for k in ("kernel", "bias"))
  np.testing.assert_allclose(np.asarray(logits), features @ kernel + bias, rtol=1e-5, atol=1e-6)
  assert head.apply is __import__("disam_jax.harness.penalties", fromlist=["x"]).linear_head


@pytest.mark.parametrize(
  "factory, missing",
  [
    ("no_head", ["n_features", "head_inputs(x)", "classifier ("]),
    ("wrong_width", ["head_inputs(x) -> [n, n_features] = [2, 7] (returns [2, 16])"]),
    ("not_a_module", ["must return an nnx.Module"]),
  ],
)
def test_a_model_missing_part_of_the_contract_is_refused_naming_it(factory, missing):
  with pytest.raises(ValueError) as err:
    _build(factory)
  message = str(err.value)
  assert f"{HERE}:{factory}" in message
  for part in missing:
    assert part in message, message


@pytest.mark.parametrize(
  "name, says",
  [
    ("no_such_package_28b.nets:build", "cannot import 'no_such_package_28b.nets'"),
    (f"{HERE}:absent", "has no attribute 'absent'"),
    (f"{HERE}:SHAPE", "not a callable factory"),
    ("resnet19", "package.module:factory"),
    (":build", "write package.module:factory"),
  ],
)
def test_model_names_that_resolve_to_nothing_are_refused(name, says):
  with pytest.raises(ValueError, match=None) as err:
    models.resolve_model(name)
  assert says in str(err.value)


def without_dtype(*, num_classes, input_shape, rngs):
  return TinyNet(num_classes=num_classes, input_shape=input_shape, rngs=rngs)


def test_bf16_asks_a_factory_without_dtype_for_one():
  with pytest.raises(ValueError, match="--precision bf16 calls the factory with dtype=jnp.bfloat16"):
    _build("without_dtype", precision="bf16")
  for factory in ("TinyNet", "linen_featurizer"):  # both take dtype: bfloat16 compute, float32 parameters
    model = _build(factory, precision="bf16")
    assert model(_x()).dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


# ------------------------------------------------------------------------------------------ the Linen bridge


def test_a_linen_featurizer_gets_a_linear_head_and_batchnorm_statistics_like_numpy():
  model = _build("linen_featurizer")
  assert isinstance(model, models.FeaturizerClassifier) and model.n_features == 16
  graphdef, params, model_state = models.functional_model(model)
  linen_params = params["backbone"]["linen"]
  assert set(linen_params) == {"Dense_0", "BatchNorm_0"} and "classifier" in params
  x = _x(8, seed=1)
  _, new_state = models.apply_model(graphdef, params, model_state, x, train=True)
  hidden = np.asarray(x, np.float64).reshape(8, -1) @ np.asarray(
    linen_params["Dense_0"]["kernel"], np.float64
  ) + np.asarray(linen_params["Dense_0"]["bias"], np.float64)
  old = model_state["backbone"]["linen"]["BatchNorm_0"]
  new = new_state["backbone"]["linen"]["BatchNorm_0"]
  np.testing.assert_allclose(
    np.asarray(new["mean"]), 0.9 * np.asarray(old["mean"]) + 0.1 * hidden.mean(0), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(new["var"]), 0.9 * np.asarray(old["var"]) + 0.1 * hidden.var(0), rtol=1e-5, atol=1e-6
  )
  _, eval_state = models.apply_model(graphdef, params, model_state, x, train=False)
  assert eval_state is model_state  # eval mode: running statistics read, not written


def test_linen_dropout_is_active_in_train_mode_only():
  model = _build("linen_featurizer", dropout=0.5)
  graphdef, params, model_state = models.functional_model(model)
  x = _x(4)
  train = [models.apply_model(graphdef, params, model_state, x, train=True)[0] for _ in range(2)]
  evals = [models.apply_model(graphdef, params, model_state, x, train=False)[0] for _ in range(2)]
  assert not np.allclose(np.asarray(train[0]), np.asarray(evals[0]))
  np.testing.assert_array_equal(np.asarray(evals[0]), np.asarray(evals[1]))
  # the dropout stream advances in the returned model state: the next step draws another mask
  _, state1 = models.apply_model(graphdef, params, model_state, x, train=True)
  again = models.apply_model(graphdef, params, state1, x, train=True)[0]
  assert not np.allclose(np.asarray(again), np.asarray(train[0]))


@pytest.mark.parametrize("factory", ["TinyNet", "linen_featurizer"])
def test_train_only_head_moves_the_classifier_alone(factory):
  graphdef, params, model_state = steps.init_model(f"{HERE}:{factory}", num_classes=3, input_shape=SHAPE, seed=0)
  mask = peft.trainable_mask(nnx.merge(graphdef, params, model_state), ["head"])
  tx = algorithms.make_optimizer(
    "disam", algorithms.HParams(), num_domains=2, aux_example=model_state, trainable_mask=mask
  )
  state = steps.init_train_state(params, model_state, tx)
  rng = np.random.default_rng(0)
  batch = (rng.random((2, 8) + SHAPE, dtype=np.float32), rng.integers(0, 3, (2, 8)).astype(np.int32))
  new, _ = jax.jit(steps.make_train_step(graphdef, tx))(state, batch)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new.params)
  assert all(jax.tree.leaves(moved["classifier"]))
  assert not any(leaf for key in moved if key != "classifier" for leaf in jax.tree.leaves(moved[key]))


# ------------------------------------------------------------------------------------------- end to end


def _cli(tmp_path, *args):
  out = tmp_path / "run"
  code = cli.main(
    [
      "--dataset",
      "rotated_digits",
      "--held-out",
      "0",
      "--steps",
      "2",
      "--eval-every",
      "2",
      "--quiet",
      "--no-plots",
      "--output-dir",
      str(out),
      *args,
    ]
  )
  return code, out


def test_cli_trains_an_nnx_user_model_with_disam_and_disam_coral(tmp_path):
  code, out = _cli(
    tmp_path, "--model", f"{HERE}:TinyNet", "--model-option", "hidden=8", "--algorithm", "disam", "disam+coral"
  )
  assert code == 0
  assert json.load(open(out / "config.json"))["model"] == f"{HERE}:TinyNet"
  results = json.load(open(out / "results.json"))
  assert set(results["rows"]) == {"disam", "disam+coral"} and not results["missing"]


def test_cli_trains_a_linen_user_model_head_only(tmp_path):
  code, out = _cli(tmp_path, "--model", f"{HERE}:linen_featurizer", "--algorithm", "disam", "--train-only", "head")
  assert code == 0
  assert json.load(open(out / "config.json"))["train_only"] == ["head"]


def test_cli_refuses_a_model_that_breaks_the_contract(tmp_path, capsys):
  code, _ = _cli(tmp_path, "--model", f"{HERE}:no_head", "--algorithm", "erm")
  assert code == cli.EXIT_BAD_INPUT
  assert "head_inputs" in capsys.readouterr().err


def test_a_linen_model_with_dropout_resumes_exactly(tmp_path):
  """The bridge's state (BatchNorm statistics, the dropout and params RNG streams) goes through the checkpoint:
  2 steps + --resume to 4 give what 4 steps give."""
  args = ["--model", f"{HERE}:linen_featurizer", "--model-option", "dropout=0.2", "--algorithm", "disam+fishr"]
  common = ["--dataset", "rotated_digits", "--held-out", "0", "--eval-every", "2", "--quiet", "--no-plots", *args]
  part, full = tmp_path / "part", tmp_path / "full"
  assert cli.main([*common, "--steps", "2", "--output-dir", str(part)]) == 0
  assert cli.main(["--resume", "--output-dir", str(part), "--steps", "4", "--quiet", "--no-plots"]) == 0
  assert cli.main([*common, "--steps", "4", "--output-dir", str(full)]) == 0
  resumed, straight = (json.load(open(d / "results.json"))["cells"] for d in (part, full))
  assert [c["evals"] for c in resumed] == [c["evals"] for c in straight]


@pytest.mark.slow  # two real processes x two devices; the default tier trains user models in one process above
@pytest.mark.parametrize("algorithm", ["disam+coral", "disam+fishr"])
def test_a_user_model_with_a_penalty_on_two_processes_equals_one_device(tmp_path, algorithm):
  """Each process imports the factory; CORAL's and Fishr's per-domain statistics over a batch sharded across 2
  processes x 2 devices give the parameters of one device."""
  from disam_jax.harness import experiment
  from tests.test_harness_distributed import _start, _wait

  extra = ["--model", f"{HERE}:TinyNet", "--algorithm", algorithm]
  runs = {"one": _wait(_start(tmp_path / "one", 1, 1, *extra)), "two": _wait(_start(tmp_path / "two", 2, 2, *extra))}
  for results in runs.values():
    for code, _, err in results:
      assert code == 0, err[-3000:]
  hparams = json.load(open(tmp_path / "one" / "config.json"))["hparams"]
  hparams = algorithms.HParams(**hparams)
  graphdef, params, model_state = steps.init_model(
    f"{HERE}:TinyNet", num_classes=10, input_shape=SHAPE, seed=0, model_kwargs={"hidden": 16}
  )
  tx = algorithms.make_optimizer(algorithm, hparams, num_domains=5, aux_example=model_state)
  template = steps.init_train_state(params, model_state, tx, algorithms.make_penalty(algorithm, hparams))
  final = {}
  for name in runs:
    state, meta = experiment.load_latest_state(
      experiment.cell_directory(str(tmp_path / name), algorithm, "75", 0), template
    )
    assert meta["step"] == 40
    final[name] = jax.tree.leaves(state.params)
  for a, b in zip(final["one"], final["two"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
