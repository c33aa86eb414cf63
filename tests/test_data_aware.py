"""Data-aware compression: output fitting, bias correction, the global budget, and the accuracy bars on the
trained VGG-style fixture (calibration split distinct from the held-out test split)."""
import json

import numpy as np
import pytest

import builders as B
from conftest import FIXTURES, ROOT, digits_calibration
from digits import load_split
from tfrewrite import cli, io, rewrite, verify
from tfrewrite.linalg import fit, svd
from tfrewrite.plan import RunContext

VGG = FIXTURES / "vgg_digits.tflite"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return digits_calibration(tmp_path_factory)


def accuracy(model) -> float:
    x, y = load_split("test", 32)
    it = verify.interpreter(model)
    pred = [verify.invoke(it, [x[i:i + 1]])[0].argmax() for i in range(len(x))]
    return float(np.mean(np.array(pred) == y))


# ------------------------------------------------------------------------------------------------ maths
def _correlated_rows(rng, n_rows, n, rank=12):
    return rng.standard_normal((n_rows, rank)) @ rng.standard_normal((rank, n)) + 0.05 * rng.standard_normal((n_rows, n))


@pytest.mark.parametrize("n_rows", [40, 400])  # fewer and more samples than input features
def test_output_fitted_svd_is_optimal_in_the_data_metric(n_rows):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((60, 100))
    x = _correlated_rows(rng, n_rows, 100)
    metric = fit.input_metric(x, 0.01)
    left, right = fit.output_lowrank_factors(w, metric, 8)
    l2, r2 = svd.lowrank_factors(w, 8)
    err_data, err_plain = fit.output_error(w, left @ right, metric), fit.output_error(w, l2 @ r2, metric)
    assert err_data < 0.8 * err_plain
    s = fit.whitened_singular_values(w, metric)
    assert err_data == pytest.approx(np.sqrt(np.sum(s[8:] ** 2) / np.sum(s ** 2)), rel=1e-5)
    # Same answer as forming Σ explicitly.
    cov = x.T @ x / n_rows
    l3, r3 = svd.whitened_lowrank_factors(w, cov, 8, damping=metric.delta / (np.trace(cov) / 100))
    assert fit.output_error(w, l3 @ r3, metric) == pytest.approx(err_data, rel=1e-4)


