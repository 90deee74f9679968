"""The `unlearnx` command line: `demo` (its JSON figures checked against facts that hold
independently of the demo's own code), `datasets`, `--version`, and its error handling."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console
from scipy.special import expit, log1p

import unlearnx as ux
from unlearnx import _cli
from unlearnx._cli import main

METHODS = ["none", "first order", "second order", "second order + refine", "retrain"]
DIABETES_FEATURES = ["Pregnancies", "BMI", "Age"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `unlearnx demo --dataset diabetes --json r.json --quiet` once for the module."""
    tmp_path = tmp_path_factory.mktemp("demo")
    path = tmp_path / "r.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "--dataset", "diabetes", "--json", str(path), "--quiet"])
    return {
        "code": code,
        "stdout": out.getvalue(),
        "dir": tmp_path,
        "results": json.loads(path.read_text()),
    }


def test_demo_writes_well_formed_json_and_prints_nothing_when_quiet(demo):
    assert demo["code"] == 0
    assert demo["stdout"] == ""
    assert sorted(os.listdir(demo["dir"])) == ["r.json"]  # no temporary file left behind
    r = demo["results"]
    assert r["dataset"] == "diabetes"
    assert r["dtype"] == "float64"
    assert r["n_train"] == 614 and r["n_features"] == 8
    assert r["prior_precision"] == 1.0
    assert r["fit"]["converged"] and r["fit"]["iterations"] > 0
    assert 0.6 < r["fit"]["test_accuracy"] < 0.9
    assert r["total_seconds"] > 0
    assert [q["kind"] for q in r["requests"]] == ["forget_features", "relabel", "forget_rows"]
    # all rows have their features removed; 5% of 614 relabelled; 80% of a group deleted
    assert [q["rows_edited"] for q in r["requests"]][:2] == [614, 31]
    assert 0 < r["requests"][2]["rows_edited"] < 614
    for q in r["requests"]:
        assert [m["method"] for m in q["methods"]] == METHODS
        for m in q["methods"]:
            assert set(m) == {
                "method",
                "time_ms",
                "speedup",
                "rel_distance",
                "grad_residual",
                "test_accuracy",
            }
            for key in ("time_ms", "speedup", "rel_distance", "grad_residual"):
                assert math.isfinite(m[key]) and m[key] >= 0, (q["name"], m)
            assert m["time_ms"] > 0 and 0 <= m["test_accuracy"] <= 1


def test_retrain_row_is_the_reference(demo):
    for q in demo["results"]["requests"]:
        retrain = q["methods"][-1]
        assert retrain["method"] == "retrain"
        assert abs(retrain["rel_distance"]) <= 1e-12
        assert retrain["speedup"] == 1.0
        assert retrain["grad_residual"] < 1e-6  # retraining is at the edited optimum


def test_methods_order_by_closeness_to_retraining(demo):
    for q in demo["results"]["requests"]:
        d = {m["method"]: m["rel_distance"] for m in q["methods"]}
        assert d["second order + refine"] <= d["second order"] < d["none"], q["name"]
        closed = 1 - d["second order"] / d["none"]
        assert q["distance_closed_second_order"] == pytest.approx(closed, rel=1e-9, abs=1e-12)


def _newton(Z, y, lam, theta, tol=1e-12):
    """MAP of `Σ logistic loss + λ/2 ‖θ‖²` by damped Newton, in numpy (an oracle that
    shares no code with unlearnx)."""

    def f(t):
        z = Z @ t
        return np.sum(log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - y * z) + 0.5 * lam * t @ t

    for _ in range(100):
        p = expit(Z @ theta)
        g = Z.T @ (p - y) + lam * theta
        if np.linalg.norm(g) < tol:
            break
        H = (Z * (p * (1 - p))[:, None]).T @ Z + lam * np.eye(Z.shape[1])
        step = np.linalg.solve(H, g)
        a = 1.0
        while f(theta - a * step) > f(theta) - 1e-4 * a * g @ step and a > 1e-8:
            a /= 2
        theta = theta - a * step
    return theta


def test_second_order_distance_matches_an_independent_recomputation(demo):
    """Request 1 (remove three features from every row), recomputed twice: with the
    library's public API, and with a numpy oracle (Newton step and exact refit)."""
    reported = demo["results"]["requests"][0]
    assert reported["kind"] == "forget_features"
    reported = {m["method"]: m["rel_distance"] for m in reported["methods"]}["second order"]

    train = ux.datasets.diabetes().train
    request = ux.forget_features(DIABETES_FEATURES)

    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train, prior_precision=1.0)
    post = ux.laplace(model, train, prior_precision=1.0)
    unlearner = ux.second_order()
    post2, _, _ = unlearner.update(request, unlearner.init(post, train))
    exact = ux.retrain(post, train, request)
    assert float(ux.metrics.distance(post2, exact)) == pytest.approx(reported, abs=1e-8)

    # The oracle: θ' = θ* − H'(θ*)⁻¹ ∇L'(θ*) on the edited data, against the exact refit.
    X = np.asarray(train.X)
    y = np.asarray(train.y, dtype=np.float64)
    Z = np.hstack([X, np.ones((train.n, 1))])
    lam = 1.0
    theta = _newton(Z, y, lam, np.zeros(Z.shape[1]))
    Z_edit = Z.copy()
    cols = [train.feature_names.index(c) for c in DIABETES_FEATURES]
    Z_edit[:, cols] = X[:, cols].mean(axis=0)  # forget_features fills with the column mean
    p = expit(Z_edit @ theta)
    g = Z_edit.T @ (p - y) + lam * theta
    H = (Z_edit * (p * (1 - p))[:, None]).T @ Z_edit + lam * np.eye(Z.shape[1])
    newton = theta - np.linalg.solve(H, g)
    refit = _newton(Z_edit, y, lam, theta)
    oracle = np.linalg.norm(newton - refit) / np.linalg.norm(refit)
    assert oracle == pytest.approx(reported, abs=1e-8)


def test_demo_renders_tables(demo):
    buffer = io.StringIO()
    _cli._render(demo["results"], Console(file=buffer, width=240))
    text = buffer.getvalue()
    for method in METHODS:
        assert method in text
    assert "compile time excluded" in text
    assert text.count("second order closed") == 3
    assert "(forget_features, 614 rows edited)" in text
    assert "float64" in text


def test_bad_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--dataset", "bogus"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--prior-precision", "-1"],
        ["demo", "--prior-precision", "nan"],
        ["demo", "--seed", "-3"],
        ["demo", "--json", "/nonexistent-dir/r.json"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_library_value_error_is_one_clean_line(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise ValueError("demo: something was wrong; fix it.")

    monkeypatch.setattr(_cli, "run_demo", fail)
    assert main(["demo", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "unlearnx: error: demo: something was wrong; fix it."
    assert "Traceback" not in err


def test_datasets_lists_the_vendored_data(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("adult", "diabetes", "german"):
        assert name in out
    assert "32,561" in out and "CC BY 4.0" in out


def test_version_through_the_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "unlearnx", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"unlearnx {ux.__version__}"
