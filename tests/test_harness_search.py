"""DomainBed's protocol: the hyperparameter declarations, the random search, the three model-selection methods, and
resuming in the middle of a search.

The draws are checked against NumPy streams seeded here by hand, the selections against choices worked out by hand
on a tiny fake run directory (every number below is written out, never computed by the harness), and a resumed
search against an uninterrupted one.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from disam_jax.harness import _choices, cli, search, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------------------------------


def test_every_hparams_field_is_declared_and_has_a_flag_or_a_setter():
  decl = _choices.declarations()
  assert list(decl) == [f.name for f in dataclasses.fields(_choices.HParams)]
  flags = {a.dest: a.option_strings for a in cli.build_parser()._actions}
  for name, d in decl.items():
    assert d.help, name
    if d.option is not None:
      assert flags[d.option[2:].replace("-", "_")] == [d.option], name
  assert decl["trigger_max_gap"].option is None and decl["trigger_min_gap"].option == "--trigger-gaps"


def test_defaults_per_dataset_kind_are_domainbeds():
  small, large = _choices.default_hparams("rotated_digits"), _choices.default_hparams("pacs")
  assert (small.lr, small.batch_size, small.weight_decay) == (1e-3, 64, 0.0)
  assert (large.lr, large.batch_size, large.weight_decay) == (5e-5, 32, 0.0)
  assert _choices.default_hparams("tfds:mnist").lr == 1e-3
  assert _choices.default_hparams("pacs", lr=0.1, rho=None).lr == 0.1  # None: not given


def test_the_docs_hold_the_generated_table_of_hyperparameters():
  with open(os.path.join(ROOT, "docs", "harness.md")) as f:
    docs = f.read()
  assert _choices.hparams_markdown() in docs


def test_config_from_args_fixes_the_flags_given_and_fills_the_rest_from_the_declarations():
  args = cli.build_parser().parse_args(
    [
      "--lr",
      "0.01",
      "--trigger-gaps",
      "4",
      "8",
      "--perturb-when",
      "variance",
      "--hparams-samples",
      "5",
      "--dataset",
      "pacs",
    ]
  )
  config = cli.config_from_args(args)
  hp = config.hparams
  assert (hp.lr, hp.trigger_min_gap, hp.trigger_max_gap, hp.batch_size) == (0.01, 4, 8, 32)
  assert config.fixed_hparams == ("lr", "perturb_when", "trigger_max_gap", "trigger_min_gap")
  assert config.hparams_samples == 5
  assert "lr" not in search.searched("erm", "pacs", config.fixed_hparams)


# ---------------------------------------------------------------------------------------------------------------------
# The search's draws
# ---------------------------------------------------------------------------------------------------------------------


def _stream(name, sample, seed):
  """An independent reference of the seeding: numpy's default_rng of [sha256(name)[:8] little-endian, sample, seed]."""
  key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
  return np.random.default_rng([key, sample, seed])


def test_draws_are_each_hyperparameters_own_stream_and_sample_0_is_the_defaults():
  base = _choices.default_hparams("rotated_digits").for_run(300)
  assert search.draw(base, "disam+coral", "rotated_digits", 0, 3, 300) == base
  hp = search.draw(base, "disam+coral", "rotated_digits", 2, 3, 300)
  assert hp.lr == pytest.approx(10 ** _stream("lr", 2, 3).uniform(-4.5, -2.5), rel=1e-15)
  assert hp.batch_size == int(2 ** _stream("batch_size", 2, 3).uniform(3, 9))
  assert hp.rho == pytest.approx(10 ** _stream("rho", 2, 3).uniform(-2, -0.5), rel=1e-15)
  assert hp.lam == pytest.approx(10 ** _stream("lam", 2, 3).uniform(-2, 0), rel=1e-15)
  assert hp.coral_gamma == pytest.approx(10 ** _stream("coral_gamma", 2, 3).uniform(-1, 1), rel=1e-15)
  assert hp.weight_decay == 0.0 and hp.vrex_lambda == base.vrex_lambda  # not searched for small images / not used
  # Reproducible; every algorithm of one draw shares the hyperparameters they have in common (a paired comparison)
  assert search.draw(base, "disam+coral", "rotated_digits", 2, 3, 300) == hp
  erm = search.draw(base, "erm", "rotated_digits", 2, 3, 300)
  assert (erm.lr, erm.batch_size, erm.rho, erm.lam) == (hp.lr, hp.batch_size, base.rho, base.lam)
  # Other samples and trial seeds draw other values
  assert len({search.draw(base, "erm", "rotated_digits", k, s, 300).lr for k in (1, 2) for s in (0, 1)}) == 4
  # A fixed hyperparameter is never drawn
  assert search.draw(base, "erm", "rotated_digits", 2, 3, 300, fixed=("lr",)).lr == base.lr


