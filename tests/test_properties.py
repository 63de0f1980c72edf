"""Property tests (hypothesis): the forecast metrics, the KD losses and the claim statistics hold
their defining identities on random inputs, checked against loops and closed forms."""
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.distill import DistillationLoss, create_loss
from tasks.kinds.forecast.metrics import lat_weights, weighted_acc, weighted_rmse
from tasks.methods import Claim
from tasks.steps.claims import check_claim, check_claims, t_interval, verdict

FAST = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # thousands of tiny tensor ops: a thread pool only adds hand-offs (3x slower on a busy 2-core box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


# ---------------------------------------------------------------------------------------------------
# forecast metrics

@st.composite
def regular_lats(draw, max_size=24):
    n = draw(st.integers(2, max_size))
    step = draw(floats(0.25, 180 / (n - 1)))
    start = draw(floats(-90, max(-90.0, 90 - step * (n - 1))))
    lat = np.clip(start + step * np.arange(n), -90, 90)
    return lat[::-1] if draw(st.booleans()) else lat


@st.composite
def irregular_lats(draw, max_size=24):
    lat = draw(st.lists(floats(-90, 90), min_size=2, max_size=max_size, unique=True))
    assume(np.diff(np.sort(lat)).min() > 1e-3)  # distinct rows: a zero-width cell has no area
    return np.array(lat)


def any_lats(max_size=24):
    return st.one_of(regular_lats(max_size), irregular_lats(max_size))


def lat_weights_loop(lat):
    # each row's band reaches halfway to its neighbours, and as far beyond the end rows as to their
    # neighbour, clipped at the poles; weight = band area / mean band area
    s = sorted(lat)
    areas = []
    for p in lat:
        i = s.index(p)
        below = s[i - 1] if i > 0 else 2 * s[0] - s[1]
        above = s[i + 1] if i < len(s) - 1 else 2 * s[-1] - s[-2]
        top, bottom = min((p + above) / 2, 90.0), max((p + below) / 2, -90.0)
        areas.append(math.sin(math.radians(top)) - math.sin(math.radians(bottom)))
    mean = sum(areas) / len(areas)
    return [a / mean for a in areas]


@FAST
@given(any_lats())
def test_lat_weights_are_positive_band_areas_with_mean_one(lat):
    w = lat_weights(lat).numpy()
    assert (w > 0).all()
    assert w.mean() == pytest.approx(1.0, rel=1e-12)
    # a nearly regular grid (gaps equal to within 1e-6) is taken as regular, hence the tolerance
    np.testing.assert_allclose(w, lat_weights_loop(list(lat)), rtol=1e-5)


@FAST
@given(regular_lats(), st.randoms(use_true_random=False))
def test_lat_weights_follow_their_rows_in_any_order(lat, rng):
    w = lat_weights(lat).numpy()
    np.testing.assert_allclose(lat_weights(lat[::-1]).numpy(), w[::-1], rtol=1e-10)  # a descending view
    order = list(range(len(lat)))
    rng.shuffle(order)  # a shuffled regular grid goes through the irregular branch: same cells
    np.testing.assert_allclose(lat_weights(lat[order]).numpy(), w[order], rtol=1e-9)


@FAST
@given(st.lists(floats(0.01, 90), min_size=1, max_size=12, unique=True), st.booleans())
def test_lat_weights_are_symmetric_about_the_equator(north, equator):
    north = np.sort(north)
    assume(len(north) < 2 or np.diff(north).min() > 1e-3)
    lat = np.concatenate([north[::-1], [0.0] if equator else [], -north])
    w = dict(zip(lat.tolist(), lat_weights(lat).numpy()))
    for p in north:
        assert w[p] == pytest.approx(w[-p], rel=1e-9)


def test_a_single_row_has_weight_one():
    assert lat_weights(np.array([45.0])).tolist() == [1.0]


@st.composite
def grid_fields(draw, n_fields=2, lo=-1e3, hi=1e3, max_time=3):
    lat = draw(any_lats(max_size=5))
    shape = (draw(st.integers(1, max_time)), len(lat), draw(st.integers(1, 4)))
    return (lat, *(draw(arrays(np.float64, shape, elements=floats(lo, hi))) for _ in range(n_fields)))


