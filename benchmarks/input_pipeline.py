"""The streamed input pipeline (`harness.streaming`) against torchvision's ImageFolder + DataLoader.

    python -m benchmarks.input_pipeline            # results/input_pipeline.{md,json}
    python -m benchmarks.input_pipeline --quick    # seconds: tiny sizes (the smoke test)

On one synthetic DomainBed-layout folder of JPEGs (4 domains x 5 classes, sizes 200-300 px, smooth colour fields
with noise, quality 90), measured in one run:

* **conversion**: images/s of the first `load_dataset` (all cores; a fresh cache).
* **throughput**: training images/s at `--size` px with DomainBed's augmentation, for each worker count, ours
  (`StreamedTrainFeed`, batches of 4 domains x b) and torchvision's (`ImageFolder` on the same folder, the same
  transforms without ToTensor/Normalize, `DataLoader(batch_size=4 b, num_workers=w)` with a random sampler with
  replacement), interleaved round by round; the first batch (worker start) is timed apart from the steady rate.
* **first step on a cached folder**: `--stat-images` tiny files converted once, then in a fresh process the time to
  `load_dataset` (lists and stats every file: the fingerprint) and to the first batch; the stat pass alone is timed.
* **host memory**: the sum of RssAnon over the process tree (the run process and its grain workers) after loading,
  3 training batches and one evaluation pass, at two dataset sizes, in fresh processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
REPO = pathlib.Path(__file__).resolve().parent.parent


def import_torchvision():
  """`(torch, torchvision)`; ImportError if absent. A torchvision wheel whose compiled ops do not load against the
  installed torch (torchvision 0.28.0's CUDA wheel with torch 2.13.0+cpu) fails on import registering fake ops for
  them; its transforms and datasets do not need them, so that registration is skipped."""
  import types

  try:
    import torch
    import torchvision
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torch
    import torchvision
  return torch, torchvision


def make_folder(root: str, n: int, *, sizes=(200, 300), seed: int = 0) -> str:
  """`n` JPEGs in root/<domain>/<class>/ (4 domains x 5 classes), natural-looking enough to decode realistically."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  domains, classes = [f"d{k}" for k in range(4)], [f"c{k}" for k in range(5)]
  for i in range(n):
    d, c = domains[i % 4], classes[(i // 4) % 5]
    os.makedirs(os.path.join(root, d, c), exist_ok=True)
    w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(xx * rng.uniform(2, 9) + k) * 100 + 128 for k in range(3)], -1)
    pixels = (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, d, c, f"{i}.jpg"), quality=90)
  return root


# Batches taken after the first and before the steady-state clock starts: both pipelines read ahead (grain: 2 per
# worker, torch's DataLoader: prefetch_factor 2 per worker), so the batches right after the first are partly ready.
_WARMUP = 3


def _ours(records, split, batch: int, workers: int, steps: int, size: int):
  """`(seconds to the first batch, steady-state images/s over `steps` batches after `_WARMUP` more)`."""
  from disam_jax.harness import streaming

  feed = streaming.StreamedTrainFeed(records, split.train, batch, seed=0, augment=True, workers=workers)
  try:
    t0 = time.perf_counter()
    x, _ = feed.next()
    first = time.perf_counter() - t0
    assert x.shape[2:] == (size, size, 3)
    for _ in range(_WARMUP):
      feed.next()
    t0 = time.perf_counter()
    for _ in range(steps):
      feed.next()
    return first, steps * x.shape[0] * x.shape[1] / (time.perf_counter() - t0)
  finally:
    feed.close()


