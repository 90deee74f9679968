"""Batch jobs from a TOML file: chunked, atomically written, resumable results.

A job names a posterior checkpoint, a vendored dataset, a CSV of requests and the
unlearning method; `run_job` plans the chunks once (requests grouped by bucket, then cut
into chunks of `chunk_size`: the plan depends only on the job, so a resumed run computes
every chunk exactly as an uninterrupted one would), and writes each chunk as one `.npz`
file (temporary file, fsync, `os.replace`) before recording it in `manifest.json` (same
way). A run killed at any point leaves only whole chunks in the manifest; `resume=True`
checks that the job is unchanged (a SHA-256 fingerprint of its settings, the requests
file and the checkpoint) and runs the chunks that are missing.

With several processes (`jax.distributed.initialize`), process `p` of `P` runs its
contiguous slice of the chunk plan on its local devices and writes to its own
`part-0000p-of-0000P/` directory; `merge_results` then writes the top-level manifest that
lists every chunk once.

Layout of a results directory:

    manifest.json          job, fingerprint, plan, finished chunks (with checksums)
    reference.npz          the starting posterior mean (and its predictions on the query)
    chunk-000000.npz       position, request_id, kind, theta, predictions, diag.*, ...
    part-00000-of-00002/   (multi-process runs: one manifest and its chunks per process)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .._checkpoint import _atomic_write, load, read_header
from .._data import _loaders
from .._requests import Request, forget_features, forget_rows, relabel
from .._unlearn._base import chain, identity
from .._unlearn._influence import first_order, second_order
from .._unlearn._refine import refine
from ._sharding import process_slice
from ._vmap import groups, make_engine, resolve_all, run

RESULTS_FORMAT = "unlearnx.batch-results"
RESULTS_VERSION = 1
DATASETS = ("adult", "diabetes", "german")
KINDS = ("forget_rows", "forget_features", "relabel")
TRANSFORMS: dict[str, Callable] = {
    "second_order": second_order,
    "first_order": first_order,
    "refine": refine,
    "identity": identity,
}


# --------------------------------------------------------------------------------------
# The job file


@dataclasses.dataclass(frozen=True)
class Job:
    """A parsed job file (paths resolved against the job file's directory)."""

    path: str
    checkpoint: str
    dataset: str
    split: str
    data_options: dict
    requests: str
    method: list
    output: str
    chunk_size: int
    parameters: bool
    query: str | None
    query_rows: int
    predict: str
    solver: str
    max_memory_gb: float

    def settings(self) -> dict:
        """What determines the results (everything but paths)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "data_options": self.data_options,
            "method": self.method,
            "chunk_size": self.chunk_size,
            "parameters": self.parameters,
            "query": self.query,
            "query_rows": self.query_rows,
            "predict": self.predict,
            "solver": self.solver,
            "max_memory_gb": self.max_memory_gb,
        }


_EXAMPLE = """\
[posterior]
checkpoint = "posterior.ux"

[data]
dataset = "adult"

[requests]
csv = "requests.csv"

[method]
chain = ["second_order", { refine = { steps = 2 } }]

[output]
directory = "results"
"""


def _toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ValueError(
                "batch: reading job files needs Python ≥ 3.11 (tomllib) or `pip install tomli`."
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"batch: job file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"batch: {path} is not valid TOML: {e}.") from None


def read_job(path: str | os.PathLike) -> Job:
    """Parse and check a job file.

    The file has the tables `[posterior]` (`checkpoint`), `[data]` (`dataset`: one of
    the vendored datasets; `split`: `"train"` (default) or `"test"`; other keys, such as
    `seed`, go to the loader), `[requests]` (`csv`), `[method]` (`chain`: a list of
    transform names or one-key tables of their arguments, e.g.
    `["second_order", {refine = {steps = 2}}]`; `solver`) and `[output]` (`directory`,
    `chunk_size`, `parameters`, `query` = `"test"` or `"train"` with `query_rows`,
    `predict` = `"map"` or `"probit"`, `max_memory_gb`). Relative paths are relative to
    the job file.

    Raises:
        ValueError: naming the table and key that is missing or wrong.
    """
    path = os.path.abspath(os.fspath(path))
    raw = _toml(path)
    base = os.path.dirname(path)
    where = f"batch: {path}"

    def table(name: str, required: bool = True) -> dict:
        t = raw.get(name)
        if t is None and not required:
            return {}
        if not isinstance(t, dict):
            raise ValueError(f"{where}: missing table [{name}]. A minimal job:\n{_EXAMPLE}")
        return t

    def get(t: dict, tname: str, key: str, kind, default: Any = ...):
        if key not in t:
            if default is ...:
                raise ValueError(f"{where}: [{tname}] needs `{key}`. A minimal job:\n{_EXAMPLE}")
            return default
        value = t[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: [{tname}] `{key}` = {value!r} has the wrong type.")
        return value

    unknown = set(raw) - {"posterior", "data", "requests", "method", "output"}
    if unknown:
        raise ValueError(f"{where}: unknown tables {sorted(unknown)}.")
    post, data, reqs = table("posterior"), table("data"), table("requests")
    method, output = table("method"), table("output", required=False)
    dataset = get(data, "data", "dataset", str)
    if dataset not in DATASETS:
        raise ValueError(f"{where}: [data] dataset = {dataset!r}; vendored datasets: {DATASETS}.")
    split = get(data, "data", "split", str, "train")
    if split not in ("train", "test"):
        raise ValueError(f"{where}: [data] split = {split!r}; use 'train' or 'test'.")
    options = {k: v for k, v in data.items() if k not in ("dataset", "split")}
    chain_spec = get(method, "method", "chain", list)
    _build_unlearner(chain_spec, where)  # checks it
    query = get(output, "output", "query", str, None)
    if query is not None and query not in ("train", "test"):
        raise ValueError(f"{where}: [output] query = {query!r}; use 'test' or 'train'.")
    predict = get(output, "output", "predict", str, "map")
    if predict not in ("map", "probit"):
        raise ValueError(f"{where}: [output] predict = {predict!r}; use 'map' or 'probit'.")
    chunk_size = get(output, "output", "chunk_size", int, 256)
    query_rows = get(output, "output", "query_rows", int, 100)
    if chunk_size < 1 or query_rows < 1:
        raise ValueError(f"{where}: [output] chunk_size and query_rows must be positive.")
    solver = get(method, "method", "solver", str, "auto")
    if solver not in ("auto", "woodbury", "plain"):
        raise ValueError(f"{where}: [method] solver = {solver!r}; use auto, woodbury or plain.")
    stem = os.path.splitext(os.path.basename(path))[0]
    return Job(
        path=path,
        checkpoint=os.path.join(base, get(post, "posterior", "checkpoint", str)),
        dataset=dataset,
        split=split,
        data_options=options,
        requests=os.path.join(base, get(reqs, "requests", "csv", str)),
        method=chain_spec,
        output=os.path.join(base, get(output, "output", "directory", str, f"{stem}.results")),
        chunk_size=chunk_size,
        parameters=get(output, "output", "parameters", bool, True),
        query=query,
        query_rows=query_rows,
        predict=predict,
        solver=solver,
        max_memory_gb=float(get(output, "output", "max_memory_gb", (int, float), 2.0)),
    )


def _build_unlearner(spec: list, where: str):
    """`["second_order", {"refine": {"steps": 2}}]` -> `chain(second_order(), refine(steps=2))`."""
    if not spec:
        raise ValueError(f'{where}: [method] chain is empty; e.g. chain = ["second_order"].')
    transforms = []
    for item in spec:
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            ((name, kwargs),) = item.items()
            if not isinstance(kwargs, dict):
                raise ValueError(f"{where}: [method] {name} arguments must be a table.")
        else:
            raise ValueError(
                f"{where}: [method] chain entries are names or one-key tables such as "
                f"{{refine = {{steps = 2}}}}; got {item!r}."
            )
        if name not in TRANSFORMS:
            raise ValueError(
                f"{where}: [method] unknown transform {name!r}; batch jobs support "
                f"{sorted(TRANSFORMS)} (exact retraining does not vmap)."
            )
        try:
            transforms.append(TRANSFORMS[name](**kwargs))
        except TypeError as e:
            raise ValueError(f"{where}: [method] {name}: {e}.") from None
    return transforms[0] if len(transforms) == 1 else chain(*transforms)


def _numbers(text: str, where: str, what: str, integer: bool):
    try:
        values = [int(v) if integer else float(v) for v in text.split()]
    except ValueError:
        raise ValueError(
            f"{where}: `{what}` must be space-separated numbers; got {text!r}."
        ) from None
    if not integer and all(float(v).is_integer() for v in values):
        values = [int(v) for v in values]
    return values


def read_requests(path: str) -> tuple[list[str], list[str], list[Request]]:
    """Parse a requests CSV with columns `request_id, kind, rows, features, labels`
    (rows, features and labels space-separated; empty `rows` in `forget_features` means
    every row). Returns `(ids, kinds, requests)`.

    Raises:
        ValueError: naming the line that is wrong.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = {"request_id", "kind"} - set(fields)
            if missing:
                raise ValueError(
                    f"batch: {path} has columns {fields}; it needs request_id, kind, rows, "
                    f"features, labels (missing {sorted(missing)})."
                )
            ids, kinds, requests = [], [], []
            seen: dict[str, int] = {}
            for line, row in enumerate(reader, start=2):
                where = f"batch: {path}, line {line}"
                rid = (row.get("request_id") or "").strip()
                kind = (row.get("kind") or "").strip()
                if not rid:
                    raise ValueError(f"{where}: empty request_id.")
                if rid in seen:
                    raise ValueError(
                        f"{where}: request_id {rid!r} already used on line {seen[rid]}."
                    )
                seen[rid] = line
                rows_text = (row.get("rows") or "").strip()
                rows = _numbers(rows_text, where, "rows", True) if rows_text else None
                if kind == "forget_rows":
                    if rows is None:
                        raise ValueError(f"{where}: forget_rows needs `rows`.")
                    request = forget_rows(rows)
                elif kind == "forget_features":
                    names = (row.get("features") or "").split()
                    if not names:
                        raise ValueError(f"{where}: forget_features needs `features`.")
                    request = forget_features(names, rows)
                elif kind == "relabel":
                    labels_text = (row.get("labels") or "").strip()
                    if rows is None or not labels_text:
                        raise ValueError(f"{where}: relabel needs `rows` and `labels`.")
                    request = relabel(rows, _numbers(labels_text, where, "labels", False))
                else:
                    raise ValueError(f"{where}: unknown kind {kind!r}; use one of {KINDS}.")
                ids.append(rid)
                kinds.append(kind)
                requests.append(request)
    except FileNotFoundError:
        raise ValueError(f"batch: requests file {path} does not exist.") from None
    if not requests:
        raise ValueError(f"batch: {path} holds no requests.")
    return ids, kinds, requests


# --------------------------------------------------------------------------------------
# Manifests and chunk files


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: str, obj: dict) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError:
        raise ValueError(f"batch: {path} is corrupted (not valid JSON).") from None
    if obj.get("format") != RESULTS_FORMAT or obj.get("version") != RESULTS_VERSION:
        raise ValueError(f"batch: {path} is not an unlearnx batch manifest (version 1).")
    return obj


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _fingerprint(job: Job, csv_sha: str, ckpt_sha: str) -> str:
    text = json.dumps(
        {"settings": job.settings(), "requests": csv_sha, "checkpoint": ckpt_sha},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _part_dir(output: str, p: int, count: int) -> str:
    return output if count == 1 else os.path.join(output, f"part-{p:05d}-of-{count:05d}")


def _flat_info(info) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(info)[0]
    out = {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator=".") or "info"
        out[f"diag.{name}"] = np.asarray(leaf)
    return out


# --------------------------------------------------------------------------------------
# Running


def prepare_runtime(job_path: str | os.PathLike) -> Job:
    """Read the job, and enable float64 in JAX if the checkpoint holds float64 arrays
    (before anything touches a device)."""
    job = read_job(job_path)
    header = read_header(job.checkpoint)
    if any(dt == "float64" for _, dt in header["leaves"]):
        jax.config.update("jax_enable_x64", True)
    return job


def run_job(
    job_path: str | os.PathLike,
    *,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict:
    """Run (or resume) a batch job; returns a summary.

    Args:
        job_path: the job's TOML file (see [`read_job`][unlearnx.batch.read_job]).
        resume: continue an interrupted run in the same output directory (otherwise an
            existing run there is an error).
        progress: called as `progress(done, total)` after each chunk (and once at the
            start), counting requests of this process.
        process_index: this process's index, which picks its slice of the chunk plan
            (default `jax.process_index()`).
        process_count: the number of processes (default `jax.process_count()`).

    Raises:
        ValueError: on a bad job, a changed job on resume, or existing results without
            `resume=True`.
    """
    job = prepare_runtime(job_path)
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    ids, kinds, requests = read_requests(job.requests)
    header = read_header(job.checkpoint)
    csv_sha = _sha256_file(job.requests)
    fingerprint = _fingerprint(job, csv_sha, header["sha256"])

    try:
        split = getattr(_loaders, job.dataset)(**job.data_options)
    except TypeError as e:
        raise ValueError(f"batch: {job.path}: [data] options {job.data_options}: {e}.") from None
    data = split.train if job.split == "train" else split.test
    posterior = load(job.checkpoint)
    unlearner = _build_unlearner(job.method, f"batch: {job.path}")
    query = None
    if job.query is not None:
        qdata = split.test if job.query == "test" else split.train
        query = qdata.X[: job.query_rows]
    where = f"batch: {job.requests}"
    labels = [f"request {rid!r} (line {i + 2})" for i, rid in enumerate(ids)]
    hosts = resolve_all(requests, data, where, labels)

    # The plan: chunks of one group each, in a fixed order; depends only on the job.
    plan: list[list[int]] = []
    for rows in groups(hosts).values():
        plan += [rows[i : i + job.chunk_size] for i in range(0, len(rows), job.chunk_size)]
    mine = list(process_slice(len(plan), p, count))

    directory = _part_dir(job.output, p, count)
    os.makedirs(directory, exist_ok=True)
    manifest_path = os.path.join(directory, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = _read_json(manifest_path)
        if not resume:
            done = len(manifest["chunks"])
            raise ValueError(
                f"batch: {directory} already holds results of a job ({done} of "
                f"{len(manifest['chunk_ids'])} chunks); pass --resume to continue it, or "
                f"choose another [output] directory."
            )
        if manifest["fingerprint"] != fingerprint:
            raise ValueError(
                f"batch: {directory} holds results of a different job (the settings, the "
                f"requests file or the checkpoint changed); resume needs the same job. Use "
                f"another [output] directory."
            )
    else:
        manifest = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "fingerprint": fingerprint,
            "job": {"file": job.path, **job.settings(), "checkpoint": job.checkpoint},
            "n_requests": len(ids),
            "n_chunks": len(plan),
            "process_index": p,
            "process_count": count,
            "chunk_ids": mine,
            "chunks": {},
            "complete": False,
            "started": time.time(),
        }
    engine = make_engine(
        posterior,
        data,
        unlearner=unlearner,
        solver=job.solver,
        query=query,
        predict=job.predict,
        chunk_size=job.chunk_size,
        max_memory_gb=job.max_memory_gb,
        where=f"batch: {job.path}",
    )
    reference = os.path.join(job.output, "reference.npz")
    if p == 0 and not os.path.exists(reference):
        ref = {"theta": np.asarray(posterior.theta)}
        if query is not None:
            ref["predictions"] = np.asarray(posterior.predict(query, method=job.predict))
        _atomic_write(reference, _npz_bytes(ref))

    # A chunk counts as done only if its file is there with the recorded checksum.
    done = {}
    for key, entry in manifest["chunks"].items():
        f = os.path.join(directory, entry["file"])
        if os.path.exists(f) and _sha256_file(f) == entry["sha256"]:
            done[key] = entry
    manifest["chunks"] = done
    total = sum(len(plan[c]) for c in mine)
    finished = sum(len(plan[int(c)]) for c in done)
    if progress is not None:
        progress(finished, total)
    t_start = time.perf_counter()
    ran = 0
    for c in mine:
        if str(c) in done:
            continue
        rows = plan[c]
        t0 = time.perf_counter()
        out = run(engine, [hosts[j] for j in rows])
        seconds = time.perf_counter() - t0
        arrays = {
            "position": np.asarray(rows, np.int64),
            "request_id": np.asarray([ids[j] for j in rows]),
            "kind": np.asarray([kinds[j] for j in rows]),
            "finite": out["finite"],
            "plain": out["plain"],
            "bucket": out["bucket"],
            "seconds": out["seconds"],
            **_flat_info(out["info"]),
        }
        if job.parameters:
            arrays["theta"] = out["theta"]
        if query is not None:
            arrays["predictions"] = out["predictions"]
        name = f"chunk-{c:06d}.npz"
        blob = _npz_bytes(arrays)
        _atomic_write(os.path.join(directory, name), blob)
        manifest["chunks"][str(c)] = {
            "file": name,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "requests": len(rows),
            "seconds": seconds,
        }
        manifest["complete"] = len(manifest["chunks"]) == len(mine)
        manifest["updated"] = time.time()
        _write_json(manifest_path, manifest)
        finished += len(rows)
        ran += len(rows)
        if progress is not None:
            progress(finished, total)
    if not manifest["complete"] or not os.path.exists(manifest_path):
        manifest["complete"] = True
        _write_json(manifest_path, manifest)
    return {
        "output": job.output,
        "directory": directory,
        "n_requests": len(ids),
        "process_requests": total,
        "ran": ran,
        "seconds": time.perf_counter() - t_start,
        "chunks": len(mine),
        "process_index": p,
        "process_count": count,
    }


def merge_results(output: str | os.PathLike) -> dict:
    """Combine the per-process parts of a multi-process run into one top-level
    `manifest.json` (the chunk files stay where they are). Every chunk of the plan must be
    present exactly once.

    Raises:
        ValueError: if parts are missing, unfinished, or from different jobs.
    """
    output = os.fspath(output)
    parts = sorted(d for d in os.listdir(output) if re.fullmatch(r"part-\d{5}-of-\d{5}", d))
    if not parts:
        raise ValueError(f"batch: {output} has no part-*-of-* directories to merge.")
    manifests = [_read_json(os.path.join(output, d, "manifest.json")) for d in parts]
    counts = {m["process_count"] for m in manifests}
    prints = {m["fingerprint"] for m in manifests}
    if len(counts) != 1 or len(prints) != 1:
        raise ValueError(f"batch: the parts in {output} come from different runs or jobs.")
    (count,) = counts
    have = sorted(m["process_index"] for m in manifests)
    if have != list(range(count)):
        missing = sorted(set(range(count)) - set(have))
        raise ValueError(f"batch: {output}: parts of processes {missing} are missing.")
    unfinished = [d for d, m in zip(parts, manifests, strict=True) if not m["complete"]]
    if unfinished:
        raise ValueError(f"batch: {output}: parts {unfinished} are not finished; resume them.")
    chunks: dict[str, dict] = {}
    for d, m in zip(parts, manifests, strict=True):
        for key, entry in m["chunks"].items():
            if key in chunks:
                raise ValueError(f"batch: {output}: chunk {key} appears in two parts.")
            chunks[key] = {**entry, "file": f"{d}/{entry['file']}"}
    first = manifests[0]
    if len(chunks) != first["n_chunks"]:
        raise ValueError(
            f"batch: {output}: {len(chunks)} of {first['n_chunks']} chunks present after merge."
        )
    merged = {
        **{k: first[k] for k in ("format", "version", "fingerprint", "job", "n_requests")},
        "n_chunks": first["n_chunks"],
        "process_index": 0,
        "process_count": 1,
        "merged_from": parts,
        "chunk_ids": sorted(int(k) for k in chunks),
        "chunks": dict(sorted(chunks.items(), key=lambda kv: int(kv[0]))),
        "complete": True,
        "started": min(m["started"] for m in manifests),
        "updated": time.time(),
    }
    _write_json(os.path.join(output, "manifest.json"), merged)
    return merged


def load_results(output: str | os.PathLike, *, partial: bool = False) -> dict:
    """Read a results directory into arrays ordered as the requests file.

    Returns:
        A dict with `request_id`, `kind`, `position`, `finite`, `plain`, `bucket`,
        `seconds`, `theta` and `predictions` (when written), `diagnostics` (a dict of
        arrays), `reference` (the starting posterior's `theta`, and `predictions`),
        `manifest`, and `done` (how many requests have results).

    Raises:
        ValueError: if the manifest or a chunk file is missing or corrupted, a request
            appears twice, or (without `partial=True`) some are missing.
    """
    output = os.fspath(output)
    path = os.path.join(output, "manifest.json")
    if not os.path.exists(path):
        if any(d.startswith("part-") for d in os.listdir(output)):
            raise ValueError(
                f"batch: {output} holds the parts of a multi-process run; merge them first "
                f"(unlearnx batch JOB.toml --merge)."
            )
        raise ValueError(f"batch: {output} has no manifest.json: not a results directory.")
    manifest = _read_json(path)
    columns: dict[str, list] = {}
    for _, entry in sorted(manifest["chunks"].items(), key=lambda kv: int(kv[0])):
        f = os.path.join(output, entry["file"])
        if not os.path.exists(f):
            raise ValueError(f"batch: chunk file {f} is missing.")
        if _sha256_file(f) != entry["sha256"]:
            raise ValueError(f"batch: chunk file {f} is corrupted (checksum mismatch).")
        with np.load(f, allow_pickle=False) as z:
            for name in z.files:
                columns.setdefault(name, []).append(z[name])
    n = manifest["n_requests"]
    if not columns:
        raise ValueError(f"batch: {output} has no finished chunks yet.")
    pos = np.concatenate(columns["position"])
    if len(np.unique(pos)) != len(pos):
        raise ValueError(f"batch: {output}: some requests appear in more than one chunk.")
    if len(pos) != n and not partial:
        raise ValueError(
            f"batch: {output} has results for {len(pos)} of {n} requests; resume the job, or "
            f"pass partial=True."
        )
    order = np.argsort(pos)
    out: dict[str, Any] = {"diagnostics": {}}
    for name, parts in columns.items():
        arr = np.concatenate(parts)[order]
        if name.startswith("diag."):
            out["diagnostics"][name[5:]] = arr
        else:
            out[name] = arr
    ref = os.path.join(output, "reference.npz")
    if os.path.exists(ref):
        with np.load(ref, allow_pickle=False) as z:
            out["reference"] = {k: z[k] for k in z.files}
    out["manifest"] = manifest
    out["done"] = len(pos)
    return out


def summarize(output: str | os.PathLike) -> dict:
    """Figures of a results directory for `unlearnx report` (partial results allowed)."""
    r = load_results(output, partial=True)
    m = r["manifest"]
    seconds = np.asarray(r["seconds"], float)
    summary: dict[str, Any] = {
        "output": os.fspath(output),
        "job": m["job"].get("file"),
        "method": m["job"].get("method"),
        "n_requests": m["n_requests"],
        "done": r["done"],
        "chunks": f"{len(m['chunks'])} of {m['n_chunks']}",
        "complete": bool(m["complete"] and r["done"] == m["n_requests"]),
        "compute_seconds": float(seconds.sum()),
        "requests_per_second": float(r["done"] / seconds.sum()) if seconds.sum() > 0 else None,
        "non_finite": int((~r["finite"]).sum()),
        "plain_fallback": int(r["plain"].sum()),
        "kinds": dict(zip(*_counts(r["kind"]), strict=True)),
        "diagnostics": {},
    }
    for name, arr in r["diagnostics"].items():
        a = np.asarray(arr)
        if a.dtype == bool:
            summary["diagnostics"][name] = {"true": int(a.sum()), "false": int((~a).sum())}
        elif a.ndim == 1 and np.issubdtype(a.dtype, np.number):
            summary["diagnostics"][name] = _stats(a.astype(float))
    if "theta" in r and "reference" in r:
        shift = np.linalg.norm(r["theta"] - r["reference"]["theta"], axis=1)
        summary["parameter_shift"] = _stats(shift)
    if "predictions" in r and "reference" in r and "predictions" in r["reference"]:
        change = np.abs(r["predictions"] - r["reference"]["predictions"]).max(axis=(1, 2))
        summary["prediction_change"] = _stats(change)
    return summary


def _counts(values: np.ndarray) -> tuple[list[str], list[int]]:
    keys, counts = np.unique(values, return_counts=True)
    return [str(k) for k in keys], [int(c) for c in counts]


def _stats(a: np.ndarray) -> dict:
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"median": None, "p90": None, "max": None}
    return {
        "median": float(np.median(a)),
        "p90": float(np.quantile(a, 0.9)),
        "max": float(a.max()),
    }


def plot(output: str | os.PathLike, path: str | os.PathLike) -> str:
    """Histograms of the parameter shift `‖θᵢ − θ*‖` and of the step norms, written to
    `path` (any format matplotlib writes, by extension). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    r = load_results(output, partial=True)
    panels = []
    if "theta" in r and "reference" in r:
        panels.append(
            (
                "‖θᵢ − θ*‖ (parameter shift)",
                np.linalg.norm(r["theta"] - r["reference"]["theta"], axis=1),
            )
        )
    for name, arr in r["diagnostics"].items():
        if name.endswith("step_norm") and np.issubdtype(arr.dtype, np.floating):
            panels.append((f"{name}", arr))
    if not panels:
        panels.append(("seconds per request", r["seconds"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=min(50, max(5, v.size // 5)), color="#3b6ea5")
        ax.set_title(title)
        ax.set_ylabel("requests")
    fig.suptitle(f"{r['done']:,} requests · {os.path.basename(os.fspath(output).rstrip('/'))}")
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