def rmse_loop(f, o, lat):
    w = lat_weights_loop(list(lat))
    n_t, n_lat, n_lon = f.shape
    total = 0.0
    for t in range(n_t):
        for i in range(n_lat):
            for j in range(n_lon):
                total += w[i] * (f[t, i, j] - o[t, i, j]) ** 2
    return math.sqrt(total / (n_t * n_lat * n_lon))


def rmse(f, o, lat):
    return weighted_rmse(torch.tensor(f), torch.tensor(o), lat)


@FAST
@given(grid_fields())
def test_rmse_matches_a_loop_over_grid_points(fields):
    lat, f, o = fields
    assert rmse(f, o, lat) == pytest.approx(rmse_loop(f, o, lat), rel=1e-5, abs=1e-12)


@FAST
@given(grid_fields())
def test_rmse_is_nonnegative_symmetric_and_zero_only_for_a_perfect_forecast(fields):
    lat, f, o = fields
    r = rmse(f, o, lat)
    assert r >= 0 and r == rmse(o, f, lat)
    assert rmse(o, o, lat) == 0.0
    if np.abs(f - o).max() > 1e-100:  # below ~1e-154 the squares underflow to zero
        assert r > 0


# constants and factors below ~1e-150 would underflow the squares: not what these laws are about
factors = st.one_of(st.just(0.0), floats(-1e3, -1e-3), floats(1e-3, 1e3))


@FAST
@given(grid_fields(), factors)
def test_rmse_of_a_constant_error_is_its_magnitude(fields, k):
    lat, _, o = fields
    # (o + k) − o is k up to one rounding of |o| + |k|
    assert rmse(o + k, o, lat) == pytest.approx(abs(k), rel=1e-9, abs=1e-12 * (np.abs(o).max() + abs(k)))


@FAST
@given(grid_fields(), floats(-1e3, 1e3))
def test_rmse_ignores_a_common_shift(fields, k):
    lat, f, o = fields
    tol = 1e-12 * (np.abs(f).max() + np.abs(o).max() + abs(k))
    assert rmse(f + k, o + k, lat) == pytest.approx(rmse(f, o, lat), rel=1e-9, abs=tol)


@FAST
@given(grid_fields(), factors)
def test_rmse_scales_with_the_magnitude_of_a_common_factor(fields, c):
    lat, f, o = fields
    tol = 1e-12 * abs(c) * (np.abs(f).max() + np.abs(o).max())
    assert rmse(c * f, c * o, lat) == pytest.approx(abs(c) * rmse(f, o, lat), rel=1e-9, abs=tol)


@FAST
@given(grid_fields(max_time=4), st.randoms(use_true_random=False))
def test_rmse_is_the_root_of_the_time_mean_square_and_ignores_row_and_column_order(fields, rng):
    lat, f, o = fields
    per_time = [rmse(f[t:t + 1], o[t:t + 1], lat) ** 2 for t in range(len(f))]
    assert rmse(f, o, lat) == pytest.approx(math.sqrt(np.mean(per_time)), rel=1e-9, abs=1e-12)
    # leading dims are averaged alike: (2, T, lat, lon) is (2T, lat, lon)
    stacked = weighted_rmse(torch.tensor(np.stack([f, o])), torch.tensor(np.stack([o, o])), lat)
    flat = rmse(np.concatenate([f, o]), np.concatenate([o, o]), lat)
    assert stacked == pytest.approx(flat, rel=1e-12, abs=1e-300)
    # the same grid with its rows (and their latitudes) or its columns reordered
    rows, cols = list(range(f.shape[1])), list(range(f.shape[2]))
    rng.shuffle(rows), rng.shuffle(cols)
    assert rmse(f[:, rows][:, :, cols], o[:, rows][:, :, cols], lat[rows]) == pytest.approx(
        rmse(f, o, lat), rel=1e-5, abs=1e-12)


def acc_loop(f, o, c, lat):
    w = lat_weights_loop(list(lat))
    accs = []
    for t in range(len(f)):
        num = ff = oo = 0.0
        for i in range(f.shape[1]):
            for j in range(f.shape[2]):
                fa, oa = f[t, i, j] - c[t, i, j], o[t, i, j] - c[t, i, j]
                num, ff, oo = num + w[i] * fa * oa, ff + w[i] * fa * fa, oo + w[i] * oa * oa
        accs.append(num / math.sqrt(ff * oo))
    return sum(accs) / len(accs)


def acc(f, o, c, lat):
    return weighted_acc(torch.tensor(f), torch.tensor(o), torch.tensor(c), lat)


