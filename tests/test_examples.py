"""Every script in `examples/` runs at its tiny size (`--small`) and writes its plot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"adult_forget_group.py", "diabetes_features.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script, tmp_path):
    args = [sys.executable, str(script), "--small"]
    plot = None
    if "--out" in script.read_text():
        plot = tmp_path / f"{script.stem}.png"
        args += ["--out", str(plot)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"{script.name} --small exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    if plot is not None:
        assert plot.is_file() and plot.stat().st_size > 0, f"{script.name} wrote no plot"
