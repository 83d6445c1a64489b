"""Sharded checkpoints, sharded init and sharded evaluation in one process of 8 CPU devices (conftest.py).

The checksums against a NumPy transcription of the digest, restores onto other meshes, retention (latest + best,
earliest on ties) by orbax's policy, the refusal of a well-formed checkpoint of other values, the shards that
sharded init leaves on each device, and the evaluator's counts on 1, 4 and 8 devices against a NumPy count. The
multi-process versions are in tests/test_harness_distributed.py.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disam_jax.harness import checkpoint, distributed
from disam_jax.harness.checkpoint import CheckpointStore, UnreadableCheckpoint

# ---------------------------------------------------------------------------------------------------------------------
# The digest: a NumPy transcription, independent of JAX
# ---------------------------------------------------------------------------------------------------------------------


def _np_fmix32(h):
  h = h ^ (h >> np.uint32(16))
  h = (h * np.uint32(0x85EBCA6B)).astype(np.uint32)
  h = h ^ (h >> np.uint32(13))
  h = (h * np.uint32(0xC2B2AE35)).astype(np.uint32)
  return h ^ (h >> np.uint32(16))


def _np_digest(x):
  """The two uint32 sums of docs/distributed.md's checksum, element by element in row-major order."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32).reshape(-1)
  elif x.dtype.itemsize == 4:
    words = x.reshape(-1).view(np.uint32)
  else:
    words = x.reshape(-1).view(np.uint8 if x.dtype.itemsize == 1 else np.uint16).astype(np.uint32)
  with np.errstate(over="ignore"):
    index = np.arange(words.size, dtype=np.uint32)
    h1 = _np_fmix32(words ^ _np_fmix32(index ^ np.uint32(0x9E3779B9)))
    h2 = _np_fmix32(h1 ^ np.uint32(0x7F4A7C15))
    return [int(h1.sum(dtype=np.uint64) % 2**32), int(h2.sum(dtype=np.uint64) % 2**32)]


def _arrays():
  rng = np.random.default_rng(0)
  return [
    rng.standard_normal((16, 12)).astype(np.float32),
    rng.standard_normal((8, 4, 6)).astype(jnp.bfloat16),
    rng.integers(-5, 5, (24,)).astype(np.int32),
    rng.integers(0, 255, (8, 8)).astype(np.uint8),
    rng.random((4, 8)) > 0.5,
    np.float32(3.5),
  ]


@pytest.mark.parametrize("mesh_spec", [None, "data=8", "data=4,fsdp=2", "data=1,fsdp=8"])
def test_the_digest_equals_a_numpy_transcription_however_the_array_is_sharded(mesh_spec):
  arrays = _arrays()
  if mesh_spec is None:
    placed = [jnp.asarray(a) for a in arrays]
  else:
    placed = distributed.place_state(arrays, distributed.parse_mesh(mesh_spec))
  assert checkpoint._digests(placed) == [_np_digest(a) for a in arrays]


def test_the_digest_changes_with_a_value_a_permutation_or_a_sign():
  x = np.arange(64, dtype=np.float32).reshape(8, 8)
  base = checkpoint._digests([jnp.asarray(x)])[0]
  for other in (x[::-1], x.T, -x, x + np.float32(1e-6) * (x == 5)):
    assert checkpoint._digests([jnp.asarray(np.ascontiguousarray(other))])[0] != base


# ---------------------------------------------------------------------------------------------------------------------
# Save on one mesh, restore on another
# ---------------------------------------------------------------------------------------------------------------------


def _state():
  rng = np.random.default_rng(1)
  return {
    "w": jnp.asarray(rng.standard_normal((64, 16)), jnp.float32),
    "v": jnp.asarray(rng.standard_normal((16, 32)), jnp.bfloat16),
    "b": jnp.asarray(rng.standard_normal(16), jnp.float32),
    "key": jax.random.key(7),
    "step": jnp.int32(12),
  }


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
  "saved_on, restored_on",
  [
    ("data=1,fsdp=8", "data=4,fsdp=2"),
    ("data=4,fsdp=2", None),  # one device
    (None, "data=2,fsdp=4"),
  ],
)
def test_a_checkpoint_restores_onto_another_mesh_into_the_template_shardings(tmp_path, saved_on, restored_on):
  state = _state()
  place = lambda tree, spec: tree if spec is None else distributed.place_state(tree, distributed.parse_mesh(spec))
  with CheckpointStore(str(tmp_path)) as store:
    store.save(3, place(state, saved_on), {"step": 3, "sampler": {"opaque": [1, 2]}}, val_acc_mean=0.5)
  template = place(jax.tree.map(jnp.zeros_like, state), restored_on)
  with CheckpointStore(str(tmp_path)) as store:
    restored, meta = store.restore(3, template)
  assert meta == {"step": 3, "sampler": {"opaque": [1, 2]}}
  _assert_equal(restored, state)
  for got, like in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
    assert got.sharding == like.sharding
  if restored_on == "data=2,fsdp=4":  # each device holds a quarter of w: read straight into the shards
    assert {s.data.shape for s in restored["w"].addressable_shards} == {(16, 16)}