def test_adding_or_reordering_hyperparameters_does_not_change_the_others_draws(monkeypatch):
  base = _choices.default_hparams("pacs").for_run(300)
  before = [search.draw(base, "sam+fishr", "pacs", k, 0, 300) for k in range(1, 6)]
  searched = search.searched("sam+fishr", "pacs")
  assert searched == ("lr", "weight_decay", "batch_size", "rho", "fishr_lambda", "fishr_ema", "fishr_anneal_steps")
  # Searched in reverse order and without `rho` (as if it had been added last): every other draw is the same
  monkeypatch.setattr(search, "searched", lambda *a, **k: tuple(n for n in reversed(searched) if n != "rho"))
  after = [search.draw(base, "sam+fishr", "pacs", k, 0, 300) for k in range(1, 6)]
  for b, a in zip(before, after):
    assert a == dataclasses.replace(b, rho=base.rho)


@pytest.mark.parametrize("dataset", ["rotated_digits", "pacs"])
def test_draws_stay_within_their_distributions(dataset):
  base = _choices.default_hparams(dataset).for_run(300)
  small = dataset == "rotated_digits"
  lr_lo, lr_hi = (10**-4.5, 10**-2.5) if small else (1e-5, 10**-3.5)
  bs_lo, bs_hi = (8, 512) if small else (8, int(2**5.5))
  draws = [
    search.draw(base, algorithm, dataset, k, s, 300)
    for algorithm in ("disam+vrex", "sam+fishr", "erm+coral" if False else "coral")
    for k in range(1, 34)
    for s in range(3)
  ]
  lrs = np.array([h.lr for h in draws])
  assert lrs.min() >= lr_lo and lrs.max() <= lr_hi
  # log-uniform: the mean of log10(lr) is near the middle of the range (~300 draws, sd of the mean ~0.03)
  assert abs(np.log10(lrs).mean() - (np.log10(lr_lo) + np.log10(lr_hi)) / 2) < 0.15
  assert all(bs_lo <= h.batch_size <= bs_hi and isinstance(h.batch_size, int) for h in draws)
  if small:
    assert all(h.weight_decay == 0.0 for h in draws)
  else:
    assert all(1e-6 <= h.weight_decay <= 1e-2 for h in draws)
  for h in draws:
    assert 0.01 <= h.rho <= 10**-0.5 and 0.01 <= h.lam <= 1.0
    assert 0.1 <= h.coral_gamma <= 10 and 0.1 <= h.vrex_lambda <= 1e5 and 10 <= h.fishr_lambda <= 1e4
    assert 0.90 <= h.fishr_ema <= 0.99
    assert 0 <= h.vrex_anneal_steps <= 600 and 0 <= h.fishr_anneal_steps <= 300  # 10^4 and 5000 of 5000 steps
    h.validate()


# ---------------------------------------------------------------------------------------------------------------------
# The three selection methods, on a fake run directory worked out by hand
# ---------------------------------------------------------------------------------------------------------------------

STEPS = (0, 10, 20)


def _evals(val, held, held_20, others=None):
  """Evaluations at STEPS: mean validation accuracy, the held-out domain a's 80% and 20%, other held-out parts."""
  out = []
  for i, step in enumerate(STEPS):
    accs = {"a": held[i], "a (20%)": held_20[i], **{k: v[i] for k, v in (others or {}).items()}}
    out.append({"step": step, "val_acc": {}, "val_acc_mean": val[i], "test_acc": held[i], "test_accs": accs})
  return out


def _cell(sample, evals, val_domain=None, algorithm="erm", seed=0):
  best = max(evals, key=lambda r: r["val_acc_mean"])  # no ties in these numbers
  summary = lambda r: {"step": r["step"], "val_acc": r["val_acc_mean"], "test_acc": r["test_acc"]}
  return {
    "algorithm": algorithm,
    "held_out": "a",
    "seed": seed,
    "steps": 20,
    "selected": summary(best),
    "last": summary(evals[-1]),
    "evals": evals,
    "seconds": 1.0,
    "sample": sample,
    "val_domain": val_domain,
    "directory": f"cells/{algorithm}_heldout-a{'+' + val_domain if val_domain else ''}_seed-{seed}"
    f"{f'_hparams-{sample}' if sample else ''}",
    "hparams": {"lr": 0.001 * (sample + 1)},
  }