def _torchvision(root: str, batch: int, workers: int, steps: int, size: int):
  """As `_ours`, torchvision's ImageFolder + DataLoader (its default start method: fork on Linux)."""
  torch, torchvision = import_torchvision()
  T = torchvision.transforms
  transform = T.Compose(
    [
      T.RandomResizedCrop(size, scale=(0.7, 1.0)),
      T.RandomHorizontalFlip(),
      T.ColorJitter(0.3, 0.3, 0.3, 0.3),
      T.RandomGrayscale(),
      T.PILToTensor(),
    ]
  )  # uint8, as ours
  dataset = torchvision.datasets.ImageFolder(root, transform=transform)
  sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
  it = iter(loader)
  try:
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    for _ in range(_WARMUP):
      next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(it)
    return first, steps * batch / (time.perf_counter() - t0)
  finally:
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
      shutdown()
    del it


def _pickle_round_trip(x):
  import pickle

  return pickle.loads(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))


def _stage_profile(records, root: str, size: int, images: int, batch: int) -> dict:
  """Mean microseconds per training image in each stage, in this process (no workers), ours and torchvision's on
  the same `images` files (torchvision's transforms called one by one as its Compose does; its random draws from
  torch's generator, ours from a NumPy generator per image as the feed does). "to the main process" is a pickle
  round trip of one batch per image (what grain's worker queue does with a batch; torchvision's workers instead put
  batches in shared memory, not timed here)."""
  from PIL import Image

  from disam_jax.harness import streaming

  source = records.source()
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs)[:images]
  ours = dict.fromkeys(
    [
      "setup (generator)",
      "read record",
      "decode",
      "RandomResizedCrop",
      "flip",
      "ColorJitter",
      "grayscale + to array",
      "batch (stack)",
      "to the main process",
    ],
    0.0,
  )
  clock = time.perf_counter

  def timed(name, fn, *a):
    t = clock()
    out = fn(*a)
    ours[name] += clock() - t
    return out

  pixels = []
  for k in range(len(files)):
    rng = timed("setup (generator)", np.random.default_rng, [0, 1, 2, k])
    raw = timed("read record", source.__getitem__, k % len(source))
    image = timed("decode", streaming.decode, raw)
    image = timed("RandomResizedCrop", streaming._random_resized_crop, image, size, rng)
    image = timed("flip", streaming._random_flip, image, rng)
    image = timed("ColorJitter", streaming._color_jitter, image, rng)
    pixels.append(timed("grayscale + to array", streaming._random_grayscale, image, rng))
    if len(pixels) == batch:
      stacked = timed("batch (stack)", np.stack, pixels)
      timed("to the main process", _pickle_round_trip, stacked)
      pixels = []
  result = {"disam_jax grain": {k: v / len(files) * 1e6 for k, v in ours.items()}}
  try:
    torch, torchvision = import_torchvision()
  except ImportError:
    return result
  T = torchvision.transforms
  stages = [
    ("RandomResizedCrop", T.RandomResizedCrop(size, scale=(0.7, 1.0))),
    ("flip", T.RandomHorizontalFlip()),
    ("ColorJitter", T.ColorJitter(0.3, 0.3, 0.3, 0.3)),
    ("grayscale + to tensor", T.Compose([T.RandomGrayscale(), T.PILToTensor()])),
  ]
  theirs = dict.fromkeys(["read file", "decode", *(name for name, _ in stages), "batch (collate)"], 0.0)
  tensors = []
  for path in files:
    t = clock()
    with open(path, "rb") as f:  # torchvision's pil_loader: Image.open(f).convert("RGB") on the open file
      image = Image.open(f)
      image.size  # noqa: B018 (the header, as a read)
      theirs["read file"] += clock() - t
      t = clock()
      image = image.convert("RGB")
      theirs["decode"] += clock() - t
    for name, transform in stages:
      t = clock()
      image = transform(image)
      theirs[name] += clock() - t
    tensors.append(image)
    if len(tensors) == batch:
      t = clock()
      torch.utils.data.default_collate(tensors)
      theirs["batch (collate)"] += clock() - t
      tensors = []
  result["torchvision"] = {k: v / len(files) * 1e6 for k, v in theirs.items()}
  return result


