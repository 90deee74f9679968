"""The `unlearnx` command-line tool: `unlearnx demo`, `unlearnx datasets`,
`unlearnx batch JOB.toml`, `unlearnx report RESULTS`, `--version`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from ._checkpoint import _atomic_write
from ._demo import DATASETS, GROUP_FRACTION, REFINE_STEPS, RELABEL_FRACTIONS, run_demo

_DESCRIPTION = (
    "Machine unlearning as a posterior update, in JAX: forget rows, features and labels "
    "of a trained model without retraining."
)

_DEMO_HELP = f"""\
Fit a logistic regression (with intercept, Gaussian prior of precision λ) on a vendored
dataset, build its Laplace posterior, then forget three requests, each separately from
the original posterior:

  1. remove a feature from every row, setting it to its mean (adult: sex; diabetes:
     Pregnancies, BMI, Age; german: personal_status_sex);
  2. flip the labels of a random {RELABEL_FRACTIONS["adult"]:.0%} (adult) or \
{RELABEL_FRACTIONS["german"]:.0%} (diabetes, german) of the rows;
  3. delete {GROUP_FRACTION:.0%} of one group's positive rows, a non-uniform deletion (adult:
     women with income >50K; german: women with good credit; diabetes: diabetic rows
     with Age above the median).

Each request is unlearned by: none (the posterior unchanged), first order, second order
(precision downdate + Newton step), second order + {REFINE_STEPS} chord refinement steps, and
exact warm-started retraining, and each result is compared with retraining. Runs in
float64 (enables jax_enable_x64).
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearnx",
        description=_DESCRIPTION,
        epilog="Examples:\n  unlearnx demo\n  unlearnx demo --dataset german --json out.json\n"
        "  unlearnx datasets\n  unlearnx batch job.toml [--resume]\n"
        "  unlearnx report job.results --plot shifts.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"unlearnx {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="unlearn three deletion requests on real data and compare with retraining",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--dataset",
        choices=DATASETS,
        default="adult",
        help="vendored dataset to run on (default: %(default)s)",
    )
    demo.add_argument(
        "--json",
        metavar="PATH",
        help="also write the figures as JSON to PATH (written atomically)",
    )
    demo.add_argument(
        "--prior-precision",
        type=_positive_float,
        default=1.0,
        metavar="λ",
        help="precision of the Gaussian prior on the parameters (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the randomly chosen rows in the requests (default: %(default)s)",
    )
    demo.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing (no progress, no tables); use with --json",
    )

    commands.add_parser(
        "datasets",
        help="list the vendored datasets with their shapes and licences",
        description="List the datasets that ship with unlearnx (usable offline).",
    )

    batch = commands.add_parser(
        "batch",
        help="unlearn thousands of requests from a job file, chunked and resumable",
        description=_BATCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("job", metavar="JOB.toml", help="the job file")
    batch.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in the job's output directory",
    )
    batch.add_argument(
        "--merge",
        action="store_true",
        help="only merge the per-process parts of a multi-process run into one manifest",
    )
    batch.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    batch.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="run as one of several processes: jax.distributed.initialize's coordinator",
    )
    batch.add_argument(
        "--num-processes", type=_positive_int, metavar="N", help="with --coordinator"
    )
    batch.add_argument("--process-id", type=_seed, metavar="I", help="with --coordinator")

    report = commands.add_parser(
        "report",
        help="summarise the results of a batch job",
        description="Summarise a batch job's results directory: progress, throughput, "
        "fallbacks and the distribution of each diagnostic. Works on unfinished runs.",
    )
    report.add_argument("results", metavar="RESULTS", help="the job's output directory")
    report.add_argument("--plot", metavar="PATH", help="write histograms to PATH (png, pdf, svg)")
    report.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    return parser


_BATCH_HELP = """\
Apply every request of a CSV file, each independently, to a saved posterior: vmapped over
requests of similar size, sharded over the local devices, written chunk by chunk (one .npz
per chunk and a manifest, each written atomically), so that an interrupted run continues
with --resume without redoing or losing a request. Example job file:

  [posterior]
  checkpoint = "posterior.ux"          # from ux.save(path, posterior)

  [data]
  dataset = "adult"                    # adult, diabetes or german (vendored)
  split = "train"                      # the rows the posterior was fitted on

  [requests]
  csv = "requests.csv"                 # request_id,kind,rows,features,labels

  [method]
  chain = ["second_order", { refine = { steps = 2 } }]

  [output]
  directory = "results"                # default: JOB.results next to the job file
  chunk_size = 256                     # requests per chunk file
  parameters = true                    # per-request posterior means
  query = "test"                       # also predictions on the first query_rows test rows
  query_rows = 100
  predict = "map"                      # or "probit"

In requests.csv, rows, features and labels are space-separated; kind is forget_rows,
forget_features or relabel. Several processes (one per host): start each with
--coordinator HOST:PORT --num-processes N --process-id I; each runs its slice of the
chunks; then run once with --merge.
"""