# Domains a, b, c; held out: a; draws 0 and 1. Validation (training domains' 20%) / a's 80% / a's 20% per step:
#   draw 0: val .50 .70 .65   a .40 .60 .62   a20 .45 .55 .58   -> best checkpoint step 10 (val .70, a .60)
#   draw 1: val .50 .68 .72   a .40 .66 .64   a20 .45 .70 .50   -> best checkpoint step 20 (val .72, a .64)
# Leave-one-domain-out: the runs holding out a and b (scored on b's 80%) and a and c (scored on c's 80%):
#   draw 0: b .30 .50 .60, c .30 .70 .50 -> mean .30 .60 .55 -> step 10 (val .60, a .60)
#   draw 1: b .30 .40 .50, c .30 .50 .60 -> mean .30 .45 .55 -> step 20 (val .55, a .64)
# Hence: training-domain validation: draw 1 (.72 > .70) at step 20, a = .64
#        oracle: the last checkpoint's a20: draw 0 .58 > draw 1 .50 -> draw 0, a = .62 (step 20)
#        leave-one-domain-out: draw 0 (.60 > .55) at step 10, a = .60
DRAW0 = _evals([0.50, 0.70, 0.65], [0.40, 0.60, 0.62], [0.45, 0.55, 0.58])
DRAW1 = _evals([0.50, 0.68, 0.72], [0.40, 0.66, 0.64], [0.45, 0.70, 0.50])
PAIR = lambda v, accs: _evals(
  [0.9, 0.9, 0.9], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1], {v: accs, f"{v} (20%)": [0.99, 0.99, 0.99]}
)
CELLS = [
  _cell(0, DRAW0),
  _cell(1, DRAW1),
  _cell(0, PAIR("b", [0.30, 0.50, 0.60]), "b"),
  _cell(0, PAIR("c", [0.30, 0.70, 0.50]), "c"),
  _cell(1, PAIR("b", [0.30, 0.40, 0.50]), "b"),
  _cell(1, PAIR("c", [0.30, 0.50, 0.60]), "c"),
]
DOMAINS = ["a", "b", "c"]


def _chosen(method, cells=CELLS, domains=DOMAINS):
  return [(c["held_out"], c["sample"], c["step"], c["test_acc"]) for c in tables.select(cells, method, domains)]


def test_training_domain_validation_chooses_the_draw_and_checkpoint_with_the_best_validation_accuracy():
  assert _chosen("selected") == [("a", 1, 20, 0.64)]


def test_oracle_chooses_the_draw_whose_last_checkpoint_is_best_on_the_held_out_domains_20_percent():
  assert _chosen("oracle") == [("a", 0, 20, 0.62)]


def test_leave_one_domain_out_scores_each_checkpoint_on_the_other_domains_held_out_with_it():
  assert _chosen("leave_one_out") == [("a", 0, 10, 0.60)]
  # Draw 0 without its (a, c) run cannot be scored: draw 1 is chosen; without any pair run, nothing is
  assert _chosen("leave_one_out", [c for c in CELLS if (c["sample"], c["val_domain"]) != (0, "c")]) == [
    ("a", 1, 20, 0.64)
  ]
  assert _chosen("leave_one_out", CELLS[:2]) == []
  # The last checkpoint of draw 0, no selection
  assert _chosen("last") == [("a", 0, 20, 0.62)]


def test_ties_choose_the_lowest_draw():
  same = [_cell(0, DRAW0), _cell(1, DRAW0), _cell(2, DRAW1)]
  same[1]["hparams"] = {"lr": 9.0}
  assert _chosen("selected", same) == [("a", 2, 20, 0.64)]
  assert _chosen("oracle", same[:2]) == [("a", 0, 20, 0.62)]


