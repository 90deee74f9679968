"""Batched unlearning: vmapped requests against the single-request update, Woodbury against
the plain refactorisation, sharding, resumable jobs and the CLI.

Oracles: `unlearner.update` one request at a time (the plain path, with its in-graph
fallback), numpy's dense inverse and determinant for the Woodbury form, and an
uninterrupted job run for the resumed ones. Exactness runs in float64 (conftest).
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import unlearnx as ux
from unlearnx._batch._woodbury import LowRankUpdate

TOL = 1e-10


def _close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, float(np.abs(b).max()))
    err = float(np.abs(a - b).max())
    assert err <= tol * scale, f"max abs difference {err:.3e} > {tol:g} × {scale:.3g}"


def _single(unlearner, post, data, requests, **predict):
    """The plain path: `update` from a fresh state, one request at a time."""
    state = unlearner.init(post, data)
    out = []
    for r in requests:
        p, _, info = unlearner.update(r, state)
        out.append((p, info))
    return out


@pytest.fixture(scope="module")
def adult_post():
    data = ux.datasets.adult().train
    model, info = ux.fit(ux.models.LogisticRegression(data.n_features), data, prior_precision=1.0)
    assert info.converged
    return data, ux.laplace(model, data, prior_precision=1.0)


@pytest.fixture(scope="module")
def pima():
    data = ux.datasets.diabetes().train
    model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data, prior_precision=1.0)
    return data, ux.laplace(model, data, prior_precision=1.0)


def _mixed_requests(data, rng, n, groups=4):
    """Single-row deletions and relabellings, then (with `groups=4`) multi-row deletions
    and a feature blanked in a few rows: one compiled function per group."""
    y = np.asarray(data.y)
    rows = rng.choice(data.n, size=3 * n, replace=False)
    reqs = [ux.forget_rows([int(r)]) for r in rows[:n]]
    reqs += [ux.relabel([int(r)], [1 - int(y[r])]) for r in rows[n : n + n // 4]]
    if groups == 4:
        reqs += [
            ux.forget_rows(rows[n + n // 4 + 3 * i : n + n // 4 + 3 * i + 3]) for i in range(4)
        ]
        reqs += [
            ux.forget_features([data.feature_names[0]], rows[2 * n + 2 * i : 2 * n + 2 * i + 2])
            for i in range(3)
        ]
    return reqs


# --- (a) the vmapped batch equals the single-request update ------------------------------


def test_adult_batch_equals_single_updates(adult_post, rng):
    data, post = adult_post
    requests = _mixed_requests(data, rng, 40)
    unlearner = ux.second_order()
    result = ux.batch.unlearn(post, data, requests, unlearner=unlearner, chunk_size=16)
    assert result.theta.shape == (len(requests), post.theta.shape[0])
    assert result.finite.all() and not result.plain.any()
    assert result.info.downdate_ok.all()
    for i, (p, info) in enumerate(_single(unlearner, post, data, requests)):
        _close(result.theta[i], p.theta)
        _close(result.info.step_norm[i], info.step_norm)
        _close(result.info.grad_change_norm[i], info.grad_change_norm)
    # single-row requests are padded to 1 row, not to the 8 of `ux.bucket_size`
    assert result.bucket[0] == 1 and set(result.bucket) == {1, 4, 2}


def test_woodbury_equals_plain_refactorisation(adult_post, rng):
    data, post = adult_post
    requests = _mixed_requests(data, rng, 24, groups=2)
    kw = dict(return_precision=True, query=data.X[:7], predict="probit")
    wood = ux.batch.unlearn(post, data, requests, solver="woodbury", **kw)
    plain = ux.batch.unlearn(post, data, requests, solver="plain", **kw)
    _close(wood.theta, plain.theta)
    _close(wood.precision, plain.precision)
    _close(wood.predictions, plain.predictions)
    # and the precision is the plain update's Λ − Σ_old + Σ_new
    for i, (p, _) in enumerate(_single(ux.second_order(), post, data, requests[:5])):
        _close(wood.precision[i], p.precision.to_dense())
        _close(wood.predictions[i], p.predict(data.X[:7]))
        _close(wood.posterior(i).theta, p.theta)


def test_low_rank_update_against_numpy(key):
    k1, k2, k3 = jax.random.split(key, 3)
    A = jax.random.normal(k1, (300, 15))
    base, _ = ux.DensePrecision.from_matrix(A.T @ A + jnp.eye(15))
    add = 0.5 * jax.random.normal(k2, (3, 15))
    remove = A[:6]
    M = np.asarray(base.matrix + add.T @ add - remove.T @ remove)
    b = jax.random.normal(k3, (15, 2))

    @jax.jit
    def everything(a, r):
        P = LowRankUpdate.build(base, a, r)
        return P.ok, P.solve(b), P.to_dense(), P.mv(b[:, 0]), P.logdet(), P.variance()

    for a, r in [(add, remove), (add[:0], remove), (add, remove[:0])]:
        ok, x, dense, mv, logdet, var = everything(a, r)
        Mi = np.asarray(base.matrix + a.T @ a - r.T @ r)
        assert bool(ok)
        _close(x, np.linalg.solve(Mi, np.asarray(b)))
        _close(dense, Mi)
        _close(mv, Mi @ np.asarray(b[:, 0]))
        _close(logdet, np.linalg.slogdet(Mi)[1])
        _close(var, np.diag(np.linalg.inv(Mi)))
    assert np.linalg.eigvalsh(M).min() > 0
    # removing too much curvature: the capacitance loses the inertia of S
    ok, *_ = everything(add, 6.0 * A[:2])
    assert np.linalg.eigvalsh(M - 35.0 * np.asarray(A[:2].T @ A[:2])).min() < 0
    assert not bool(ok)


def test_indefinite_downdate_falls_back_to_plain_update(pima):
    data, post = pima
    # A stale precision (2% of the curvature): removing a high-leverage row makes the
    # downdate indefinite, and the plain path recomputes the precision from the data.
    P = ux.DensePrecision.from_matrix(0.02 * post.precision.to_dense())[0]
    stale = ux.LaplacePosterior(post.mean, P, post.prior_precision, post.curvature)
    Xa = np.hstack([np.asarray(data.X), np.ones((data.n, 1))])
    lev = np.einsum("ij,jk,ik->i", Xa, np.linalg.inv(P.to_dense()), Xa)
    p = 1 / (1 + np.exp(-Xa @ np.asarray(post.theta)))
    lev = lev * p * (1 - p)
    bad_rows = np.argsort(lev)[-3:]  # leverage ≥ 1: indefinite
    good_rows = np.argsort(lev)[:5]
    assert lev[bad_rows].min() > 1 and lev[good_rows].max() < 1
    requests = [ux.forget_rows([int(r)]) for r in np.concatenate([good_rows, bad_rows])]
    result = ux.batch.unlearn(stale, data, requests)
    np.testing.assert_array_equal(result.plain, [False] * 5 + [True] * 3)
    np.testing.assert_array_equal(result.info.fallback, result.plain)
    assert result.finite.all()
    for i, (q, info) in enumerate(_single(ux.second_order(), stale, data, requests)):
        _close(result.theta[i], q.theta)
        assert bool(info.fallback) == result.plain[i]


@pytest.mark.parametrize(
    "unlearner",
    [
        ux.chain(ux.second_order(), ux.refine(steps=2)),
        ux.first_order(),
        ux.identity(),
        ux.second_order(method="rank_update"),
        ux.second_order(damping=0.3),
    ],
    ids=["second_order+refine", "first_order", "identity", "rank_update", "damping"],
)
def test_chains_and_other_transforms(pima, rng, unlearner):
    data, post = pima
    requests = _mixed_requests(data, rng, 12, groups=2)
    result = ux.batch.unlearn(post, data, requests, unlearner=unlearner)
    for i, (p, info) in enumerate(_single(unlearner, post, data, requests)):
        _close(result.theta[i], p.theta)
        for a, b in zip(jax.tree.leaves(result.info), jax.tree.leaves(info), strict=True):
            _close(np.asarray(a[i], float), np.asarray(b, float))


@pytest.mark.parametrize("structure,curvature", [("diag", "ggn"), ("full", "hessian")])
def test_other_precisions(pima, rng, structure, curvature):
    data, post = pima
    post = ux.laplace(post.mean, data, structure=structure, curvature=curvature)
    requests = _mixed_requests(data, rng, 8, groups=2)
    result = ux.batch.unlearn(post, data, requests, return_precision=True)
    for i, (p, _) in enumerate(_single(ux.second_order(), post, data, requests)):
        _close(result.theta[i], p.theta)
        P = p.precision
        _close(result.precision[i], P.diag if structure == "diag" else P.to_dense())


def test_mlp_with_damping(key):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:300] / 16.0, y[:300]
    data = ux.Dataset(
        jnp.asarray(X),
        jnp.asarray(y),
        jnp.ones(len(y)),
        {},
        tuple(f"px{i}" for i in range(64)),
        n_classes=10,
    )
    # The network at its random initialisation: the update's algebra does not need the
    # optimum, and the GGN precision is positive definite anywhere.
    model = ux.models.MLPClassifier(64, 10, width=8, depth=1, key=key)
    post = ux.laplace(model, data, prior_precision=1.0)
    unlearner = ux.second_order(damping=0.5)
    requests = [ux.relabel([i, i + 1], [0, 1]) for i in range(0, 8, 2)]
    result = ux.batch.unlearn(post, data, requests, unlearner=unlearner)
    assert not result.plain.any()
    for i, (p, _) in enumerate(_single(unlearner, post, data, requests)):
        _close(result.theta[i], p.theta, 1e-9)


def test_edits_and_requests_give_the_same_result(pima):
    data, post = pima
    requests = [ux.forget_rows([3, 4]), ux.relabel([9], [0])]
    edits = [r.resolve(data) for r in requests]  # bucket 8
    a = ux.batch.unlearn(post, data, requests)
    b = ux.batch.unlearn(post, data, edits)
    _close(a.theta, b.theta)
    assert list(b.bucket) == [8, 8] and list(a.bucket) == [2, 1]


# --- (b) no recompilation across chunks and calls ----------------------------------------


def test_no_recompilation_across_chunks(pima, caplog):
    data, post = pima
    rows = np.arange(200)
    unlearner = ux.second_order(damping=1e-3)  # a transform no other test compiles

    def run(rs):
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            requests = [ux.forget_rows([int(r)]) for r in rs]
            ux.batch.unlearn(post, data, requests, unlearner=unlearner, chunk_size=8)
        return sum("Compiling jit(_run_chunk)" in r.getMessage() for r in caplog.records)

    # 40 requests of one bucket in 5 chunks of 8: one compilation
    assert run(rows[:40]) == 1
    events = []

    def listener(name, duration, **kwargs):
        if name.startswith("/jax/core/compile/"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        requests = [ux.forget_rows([int(r)]) for r in rows[40:80]]
        ux.batch.unlearn(post, data, requests, unlearner=unlearner, chunk_size=8)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == []  # a second call with the same shapes compiles nothing at all
    # a new bucket (2 rows) compiles once more: the detector works
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        requests = [ux.forget_rows([1, 2]), ux.forget_rows([5, 6])]
        ux.batch.unlearn(post, data, requests, unlearner=unlearner)
    assert sum("Compiling jit(_run_chunk)" in r.getMessage() for r in caplog.records) == 1


# --- (c) sequential mode ------------------------------------------------------------------


def test_sequential_matches_update_loop(pima):
    data, post = pima
    queue = [
        ux.forget_rows([1, 2]),
        ux.relabel([5], [1]),
        ux.forget_rows([9]),
        ux.forget_features(["BMI"], [20, 21]),
    ]
    unlearner = ux.chain(ux.second_order(), ux.refine(steps=1))
    res = ux.batch.unlearn_sequential(post, data, queue, unlearner=unlearner)
    state = unlearner.init(post, data)
    for i, r in enumerate(queue):
        p, state, _ = unlearner.update(r, state)
        _close(res.theta[i], p.theta)
    _close(res.posterior.theta, p.theta)
    assert int(res.state.ledger.count) == 4
    assert res.info[0].downdate_ok.shape == (4,)
    with pytest.raises(ValueError, match=r"requests\[1\].*already forgotten"):
        ux.batch.unlearn_sequential(post, data, [ux.forget_rows([1]), ux.forget_rows([1])])


# --- (d) errors at the boundary -----------------------------------------------------------


def test_errors(pima):
    data, post = pima
    with pytest.raises(ValueError, match="empty"):
        ux.batch.unlearn(post, data, [])
    with pytest.raises(ValueError, match=r"requests\[1\].*out of range"):
        ux.batch.unlearn(post, data, [ux.forget_rows([0]), ux.forget_rows([10**6])])
    with pytest.raises(ValueError, match=r"requests\[0\]: got a list"):
        ux.batch.unlearn(post, data, [[0, 1]])
    with pytest.raises(ValueError, match="cannot be vmapped"):
        ux.batch.unlearn(post, data, [ux.forget_rows([0])], unlearner=ux.exact_retrain())
    with pytest.raises((ValueError, TypeError), match="solver"):  # TypeError: jaxtyping hook
        ux.batch.unlearn(post, data, [ux.forget_rows([0])], solver="lu")
    with pytest.raises(ValueError, match="`query` must have shape"):
        ux.batch.unlearn(post, data, [ux.forget_rows([0])], query=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="return_precision=True"):
        ux.batch.unlearn(post, data, [ux.forget_rows([0])]).posterior(0)


# --- (e) sharding over devices -------------------------------------------------------------


def _python(code: str, *, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python (own XLA flags, own JAX runtime)."""
    env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stderr[-4000:]}"
    return result