# anomalies of at least 1e-3 in magnitude: every time's anomaly is far above the 1e-30 floor that
# `weighted_acc` puts under its denominator (a guard for all-zero anomalies), so no time is clamped
anomaly = st.one_of(floats(-1e3, -1e-3), floats(1e-3, 1e3))


@st.composite
def anomaly_fields(draw):
    lat, c = draw(grid_fields(n_fields=1))
    fa, oa = (draw(arrays(np.float64, c.shape, elements=anomaly)) for _ in range(2))
    return lat, fa, oa, c


@FAST
@given(anomaly_fields())
def test_acc_matches_a_loop_over_grid_points(fields):
    lat, fa, oa, c = fields
    f, o = c + fa, c + oa
    assert acc(f, o, c, lat) == pytest.approx(acc_loop(f, o, c, lat), rel=1e-5, abs=1e-9)


@FAST
@given(grid_fields(n_fields=3))
def test_acc_is_a_correlation_in_minus_one_to_one_for_any_fields(fields):
    lat, f, o, c = fields
    a = acc(f, o, c, lat)
    assert math.isfinite(a) and -1 - 1e-12 <= a <= 1 + 1e-12  # Cauchy–Schwarz; all-zero anomalies give 0
    assert a == pytest.approx(acc(o, f, c, lat), rel=1e-12, abs=1e-15)  # symmetric in forecast and truth


@FAST
@given(anomaly_fields())
def test_acc_of_a_perfect_forecast_is_one(fields):
    lat, _, oa, c = fields
    o = c + oa
    assert acc(o, o, c, lat) == pytest.approx(1.0, rel=1e-12)


@FAST
@given(anomaly_fields(), floats(1e-3, 1e3))
def test_acc_ignores_positive_scaling_of_the_forecast_anomaly_and_flips_with_its_sign(fields, k):
    lat, fa, oa, c = fields
    zero = np.zeros_like(fa)  # climatology zero: the anomalies are exactly what was drawn
    a = acc(fa, oa, zero, lat)
    assert acc(k * fa, oa, zero, lat) == pytest.approx(a, rel=1e-9, abs=1e-12)
    assert acc(-fa, oa, zero, lat) == pytest.approx(-a, rel=1e-12, abs=1e-15)
    # anomalies against any climatology: the same scores (up to the rounding of c + anomaly)
    assert acc(c + fa, c + oa, c, lat) == pytest.approx(a, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# KD losses

@st.composite
def logit_pairs(draw, lo=-50.0, hi=50.0):
    shape = (draw(st.integers(1, 6)), draw(st.integers(2, 8)))
    zs, zt = (draw(arrays(np.float64, shape, elements=floats(lo, hi))) for _ in range(2))
    return torch.tensor(zs), torch.tensor(zt)


temperatures = floats(0.25, 10.0)


def log_softmax_loop(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def kd_loop(zs, zt, temperature):
    # Hinton: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over rows
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        ls = log_softmax_loop([v / temperature for v in s_row])
        lt = log_softmax_loop([v / temperature for v in t_row])
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return total / len(zs) * temperature ** 2


def kd(zs, zt, temperature):
    return create_loss("kd", temperature=temperature)({"logits": zs}, {"logits": zt}, None)


@FAST
@given(logit_pairs(), temperatures)
def test_kd_loss_matches_a_loop_and_is_nonnegative(logits, temperature):
    zs, zt = logits
    value = float(kd(zs, zt, temperature))
    assert value == pytest.approx(kd_loop(zs, zt, temperature), rel=1e-9, abs=1e-10)
    assert value >= -1e-12  # Gibbs' inequality, up to rounding


@FAST
@given(logit_pairs(), temperatures)
def test_kd_loss_is_zero_for_the_teachers_own_logits(logits, temperature):
    _, zt = logits
    assert float(kd(zt.clone(), zt, temperature)) == pytest.approx(0.0, abs=1e-12)


@FAST
@given(logit_pairs(), temperatures, arrays(np.float64, 6, elements=floats(-1e3, 1e3)),
       arrays(np.float64, 6, elements=floats(-1e3, 1e3)))
def test_kd_loss_ignores_a_constant_added_to_each_row(logits, temperature, cs, ct):
    zs, zt = logits
    cs, ct = torch.tensor(cs[:len(zs), None]), torch.tensor(ct[:len(zs), None])  # softmax is shift-invariant
    assert float(kd(zs + cs, zt + ct, temperature)) == pytest.approx(float(kd(zs, zt, temperature)),
                                                                      rel=1e-6, abs=1e-8)


@FAST
@given(logit_pairs(), temperatures)
def test_kd_gradient_is_the_closed_form(logits, temperature):
    # d/dz_s of T²·KL(p_t ‖ p_s) averaged over B rows is T·(p_s − p_t)/B (Hinton et al. 2015, eq. 2)
    zs, zt = logits
    zs.requires_grad_(True)
    kd(zs, zt, temperature).backward()
    p_s, p_t = torch.softmax(zs.detach() / temperature, -1), torch.softmax(zt / temperature, -1)
    expected = temperature * (p_s - p_t) / len(zs)
    torch.testing.assert_close(zs.grad, expected, rtol=1e-9, atol=1e-12)


@FAST
@given(logit_pairs(lo=-1e4, hi=1e4), floats(0.05, 20.0))
def test_kd_loss_and_gradient_stay_finite_in_float32_for_extreme_logits(logits, temperature):
    zs, zt = (z.float() for z in logits)
    zs.requires_grad_(True)
    loss = kd(zs, zt, temperature)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


@st.composite
def feature_pairs(draw):
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 6)))
    s = draw(arrays(np.float64, shape, elements=floats(-100, 100)))
    t = draw(arrays(np.float64, (shape[0], draw(st.integers(1, 6))), elements=floats(-100, 100)))
    return torch.tensor(s), torch.tensor(t)