def test_results_md_gives_each_method_with_the_draw_it_chose_and_standard_errors(tmp_path):
  seed1 = [dict(c, seed=1) for c in CELLS]
  seed1[0] = _cell(0, _evals([0.5, 0.9, 0.6], [0.4, 0.7, 0.6], [0.4, 0.5, 0.6]), seed=1)  # draw 0 at step 10: .70
  config = {
    "dataset": "fake",
    "model": "mlp",
    "steps": 20,
    "hparams": {},
    "algorithms": ["erm"],
    "seeds": [0, 1],
    "held_out": ["a"],
    "hparams_samples": 2,
    "leave_one_out": True,
  }
  data = {"dataset": "fake", "domains": {"a": 10, "b": 10, "c": 10}, "unreadable_files": [], "warnings": []}
  tables.write_results(str(tmp_path), CELLS + seed1, config, data=data)
  text = (tmp_path / "results.md").read_text()
  saved = json.loads((tmp_path / "results.json").read_text())
  # training-domain validation: seed 0 draw 1 (.64), seed 1 draw 0 (val .90 > .72: .70); mean 67.0,
  # s.e. = std(ddof=0) / sqrt(2) = 3 / sqrt 2 = 2.1
  section = text.split("## Model selection: training-domain validation")[1].split("## Model selection")[0]
  assert "| ERM | 67.0 ± 2.1 | 67.0 ± 2.1 |" in section and "| ERM | 0: 1 @ 20, 1: 0 @ 10 |" in section
  section = text.split("## Model selection: test-domain validation (oracle)")[1].split("## Model selection")[0]
  # oracle: seed 0 draw 0 (.62); seed 1: draw 0's last a20 .60 > draw 1's .50 -> a = .60; 61.0 ± 0.7
  assert "| ERM | 61.0 ± 0.7 | 61.0 ± 0.7 |" in section and "| ERM | 0: 0 @ 20, 1: 0 @ 20 |" in section
  section = text.split("## Model selection: leave-one-domain-out validation")[1].split("## Model selection")[0]
  # draw 0 at step 10 for both seeds (the same pair runs): a = .60 (seed 0), .70 (seed 1); 65.0 ± 5 / sqrt 2
  assert "| ERM | 65.0 ± 3.5 | 65.0 ± 3.5 |" in section and "| ERM | 0: 0 @ 10, 1: 0 @ 10 |" in section
  assert "Search: all 12 runs finished." in text
  assert saved["tables"]["selected"]["erm"]["a"]["se"] == pytest.approx(0.03 / np.sqrt(2))
  assert [(c["seed"], c["sample"]) for c in saved["selections"]["selected"]] == [(0, 1), (1, 0)]
  tables.write_results(str(tmp_path), CELLS[:1] + seed1, config, data=data)
  assert "**Search incomplete: 5 of its 12 runs have no result**" in (tmp_path / "results.md").read_text()


def test_experiment_and_tables_name_the_20_percent_part_alike():
  from disam_jax.harness import experiment

  assert experiment.OUT_SUFFIX == tables.OUT_SUFFIX


# ---------------------------------------------------------------------------------------------------------------------
# Runs: a search in a run directory, resumed in the middle
# ---------------------------------------------------------------------------------------------------------------------


def _search_config(**kw):
  from disam_jax.harness.algorithms import HParams
  from disam_jax.harness.config import ExperimentConfig

  return ExperimentConfig(
    algorithms=("erm",),
    held_out=("0",),
    steps=4,
    eval_every=2,
    hparams_samples=3,
    model_kwargs={"hidden": 8},
    hparams=HParams(batch_size=8).for_run(4),
    fixed_hparams=("batch_size",),
    **kw,
  )


def test_a_search_interrupted_in_its_second_draw_resumes_to_the_uninterrupted_result(tmp_path):
  from disam_jax.harness import experiment

  config = _search_config()
  prepared = experiment.prepare(config)
  full = experiment.run_experiment(config, str(tmp_path / "full"), progress=False, prepared=prepared)
  assert [c.sample for c in full] == [0, 1, 2] and len({c.hparams["lr"] for c in full}) == 3
  assert sorted(os.listdir(tmp_path / "full" / "cells")) == [
    "erm_heldout-0_seed-0",
    "erm_heldout-0_seed-0_hparams-1",
    "erm_heldout-0_seed-0_hparams-2",
  ]
  calls = []

  def stop(*args):
    calls.append(args)
    if len(calls) == 7:  # draw 1, step 3: its step-2 checkpoint exists
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    experiment.run_experiment(config, str(tmp_path / "part"), progress=False, prepared=prepared, on_step=stop)
  resumed = experiment.run_experiment(config, str(tmp_path / "part"), resume=True, progress=False, prepared=prepared)
  for a, b in zip(full, resumed):
    assert (a.sample, a.hparams, a.evals) == (b.sample, b.hparams, b.evals)
  saved = json.loads((tmp_path / "part" / "cells" / "erm_heldout-0_seed-0_hparams-1" / "result.json").read_text())
  assert saved["sample"] == 1 and saved["hparams"] == full[1].hparams