def test_a_checkpoint_of_another_configuration_is_refused_before_reading_its_arrays(tmp_path):
  with CheckpointStore(str(tmp_path)) as store:
    store.save(1, _state(), {"step": 1})
    other = {**_state(), "w": jnp.zeros((32, 16))}
    with pytest.raises(
      ValueError,
      match=r"Checkpoint array 4 has shape \(64, 16\) but the training state expects "
      r"\(32, 16\)",
    ):
      store.restore(1, other)
    with pytest.raises(ValueError, match="Checkpoint holds 5 arrays but this configuration's training state has 4"):
      store.restore(1, {k: v for k, v in _state().items() if k != "b"})


# ---------------------------------------------------------------------------------------------------------------------
# Retention, non-blocking saves, silent corruption
# ---------------------------------------------------------------------------------------------------------------------


def test_retention_keeps_the_latest_and_the_earliest_best_by_orbax_policy_also_when_reopened(tmp_path):
  state = _state()
  accuracies = {0: 0.1, 2: 0.5, 4: 0.3, 6: 0.5, 8: 0.2}  # 2 and 6 tie: the earlier is the best
  kept = []
  with CheckpointStore(str(tmp_path)) as store:
    for step in (0, 2, 4):
      store.save(step, state, {"step": step}, val_acc_mean=accuracies[step])
      store._wait()
      kept.append(store.steps())
  with CheckpointStore(str(tmp_path)) as store:  # the metrics are read back from the checkpoints
    for step in (6, 8):
      store.save(step, state, {"step": step}, val_acc_mean=accuracies[step])
      store._wait()
      kept.append(store.steps())
  assert kept == [[0], [2], [2, 4], [2, 6], [2, 8]]
  assert sorted(os.listdir(tmp_path)) == ["2", "8"]


def test_a_save_returns_before_its_write_and_the_meta_it_was_given_may_change_meanwhile(tmp_path):
  """The meta's lists are copied at save time: orbax writes the JSON in its background thread."""
  evals = [{"step": 0}]
  with CheckpointStore(str(tmp_path)) as store:
    store.save(0, _state(), {"step": 0, "evals": evals}, val_acc_mean=0.1)
    evals.append({"step": 2})  # what the loop does at the next evaluation
  with CheckpointStore(str(tmp_path)) as store:
    _, meta = store.restore(0, _state())
  assert meta["evals"] == [{"step": 0}]


def test_a_well_formed_checkpoint_of_other_values_is_refused_and_the_one_before_restored(tmp_path):
  """Step 4's arrays under step 8's name: orbax reads them without complaint; the digests recorded in step 8's meta
  do not match them (this test goes red with the comparison of the digests off)."""
  state = _state()
  later = jax.tree.map(lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x + 1, state)
  mesh = distributed.parse_mesh("data=2,fsdp=4")
  with CheckpointStore(str(tmp_path)) as store:
    store.save(4, distributed.place_state(state, mesh), {"step": 4}, val_acc_mean=0.9)
    store.save(8, distributed.place_state(later, mesh), {"step": 8}, val_acc_mean=0.1)
  shutil.rmtree(tmp_path / "8" / "state")
  shutil.copytree(tmp_path / "4" / "state", tmp_path / "8" / "state")
  with CheckpointStore(str(tmp_path)) as store:
    with pytest.raises(UnreadableCheckpoint, match="the checkpoint of step 8 in .* does not match its checksums"):
      store.restore(8, state)
    step, restored, meta, notes = store.restore_latest(state)
  assert step == 4 and meta == {"step": 4} and len(notes) == 1
  _assert_equal(restored, state)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded init
