"""Sharded checkpoints (`harness.checkpoint.CheckpointStore`): blocking time, write time, restore time and host
memory of a save, 1 process vs 2 processes.

    python -m benchmarks.checkpoint            # states of 50 and 500 MiB, 1 and 2 processes: results/checkpoint.md
    python -m benchmarks.checkpoint --quick    # 4 MiB, seconds (the smoke test)

Each case runs in fresh worker processes (2 CPU devices each; 2 processes join over loopback with gloo) holding a
state of float32 matrices split over an `fsdp` axis of every device (1 process: 2 devices, 2 processes: 4 devices,
so each process holds half the state). The state is created sharded (`distributed.init_sharded`). Then `--saves`
checkpoints as the training loop writes them, each one deleting the one before (the latest is also the best):

* blocking: how long `save` holds the caller (the digests on the devices, orbax's copy to host, launching the
  write); the loop trains while the rest goes on in orbax's background thread;
* write: from the start of `save` until the checkpoint is complete and the older one deleted (`_wait` called right
  after `save`);
* restore: `restore` of the latest into the placed state's shardings, digests checked, in a fresh store;
* peak host memory: the process's RssAnon (heap; not file mappings or page cache), sampled every 2 ms during the
  saves and during the restore, and its increase over the value before.

Times are the median over the saves and the max over the processes (the job waits for the slowest). One run on a
shared 2-core machine: read ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MIB = 2**20
COLUMNS = 1024  # every matrix is [rows, 1024] float32, rows a multiple of 4 (split over up to 4 devices)


def _rss_anon() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  return 0


class _Peak:
  """The peak of this process's RssAnon while the block runs (a sampling thread)."""

  def __enter__(self):
    self.before = self.peak = _rss_anon()
    self._stop = threading.Event()

    def sample():
      while not self._stop.is_set():
        self.peak = max(self.peak, _rss_anon())
        time.sleep(0.002)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_anon())


def _worker(size_mib: float, saves: int, directory: str) -> dict:
  """One process of a case (after `distributed.initialize`): the measurements of this process."""
  import jax
  import jax.numpy as jnp

  from disam_jax.harness import distributed
  from disam_jax.harness.checkpoint import CheckpointStore

  mesh = distributed.parse_mesh(f"data=1,fsdp={jax.device_count()}")
  arrays = 8
  rows = max(4, int(round(size_mib * MIB / 4 / COLUMNS / arrays / 4)) * 4)

  def make():
    keys = jax.random.split(jax.random.key(0), arrays)
    return {f"w{i}": jax.random.normal(keys[i], (rows, COLUMNS), jnp.float32) for i in range(arrays)}

  state = distributed.init_sharded(make, mesh)
  jax.block_until_ready(state)
  total = sum(x.size * 4 for x in jax.tree.leaves(state))
  blocking, write = [], []
  with _Peak() as saving:
    store = CheckpointStore(directory)
    for step in range(saves):
      start = time.perf_counter()
      store.save(step, state, {"step": step}, val_acc_mean=float(step))  # the latest is the best: one deletion each
      blocking.append(time.perf_counter() - start)
      store._wait()
      write.append(time.perf_counter() - start)
    store.close()
  template = jax.tree.map(jnp.zeros_like, state)
  jax.block_until_ready(template)
  with _Peak() as restoring:
    store = CheckpointStore(directory)
    start = time.perf_counter()
    restored, _ = store.restore(saves - 1, template)
    jax.block_until_ready(restored)
    restore = time.perf_counter() - start
    store.close()
  equal = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  return dict(
    process=jax.process_index(),
    processes=jax.process_count(),
    devices=jax.device_count(),
    state_mib=total / MIB,
    local_mib=total / MIB / jax.process_count(),
    blocking_s=blocking,
    write_s=write,
    restore_s=restore,
    equal=equal,
    save_peak_mib=saving.peak / MIB,
    save_increase_mib=(saving.peak - saving.before) / MIB,
    restore_peak_mib=restoring.peak / MIB,
    restore_increase_mib=(restoring.peak - restoring.before) / MIB,
  )