def test_the_cli_grows_a_search_on_resume_and_refuses_to_shrink_it(tmp_path, capsys):
  run = str(tmp_path / "run")
  base = [
    "--algorithm",
    "erm",
    "--held-out",
    "0",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--model-option",
    "hidden=8",
    "--batch-size",
    "8",
    "--no-plots",
    "--quiet",
    "--output-dir",
    run,
  ]
  assert cli.main(base + ["--hparams-samples", "2"]) == 0
  first = json.loads(open(os.path.join(run, "results.json")).read())["cells"]
  assert cli.main(["--resume", "--output-dir", run, "--hparams-samples", "3", "--quiet", "--no-plots"]) == 0
  grown = json.loads(open(os.path.join(run, "results.json")).read())["cells"]
  assert [c["sample"] for c in grown] == [0, 1, 2]
  assert [c["evals"] for c in grown[:2]] == [c["evals"] for c in first]  # the earlier draws are unchanged
  assert set(grown[2]["hparams"]) == {"lr"}  # what was drawn; --batch-size fixed the batch size
  capsys.readouterr()
  assert cli.main(["--resume", "--output-dir", run, "--hparams-samples", "2", "--quiet"]) == 2
  assert "--hparams-samples 2 is below the run's 3; it can only grow" in capsys.readouterr().err
  assert cli.main(base + ["--hparams-samples", "0", "--output-dir", str(tmp_path / "bad")]) == 2
  assert "hparams_samples must be an integer >= 1" in capsys.readouterr().err


def test_the_plan_and_the_progress_bar_cover_every_draw_and_leave_one_out_run(tmp_path, monkeypatch):
  from disam_jax.harness import experiment

  config = _search_config(leave_one_out=True)
  domains = ["0", "15", "30", "45", "60", "75"]
  plan = experiment.planned_runs(config, ("0",), domains)
  # held out 0 alone, then the 5 pairs (0, v); 3 draws each; one algorithm
  assert len(plan) == 6 * 3 and plan[0] == (0, ("0",), 0, "erm") and plan[3] == (0, ("0", "15"), 0, "erm")
  assert experiment.held_out_sets(dataclasses.replace(config, leave_one_out=False), ("0",), domains) == [("0",)]
  # the report's count of the search's runs is the experiment's
  planned = tables.planned_runs(json.loads(json.dumps(config.to_json())), {"domains": dict.fromkeys(domains, 1)})
  assert len(planned) == len(plan)
  totals = []
  progress = experiment._Progress.__init__

  def spy(self, shown, total):
    totals.append(total)
    progress(self, False, total)

  def stop(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(experiment._Progress, "__init__", spy)
  with pytest.raises(KeyboardInterrupt):
    experiment.run_experiment(config, str(tmp_path / "run"), progress=True, on_step=stop)
  assert totals == [len(plan) * config.steps]


def test_merge_keeps_draws_and_leave_one_out_runs_apart_and_refuses_a_duplicate_search(tmp_path, capsys):
  from disam_jax.harness import report

  config = {
    "dataset": "fake",
    "model": "mlp",
    "steps": 20,
    "hparams": {},
    "algorithms": ["erm"],
    "seeds": [0],
    "held_out": ["a"],
    "hparams_samples": 2,
    "leave_one_out": True,
  }
  data = {"dataset": "fake", "domains": {"a": 10, "b": 10, "c": 10}, "unreadable_files": [], "warnings": []}
  for name in ("one", "two"):
    cell = tmp_path / name / "cells" / "erm_heldout-a_seed-0"  # draw 0's metrics: the dynamics table reads them
    os.makedirs(cell)
    with open(cell / "metrics.jsonl", "w") as f:
      for step in range(1, 21):
        f.write(
          json.dumps(
            {
              "step": step,
              "loss": 1.0 / step,
              "domain_losses": {"b": 1.0, "c": 1.0},
              "variance": 0.0,
              "perturbation_norm": 0.0,
              "grad_norm": 1.0,
              "time": 0.01 * step,
            }
          )
          + "\n"
        )
    tables.write_results(str(tmp_path / name), CELLS, config, data=data)
  assert (
    report.main(
      [str(tmp_path / "merged"), "--no-plots", "--merge", str(tmp_path / "one"), f"{tmp_path / 'two'}=_again"]
    )
    == 0
  )
  text = (tmp_path / "merged" / "results.md").read_text()
  section = text.split("## Model selection: leave-one-domain-out validation")[1].split("## Model selection")[0]
  assert "| ERM | 60.0 | 60.0 |" in section and "| ERM_AGAIN | 60.0 | 60.0 |" in section
  capsys.readouterr()
  assert (
    report.main([str(tmp_path / "merged2"), "--no-plots", "--merge", str(tmp_path / "one"), str(tmp_path / "two")]) == 2
  )
  assert "the report would keep only one of them" in capsys.readouterr().err
