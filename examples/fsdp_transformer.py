"""DISAM on a small LM-style transformer with FSDP x tensor-parallel parameters, 8 emulated CPU devices.

A toy next-token task: M domains of synthetic token sequences, domain d counting up by stride d + 1 (mod the
vocabulary) from a random start, with a domain-dependent fraction of tokens replaced at random (so the domains differ
in how well they can be fit, and the variance of the per-domain losses is not zero). The batch is laid out
`[M, b, S]` (M domains, b sequences each, S tokens) and sharded on b.

The layout: an explicit-axes 4x2 ('data', 'model') mesh (`jax.make_mesh`'s default axis types, `jax.set_mesh`).
Every weight is 2-D and sharded over both axes: `[in, out]` weights P('data', 'model') (FSDP on 'data' x
tensor-parallel on 'model'), the output projections P('model', 'data'); LayerNorm scales replicated. The model
states the layout it computes in, as explicit-mode models must: `jax.sharding.reshard` gathers a weight's FSDP
slices where it is used (keeping its 'model' split), and the row-parallel matmuls name their output sharding (their
contracted axis is split over 'model': the partial products are summed). DISAM needs nothing extra: its norms and
dot products are taken over whole parameters however they are split, and Adam's moments stay sharded like the
params. Prints the loss, the per-domain losses and their variance every `--log-every` steps, and checks at the end
that every parameter and moment is still sharded as it started.

    python examples/fsdp_transformer.py [--steps 150] [--log-every 25]
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported: XLA reads it once
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from jax.sharding import reshard  # noqa: E402

import disam_jax  # noqa: E402

V, D, H, F, L, S = 64, 64, 4, 128, 2, 16  # vocabulary, width, heads, MLP hidden units, layers, sequence length
M, B = 4, 8  # domains, sequences per domain in a batch (B divisible by the 4 'data' devices)
NOISE = (0.0, 0.05, 0.1, 0.2)  # fraction of tokens replaced at random, per domain

ROW = P("data", "model")  # [in, out]: FSDP x column-parallel
COL = P("model", "data")  # output projections: row-parallel x FSDP
LAYER_SPECS = {"ln1": P(), "wq": ROW, "wk": ROW, "wv": ROW, "wo": COL, "ln2": P(), "w1": ROW, "w2": COL}
SPECS = {"embed": ROW, "pos": ROW, "layers": [LAYER_SPECS] * L, "ln_f": P(), "unembed": ROW}
BATCH = P(None, "data", None)  # [M, b, S]: every device holds a slice of every domain
RESIDUAL = P(None, "data", None, None)  # [M, b, S, D]


def init_params(key):
  keys = iter(jax.random.split(key, 3 + 6 * L))
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape, jnp.float32)
  layer = lambda: {
    "ln1": jnp.ones([D]),
    "wq": normal([D, D], D**-0.5),
    "wk": normal([D, D], D**-0.5),
    "wv": normal([D, D], D**-0.5),
    "wo": normal([D, D], D**-0.5),
    "ln2": jnp.ones([D]),
    "w1": normal([D, F], D**-0.5),
    "w2": normal([F, D], F**-0.5),
  }
  return {
    "embed": normal([V, D], 1.0),
    "pos": normal([S, D], 0.1),
    "layers": [layer() for _ in range(L)],
    "ln_f": jnp.ones([D]),
    "unembed": normal([D, V], D**-0.5),
  }


def layer_norm(x, scale):
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale


def column_parallel(x, w):
  """x [..., in] (replicated on 'model') @ w gathered over 'data' only: the output is split over 'model'."""
  return x @ reshard(w, P(None, "model"))


def row_parallel(x, w):
  """x [..., in@model] @ w [in@model, out]: each device's partial product, summed over 'model'."""
  return jnp.matmul(x, reshard(w, P("model", None)), out_sharding=RESIDUAL)