def hint_in_float64(s, t):
    # the adapter is built (in float32, the training dtype) on the first call; then cast for exact checks
    loss = create_loss("hint", student_key="f", teacher_key="f")
    loss({"f": s.detach().float()}, {"f": t.float()}, None)
    return loss.double()


@FAST
@given(feature_pairs())
def test_hint_loss_is_the_mean_square_of_the_adapted_student_and_has_finite_gradients(features):
    s, t = features
    s.requires_grad_(True)
    loss = hint_in_float64(s, t)
    value = loss({"f": s}, {"f": t}, None)
    w, b = loss.adapter.weight.detach().numpy(), loss.adapter.bias.detach().numpy()
    x, y = s.detach().numpy(), t.numpy()
    total = 0.0
    for i in range(len(x)):
        for k in range(y.shape[1]):
            total += (sum(w[k, j] * x[i, j] for j in range(x.shape[1])) + b[k] - y[i, k]) ** 2
    assert float(value) == pytest.approx(total / y.size, rel=1e-9, abs=1e-12)
    assert float(value) >= 0
    value.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(loss.adapter.weight.grad).all()


@FAST
@given(feature_pairs())
def test_hint_loss_is_zero_when_the_adapted_student_matches_the_teacher(features):
    s, _ = features
    loss = hint_in_float64(s, s)
    with torch.no_grad():  # an identity adapter: the student's feature is the hint itself
        loss.adapter.weight.copy_(torch.eye(s.shape[1], dtype=torch.float64))
        loss.adapter.bias.zero_()
    assert float(loss({"f": s}, {"f": s.clone()}, None)) == 0.0


@st.composite
def row_sets(draw):
    # rows at least 1e-3 apart on average: the mean-distance normaliser stays off its 1e-12 floor
    shape = (draw(st.integers(2, 6)), draw(st.integers(1, 4)))
    x = draw(arrays(np.float64, shape, elements=floats(-100, 100)))
    assume(torch.pdist(torch.tensor(x)).mean() > 1e-3)
    return torch.tensor(x)


def relation(s, t):
    return float(create_loss("relation", student_key="f", teacher_key="f")({"f": s}, {"f": t}, None))


@FAST
@given(row_sets(), row_sets(), floats(1e-3, 1e3), arrays(np.float64, 4, elements=floats(-100, 100)))
def test_relation_loss_sees_only_the_shape_of_the_student_rows(s, t, k, shift):
    n = min(len(s), len(t))
    s, t = s[:n, :], t[:n, :]
    assume(torch.pdist(s).mean() > 1e-3 and torch.pdist(t).mean() > 1e-3)
    value = relation(s, t)
    assert value >= 0 and relation(t, t.clone()) == pytest.approx(0.0, abs=1e-12)
    # normalised distances: scaling and translating the student's rows change nothing
    assert relation(k * s, t) == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert relation(s + torch.tensor(shift[:s.shape[1]]), t) == pytest.approx(value, rel=1e-6, abs=1e-6)