_FIRST_STEP = textwrap.dedent("""
  import json, os, sys, time
  t0 = time.perf_counter()
  from disam_jax.harness import data, streaming
  t_import = time.perf_counter() - t0
  root, cache = sys.argv[1], sys.argv[2]
  t0 = time.perf_counter()
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  t_list = time.perf_counter() - t0
  t0 = time.perf_counter()
  for f in files:
    os.stat(f)
  t_stat = time.perf_counter() - t0
  t0 = time.perf_counter()
  ds = data.load_dataset("image_folder", data_dir=root, image_size=32, cache_dir=cache)
  t_load = time.perf_counter() - t0
  split = data.split_dataset(ds, ds.domains[-1])
  feed = streaming.StreamedTrainFeed(split.records, split.train, 8, 0, workers=0)
  feed.next()
  t_first = time.perf_counter() - t0
  feed.close()
  print(json.dumps({"files": len(files), "import_s": t_import, "list_s": t_list, "stat_s": t_stat,
                    "load_dataset_s": t_load, "to_first_batch_s": t_first}))
""")


_MEMORY = textwrap.dedent("""
  import json, os, sys
  from disam_jax.harness import data, streaming

  def tree_rss_anon():
    import psutil
    total = 0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
      try:
        for line in open(f"/proc/{p.pid}/status"):
          if line.startswith("RssAnon:"):
            total += int(line.split()[1]) * 1024
      except OSError:
        pass
    return total

  root, cache, size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  before = tree_rss_anon()
  ds = data.load_dataset("image_folder", data_dir=root, image_size=size, cache_dir=cache)
  split = data.split_dataset(ds, ds.domains[-1])
  feed = streaming.StreamedTrainFeed(split.records, split.train, 8, 0, workers=workers)
  for _ in range(3):
    feed.next()
  parts = [("val", d) for d in split.train_domains] + [("test", ds.domains[-1])]
  evals = streaming.StreamedEvalFeed(split.records, parts,
                                     list(split.val) + list(split.test), 64, workers=workers)
  batches = iter(evals.batches())
  next(batches)
  peak = tree_rss_anon()  # workers running, train and eval pipelines open
  for _ in batches:
    pass
  after = tree_rss_anon()
  feed.close(); evals.close()
  print(json.dumps({"images": sum(len(x) for x in ds.images), "rss_anon_before": before,
                    "rss_anon_running": peak, "rss_anon_after_eval": after}))
""")


