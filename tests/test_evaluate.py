"""Evaluation: the metric math against independent computations, and the whole stage on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tipsen import metrics


# ---------------------------------------------------------------- metric math


def _naive_alignment(gen, real):
    """Per-pair cosines with plain loops: the definition, not the implementation."""
    total = 0.0
    for g in gen:
        for r in real:
            total += float(np.dot(g, r) / (np.linalg.norm(g) * np.linalg.norm(r)))
    return total / (len(gen) * len(real))


def test_alignment_matches_an_independent_numpy_computation():
    rng = np.random.default_rng(7)
    gen, real = rng.normal(size=(9, 16)), rng.normal(size=(13, 16)) * 3.0  # scale must not matter
    assert metrics.alignment(gen, real) == pytest.approx(_naive_alignment(gen, real), abs=1e-12)
    assert metrics.cosine_matrix(gen, real).shape == (9, 13)
    # torch tensors in, the same number out
    assert metrics.alignment(torch.tensor(gen), torch.tensor(real)) == pytest.approx(
        _naive_alignment(gen, real), abs=1e-6)


def test_alignment_on_known_cosines():
    e = np.eye(4)
    assert metrics.alignment(e[:1], e[:1] * 5) == pytest.approx(1.0)  # identical direction
    assert metrics.alignment(e[:1], -e[:1]) == pytest.approx(-1.0)  # opposite
    assert metrics.alignment(e[:2], e[2:]) == pytest.approx(0.0)  # orthogonal
    # gen = [e0, e1], real = [e0, (e0 + e1)/sqrt2]: cosines 1, 1/sqrt2, 0, 1/sqrt2 -> mean (1 + sqrt2) / 4
    real = np.stack([e[0], (e[0] + e[1]) / np.sqrt(2)])
    assert metrics.alignment(e[:2], real) == pytest.approx((1 + np.sqrt(2)) / 4)
    np.testing.assert_allclose(metrics.cosine_matrix(e[:2], real), [[1, 2 ** -0.5], [0, 2 ** -0.5]], atol=1e-12)


def test_diversity_excludes_the_diagonal():
    e = np.eye(3)
    assert metrics.diversity(np.tile(e[:1], (5, 1))) == pytest.approx(0.0)  # identical images: no diversity
    assert metrics.diversity(e) == pytest.approx(1.0)  # orthogonal: distance 1 for every pair
    assert metrics.diversity(np.stack([e[0], -e[0]])) == pytest.approx(2.0)  # opposite
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 8))
    n = len(x)
    pairs = [1 - _naive_alignment(x[i:i + 1], x[j:j + 1]) for i in range(n) for j in range(n) if i != j]
    assert metrics.diversity(x) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert np.isnan(metrics.diversity(x[:1]))


def test_mean_std_is_population_std():
    m, s = metrics.mean_std([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and s == pytest.approx(np.sqrt(((0.2 ** 2) * 2) / 3))


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    v = np.random.default_rng(0).normal(0.6, 0.1, size=30)
    a = metrics.bootstrap_ci(v, samples=500, seed=1)
    assert a == metrics.bootstrap_ci(v, samples=500, seed=1)  # same seed, same interval
    assert a != metrics.bootstrap_ci(v, samples=500, seed=2)
    assert a[0] < v.mean() < a[1]
    # the percentile interval of an independent resampling loop with the same generator
    rng = np.random.default_rng(1)
    means = [v[rng.integers(0, len(v), size=len(v))].mean() for _ in range(500)]
    assert a == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    # roughly the normal-theory width 2 * 1.96 * sd / sqrt(n)
    assert (a[1] - a[0]) == pytest.approx(2 * 1.96 * v.std() / np.sqrt(len(v)), rel=0.25)
    assert metrics.bootstrap_ci([0.3, 0.3, 0.3], samples=100, seed=0) == pytest.approx((0.3, 0.3))
    assert metrics.bootstrap_ci(v, samples=0, seed=0) is None


def test_paired_comparison():
    rng = np.random.default_rng(5)
    base = rng.normal(0.6, 0.1, size=20)
    better = base + 0.05 + rng.normal(0, 0.005, size=20)  # better on every keyword
    cmp = metrics.paired(better, base, samples=400, seed=0)
    assert cmp["mean_diff"] == pytest.approx(np.mean(better - base))
    assert cmp["wins"] == 20 and cmp["n"] == 20 and cmp["significant"]
    assert 0 < cmp["ci95"][0] < cmp["mean_diff"] < cmp["ci95"][1]
    # the CI is of the differences, far narrower than the spread of either method's scores
    assert cmp["ci95"][1] - cmp["ci95"][0] < 0.01
    same = metrics.paired(base, base, samples=400, seed=0)
    assert same["mean_diff"] == 0 and same["wins"] == 0 and not same["significant"]
    with pytest.raises(ValueError):
        metrics.paired(base, base[:3], samples=10, seed=0)