def _run_case(size_mib: float, processes: int, saves: int, timeout: float) -> list[dict]:
  """Runs one case in `processes` fresh worker processes; their results."""
  from disam_jax.harness.launch import free_port

  port = free_port()
  with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as directory:
    procs = []
    for pid in range(processes):
      env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
      env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
      if processes > 1:
        env.update(
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid)
        )
      command = [
        sys.executable,
        "-m",
        "benchmarks.checkpoint",
        "--worker",
        str(size_mib),
        str(saves),
        os.path.join(directory, "checkpoints"),
      ]
      procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      if p.returncode:
        raise RuntimeError(f"a worker of the {size_mib} MiB x {processes} process case failed: {err[-2000:]}")
      results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def _summary(results: list[dict]) -> dict:
  slowest = lambda key: max(statistics.median(r[key]) for r in results)
  return dict(
    state_mib=round(results[0]["state_mib"], 1),
    processes=len(results),
    devices=results[0]["devices"],
    local_mib=round(results[0]["local_mib"], 1),
    blocking_s=round(slowest("blocking_s"), 4),
    write_s=round(slowest("write_s"), 4),
    restore_s=round(max(r["restore_s"] for r in results), 4),
    blocking_fraction=round(slowest("blocking_s") / slowest("write_s"), 3),
    write_mib_per_s_per_process=round(results[0]["local_mib"] / slowest("write_s"), 1),
    restore_mib_per_s_per_process=round(results[0]["local_mib"] / max(r["restore_s"] for r in results), 1),
    save_peak_mib=round(max(r["save_peak_mib"] for r in results), 1),
    save_increase_mib=round(max(r["save_increase_mib"] for r in results), 1),
    restore_peak_mib=round(max(r["restore_peak_mib"] for r in results), 1),
    restore_increase_mib=round(max(r["restore_increase_mib"] for r in results), 1),
    equal=all(r["equal"] for r in results),
  )


def _markdown(rows: list[dict], saves: int) -> str:
  from benchmarks.step_cost.timing import machine_line
  from disam_jax.harness.tables import markdown_table

  header = [
    "state MiB",
    "processes",
    "MiB per process",
    "save blocks s",
    "write s",
    "blocking / write",
    "restore s",
    "write MiB/s per process",
    "restore MiB/s per process",
    "peak RssAnon saving (increase) MiB",
    "peak RssAnon restoring (increase) MiB",
    "restored equal",
  ]
  rows = [
    [
      r["state_mib"],
      r["processes"],
      r["local_mib"],
      r["blocking_s"],
      r["write_s"],
      r["blocking_fraction"],
      r["restore_s"],
      r["write_mib_per_s_per_process"],
      r["restore_mib_per_s_per_process"],
      f"{r['save_peak_mib']} ({r['save_increase_mib']})",
      f"{r['restore_peak_mib']} ({r['restore_increase_mib']})",
      "yes" if r["equal"] else "NO",
    ]
    for r in rows
  ]
  lines = [
    "# Sharded checkpoints: blocking, write and restore time, host memory",
    "",
    f"{machine_line()}; `python -m benchmarks.checkpoint` (medians of {saves} saves, each deleting the one before; "
    "the slowest process). Each process has 2 CPU devices; the state is split over all devices (`fsdp`).",
    "",
    *markdown_table(header, rows, ["---:"] * 11 + [":---:"]),
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a 4 MiB state, 2 saves: the smoke test")
  parser.add_argument("--sizes", type=float, nargs="+", default=[50, 500], help="state sizes in MiB")
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--worker", nargs=3, metavar=("MIB", "SAVES", "DIR"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    from disam_jax.harness import distributed

    distributed.initialize(distributed.DistributedConfig.from_env(initialization_timeout=60))
    print(json.dumps(_worker(float(args.worker[0]), int(args.worker[1]), args.worker[2])))
    return 0
  sizes, saves = ([4.0], 2) if args.quick else (args.sizes, args.saves)
  rows = []
  for size in sizes:
    for processes in args.processes:
      rows.append(_summary(_run_case(size, processes, saves, timeout=1200)))
      print(json.dumps(rows[-1]), flush=True)
  from benchmarks.step_cost.timing import write_results

  stem = "checkpoint_quick" if args.quick else "checkpoint"
  path = write_results(args.out_dir, stem, _markdown(rows, saves), {"saves": saves, "rows": rows})
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
