"""Accuracy metrics over k samples per problem: avg@k, unbiased pass@k, standard error.

Consumes, per problem, the number of samples n and how many were correct c (pure numpy, no
I/O); produces per-problem values and their means over problems:
- avg@n: c / n per problem (the paper's "mean accuracy over 64 samples", avg@64), then the
  mean over problems, with its standard error across problems (sample std, ddof=1, / sqrt(P));
- pass@k: the unbiased estimator of Chen et al. 2021 (Codex paper), the chance that at least one
  of k samples drawn without replacement from the n is correct:
  1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i), the product form being the
  numerically stable one (no huge binomials); 1 when n - c < k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct out of n samples (1 <= k <= n)."""
    n, c, k = int(n), int(c), int(k)
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def per_problem(n: int, c: int, ks: Sequence[int]) -> dict:
    """{"n", "correct", "accuracy", "pass@k": {k: value}} of one problem."""
    return {
        "n": int(n),
        "correct": int(c),
        "accuracy": float(c) / n if n else 0.0,
        "pass@k": {int(k): pass_at_k(n, c, k) for k in ks},
    }


def aggregate(n_P: Sequence[int], c_P: Sequence[int], ks: Sequence[int]) -> dict:
    """Means over P problems: {"problems", "avg", "stderr", "pass@k": {k: mean}}.

    `avg` is the mean of the per-problem accuracies c/n (avg@n when every n is the same);
    `stderr` their standard error (None for fewer than 2 problems).
    """
    n_P = np.asarray(n_P, dtype=np.int64)
    c_P = np.asarray(c_P, dtype=np.int64)
    if n_P.shape != c_P.shape or n_P.ndim != 1:
        raise ValueError(f"n and c must be 1-d of the same length, got {n_P.shape}, {c_P.shape}")
    P = len(n_P)
    if P == 0:
        return {"problems": 0, "avg": None, "stderr": None, "pass@k": {int(k): None for k in ks}}
    acc_P = c_P / n_P
    stderr = float(acc_P.std(ddof=1) / np.sqrt(P)) if P > 1 else None
    return {
        "problems": P,
        "avg": float(acc_P.mean()),
        "stderr": stderr,
        "pass@k": {
            int(k): float(np.mean([pass_at_k(n, c, k) for n, c in zip(n_P, c_P, strict=True)]))
            for k in ks
        },
    }
