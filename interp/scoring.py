"""Pure math for scores: the OpenAI simulation scores and the classification metrics of detection,
fuzzing and embedding scorers. No I/O; every function is unit-tested with known answers."""
from __future__ import annotations

import math

import numpy as np

DIGITS = [str(v) for v in range(11)]


def normalise_activations(acts: list[float], max_act: float) -> list[int]:
    """The prompt scale: min(10, floor(10·relu(a)/max_a)); all zeros when max_a <= 0."""
    if max_act <= 0:
        return [0] * len(acts)
    return [min(10, math.floor(10 * max(a, 0.0) / max_act)) for a in acts]


def expected_value(top_logprobs: dict[str, float]) -> float | None:
    """E = Σ v·p over the top-logprob entries "0".."10", renormalised; None when none of them is there."""
    vals, lps = [], []
    for tok, lp in top_logprobs.items():
        t = tok.strip()
        if t in DIGITS:
            vals.append(int(t))
            lps.append(lp)
    if not vals:
        return None
    lps = np.asarray(lps, dtype=np.float64)
    p = np.exp(lps - lps.max())
    p /= p.sum()
    return float(np.dot(vals, p))


def expected_value_split(top_logprobs: dict[str, float], p_zero_after_one: float = 0.0) -> float | None:
    """E = Σ v·p over 0..10 read at a value's first token, for tokenizers that write 10 as "1" then "0".
    The "1" mass is split by q = P("0" | "1"), read at the next position: P(10) = P("10") + q·P("1"),
    P(1) = (1 - q)·P("1"); then renormalised over 0..10. q is only observable when the answer's first
    digit was "1" (the next position's logprobs are conditioned on it); otherwise pass 0, reading "1" as 1.
    None when no entry is a value."""
    p = np.zeros(len(DIGITS), dtype=np.float64)
    for tok, lp in top_logprobs.items():
        t = tok.strip()
        if t in DIGITS:
            p[int(t)] += math.exp(lp)
    q = min(1.0, max(0.0, p_zero_after_one))
    p[10] += q * p[1]
    p[1] *= 1.0 - q
    total = float(p.sum())
    if total <= 0.0:
        return None
    return float(np.dot(np.arange(len(DIGITS)), p / total))


def simulation_scores_normalised(true_activations: list[list[float]], expected_values: list[list[float]],
                                 max_act: float) -> dict[str, float | None]:
    """rsquared_score and absolute_dev_explained_score with the true activations on the prompt's scale
    (normalise_activations: 0-10 of the feature's max), so that they no longer depend on the feature's
    scale and two features compare; keys carry the suffix `_normalised`. simulation_scores stays the
    published formula on raw activations."""
    norm = [[float(v) for v in normalise_activations(seq, max_act)] for seq in true_activations]
    raw = simulation_scores(norm, expected_values)
    return {f"{k}_normalised": raw[k] for k in ("rsquared_score", "absolute_dev_explained_score")}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if den == 0.0:      # a constant side: the correlation is undefined, not 0
        return None
    return float(dx @ dy) / den


def simulation_scores(true_activations: list[list[float]], expected_values: list[list[float]]) -> dict[str, float | None]:
    """OpenAI's scores over all sequences concatenated (top and random together), on raw true activations."""
    if len(true_activations) != len(expected_values) or any(
            len(t) != len(e) for t, e in zip(true_activations, expected_values)):
        raise ValueError("true_activations and expected_values must have the same per-sequence lengths")
    t = np.asarray([v for seq in true_activations for v in seq], dtype=np.float64)
    e = np.asarray([v for seq in expected_values for v in seq], dtype=np.float64)
    out: dict[str, float | None] = {"ev_correlation_score": _pearson(t, e),
                                    "rsquared_score": None, "absolute_dev_explained_score": None}
    if t.size:
        ms = float(np.mean(t ** 2))
        ma = float(np.mean(np.abs(t)))
        if ms > 0:
            out["rsquared_score"] = 1.0 - float(np.mean((t - e) ** 2)) / ms
        if ma > 0:
            out["absolute_dev_explained_score"] = 1.0 - float(np.mean(np.abs(t - e))) / ma
    return out


def auroc(labels: list[int], scores: list[float]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half); None with one class."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # average ranks handle ties exactly (Mann-Whitney U)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_scores(labels: list[int], predictions: list[int],
                          probabilities: list[float] | None = None) -> dict[str, float | None]:
    """Balanced accuracy, precision, recall, F1 (None where a denominator is 0), and AUROC given probabilities."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predictions, dtype=bool)
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    fn, tn = int((y & ~p).sum()), int((~y & ~p).sum())
    recall = tp / (tp + fn) if tp + fn else None
    tnr = tn / (tn + fp) if tn + fp else None
    precision = tp / (tp + fp) if tp + fp else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else
          (0.0 if precision is not None and recall is not None else None))
    bal = (recall + tnr) / 2 if recall is not None and tnr is not None else None
    out = {"balanced_accuracy": bal, "precision": precision, "recall": recall, "f1": f1,
           "auroc": auroc(labels, probabilities) if probabilities is not None else None}
    return out