def _run(code: str, *args) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run(
    [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--profile-images", type=int, default=200)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8, help="per domain (4 domains)")
  parser.add_argument("--steps", type=int, default=30, help="timed batches per cell")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--stat-images", type=int, default=20000)
  parser.add_argument("--memory-images", type=int, nargs=2, default=[400, 4000])
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.images, args.size, args.batch, args.steps, args.workers, args.rounds = 48, 32, 2, 2, [0], 1
    args.stat_images, args.memory_images, args.profile_images = 100, [40, 80], 8

  from disam_jax.harness import data

  results = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "args": vars(args)}
  with tempfile.TemporaryDirectory(prefix="input_pipeline-") as tmp:
    root = make_folder(os.path.join(tmp, "folder"), args.images)
    t0 = time.perf_counter()
    ds = data.load_dataset("image_folder", data_dir=root, image_size=args.size, cache_dir=os.path.join(tmp, "c"))
    results["conversion_images_per_s"] = args.images / (time.perf_counter() - t0)
    split = data.split_dataset(ds, ds.domains[-1])
    train_root = os.path.join(tmp, "train_domains")  # torchvision reads the same 3 training domains
    os.makedirs(train_root)
    for d in split.train_domains:
      os.symlink(os.path.join(root, d), os.path.join(train_root, d))
    domains = len(split.train_domains)
    rows = []
    try:
      import_torchvision()
      have_torch = True
    except ImportError:
      have_torch = False
    for r in range(args.rounds):
      for w in args.workers:
        # interleaved, the order alternating by round so neither pipeline always runs after the other
        for pipeline in ["ours", "torchvision"] if r % 2 == 0 else ["torchvision", "ours"]:
          if pipeline == "ours":
            first, rate = _ours(ds.records, split, args.batch, w, args.steps, args.size)
            name = "disam_jax grain"
          elif have_torch:
            first, rate = _torchvision(train_root, args.batch * domains, w, args.steps, args.size)
            name = "torchvision"
          else:
            continue
          rows.append({"round": r, "workers": w, "pipeline": name, "first_batch_s": first, "images_per_s": rate})
          print(rows[-1], flush=True)
    results["throughput"] = rows
    results["stage_profile_us_per_image"] = _stage_profile(
      ds.records, train_root, args.size, args.profile_images, args.batch * domains
    )

    stat_root = make_folder(os.path.join(tmp, "stat"), args.stat_images, sizes=(16, 24))
    cache = os.path.join(tmp, "stat_cache")
    t0 = time.perf_counter()
    data.load_dataset("image_folder", data_dir=stat_root, image_size=32, cache_dir=cache)
    results["conversion_small_images_per_s"] = args.stat_images / (time.perf_counter() - t0)
    results["first_step_cached"] = _run(_FIRST_STEP, stat_root, cache)

    memory = []
    for n in args.memory_images:
      mroot = make_folder(os.path.join(tmp, f"mem{n}"), n, sizes=(64, 96))
      mcache = os.path.join(tmp, f"mem{n}_cache")
      data.load_dataset("image_folder", data_dir=mroot, image_size=args.size, cache_dir=mcache)
      memory.append(_run(_MEMORY, mroot, mcache, args.size, 2 if not args.quick else 0))
    results["memory"] = memory
  _write(results, pathlib.Path(args.out), args.quick)
  return 0


def summary(rows: list[dict]) -> list[dict]:
  """Per worker count: each pipeline's median steady-state images/s and first-batch seconds over the rounds, the
  per-round values, and whether ours is at least torchvision's median rate."""
  import statistics

  out = []
  for w in sorted({r["workers"] for r in rows}):
    cell = {"workers": w}
    for name, key in (("disam_jax grain", "ours"), ("torchvision", "torchvision")):
      mine = [r for r in rows if r["workers"] == w and r["pipeline"] == name]
      if mine:
        cell[key] = {
          "median_images_per_s": statistics.median(r["images_per_s"] for r in mine),
          "median_first_batch_s": statistics.median(r["first_batch_s"] for r in mine),
          "images_per_s": [r["images_per_s"] for r in mine],
        }
    if "ours" in cell and "torchvision" in cell:
      cell["ratio"] = cell["ours"]["median_images_per_s"] / cell["torchvision"]["median_images_per_s"]
      cell["target_met"] = cell["ratio"] >= 1.0
    out.append(cell)
  return out


def _summary_table(summary_rows: list[dict]) -> list[str]:
  """The per-worker-count table: medians, the ratio, whether the target is met, first batches, per-round rates."""
  from disam_jax.harness.tables import markdown_table

  rounds = lambda p: ", ".join(f"{v:.0f}" for v in p["images_per_s"])
  rows = []
  for c in summary_rows:
    o, t = c.get("ours"), c.get("torchvision")
    if o is None or t is None:
      continue
    rows.append(
      [
        c["workers"],
        f"{o['median_images_per_s']:.0f}",
        f"{t['median_images_per_s']:.0f}",
        f"{c['ratio']:.2f}",
        "yes" if c["target_met"] else "no",
        f"{o['median_first_batch_s']:.2f}",
        f"{t['median_first_batch_s']:.2f}",
        rounds(o),
        rounds(t),
      ]
    )
  return markdown_table(
    [
      "workers",
      "ours: median images/s",
      "torchvision: median images/s",
      "ours / torchvision",
      "target met",
      "ours: first batch (s)",
      "torchvision: first batch (s)",
      "ours per round",
      "torchvision per round",
    ],
    rows,
  )


def _write(results: dict, out: pathlib.Path, quick: bool) -> None:
  from disam_jax.harness.tables import markdown_table

  out.mkdir(parents=True, exist_ok=True)
  name = "input_pipeline_quick" if quick else "input_pipeline"
  results["summary"] = summary(results["throughput"])
  (out / f"{name}.json").write_text(json.dumps(results, indent=1))
  a = results["args"]
  lines = [
    f"# Input pipeline ({results['date']}, {results['cpus']} CPUs)",
    "",
    f"`python -m benchmarks.input_pipeline` (run under `flock /work/cpu.lock`: no other benchmark beside it). "
    f"{a['images']} synthetic JPEGs (200-300 px, 4 domains, 3 read for training), {a['size']} px, batches of "
    f"{a['batch']} per domain (torchvision: {a['batch'] * 3} per batch from the same 3 domains' files), "
    f"DomainBed's training augmentation in both; {a['rounds']} interleaved rounds (the order alternating), "
    f"per cell: the first batch (worker start-up included) timed apart, {_WARMUP} batches untimed, then "
    f"{a['steps']} batches timed (the steady-state rate).",
    f"The box has {results['cpus']} cores: with 2 workers, the workers and the main process oversubscribe it "
    "(both pipelines alike), and other users' processes may share it.",
    "",
    f"Conversion: {results['conversion_images_per_s']:.0f} images/s (200-300 px JPEGs), "
    f"{results['conversion_small_images_per_s']:.0f} images/s (16-24 px JPEGs).",
    "",
    *_summary_table(results["summary"]),
  ]
  lines += [
    "",
    "The first batch of ours includes starting grain's worker processes: grain starts them with the spawn "
    "method (not configurable) and each imports grain, which imports JAX (`import grain` in a fresh "
    "process: 1.3-1.7 s on this box; our module, Pillow and array_record add 0.02 s); torchvision's "
    "DataLoader forks. A run pays it once per feed (the evaluation feed keeps its workers for the whole "
    "run), not per step or per evaluation.",
  ]
  profile = results.get("stage_profile_us_per_image", {})
  if profile:
    lines += [
      "",
      f"Where a training image's time goes, in one process, no workers ({a['profile_images']} images, "
      "microseconds per image; `_stage_profile`):",
      "",
      *markdown_table(
        ["pipeline", "stage", "us per image"],
        [
          row
          for pipe, stages in profile.items()
          for row in [
            *([pipe, k, f"{v:.0f}"] for k, v in stages.items()),
            [pipe, "**total**", f"**{sum(stages.values()):.0f}**"],
          ]
        ],
      ),
    ]
  lines += [
    "",
    *markdown_table(
      ["round", "workers", "pipeline", "first batch (s)", "images/s"],
      (
        [row["round"], row["workers"], row["pipeline"], f"{row['first_batch_s']:.2f}", f"{row['images_per_s']:.1f}"]
        for row in results["throughput"]
      ),
    ),
  ]
  f = results["first_step_cached"]
  lines += [
    "",
    f"Cached folder of {f['files']} files: listing {f['list_s']:.2f} s, stat of every file "
    f"{f['stat_s']:.2f} s, load_dataset {f['load_dataset_s']:.2f} s, to the first batch "
    f"{f['to_first_batch_s']:.2f} s (after imports of {f['import_s']:.2f} s).",
    "",
    *markdown_table(
      ["images", "RssAnon before (MiB)", "running (MiB)", "after an eval pass (MiB)"],
      (
        [
          m["images"],
          f"{m['rss_anon_before'] / 2**20:.0f}",
          f"{m['rss_anon_running'] / 2**20:.0f}",
          f"{m['rss_anon_after_eval'] / 2**20:.0f}",
        ]
        for m in results["memory"]
      ),
    ),
  ]
  (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