# ---------------------------------------------------------------------------------------------------------------------


def test_sharded_init_creates_every_leaf_in_its_shards_never_whole_on_one_device():
  from disam_jax.harness import algorithms
  from disam_jax.harness.algorithms import HParams
  from disam_jax.harness.steps import init_model, init_train_state

  mesh = distributed.parse_mesh("data=2,fsdp=4")
  graphdef, params, model_state = init_model(
    "mlp", num_classes=12, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 32}, mesh=mesh
  )
  _, whole, _ = init_model("mlp", num_classes=12, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 32})
  tx = algorithms.make_optimizer("disam", HParams(), num_domains=3, aux_example=model_state)
  state = distributed.init_sharded(lambda p, m: init_train_state(p, m, tx), mesh, params, model_state)
  split = 0
  for leaf in jax.tree.leaves(state):
    spec = distributed.fsdp_sharding(leaf.shape, mesh).spec
    assert leaf.sharding.spec == spec
    if "fsdp" in spec:  # each of the 8 devices holds a quarter of the leaf
      split += 1
      axis = list(spec).index("fsdp")
      shape = list(leaf.shape)
      shape[axis] //= 4
      assert {s.data.shape for s in leaf.addressable_shards} == {tuple(shape)}
  assert split >= 3 * 2  # the weight matrices, and Adam's two moments of each
  _assert_equal(state.params, whole)  # the values of the unsharded initialization
  # What XLA allocates per device to create the state: the shards, never the whole state (nor a whole weight)
  make = lambda: init_train_state(
    *init_model("mlp", num_classes=12, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 32})[1:], tx
  )
  memory = distributed.sharded_initializer(make, mesh).lower().compile().memory_analysis()
  leaves = jax.tree.leaves(state)
  nbytes = lambda x: x.size * (8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.itemsize)
  whole_bytes = sum(nbytes(x) for x in leaves)
  shard_bytes = sum(
    s.data.nbytes if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else nbytes(x)
    for x in leaves
    for s in x.addressable_shards[:1]
  )
  assert shard_bytes < whole_bytes / 2
  assert memory.output_size_in_bytes <= shard_bytes + 64 * len(leaves)  # alignment slack
  assert memory.output_size_in_bytes + memory.temp_size_in_bytes < whole_bytes


# ---------------------------------------------------------------------------------------------------------------------
# Sharded evaluation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("devices, mesh_spec", [(1, None), (4, "data=4"), (4, "data=1,fsdp=4"), (8, "data=4,fsdp=2")])
def test_sharded_evaluation_counts_equal_a_numpy_count_of_the_predictions(devices, mesh_spec):
  """Every accuracy is a NumPy count over the predictions of the unsharded model on each whole set."""
  from disam_jax.harness import data, feeds, loop
  from disam_jax.harness.config import ExperimentConfig
  from disam_jax.harness.steps import init_model, init_train_state

  config = ExperimentConfig(
    algorithms=("erm",), held_out=("75",), model="mlp", model_kwargs={"hidden": 16}, eval_batch_size=100
  )
  split = data.split_dataset(data.load_dataset("rotated_digits", seed=0), "75", seed=0)
  mesh = None if mesh_spec is None else distributed.parse_mesh(mesh_spec, jax.devices()[:devices])
  graphdef, params, model_state = init_model(
    "mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 16}, mesh=mesh
  )
  compiled = loop._compile(config, graphdef, model_state, len(split.train))
  state = init_train_state(params, model_state, compiled.txs["erm"])
  feed = loop._eval_feed(config, split, mesh)
  assert feed.global_batch_size == 100 if devices != 8 else 104  # a multiple of the devices
  record = loop._evaluator(config, "erm", feed, "75", 0, compiled, mesh)(state, 0)

  _, whole, whole_state = init_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 16})
  eval_step = compiled.eval_step  # jitted
  acc = [
    float(np.sum(np.argmax(np.asarray(eval_step(whole, whole_state, x)), -1) == y) / len(y))
    for x, y in tuple(split.val) + tuple(split.test)
  ]
  assert record["val_acc"] == dict(zip([d for kind, d in feed.parts if kind == "val"], acc[:-1]))
  assert record["test_acc"] == acc[-1]
  assert isinstance(feed, feeds.ArrayEvalFeed)
