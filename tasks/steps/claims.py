"""Checking a method's claim over seeds, with uncertainty.

A claim compares two roles' metrics, e.g. `student_kd.accuracy > student_labels.accuracy`. Both sides
are paired by seed, and the paired differences d_s = left_s − right_s get a 95% Student-t interval
(for a scaled or shifted right side, `a.x <= 0.6 * b.x` or `a.x >= b.x - 0.02`, d_s = left_s − bound_s),
mean(d) ± t(0.975, n−1) · sd(d) / √n. A side with one value (a deterministic baseline such as
persistence, or the single teacher a `distill` recipe trains) is paired with every seed of the other.
The verdict reads the interval in the claim's direction:

    holds         the whole interval is on the claimed side of zero (for `>`/`<`: not touching it)
    refuted       the whole interval is on the other side (a strict claim whose interval is [0, 0],
                  an exact tie on every seed, is refuted too)
    inconclusive  the interval straddles zero, or there is one pair and so no interval

A compound claim (several statements) holds when every part holds and is refuted when any part is;
every part is reported. The number of seeds is a param (`methods.<m>.seeds`).
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from ..methods import Claim

CONFIDENCE = 0.95
INTERVAL = "Student t on the differences paired by seed, two-sided 95%"
Scores = dict[str, dict[str, dict[int, float]]]   # role -> metric -> seed -> value


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and range over seeds."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": list(values)}


def by_role(evaluations: list[dict[str, Any]]) -> Scores:
    """`scores[role][metric][seed]`, seeds in ascending order."""
    scores: Scores = {}
    for e in sorted(evaluations, key=lambda e: (e["role"], e["seed"])):
        for k, v in e["metrics"].items():
            scores.setdefault(e["role"], {}).setdefault(k, {})[e["seed"]] = v
    return scores


def pair(left: dict[int, float], right: dict[int, float]) -> list[tuple[int, float, float]]:
    """(seed, left, right) pairs: by seed, or a single value against every seed of the other side."""
    if len(left) == 1 and len(right) > 1:
        (value,) = left.values()
        return [(s, value, r) for s, r in sorted(right.items())]
    if len(right) == 1 and len(left) > 1:
        (value,) = right.values()
        return [(s, l, value) for s, l in sorted(left.items())]
    common = sorted(set(left) & set(right))
    if len(left) == len(right) == 1 and not common:
        return [(next(iter(left)), *left.values(), *right.values())]
    if not common or len(common) != len(left) or len(common) != len(right):
        raise ValueError(f"cannot pair seeds {sorted(left)} with {sorted(right)}")
    return [(s, left[s], right[s]) for s in common]


def t_interval(differences: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Student-t interval of the mean; None for fewer than two values."""
    n = len(differences)
    if n < 2:
        return None
    from scipy.stats import t
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    half = t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def verdict(claim: Claim, interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "inconclusive"
    lo, hi = sorted((claim.sign * interval[0], claim.sign * interval[1]))  # in the claimed direction
    if lo > 0 or (lo == 0 and not claim.strict):
        return "holds"
    if hi < 0 or (hi == 0 and claim.strict):
        return "refuted"
    return "inconclusive"


def check_claim(claim: Claim, scores: Scores) -> dict[str, Any]:
    """One statement over seeds: both sides, the paired differences, their interval and the verdict."""
    left = scores[claim.left_role][claim.left_metric]
    right = scores[claim.right_role][claim.right_metric]
    pairs = pair(left, right)
    diffs = [l - claim.bound(r) for _, l, r in pairs]
    interval = t_interval(diffs)
    return {"statement": claim.statement,
            "left": summarize(list(left.values())), "right": summarize(list(right.values())),
            "seeds": [s for s, _, _ in pairs], "differences": diffs, "diff_mean": statistics.fmean(diffs),
            "ci95": None if interval is None else list(interval), "interval": INTERVAL,
            "verdict": verdict(claim, interval)}


def check_claims(claims: list[Claim], scores: Scores) -> dict[str, Any]:
    """Every part, and the whole: holds if all parts hold, refuted if any part is refuted."""
    parts = [check_claim(c, scores) for c in claims]
    counts = {v: sum(p["verdict"] == v for p in parts) for v in ("holds", "refuted", "inconclusive")}
    whole = ("holds" if counts["holds"] == len(parts) else "refuted" if counts["refuted"] else "inconclusive")
    return {"statement": " and ".join(p["statement"] for p in parts), "verdict": whole, "counts": counts,
            "parts": parts}


def describe(claim: dict[str, Any]) -> str:
    """One line: the verdict, then each part's mean difference and interval."""
    def part(p: dict[str, Any]) -> str:
        ci = "no interval (one pair)" if p["ci95"] is None else f"95% CI [{p['ci95'][0]:.4g}, {p['ci95'][1]:.4g}]"
        return f"{p['statement']}: {p['verdict']}, diff {p['diff_mean']:+.4g}, {ci}"
    counts = claim["counts"]
    head = (f"{claim['verdict'].upper()} ({counts['holds']} hold, {counts['refuted']} refuted, "
            f"{counts['inconclusive']} inconclusive)")
    return head + "; " + "; ".join(part(p) for p in claim["parts"])
