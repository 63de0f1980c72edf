"""Claims over seeds: pairing, the Student-t interval against a closed form and scipy, verdicts,
compound claims, and the report's line."""
import math
import statistics

import pytest

from tasks.methods import Claim
from tasks.steps.claims import by_role, check_claim, check_claims, describe, pair, summarize, t_interval, verdict


def test_summarize_over_seeds():
    s = summarize([0.9, 0.92, 0.94])
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(statistics.stdev([0.9, 0.92, 0.94]))
    assert summarize([0.5])["std"] == 0.0


def test_t_interval_matches_its_closed_form():
    d = [0.01, 0.03, -0.01, 0.02]
    lo, hi = t_interval(d)
    # t(0.975, 3) = 3.182446305...
    half = 3.182446305284263 * statistics.stdev(d) / math.sqrt(4)
    assert (lo, hi) == pytest.approx((statistics.fmean(d) - half, statistics.fmean(d) + half), rel=1e-9)
    assert t_interval([0.3]) is None
    assert t_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))


def test_pairs_are_by_seed_or_one_value_against_every_seed():
    assert pair({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5}) == [(0, 1.0, 0.5), (1, 2.0, 1.5)]
    assert pair({0: 1.0, 1: 2.0, 2: 3.0}, {0: 9.0}) == [(0, 1.0, 9.0), (1, 2.0, 9.0), (2, 3.0, 9.0)]
    assert pair({0: 9.0}, {3: 1.0, 4: 2.0}) == [(3, 9.0, 1.0), (4, 9.0, 2.0)]
    with pytest.raises(ValueError, match="cannot pair"):
        pair({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})


@pytest.mark.parametrize("statement,interval,expected", [
    ("a.x > b.x", (0.01, 0.05), "holds"),
    ("a.x > b.x", (-0.05, -0.01), "refuted"),
    ("a.x > b.x", (-0.01, 0.05), "inconclusive"),
    ("a.x > b.x", (0.0, 0.0), "refuted"),         # an exact tie on every seed is not "greater"
    ("a.x >= b.x", (0.0, 0.0), "holds"),
    ("a.x >= b.x", (0.0, 0.02), "holds"),
    ("a.rmse < b.rmse", (-3.0, -1.0), "holds"),     # lower is the claimed side
    ("a.rmse < b.rmse", (1.0, 3.0), "refuted"),
    ("a.rmse <= b.rmse", (-1.0, 0.5), "inconclusive"),
    ("a.x > b.x", None, "inconclusive"),            # one pair: no interval
])
def test_verdict_reads_the_interval_in_the_claims_direction(statement, interval, expected):
    assert verdict(Claim.parse(statement), interval) == expected


def evals(role, values, metric="accuracy"):
    return [{"role": role, "seed": s, "run_id": f"{role}{s}", "metrics": {metric: v}} for s, v in values.items()]


def test_a_claim_pairs_students_by_seed_and_reports_its_interval():
    scores = by_role(evals("student_kd", {0: 0.95, 1: 0.96, 2: 0.94}) + evals("student_labels", {0: 0.94, 1: 0.95, 2: 0.93}))
    part = check_claim(Claim.parse("student_kd.accuracy > student_labels.accuracy"), scores)
    assert part["differences"] == pytest.approx([0.01, 0.01, 0.01]) and part["seeds"] == [0, 1, 2]
    assert part["verdict"] == "holds" and part["ci95"] == pytest.approx([0.01, 0.01])
    assert part["left"]["mean"] == pytest.approx(0.95)


def test_a_compound_claim_reports_every_part_and_the_whole():
    scores = by_role(evals("teacher", {0: 50.0, 1: 52.0, 2: 51.0}, "rmse") + evals("persistence", {0: 56.0}, "rmse")
                     + evals("climatology", {0: 51.0}, "rmse"))
    claim = check_claims([Claim.parse("teacher.rmse < persistence.rmse"), Claim.parse("teacher.rmse < climatology.rmse")],
                         scores)
    assert [p["verdict"] for p in claim["parts"]] == ["holds", "inconclusive"]
    assert claim["verdict"] == "inconclusive" and claim["counts"] == {"holds": 1, "refuted": 0, "inconclusive": 1}
    line = describe(claim)
    assert line.startswith("INCONCLUSIVE (1 hold, 0 refuted, 1 inconclusive)") and "teacher.rmse < climatology.rmse" in line
    refuted = check_claims([Claim.parse("teacher.rmse < persistence.rmse"), Claim.parse("teacher.rmse > climatology.rmse"),
                            Claim.parse("teacher.rmse > persistence.rmse")], scores)
    assert refuted["verdict"] == "refuted"


def test_a_single_seed_claim_is_inconclusive_and_says_so():
    scores = by_role(evals("teacher", {0: 117.0}, "rmse") + evals("iterated_1h", {0: 3688.0}, "rmse"))
    claim = check_claims([Claim.parse("teacher.rmse < iterated_1h.rmse")], scores)
    assert claim["verdict"] == "inconclusive" and claim["parts"][0]["ci95"] is None
    assert "no interval (one pair)" in describe(claim)


@pytest.mark.parametrize("statement,factor,offset", [
    ("student_labels.gflops <= 0.6 * teacher.gflops", 0.6, 0.0),
    ("student_labels.car_bev_ap >= teacher.car_bev_ap - 0.02", 1.0, -0.02),
    ("a.x > 2 * b.y + 1e-3", 2.0, 0.001),
])
def test_a_claim_may_scale_and_shift_its_right_side(statement, factor, offset):
    claim = Claim.parse(statement)
    assert (claim.factor, claim.offset) == (factor, pytest.approx(offset))
    assert Claim.parse(claim.statement) == claim  # the statement round-trips


def test_a_ratio_claim_pairs_left_with_the_scaled_right_side():
    # a cut of at least 40%: left <= 0.6 * right; seed by seed d = left - 0.6 * right
    scores = {"student_labels": {"gflops": {0: 0.5, 1: 0.55, 2: 0.52}}, "teacher": {"gflops": {0: 1.0, 1: 1.0, 2: 1.0}}}
    part = check_claim(Claim.parse("student_labels.gflops <= 0.6 * teacher.gflops"), scores)
    assert part["differences"] == pytest.approx([-0.1, -0.05, -0.08])
    assert part["verdict"] == "holds"
    margin = check_claim(Claim.parse("student_labels.gflops >= teacher.gflops - 0.02"), scores)
    assert margin["differences"] == pytest.approx([-0.48, -0.43, -0.46]) and margin["verdict"] == "refuted"


def test_a_malformed_scaled_claim_names_the_grammar():
    with pytest.raises(ValueError, match=r"\[<number> \*\]"):
        Claim.parse("a.x > b.y * 2")