def attention(x, p):
  m, b, s, _ = x.shape
  heads = lambda t: t.reshape(m, b, s, H, D // H)  # D@model -> (H@model, D/H)
  q, k, v = (heads(column_parallel(x, p[name])) for name in ("wq", "wk", "wv"))
  logits = jnp.einsum("mbshd,mbthd->mbhst", q, k) / math.sqrt(D // H)
  logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -1e9)
  out = jnp.einsum("mbhst,mbthd->mbshd", jax.nn.softmax(logits, axis=-1), v).reshape(m, b, s, D)
  return row_parallel(out, p["wo"])


def sequence_losses(params, tokens):
  """tokens [M, b, S] -> [M, b] mean next-token cross-entropy of each sequence."""
  inputs, targets = tokens[..., :-1], tokens[..., 1:]
  x = jax.nn.one_hot(inputs, V, dtype=jnp.float32) @ reshard(params["embed"], P())
  x = x + reshard(params["pos"], P())[:-1]
  for p in params["layers"]:
    x = x + attention(layer_norm(x, p["ln1"]), p)
    x = x + row_parallel(jax.nn.gelu(column_parallel(layer_norm(x, p["ln2"]), p["w1"])), p["w2"])
  logits = column_parallel(layer_norm(x, params["ln_f"]), params["unembed"])  # [M, b, S-1, V@model]
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jax.nn.one_hot(targets, V, dtype=jnp.float32) * log_p, axis=-1).mean(-1)


def sample_tokens(rng):
  """[M, B, S] int32 for one step (see the module docstring)."""
  start = rng.integers(0, V, size=(M, B, 1))
  tokens = (start + np.arange(1, M + 1)[:, None, None] * np.arange(S)) % V
  flip = rng.random((M, B, S)) < np.asarray(NOISE)[:, None, None]
  return np.where(flip, rng.integers(0, V, size=(M, B, S)), tokens).astype(np.int32)


def _same_layout(tree, shardings):
  """Whether every leaf of tree is laid out as `shardings` says (P() and P(None,) are the same layout)."""
  return all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(tree), shardings))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--log-every", type=int, default=25)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  mesh = jax.make_mesh((4, 2), ("data", "model"))  # Explicit axes: the default
  rng = np.random.default_rng(args.seed)
  tx = disam_jax.disam(optax.adam(3e-3), rho=0.05, lam=0.1, num_domains=M)

  with jax.set_mesh(mesh):
    params = jax.tree.map(
      lambda x, s: jax.device_put(x, s),
      init_params(jax.random.key(args.seed)),
      SPECS,
      is_leaf=lambda v: isinstance(v, P),
    )
    state = tx.init(params)  # Adam's moments are created sharded like the params
    layout = [x.sharding for x in jax.tree.leaves(params)]
    assert _same_layout(state.base_state[0].mu, layout)

    @jax.jit
    def step(params, state, tokens):
      domain_loss_fn = lambda p: disam_jax.domain_losses_from_grouped(sequence_losses(p, tokens))
      updates, state = tx.update(None, state, params, domain_loss_fn=domain_loss_fn)
      return optax.apply_updates(params, updates), state

    print(
      f"{jax.device_count()} devices, mesh {dict(mesh.shape)} ({mesh.axis_types[0].name} axes); "
      f"{sum(x.size for x in jax.tree.leaves(params))} parameters; batch [M={M}, b={B}, S={S}]"
    )
    print(f"{'step':>5} {'loss':>7} {'variance':>9}  per-domain losses (noise {', '.join(map(str, NOISE))})")
    first_step_s, t0 = None, time.perf_counter()
    for i in range(1, args.steps + 1):
      params, state = step(params, state, jax.device_put(sample_tokens(rng), BATCH))
      if first_step_s is None:
        jax.block_until_ready(params)
        first_step_s, t0 = time.perf_counter() - t0, time.perf_counter()
      if i % args.log_every == 0 or i in (1, args.steps):
        losses = " ".join(f"{v:.3f}" for v in np.asarray(state.domain_losses))
        print(f"{i:>5} {float(state.loss):>7.3f} {float(state.variance):>9.5f}  [{losses}]")
    jax.block_until_ready(params)
    steady_s = (time.perf_counter() - t0) / max(1, args.steps - 1)

  for name, tree in (
    ("params", params),
    ("Adam's first moments", state.base_state[0].mu),
    ("Adam's second moments", state.base_state[0].nu),
  ):
    if not _same_layout(tree, layout):
      raise SystemExit(f"the layout of the {name} changed: {[x.sharding.spec for x in jax.tree.leaves(tree)]}")
  w = params["layers"][0]["w1"]
  print(
    f"params and Adam moments still sharded as they started; e.g. layers[0].w1 {w.shape} {w.sharding.spec}, "
    f"{len(w.addressable_shards)} shards of {w.addressable_shards[0].data.shape}"
  )
  print(
    f"first step (compile) {first_step_s:.1f} s, then {1e3 * steady_s:.0f} ms/step; "
    f"{time.perf_counter() - start:.1f} s in all"
  )
  return float(state.loss)


if __name__ == "__main__":
  main()