@pytest.mark.parametrize("n_rows", [40, 400])
def test_error_around_the_mean_comes_from_the_second_moment_metric(n_rows):
    """The --ratio floor's error around the mean, read off the uncentered metric (no second eigendecomposition),
    equals the one computed from the rows' damped covariance formed explicitly; also for factors L·R."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((30, 100))
    x = _correlated_rows(rng, n_rows, 100) + 3.0  # a large mean, as after a RELU
    left, right = rng.standard_normal((30, 6)), rng.standard_normal((6, 100))
    metric = fit.input_metric(x, 0.02)
    c = x - x.mean(axis=0)
    cov = c.T @ c / n_rows + 0.02 * np.sum(c * c) / n_rows / 100 * np.eye(100)

    def around_mean(e):
        return np.sqrt(np.trace(e @ cov @ e.T) / np.trace(w @ cov @ w.T))
    approx = 0.7 * w + 0.1 * left @ right
    assert fit.centered_output_error(w, approx, metric) == pytest.approx(around_mean(w - approx), rel=1e-9)
    assert fit.lowrank_output_error(w, left, right, metric, centered=True) == \
        pytest.approx(around_mean(w - left @ right), rel=1e-9)


def test_bias_shift_matches_the_mean_output():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((30, 50))
    x = _correlated_rows(rng, 300, 50) + 2.0  # a large mean, as after a RELU
    metric = fit.input_metric(x)
    left, right = fit.output_lowrank_factors(w, metric, 4)
    approx = left.astype(np.float64) @ right
    shift = fit.bias_shift(w, approx, x.mean(axis=0))
    np.testing.assert_allclose((x @ approx.T + shift).mean(axis=0), (x @ w.T).mean(axis=0), atol=1e-9)


def test_tucker2_and_cp_output_fits_beat_weight_fits():
    rng = np.random.default_rng(7)
    from tfrewrite.linalg import cp, tucker
    kernel = rng.standard_normal((24, 9, 16))
    rows = _correlated_rows(rng, 600, 9 * 16, rank=20)
    metric = fit.input_metric(rows)
    w = kernel.reshape(24, -1)
    res = tucker.tucker2(kernel, 8, 6)
    plain = np.einsum("tp,pkq,sq->tks", res.out_factor, res.core, res.in_factor).reshape(24, -1)
    u, core = fit.tucker2_output_fit(kernel, res.in_factor, 8, metric)
    fitted = np.einsum("tp,pkq,sq->tks", u, core, res.in_factor).reshape(24, -1)
    assert fit.output_error(w, fitted, metric) < 0.9 * fit.output_error(w, plain, metric)
    c = cp.cp3(kernel, 10)
    phi = (c.mid_factor[:, None, :] * c.in_factor[None, :, :]).reshape(9 * 16, 10)
    a = fit.refit_output_factor(w, phi, metric)
    assert fit.output_error(w, a @ phi.T, metric) < fit.output_error(w, c.out_factor @ phi.T, metric)


# ------------------------------------------------------------------------------------------ the model
def test_calibrated_layers_match_the_original_mean_and_beat_plain(calib, tmp):
    plain, aware = tmp / "plain.tflite", tmp / "aware.tflite"
    rep = tmp / "r.json"
    # The weight-fitted rewrite breaks this model (output error above 0.5): --force keeps it, for the comparison.
    assert cli.main([str(VGG), str(plain), "--rank", "16", "--quiet", "--force"]) == 0
    assert cli.main([str(VGG), str(aware), "--rank", "16", "--calibration", str(calib), "--report", str(rep),
                     "--quiet"]) == 0
    report = json.loads(rep.read_text())
    done = [e for e in report["layers"] if e["action"] == "rewritten"]
    assert done and all(e.get("bias_corrected") and e["output_error"] < e["rel_error"] for e in done)
    assert report["calibration"]["samples"] == 96  # 100, the last 4 kept out of the fit for the output-error check
    x, _ = load_split("calib", 32)
    xs = [[x[i:i + 1]] for i in range(len(x))]
    ref, p, a = (np.concatenate([o[0] for o in verify.run(m, xs)]) for m in (VGG, plain, aware))
    assert np.linalg.norm(a - ref) < 0.5 * np.linalg.norm(p - ref)


@pytest.mark.slow
def test_accuracy_bars_on_the_trained_fixture(calib, tmp):
    """Measured (2026-12-01, this machine): original 97.50 %; plain --rank 48 (4.9x smaller) 90.28 %;
    data-aware --target-size 5 97.50 % (5.12x); --target-size 10 95.28 %. Bars from issue 7: at 5x the data-aware loss
    is at most half the plain loss, at 10x the loss is at most 3 points. Without data (issue 12; measured 96.11 %
    at 5.01x): within 3 points of the original, and never better than with data. Its fits are tempered: each FC's
    output error on the generated rows is a little above its damage, the best fit's there (equal with data)."""
    base = accuracy(VGG)
    plain5, aware5, aware10 = tmp / "p5.tflite", tmp / "a5.tflite", tmp / "a10.tflite"
    free5, free_report = tmp / "f5.tflite", tmp / "f5.json"
    assert cli.main([str(VGG), str(free5), "--target-size", "5", "--quiet", "--report", str(free_report)]) == 0
    # Its output error is measured on generated images, not noise: a good model is not called broken.
    free = json.loads(free_report.read_text())
    assert free["output_error"]["worst"] < 0.2, free["output_error"]
    assert not any("broken" in w for w in free["warnings"]), free["warnings"]
    fcs = [e for e in free["layers"] if e["kind"] == "fc" and e["action"] == "rewritten"]
    assert fcs and all(e["damage"] < e["output_error"] < 1.25 * e["damage"] for e in fcs), fcs
    assert cli.main([str(VGG), str(plain5), "--rank", "48", "--quiet"]) == 0
    assert cli.main([str(VGG), str(aware5), "--target-size", "5", "--calibration", str(calib), "--quiet"]) == 0
    assert cli.main([str(VGG), str(aware10), "--target-size", "10", "--calibration", str(calib), "--quiet"]) == 0
    size = VGG.stat().st_size
    assert size / plain5.stat().st_size >= 4.8 and size / aware5.stat().st_size >= 5.0
    assert size / aware10.stat().st_size >= 10.0
    loss_plain5 = base - accuracy(plain5)
    loss_aware5 = base - accuracy(aware5)
    loss_aware10 = base - accuracy(aware10)
    assert loss_plain5 > 0.03
    assert loss_aware5 <= 0.5 * loss_plain5, (loss_aware5, loss_plain5)
    assert loss_aware10 <= 0.03, loss_aware10
    assert size / free5.stat().st_size >= 4.9
    loss_free5 = base - accuracy(free5)
    assert loss_free5 <= 0.03 and loss_aware5 <= loss_free5, (loss_free5, loss_aware5)


