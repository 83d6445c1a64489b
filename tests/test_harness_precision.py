"""`--precision bf16`: bfloat16 compute, float32 parameters, optimizer state, losses, penalties and DISAM's
statistics. Checked leaf by leaf on the state after training steps, and on the compute (bfloat16 logits and dot
products in the step's jaxpr)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disam_jax.harness import algorithms, models, steps
from disam_jax.harness.config import ExperimentConfig

SHAPE = (8, 8, 1)


def _floating_leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [
    (jax.tree_util.keystr(path), leaf.dtype)
    for path, leaf in flat
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
  ]


@pytest.mark.parametrize(
  "model, options, algorithm",
  [
    ("mlp", {}, "disam"),
    ("mlp", {}, "disam+coral"),
    ("mlp", {}, "disam+fishr"),
    ("resnet18", {"width": 4}, "disam"),  # BatchNorm running statistics
  ],
)
def test_bf16_computes_in_bfloat16_and_keeps_every_state_leaf_float32(model, options, algorithm):
  kwargs = {**options, "precision": "bf16"}
  graphdef, params, model_state = steps.init_model(model, num_classes=3, input_shape=SHAPE, seed=0, model_kwargs=kwargs)
  hparams = algorithms.HParams().for_run(10)
  tx = algorithms.make_optimizer(algorithm, hparams, num_domains=2, aux_example=model_state)
  penalty = algorithms.make_penalty(algorithm, hparams)
  state = steps.init_train_state(params, model_state, tx, penalty)
  rng = np.random.default_rng(0)
  batch = (rng.random((2, 8) + SHAPE, dtype=np.float32), rng.integers(0, 3, (2, 8)).astype(np.int32))
  step = steps.make_train_step(graphdef, tx, penalty)
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  # the layers' matmuls and convolutions produce bfloat16 (forward and backward; float32 ones are the optimizer's
  # norms, scalars, and the penalties, which accumulate in float32)
  outputs = [
    line.split("=")[0].split(":")[-1].strip()
    for line in jaxpr.splitlines()
    if "= dot_general" in line or "= conv_general_dilated" in line
  ]
  assert sum(o.startswith("bf16[") for o in outputs) >= 6, outputs
  jitted = jax.jit(step)
  for _ in range(2):
    state, metrics = jitted(state, batch)
  leaves = _floating_leaves(state) + _floating_leaves(metrics)
  assert leaves and {dtype for _, dtype in leaves} == {jnp.dtype(jnp.float32)}, [
    (path, dtype) for path, dtype in leaves if dtype != jnp.float32
  ]
  assert np.isfinite(float(metrics["loss"]))
  logits, _ = models.apply_model(graphdef, state.params, state.model_state, jnp.asarray(batch[0][0]), train=False)
  assert logits.dtype == jnp.bfloat16


def test_bf16_logits_stay_close_to_float32():
  """Same parameters (float32 in both), bfloat16 vs float32 compute: logits agree to bfloat16's precision."""
  x = jnp.asarray(np.random.default_rng(1).random((16,) + SHAPE), jnp.float32)
  out = {}
  for precision in models.PRECISIONS:
    model = models.create_model("mlp", num_classes=10, input_shape=SHAPE, rngs=nnx.Rngs(0), precision=precision)
    assert model.classifier.kernel.dtype == jnp.float32
    out[precision] = np.asarray(model(x), np.float32)
  assert out["bf16"].dtype == np.float32 and not np.array_equal(out["bf16"], out["float32"])
  np.testing.assert_allclose(out["bf16"], out["float32"], atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
  "options, says",
  [
    ({"param_dtype": "bfloat16"}, "drop the model option param_dtype=bfloat16"),
    ({"dtype": "float16"}, "drop the model option dtype=float16"),
  ],
)
def test_bf16_refuses_options_that_contradict_it(options, says):
  with pytest.raises(ValueError, match=says):
    models.create_model("mlp", num_classes=3, input_shape=SHAPE, rngs=nnx.Rngs(0), precision="bf16", **options)


def test_precision_is_a_config_field_not_a_model_option():
  assert ExperimentConfig(precision="bf16").model_options == {"precision": "bf16"}
  assert ExperimentConfig().model_options == {}
  for bad in (ExperimentConfig(precision="fp16"), ExperimentConfig(model_kwargs={"precision": "bf16"})):
    with pytest.raises(ValueError, match="--precision"):
      bad.validate()
  assert ExperimentConfig.from_json({**ExperimentConfig().to_json(), "precision": "bf16"}).precision == "bf16"


def test_cli_precision_is_recorded_and_resume_refuses_another(tmp_path, capsys):
  from disam_jax.harness import cli

  out = tmp_path / "run"
  common = [
    "--dataset",
    "rotated_digits",
    "--algorithm",
    "disam",
    "--held-out",
    "0",
    "--eval-every",
    "2",
    "--quiet",
    "--no-plots",
  ]
  assert cli.main([*common, "--steps", "2", "--precision", "bf16", "--output-dir", str(out)]) == 0
  import json

  assert json.load(open(out / "config.json"))["precision"] == "bf16"
  capsys.readouterr()
  code = cli.main(["--resume", "--output-dir", str(out), "--precision", "float32"])
  assert code == cli.EXIT_BAD_INPUT and "--precision" in capsys.readouterr().err
  assert cli.main(["--resume", "--output-dir", str(out), "--steps", "4", "--quiet", "--no-plots"]) == 0
