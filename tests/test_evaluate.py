import statistics

import pytest
import torch

from models.registry import Claim
from tasks.evaluate import by_role, check_claim, classification_metrics, summarize


def test_classification_metrics_match_a_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(37, 5), torch.randint(0, 3, (37,))
    got = classification_metrics(model, x, y, batch_size=8)
    correct, nll = 0, 0.0
    for i in range(37):
        z = model(x[i]).detach()
        correct += int(z.argmax() == y[i])
        nll += float(-torch.log_softmax(z, -1)[y[i]])
    assert got["accuracy"] == pytest.approx(correct / 37)
    assert got["loss"] == pytest.approx(nll / 37, rel=1e-5)


def test_summarize_and_claim_over_seeds():
    s = summarize([0.9, 0.92, 0.94])
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(statistics.stdev([0.9, 0.92, 0.94]))
    scores = {"student_kd": {"accuracy": [0.95, 0.96, 0.94]}, "student_labels": {"accuracy": [0.94, 0.95, 0.93]}}
    v = check_claim(Claim.parse("student_kd.accuracy > student_labels.accuracy"), scores)
    assert v["passed"] and v["difference"] == pytest.approx(0.01)
    tie = check_claim(Claim.parse("student_kd.accuracy > student_labels.accuracy"),
                      {"student_kd": {"accuracy": [0.9]}, "student_labels": {"accuracy": [0.9]}})
    assert tie["passed"] is False and tie["left"]["std"] == 0.0


def test_by_role_orders_values_by_seed():
    evals = [{"role": "a", "seed": 2, "metrics": {"m": 3.0}}, {"role": "a", "seed": 0, "metrics": {"m": 1.0}}]
    assert by_role(evals) == {"a": {"m": [1.0, 3.0]}}