@st.composite
def forecast_outputs(draw):
    b, z, h, w = (draw(st.integers(1, 3)) for _ in range(4))
    upper_ch, surface_ch = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    assume(upper_ch or surface_ch)  # a model forecasts at least one field
    shapes = {"upper": (b, upper_ch, z, h, w), "surface": (b, surface_ch, h, w)}
    field = lambda shape: torch.tensor(draw(arrays(np.float64, shape, elements=floats(-1e3, 1e3))))
    side = lambda: {k: field(shape) for k, shape in shapes.items()}
    return side(), side()


@FAST
@given(forecast_outputs())
def test_forecast_losses_are_the_mean_of_the_present_fields_mean_absolute_errors(outputs):
    pred, truth = outputs
    maes = [np.abs(pred[k].numpy() - truth[k].numpy()).sum() / pred[k].numel() for k in ("upper", "surface")
            if pred[k].numel()]
    expected = sum(maes) / len(maes)
    l1, kd_out = create_loss("forecast_l1")(pred, None, truth), create_loss("forecast_kd")(pred, truth, None)
    for value in (l1, kd_out):
        assert math.isfinite(float(value)) and float(value) >= 0
        assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(create_loss("forecast_kd")(pred, pred, None)) == 0.0


@FAST
@given(logit_pairs(), temperatures, floats(0, 10), floats(0, 10))
def test_a_distillation_loss_is_the_weighted_sum_of_its_terms(logits, temperature, a, b):
    zs, zt = logits
    y = torch.zeros(len(zs), dtype=torch.long)
    crit = DistillationLoss({"kd": {"weight": a, "temperature": temperature}, "ce": {"weight": b}})
    total, parts = crit({"logits": zs}, {"logits": zt}, y)
    ce = float(torch.nn.functional.cross_entropy(zs, y))
    assert parts["kd"] == pytest.approx(a * kd_loop(zs, zt, temperature), rel=1e-9, abs=1e-9)
    assert parts["ce"] == pytest.approx(b * ce, rel=1e-12, abs=1e-12)
    assert float(total) == pytest.approx(parts["kd"] + parts["ce"], rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# claim statistics

# t(0.975, df) from a printed table (df 1 and 2 also have closed forms: tan(0.475π) and 0.95/√0.04875)
T975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 6: 2.44691, 7: 2.36462, 8: 2.30600,
        9: 2.26216, 10: 2.22814, 11: 2.20099, 12: 2.17881}

differences = st.lists(floats(-1e3, 1e3), min_size=2, max_size=13)


def sample_sd(d):
    # in units of the largest |d|, so that tiny differences do not underflow when squared
    m = max(map(abs, d)) or 1.0
    mean = sum(x / m for x in d) / len(d)
    return m * math.sqrt(sum((x / m - mean) ** 2 for x in d) / (len(d) - 1))


def close(a, b, scale):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * scale)


def test_the_t_table_agrees_with_its_closed_forms():
    assert T975[1] == pytest.approx(math.tan(0.475 * math.pi), rel=1e-5)
    assert T975[2] == pytest.approx(0.95 / math.sqrt(0.04875), rel=1e-5)


@FAST
@given(differences)
def test_t_interval_is_the_mean_plus_minus_t_times_the_standard_error(d):
    lo, hi = t_interval(d)
    mean, scale = sum(d) / len(d), max(map(abs, d))
    assert lo <= statistics.fmean(d) <= hi
    assert (lo + hi) / 2 == pytest.approx(mean, rel=1e-9, abs=1e-12 * scale)
    half = T975[len(d) - 1] * sample_sd(d) / math.sqrt(len(d))
    assert (hi - lo) / 2 == pytest.approx(half, rel=2e-5, abs=1e-9 * scale)


@FAST
@given(differences, factors)
def test_t_interval_scales_with_the_differences(d, c):
    lo, hi = t_interval(d)
    lo_c, hi_c = t_interval([c * x for x in d])
    expected = (c * lo, c * hi) if c > 0 else (c * hi, c * lo)  # a negative factor swaps the ends
    scale = abs(c) * max(map(abs, d))
    assert close(lo_c, expected[0], scale) and close(hi_c, expected[1], scale)


@FAST
@given(differences, floats(-1e3, 1e3))
def test_t_interval_shifts_with_the_differences(d, shift):
    lo, hi = t_interval(d)
    lo_s, hi_s = t_interval([x + shift for x in d])
    scale = abs(shift) + max(map(abs, d))
    assert close(lo_s, lo + shift, scale) and close(hi_s, hi + shift, scale)