def _positive_int(text: str) -> int:
    value = _seed(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `unlearnx` command line. Returns the exit status (0 success, 1 error);
    bad arguments exit with status 2 through argparse."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.json is not None:
        directory = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(directory):
            parser.error(f"--json: directory {directory} does not exist")
        if os.path.isdir(args.json):
            parser.error(f"--json: {args.json} is a directory; give a file name")
    console = Console(highlight=False, quiet=getattr(args, "quiet", False))
    err = Console(stderr=True, highlight=False)
    if args.command == "batch" and args.coordinator is not None:
        if args.num_processes is None or args.process_id is None:
            parser.error("--coordinator needs --num-processes and --process-id")
    try:
        if args.command == "demo":
            _demo(args, console)
        elif args.command == "batch":
            _batch(args, console)
        elif args.command == "report":
            _report(args, console)
        else:
            _datasets(console)
    except (ValueError, OSError) as e:
        err.print(f"unlearnx: error: {e}", markup=False)
        return 1
    except KeyboardInterrupt:
        err.print("unlearnx: interrupted", markup=False)
        return 130
    return 0


def _demo(args: argparse.Namespace, console: Console) -> None:
    console.print(
        f"[bold]unlearnx {__version__} demo[/bold] · dataset [bold]{args.dataset}[/bold] · "
        f"float64 (jax_enable_x64 enabled) · prior precision λ = {args.prior_precision:g} · "
        f"seed {args.seed}"
    )
    if args.quiet:
        results = run_demo(args.dataset, prior_precision=args.prior_precision, seed=args.seed)
    else:
        with console.status("starting") as status:
            results = run_demo(
                args.dataset,
                prior_precision=args.prior_precision,
                seed=args.seed,
                status=lambda message: status.update(escape(message)),
            )
    if args.json is not None:
        _write_json(args.json, results)
    _render(results, console)
    if args.json is not None:
        console.print(f"Wrote {args.json}", markup=False)


def _render(r: dict, console: Console) -> None:
    fit = r["fit"]
    console.print(f"JAX {r['jax_version']} on {r['backend']}, dtype {r['dtype']}", style="dim")
    console.print(
        f"Data  {r['dataset']}: {r['n_train']:,} train rows × {r['n_features']} features "
        f"({fit['n_params']} parameters with the intercept), {r['n_test']:,} test rows; "
        f"loaded in {fit['load_seconds']:.2f} s"
    )
    console.print(
        f"Fit   {fit['solver']}, {fit['iterations']} iterations, "
        f"‖∇L‖ = {fit['grad_norm']:.2e}{'' if fit['converged'] else ' (NOT converged)'}; "
        f"train accuracy {fit['train_accuracy']:.4f}, test accuracy "
        f"{fit['test_accuracy']:.4f}; fit {fit['seconds']:.2f} s, Laplace "
        f"{fit['laplace_seconds']:.2f} s (both including compilation)"
    )
    for i, req in enumerate(r["requests"], 1):
        console.print()
        table = Table(
            title=escape(
                f"Request {i}: {req['name']} ({req['kind']}, {req['rows_edited']:,} rows edited)"
            ),
            title_justify="left",
            title_style="bold",
            box=box.SIMPLE_HEAD,
        )
        table.add_column("method", no_wrap=True)
        table.add_column("time ms", justify="right")
        table.add_column("speed-up", justify="right")
        table.add_column("rel. dist.", justify="right")
        table.add_column("grad resid.", justify="right")
        table.add_column("test acc.", justify="right")
        for m in req["methods"]:
            table.add_row(
                m["method"],
                _ms(m["time_ms"]),
                _speedup(m["speedup"]),
                f"{m['rel_distance']:.2e}",
                f"{m['grad_residual']:.2e}",
                f"{m['test_accuracy']:.4f}",
            )
        console.print(table)
        closed = req["distance_closed_second_order"]
        if closed >= 0:
            console.print(f"→ second order closed {closed:.1%} of the distance to retraining.")
        else:
            console.print(
                f"→ second order closed {closed:.1%} of the distance to retraining: one "
                "Newton step from the old optimum overshoots on so large an edit; the refine "
                "steps then move towards retraining."
            )
    console.print()
    console.print(
        f"Times are medians of {r['repeats']} calls after one warm-up call, each from a fresh "
        "init state; compile time excluded. Speed-up = retrain time / method time. "
        "rel. dist. = ‖θ − θ_retrain‖ / ‖θ_retrain‖ (distance to retraining); grad resid. = "
        "‖∇L(θ; D')‖ on the edited data.",
        style="dim",
    )
    console.print(f"Total {r['total_seconds']:.1f} s (wall, including loading and compilation)")


def _ms(ms: float) -> str:
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:,.0f}"


def _speedup(s: float) -> str:
    return f"{s:,.0f}×" if s >= 10 else f"{s:.1f}×"


