"""The README's example runs and its claim (relative distance < 1e-3) holds."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_meets_its_claim(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    distance = float(namespace["ux"].metrics.distance(namespace["post2"], namespace["exact"]))
    assert distance < 1e-3
    assert capsys.readouterr().out.strip()  # the example prints the distance


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
