"""The `unlearnx` command-line tool: `unlearnx demo`, `unlearnx datasets`, `--version`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
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
        "  unlearnx datasets",
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
    return parser


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
    try:
        if args.command == "demo":
            _demo(args, console)
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
    """Write `obj` as JSON to `path` atomically: a temporary file in the same directory,
    then `os.replace`."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
