"""Training-data regimes that stress DISAM's domain labels: imbalance, many small domains, wrong domain labels,
and pseudo-domains inferred without labels.

Each function takes a `data.DomainSplit` and returns one whose *training* part is regrouped into new training domains
(in memory: pixel arrays; streamed image folders: record-index arrays, regrouped the same way, except `infer_domains`,
which needs pixels and refuses them); the validation parts (training-domain validation, used for model selection) and
the held-out test domains are never touched, so held-out accuracies stay comparable across regimes, and every
algorithm run on the same seed sees the same regrouped data. `apply_regimes` applies them in a fixed order (imbalance,
wrong domain labels, sub-domains; or imbalance, then inferred domains), as `experiment._cell_split` does for the
`disam-train` options ``--imbalance``, ``--domain-label-noise``, ``--sub-domains`` and ``--infer-domains``.

Example::

  split = split_dataset(load_dataset("rotated_digits"), held_out="75")
  split = infer_domains(split, 5, seed=0)        # 5 k-means clusters of the pooled training images
  split.train_domains                            # ('c0', 'c1', 'c2', 'c3', 'c4'); split.val_domains: the true ones
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from disam_jax.harness import data as data_lib

__all__ = ["apply_regimes", "imbalance", "infer_domains", "shuffle_domain_labels", "split_domains"]


def _regrouped(split: data_lib.DomainSplit, names: Sequence[str], parts) -> data_lib.DomainSplit:
  return dataclasses.replace(
    split,
    train_domains=tuple(names),
    train=tuple(parts),
    val_domains=split.val_domains or split.train_domains,
  )


def imbalance(split: data_lib.DomainSplit, ratio: float, *, seed: int) -> data_lib.DomainSplit:
  """Subsamples the training domains geometrically: the j-th of M training domains keeps a random
  ``ratio ** (-j / (M - 1))`` of its training examples (at least one), so the first keeps all and the last
  ``1 / ratio``: a largest-to-smallest size ratio of `ratio` (>= 1)."""
  if not ratio >= 1.0:
    raise ValueError(f"imbalance ratio must be >= 1 (largest / smallest training domain); got {ratio}.")
  m = len(split.train)
  parts = []
  for j, (x, y) in enumerate(split.train):
    keep = ratio ** (-j / max(m - 1, 1))
    n = max(1, int(round(len(x) * keep)))
    idx = np.sort(np.random.default_rng((seed, 104729, j)).permutation(len(x))[:n])
    parts.append((x[idx], y[idx]))
  return _regrouped(split, split.train_domains, parts)


def shuffle_domain_labels(split: data_lib.DomainSplit, fraction: float, *, seed: int) -> data_lib.DomainSplit:
  """Gives a random `fraction` of every training domain's examples a wrong domain label: each chosen example is
  moved to a uniformly drawn *other* training domain (domain names and count unchanged)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"domain-label noise must be in [0, 1]; got {fraction}.")
  m = len(split.train)
  if m < 2:
    raise ValueError("domain-label noise needs at least two training domains.")
  rng = np.random.default_rng((seed, 7907))
  owner = []
  for i, (x, _) in enumerate(split.train):
    target = np.full(len(x), i)
    moved = rng.permutation(len(x))[: int(round(len(x) * fraction))]
    target[moved] = (i + rng.integers(1, m, size=len(moved))) % m
    owner.append(target)
  x_all = np.concatenate([x for x, _ in split.train])
  y_all = np.concatenate([y for _, y in split.train])
  owner = np.concatenate(owner)
  parts = [(x_all[owner == i], y_all[owner == i]) for i in range(m)]
  return _regrouped(split, split.train_domains, parts)


def split_domains(split: data_lib.DomainSplit, k: int, *, seed: int) -> data_lib.DomainSplit:
  """Splits every training domain into `k` random, near-equal sub-domains named ``<domain>/<j>``: M * k smaller
  domains (same examples)."""
  if not (isinstance(k, (int, np.integer)) and k >= 1):
    raise ValueError(f"sub-domains must be a positive integer; got {k!r}.")
  names, parts = [], []
  for i, (name, (x, y)) in enumerate(zip(split.train_domains, split.train)):
    if len(x) < k:
      raise ValueError(f"training domain {name!r} has {len(x)} examples, fewer than {k} sub-domains.")
    order = np.random.default_rng((seed, 6007, i)).permutation(len(x))
    for j, idx in enumerate(np.array_split(order, k)):
      idx = np.sort(idx)
      names.append(f"{name}/{j}")
      parts.append((x[idx], y[idx]))
  return _regrouped(split, names, parts)


def infer_domains(split: data_lib.DomainSplit, k: int, *, seed: int) -> data_lib.DomainSplit:
  """Replaces the training domains by `k` pseudo-domains found without domain labels: k-means (scikit-learn,
  seeded by `seed`, so the assignment is deterministic) on the pooled, flattened training images. The pseudo-domains
  are named ``c0`` .. ``c<k-1>`` in order of their size (largest first); validation and test data are unchanged.

  The features are the images as they are held (float32, flattened; no float64 copy). A streamed split (image
  folders: record indices, no pixels in memory) is refused."""
  if not (isinstance(k, (int, np.integer)) and k >= 2):
    raise ValueError(f"--infer-domains needs K >= 2 pseudo-domains (DISAM needs two); got {k!r}.")
  if split.records is not None:
    raise ValueError(
      "--infer-domains clusters images held in memory; image folders and tfds:<name> are streamed, "
      "not held: drop --infer-domains (or use --sub-domains K / --domain-label-noise P, which work on "
      "them)."
    )
  try:
    from sklearn.cluster import KMeans
  except ImportError as e:
    raise ImportError("--infer-domains needs scikit-learn: pip install 'disam_jax[harness]'") from e
  x_all = np.concatenate([x for x, _ in split.train])
  y_all = np.concatenate([y for _, y in split.train])
  if len(x_all) < k:
    raise ValueError(f"--infer-domains {k}: only {len(x_all)} training examples.")
  features = x_all.reshape(len(x_all), -1)  # a view of the pooled float32 images: k-means runs in float32
  labels = KMeans(n_clusters=int(k), n_init=4, random_state=int(seed)).fit_predict(features)
  sizes = np.bincount(labels, minlength=k)
  order = np.argsort(-sizes, kind="stable")
  parts = [(x_all[labels == c], y_all[labels == c]) for c in order]
  return _regrouped(split, [f"c{j}" for j in range(int(k))], parts)


def apply_regimes(
  split: data_lib.DomainSplit,
  *,
  seed: int,
  imbalance_ratio: float = 1.0,
  domain_label_noise: float = 0.0,
  sub_domains: int = 1,
  inferred_domains: int = 0,
) -> data_lib.DomainSplit:
  """Applies the regimes in order: `imbalance`, then either `infer_domains` (when `inferred_domains` > 0; it
  ignores domain labels, so it cannot be combined with the other two) or `shuffle_domain_labels` and
  `split_domains`. Defaults change nothing."""
  if inferred_domains and (domain_label_noise or sub_domains != 1):
    raise ValueError(
      "--infer-domains replaces the domain labels; it cannot be combined with --domain-label-noise or --sub-domains."
    )
  if imbalance_ratio != 1.0:
    split = imbalance(split, imbalance_ratio, seed=seed)
  if inferred_domains:
    return infer_domains(split, inferred_domains, seed=seed)
  if domain_label_noise:
    split = shuffle_domain_labels(split, domain_label_noise, seed=seed)
  if sub_domains != 1:
    split = split_domains(split, sub_domains, seed=seed)
  return split