def _write_json(path: str, obj: dict) -> None:
    """Write `obj` as JSON to `path` atomically (the checkpoints' writer: a temporary file
    in the same directory, fsynced, then `os.replace`)."""
    _atomic_write(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def _licence(description: str) -> str:
    match = re.search(r"Licence: (.+?)\.(?:\s|$)", description)
    return match.group(1) if match else "see unlearnx/_data/files/README.md"


def _datasets(console: Console) -> None:
    from . import datasets

    table = Table(
        title="Vendored datasets (offline, in unlearnx/_data/files)", title_justify="left"
    )
    table.add_column("name", style="bold")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    table.add_column("features", justify="right")
    table.add_column("licence")
    with console.status("loading datasets") as status:
        t0 = time.perf_counter()
        for name in DATASETS:
            status.update(escape(f"loading {name}"))
            split = getattr(datasets, name)()
            table.add_row(
                name,
                f"{split.train.n:,}",
                f"{split.test.n:,}",
                str(split.train.n_features),
                _licence(split.description),
            )
    console.print(table)
    console.print(
        f"Loaded in {time.perf_counter() - t0:.1f} s. Provenance and citations: "
        "unlearnx/_data/files/README.md, or each loader's docstring.",
        style="dim",
    )


def _batch(args: argparse.Namespace, console: Console) -> None:
    from ._batch import _jobs

    if args.merge:
        job = _jobs.read_job(args.job)
        merged = _jobs.merge_results(job.output)
        console.print(
            f"Merged {len(merged['merged_from'])} parts: {len(merged['chunks'])} chunks, "
            f"{merged['n_requests']:,} requests → {job.output}/manifest.json",
            markup=False,
        )
        return
    # Before anything touches a device: the distributed runtime, then float64 if the
    # checkpoint holds it.
    if args.coordinator is not None:
        import jax

        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    job = _jobs.prepare_runtime(args.job)
    if args.quiet:
        summary = _jobs.run_job(job.path, resume=args.resume)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console.print(f"[bold]unlearnx batch[/bold] {escape(job.path)}")
    columns = (
        TextColumn("[bold]unlearning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("unlearning", total=None, rate="")
        start: dict = {}

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if not start:
                start.update(t=now, done=done)
            rate = (done - start["done"]) / (now - start["t"]) if now > start["t"] else 0.0
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} req/s")

        summary = _jobs.run_job(job.path, resume=args.resume, progress=progress)
    rate = summary["ran"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    console.print(
        f"{summary['ran']:,} requests run ({summary['process_requests']:,} in this process's "
        f"{summary['chunks']} chunks, {summary['n_requests']:,} in the job) in "
        f"{summary['seconds']:.1f} s, {rate:,.0f} requests/s including compilation → "
        f"{escape(summary['directory'])}"
    )


def _report(args: argparse.Namespace, console: Console) -> None:
    from ._batch import _jobs

    s = _jobs.summarize(args.results)
    table = Table(
        title=escape(f"Batch results: {args.results}"), title_justify="left", box=box.SIMPLE_HEAD
    )
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("value")
    status = "complete" if s["complete"] else "INCOMPLETE (resume the job)"
    table.add_row("requests", f"{s['done']:,} of {s['n_requests']:,} ({status})")
    table.add_row("chunks", s["chunks"])
    table.add_row("method", escape(json.dumps(s["method"])))
    table.add_row("kinds", ", ".join(f"{k} {v:,}" for k, v in s["kinds"].items()))
    rps = s["requests_per_second"]
    table.add_row(
        "compute", f"{s['compute_seconds']:.2f} s" + (f", {rps:,.0f} requests/s" if rps else "")
    )
    table.add_row("non-finite", f"{s['non_finite']:,}")
    table.add_row("plain fallback", f"{s['plain_fallback']:,} (indefinite batched downdate)")
    console.print(table)
    stats = Table(title="Distributions", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("quantity", "median", "p90", "max"):
        stats.add_column(col, justify="left" if col == "quantity" else "right")
    rows = []
    if "parameter_shift" in s:
        rows.append(("‖θᵢ − θ*‖", s["parameter_shift"]))
    if "prediction_change" in s:
        rows.append(("max |Δ prediction|", s["prediction_change"]))
    for name, v in s["diagnostics"].items():
        if "median" in v:
            rows.append((name, v))
        else:
            stats_bool = f"true {v['true']:,} / false {v['false']:,}"
            stats.add_row(escape(name), stats_bool, "", "")
    for name, v in rows:
        stats.add_row(escape(name), *(_num(v[k]) for k in ("median", "p90", "max")))
    console.print(stats)
    if args.json is not None:
        _write_json(args.json, s)
        console.print(f"Wrote {args.json}", markup=False)
    if args.plot is not None:
        _jobs.plot(args.results, args.plot)
        console.print(f"Wrote {args.plot}", markup=False)


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"
