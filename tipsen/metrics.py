"""Evaluation math on embeddings: cosine alignment, diversity, bootstrap CIs and paired comparisons.

Pure numpy (torch tensors are accepted and converted); no models, no files. All inputs are rows of
embeddings; everything is computed in float64 so that the same embeddings always give the same numbers.
"""
from __future__ import annotations

import numpy as np


def _rows(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty 2-D array of embeddings, got shape {x.shape}")
    return x


def normalize(x) -> np.ndarray:
    """L2-normalised rows (a zero row stays zero rather than becoming NaN)."""
    x = _rows(x)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine_matrix(a, b) -> np.ndarray:
    """All pairwise cosines between the rows of `a` and `b`: one matrix product of normalised rows."""
    return normalize(a) @ normalize(b).T


def alignment(gen, real) -> float:
    """The paper's image alignment: the mean cosine over all generated x real pairs."""
    return float(cosine_matrix(gen, real).mean())


def diversity(emb) -> float:
    """Mean pairwise cosine distance (1 - cos) among a set's rows, excluding each row with itself.

    NaN for fewer than two rows, where diversity is undefined.
    """
    sim = cosine_matrix(emb, emb)
    n = sim.shape[0]
    if n < 2:
        return float("nan")
    off_diagonal = (sim.sum() - np.trace(sim)) / (n * (n - 1))
    return float(1.0 - off_diagonal)


def mean_std(values) -> tuple[float, float]:
    """Mean and population std (ddof=0) over keywords, as the table reports them."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=0))


def bootstrap_means(values, *, samples: int, seed: int) -> np.ndarray:
    """Means of `samples` resamples (with replacement) of `values`.

    The resample indices depend only on (len(values), samples, seed), so methods evaluated on the same
    keywords are resampled identically (common random numbers).
    """
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(samples, len(v)))
    return v[idx].mean(axis=1)


def bootstrap_ci(values, *, samples: int, seed: int, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean; None when there is nothing to resample."""
    if samples <= 0 or len(values) == 0:
        return None
    means = bootstrap_means(values, samples=samples, seed=seed)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def paired(a, b, *, samples: int, seed: int, level: float = 0.95) -> dict:
    """Per-keyword differences a - b: their mean, a bootstrap CI, and how often a beats b.

    `significant` is true when the CI excludes zero.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired comparison needs two equal-length 1-D score lists, got {a.shape} and {b.shape}")
    diff = a - b
    ci = bootstrap_ci(diff, samples=samples, seed=seed, level=level)
    return {"mean_diff": float(diff.mean()), "ci95": list(ci) if ci else None, "wins": int((diff > 0).sum()),
            "n": int(len(diff)), "significant": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}