def test_sharded_over_four_host_devices_equals_unsharded():
    code = """
        import json, logging, io
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np
        import unlearnx as ux
        assert jax.local_device_count() == 4, jax.devices()
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        y = np.asarray(data.y)
        reqs = [ux.forget_rows([i]) for i in range(13)]
        reqs += [ux.relabel([20 + i], [1 - y[20 + i]]) for i in range(6)]
        kw = dict(query=data.X[:5], predict="probit")
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        logging.getLogger("jax").addHandler(handler)
        with jax.log_compiles():
            sharded = ux.batch.unlearn(post, data, reqs, chunk_size=8, **kw)
        logging.getLogger("jax").removeHandler(handler)
        one = ux.batch.unlearn(post, data, reqs, devices=jax.devices()[:1], **kw)
        mesh = ux.batch.request_mesh()
        print(json.dumps({
            "mesh": dict(mesh.shape),
            "theta": float(np.abs(sharded.theta - one.theta).max()),
            "pred": float(np.abs(sharded.predictions - one.predictions).max()),
            "named": "NamedSharding" in log.getvalue(),
            "n": len(sharded),
        }))
    """
    out = _python(code, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mesh"] == {"requests": 4} and r["n"] == 19
    assert r["named"], "the chunk function was not compiled for sharded inputs"
    assert r["theta"] <= 1e-12 and r["pred"] <= 1e-12


# --- (f) jobs: chunked, atomic, resumable; the CLI ------------------------------------------


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, pima):
    """A job on Pima: 150 requests (three groups) in chunks of 2, its posterior saved."""
    data, post = pima
    d = tmp_path_factory.mktemp("job")
    ux.save(d / "post.ux", post)
    y = np.asarray(data.y)
    lines = ["request_id,kind,rows,features,labels"]
    lines += [f"del-{i},forget_rows,{i},," for i in range(100)]
    lines += [f"rel-{i},relabel,{200 + i},,{1 - y[200 + i]}" for i in range(40)]
    lines += [f"bmi-{i},forget_features,{300 + 2 * i} {301 + 2 * i},BMI Age," for i in range(10)]
    (d / "requests.csv").write_text("\n".join(lines) + "\n")
    return d