@FAST
@given(differences, st.randoms(use_true_random=False))
def test_t_interval_ignores_the_order_of_the_seeds(d, rng):
    shuffled = list(d)
    rng.shuffle(shuffled)
    assert t_interval(shuffled) == pytest.approx(t_interval(d), rel=1e-12, abs=1e-12 * max(map(abs, d)))


ops = st.sampled_from([">", ">=", "<", "<="])


def claimed_side(op, x):
    return {">": x > 0, ">=": x >= 0, "<": x < 0, "<=": x <= 0}[op]


def reference_verdict(op, lo, hi):
    # holds: the whole interval on the claimed side of zero; refuted: the whole interval on the other
    if claimed_side(op, lo) and claimed_side(op, hi):
        return "holds"
    if not claimed_side(op, lo) and not claimed_side(op, hi):
        return "refuted"
    return "inconclusive"


ends = st.one_of(st.just(0.0), st.just(-0.0), floats(-1, 1))


@settings(max_examples=200, deadline=None)
@given(ops, ends, ends)
def test_verdict_holds_iff_the_interval_is_on_the_claimed_side(op, a, b):
    lo, hi = min(a, b), max(a, b)
    assert verdict(Claim.parse(f"x.m {op} y.m"), (lo, hi)) == reference_verdict(op, lo, hi)


def scores_of(left, right):
    return {"a": {"m": dict(left)}, "b": {"m": dict(right)}}


@FAST
@given(differences, ops)
def test_a_checked_claim_reports_a_verdict_that_its_interval_explains(d, op):
    # the right side is zero on every seed, so the paired differences are exactly d
    scores = scores_of(enumerate(d), {s: 0.0 for s in range(len(d))})
    part = check_claim(Claim.parse(f"a.m {op} b.m"), scores)
    assert part["differences"] == d and part["diff_mean"] == pytest.approx(sum(d) / len(d), abs=1e-9)
    lo, hi = part["ci95"]
    assert part["verdict"] == reference_verdict(op, lo, hi)
    # the same claim read from the other side: b.m (op reversed) a.m; negated interval, same verdict
    flipped = {">": "<", ">=": "<=", "<": ">", "<=": ">="}[op]
    mirror = check_claim(Claim.parse(f"b.m {flipped} a.m"), scores)
    assert mirror["ci95"] == pytest.approx([-hi, -lo]) and mirror["verdict"] == part["verdict"]


@FAST
@given(floats(-1e3, 1e3), floats(-1e3, 1e3), st.integers(0, 100), ops)
def test_one_seed_is_inconclusive(left, right, seed, op):
    part = check_claim(Claim.parse(f"a.m {op} b.m"), scores_of({seed: left}, {seed: right}))
    assert part["ci95"] is None and part["verdict"] == "inconclusive"


@FAST
@given(differences, floats(-1e3, 1e3), ops)
def test_a_single_baseline_value_is_paired_with_every_seed(values, baseline, op):
    claim = Claim.parse(f"a.m {op} b.m")
    seeds = range(len(values))
    once = check_claim(claim, scores_of(enumerate(values), {7: baseline}))
    every = check_claim(claim, scores_of(enumerate(values), {s: baseline for s in seeds}))
    assert once["differences"] == every["differences"] and once["ci95"] == every["ci95"]
    assert once["verdict"] == every["verdict"]


@FAST
@given(st.lists(st.tuples(differences, ops), min_size=1, max_size=4))
def test_a_compound_claim_holds_iff_every_part_holds_and_is_refuted_iff_any_part_is(parts):
    scores = {f"r{i}": {"m": dict(enumerate(d))} for i, (d, _) in enumerate(parts)}
    for i, (d, _) in enumerate(parts):
        scores[f"base{i}"] = {"m": {s: 0.0 for s in range(len(d))}}
    claims = [Claim.parse(f"r{i}.m {op} base{i}.m") for i, (_, op) in enumerate(parts)]
    whole = check_claims(claims, scores)
    each = [check_claim(c, scores)["verdict"] for c in claims]
    assert [p["verdict"] for p in whole["parts"]] == each
    assert (whole["verdict"] == "holds") == all(v == "holds" for v in each)
    assert (whole["verdict"] == "refuted") == any(v == "refuted" for v in each)