@pytest.mark.slow
def test_budget_is_deterministic_and_reported(calib, tmp, capsys):
    reports = []
    for name in ("a", "b"):
        rep = tmp / f"{name}.json"
        assert cli.main([str(VGG), str(tmp / f"{name}.tflite"), "--target-macs", "2", "--calibration", str(calib),
                         "--conv-method", "tucker2", "--only", "conv2|conv3|fc", "--report", str(rep)]) == 0
        reports.append(json.loads(rep.read_text()))
    assert (tmp / "a.tflite").read_bytes() == (tmp / "b.tflite").read_bytes()
    budget = reports[0]["budget"]
    assert budget["reached"] and budget == reports[1]["budget"]
    t = reports[0]["totals"]
    assert t["macs_before"] / t["macs_after"] >= 2
    for layer in budget["layers"]:
        assert {"output", "rank", "damage", "share", "candidates"} <= set(layer)
    assert abs(sum(layer["share"] for layer in budget["layers"]) - 1) < 1e-3
    text = capsys.readouterr().out
    assert "damage" in text and "share" in text and "budget: 2x fewer MACs, reached" in text
    import jsonschema
    jsonschema.validate(reports[0], json.loads((ROOT / "schemas" / "report.schema.json").read_text()))


BAD = {
    "wrong name": lambda x: {"pixels": x},
    "wrong shape": lambda x: {"image": x[:, :, :16]},
    "wrong dtype": lambda x: {"image": (x * 255).astype(np.uint8)},
    "empty": lambda x: {"image": x[:0]},
    "nan": lambda x: {"image": np.where(x > 0.5, np.nan, x).astype(np.float32)},
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_calibration_files(tmp, capsys, what):
    x, _ = load_split("calib", 32)
    path = tmp / "c.npz"
    np.savez(path, **BAD[what](x[:4]))
    out = tmp / "o.tflite"
    code = cli.main([str(VGG), str(out), "--rank", "16", "--calibration", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrewrite: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_calibration_options_need_each_other(tmp, capsys):
    for args in (["--sequential", "--rank", "4"], ["--target-size", "5", "--rank", "4",
                                                                           "--calibration", "x.npz"]):
        code = cli.main([str(VGG), str(tmp / "o.tflite"), *args])
        assert code == 2 and capsys.readouterr().err.startswith("tfrewrite: error:")


def test_fc_with_calibration_on_a_built_model():
    """A single FC whose inputs live in a low-dimensional subspace: the data-aware rank-4 model matches the
    original on such inputs far better than the weight-fitted one."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 64))
    model = B.fc_model(w, rng.standard_normal(32), (1, 64), act="NONE")
    basis = rng.standard_normal((4, 64))
    x = rng.standard_normal((200, 4)) @ basis
    m_plain, m_aware = io.read_buffer(model), io.read_buffer(model)
    rewrite.rewrite_model(m_plain, rewrite.Options(fc_rank=4))
    ctx = RunContext(rewrite.Options(fc_rank=4).plan())
    op = m_aware.main.operators[0]
    ctx.layer_data[id(op)] = {"rows": x.astype(np.float32), "mean": x.mean(axis=0)}
    rewrite.rewrite_model(m_aware, rewrite.Options(fc_rank=4), context=ctx)
    samples = [[x[i:i + 1].astype(np.float32)] for i in range(20)]
    ref = np.concatenate([o[0] for o in verify.run(model, samples)])
    plain = np.concatenate([o[0] for o in verify.run(io.to_bytes(m_plain), samples)])
    aware = np.concatenate([o[0] for o in verify.run(io.to_bytes(m_aware), samples)])
    assert np.linalg.norm(aware - ref) < 0.01 * np.linalg.norm(ref)
    assert np.linalg.norm(plain - ref) > 0.1 * np.linalg.norm(ref)


def test_cross_term_reduces_to_the_plain_fit_when_inputs_are_unchanged():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((20, 30))
    x = _correlated_rows(rng, 200, 30)
    metric = fit.input_metric(x)
    cross = fit.cross_term(w, metric, x, x)
    l1, r1 = fit.output_lowrank_factors(w, metric, 5)
    l2, r2 = fit.output_lowrank_factors(w, metric, 5, cross)
    np.testing.assert_allclose(l1.astype(np.float64) @ r1, l2.astype(np.float64) @ r2, atol=1e-4)
    # With changed inputs x' = x + noise, the cross fit predicts W·x from x' better than the plain one.
    x2 = x + 0.3 * rng.standard_normal(x.shape)
    m2 = fit.input_metric(x2)
    c2 = fit.cross_term(w, m2, x2, x)
    la, ra = fit.output_lowrank_factors(w, m2, 5, c2)
    lb, rb = fit.output_lowrank_factors(w, m2, 5)
    target = x @ w.T
    assert np.linalg.norm(x2 @ (la @ ra).T - target) < np.linalg.norm(x2 @ (lb @ rb).T - target)


@pytest.mark.slow
def test_sequential_fitting_accounts_for_compounding_errors(calib, tmp):
    """Measured: --rank 16 with calibration 93.06 %, with --sequential 96.39 % (original 97.50 %)."""
    one, seq = tmp / "one.tflite", tmp / "seq.tflite"
    assert cli.main([str(VGG), str(one), "--rank", "16", "--calibration", str(calib), "--quiet"]) == 0
    assert cli.main([str(VGG), str(seq), "--rank", "16", "--calibration", str(calib), "--sequential", "--quiet"]) == 0
    assert one.stat().st_size == seq.stat().st_size
    assert accuracy(seq) >= accuracy(one) + 0.01


def test_tempered_metric_is_the_matrix_power_between_weights_and_samples():
    """Σ^p through the eigenbasis equals the matrix power formed explicitly (also where the rows span less than
    the input space); at p = 0 the output fit is the plain SVD, at p = 1 the samples' own fit."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((20, 50))
    for n_rows in (30, 300):
        x = _correlated_rows(rng, n_rows, 50)
        metric = fit.input_metric(x, 0.05)
        sigma = x.T @ x / n_rows + metric.delta * np.eye(50)
        lam, v = np.linalg.eigh(sigma)
        for p in (0.25, 0.5):
            half_power = (v * lam ** (p / 2)) @ v.T  # (Σ^p)^½
            assert np.allclose(metric.tempered(p).sqrt_apply(w, 0.5), w @ half_power, rtol=1e-8, atol=1e-10)
        plain_left, plain_right = svd.lowrank_factors(w, 5)
        left, right = fit.output_lowrank_factors(w, metric.tempered(0.0), 5)
        assert np.allclose(left @ right, plain_left @ plain_right, atol=1e-5)
        left, right = fit.output_lowrank_factors(w, metric.tempered(0.5), 5)
        tempered = left @ right
        # Half way: a smaller weight error than the samples' fit, a smaller output error than the plain SVD.
        sample_left, sample_right = fit.output_lowrank_factors(w, metric, 5)
        assert np.linalg.norm(w - tempered) < np.linalg.norm(w - sample_left @ sample_right)
        assert fit.output_error(w, tempered, metric) < fit.output_error(w, plain_left @ plain_right, metric)


def test_only_a_budget_without_data_fits_in_the_tempered_metric():
    """Generated rows under a budget: the tempered metric. Real rows, --ratio (its floor judges the fit it
    keeps) and sequential fitting (its cross term is in Σ): the rows' own."""
    from tfrewrite.passes.common import RankPolicy, fit_metric, layer_metric
    rows = _correlated_rows(np.random.default_rng(17), 60, 40)

    def policy(budgeted=True, **extra):
        return RankPolicy(ratio=2, budgeted=budgeted, extra={"rows": rows, "mean": rows.mean(0), **extra})
    for p, tempered in ((policy(temper=0.5), True), (policy(), False), (policy(False, temper=0.5), False),
                        (policy(temper=0.5, target_rows=rows), False)):
        expected = layer_metric(p).tempered(0.5).lam if tempered else layer_metric(p).lam
        assert np.allclose(fit_metric(p).lam, expected)
    assert fit_metric(RankPolicy(ratio=2, budgeted=True)) is None  # no rows: fitted to the weights