def _job(d, output, chunk_size=2, **extra):
    text = f"""
        [posterior]
        checkpoint = "post.ux"
        [data]
        dataset = "diabetes"
        [requests]
        csv = "requests.csv"
        [method]
        chain = ["second_order"]
        [output]
        directory = "{output}"
        chunk_size = {chunk_size}
        query = "test"
        query_rows = 7
    """
    for k, v in extra.items():
        text += f"{k} = {json.dumps(v)}\n"
    path = d / f"{output}.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _cli_env(d):
    # A shared persistent compilation cache: the repeated runs of this test reuse what the
    # first one compiled (same programs, so the same numbers).
    return {
        "JAX_COMPILATION_CACHE_DIR": str(d / "xla-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _cli(args, d, **kw):
    env = {**os.environ, **_cli_env(d)}
    return subprocess.Popen(
        [sys.executable, "-m", "unlearnx", *args],
        cwd=d,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _same_results(a, b):
    assert list(a["request_id"]) == list(b["request_id"])
    for key in ("theta", "predictions", "finite", "plain", "bucket", "kind", "position"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["diagnostics"].keys() == b["diagnostics"].keys()
    for key in a["diagnostics"]:
        np.testing.assert_array_equal(a["diagnostics"][key], b["diagnostics"][key], err_msg=key)


def test_job_in_process_matches_batch_unlearn(job_dir, pima):
    from unlearnx._batch import _jobs

    data, post = pima
    summary = _jobs.run_job(_job(job_dir, "inproc", chunk_size=16))
    assert summary["ran"] == 150 and summary["chunks"] == 7 + 3 + 1  # per group
    r = ux.batch.load_results(job_dir / "inproc")
    ids, _, requests = _jobs.read_requests(str(job_dir / "requests.csv"))
    assert list(r["request_id"]) == ids
    query = ux.datasets.diabetes().test.X[:7]
    direct = ux.batch.unlearn(post, data, requests, query=query, chunk_size=16)
    _close(r["theta"], direct.theta)
    _close(r["predictions"], direct.predictions)
    np.testing.assert_array_equal(r["diagnostics"]["downdate_ok"], direct.info.downdate_ok)
    # a second run without --resume refuses to mix two runs; with it, there is nothing to do
    with pytest.raises(ValueError, match="pass --resume"):
        _jobs.run_job(_job(job_dir, "inproc", chunk_size=16))
    assert _jobs.run_job(_job(job_dir, "inproc", chunk_size=16), resume=True)["ran"] == 0
    # a changed job cannot resume into the same directory
    with pytest.raises(ValueError, match="different job"):
        _jobs.run_job(_job(job_dir, "inproc", chunk_size=8), resume=True)


def test_killed_job_resumes_to_the_same_results(job_dir):
    import signal
    import time

    ref = _cli(["batch", str(_job(job_dir, "ref")), "--quiet"], job_dir)
    assert ref.wait(timeout=120) == 0, ref.stderr.read()
    expected = ux.batch.load_results(job_dir / "ref")
    n_chunks = expected["manifest"]["n_chunks"]
    rng = np.random.default_rng(5)
    # kill points: during start-up (a random time), and after a random number of chunks
    points = [("time", rng.uniform(0.2, 1.5))] + [
        ("chunks", int(k)) for k in rng.integers(1, n_chunks - 1, size=2)
    ]
    refused = False
    for i, (how, when) in enumerate(points):
        name = f"killed{i}"
        job = _job(job_dir, name)
        proc = _cli(["batch", str(job), "--quiet"], job_dir)
        manifest = job_dir / name / "manifest.json"
        t0 = time.monotonic()
        while proc.poll() is None:
            if how == "time" and time.monotonic() - t0 >= when:
                break
            if how == "chunks" and manifest.exists():
                try:
                    if len(json.loads(manifest.read_text())["chunks"]) >= when:
                        break
                except json.JSONDecodeError:  # never: the manifest is replaced atomically
                    raise
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        partial = len(json.loads(manifest.read_text())["chunks"]) if manifest.exists() else 0
        assert partial < n_chunks, f"kill point {how}={when} came after the job finished"
        # a rerun without --resume refuses (checked once); --resume finishes the job
        if partial and not refused:
            again = _cli(["batch", str(job), "--quiet"], job_dir)
            assert again.wait(timeout=120) == 1 and "--resume" in again.stderr.read()
            refused = True
        done = _cli(["batch", str(job), "--quiet", "--resume"], job_dir)
        assert done.wait(timeout=120) == 0, done.stderr.read()
        got = ux.batch.load_results(job_dir / name)
        assert got["done"] == len(set(got["request_id"])) == 150  # every request once
        _same_results(got, expected)


def test_report_cli(job_dir, tmp_path):
    from unlearnx._batch import _jobs
    from unlearnx._cli import main

    _jobs.run_job(_job(job_dir, "report", chunk_size=16))

    out = tmp_path / "h.png"
    js = tmp_path / "s.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", str(job_dir / "report"), "--plot", str(out), "--json", str(js)]) == 0
    text = buf.getvalue()
    assert "150 of 150 (complete)" in text and "plain fallback" in text
    assert out.stat().st_size > 1000
    summary = json.loads(js.read_text())
    assert summary["done"] == 150 and summary["kinds"] == {
        "forget_features": 10,
        "forget_rows": 100,
        "relabel": 40,
    }


def test_two_process_distributed_job_and_merge(job_dir):
    """Two processes under `jax.distributed` on localhost, each running its slice of the
    chunk plan into its own part; the merge lists every chunk once."""
    import socket

    from unlearnx._batch import _jobs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _job(job_dir, "dist", chunk_size=16)
    flags = ["--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [_cli(["batch", str(job), *flags, "--process-id", str(i)], job_dir) for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    parts = sorted(p.name for p in (job_dir / "dist").glob("part-*"))
    assert parts == ["part-00000-of-00002", "part-00001-of-00002"]
    with pytest.raises(ValueError, match="merge them first"):
        ux.batch.load_results(job_dir / "dist")
    merge = _cli(["batch", str(job), "--merge"], job_dir)
    assert merge.wait(timeout=60) == 0, merge.stderr.read()
    got = ux.batch.load_results(job_dir / "dist")
    assert got["done"] == len(set(got["request_id"])) == 150
    _jobs.run_job(_job(job_dir, "single", chunk_size=16))
    _same_results(got, ux.batch.load_results(job_dir / "single"))
