"""The documentation builds (strictly), and every code example in it runs.

- `mkdocs build --strict` with the mkdocs installed beside this Python;
- every ```python block of `docs/getting-started.md` (in order, in one namespace) and of
  `docs/networks.md`;
- the ```python blocks of the `Example:` sections of the public API's docstrings;
- every public name of `unlearnx` and of its public namespaces (`ux.datasets`, ...) has
  a `::: unlearnx....` entry on an API page.
"""

import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import unlearnx as ux

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^[ \t]*```python[ \t]*\n(.*?)^[ \t]*```", re.S | re.M)


def _python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of Markdown (or of a docstring), dedented."""
    return [textwrap.dedent(b) for b in _FENCE.findall(text)]


def _public(module) -> dict[str, object]:
    """Public names of a module: its `__all__`, or every name without a leading `_`."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return {n: getattr(module, n) for n in names}


def _namespaces() -> dict[str, types.ModuleType]:
    """The public submodules of unlearnx (`ux.datasets`, `ux.models`, `ux.metrics`, ...)."""
    return {
        name: obj
        for name, obj in _public(ux).items()
        if isinstance(obj, types.ModuleType) and obj.__name__ == f"unlearnx.{name}"
    }


def _public_objects() -> dict[str, object]:
    """Qualified name -> object, for the package, its namespaces and their members."""
    objects = {"unlearnx": ux}
    for name, obj in _public(ux).items():
        if not isinstance(obj, types.ModuleType) or name in _namespaces():
            objects[f"unlearnx.{name}"] = obj
    for ns, module in _namespaces().items():
        for name, obj in _public(module).items():
            if not isinstance(obj, types.ModuleType):
                objects[f"unlearnx.{ns}.{name}"] = obj
    return objects


def _example_section(doc: str) -> str:
    """The text of a docstring's `Example:` / `Examples:` section (to the next section)."""
    doc = inspect.cleandoc(doc)
    m = re.search(r"^Examples?:[ \t]*\n(.*?)(?=^\S[^\n]*:[ \t]*\n|\Z)", doc, re.S | re.M)
    return m.group(1) if m else ""


def _docstring_examples() -> dict[str, list[str]]:
    """Qualified name -> the Example blocks of its docstring (and of its methods')."""
    seen: set[int] = set()
    found: dict[str, list[str]] = {}

    def visit(qualname, obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        doc = obj.__doc__ if isinstance(obj.__doc__, str) else None
        if doc and (blocks := _python_blocks(_example_section(doc))):
            found[qualname] = blocks
        if isinstance(obj, type) and obj.__module__.startswith("unlearnx"):
            for name, member in vars(obj).items():
                if not name.startswith("_") and (
                    callable(member) or isinstance(member, (property, staticmethod))
                ):
                    visit(f"{qualname}.{name}", member)

    for qualname, obj in _public_objects().items():
        visit(qualname, obj)
    return found


EXAMPLES = _docstring_examples()


def test_mkdocs_build_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.is_file(), f"no mkdocs beside {sys.executable}; pip install -e '.[docs]'"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_getting_started_runs():
    blocks = _python_blocks((DOCS / "getting-started.md").read_text())
    assert len(blocks) >= 5
    assert "jax_enable_x64" in blocks[0], "the first block must enable float64"
    namespace: dict = {"__name__": "getting_started"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"getting-started.md block {i + 1}", "exec"), namespace)


def test_networks_page_runs():
    blocks = _python_blocks((DOCS / "networks.md").read_text())
    assert blocks
    namespace: dict = {"__name__": "networks"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"networks.md block {i + 1}", "exec"), namespace)


def test_docstring_examples_found():
    # The core entry points all carry runnable examples.
    for name in ("unlearnx.fit", "unlearnx.laplace", "unlearnx.second_order", "unlearnx.retrain"):
        assert name in EXAMPLES, f"{name} has no ```python block in an Example: section"


@pytest.mark.parametrize("qualname", sorted(EXAMPLES))
def test_docstring_example_runs(qualname):
    for i, block in enumerate(EXAMPLES[qualname]):
        exec(compile(block, f"{qualname} example {i + 1}", "exec"), {"__name__": qualname})


def test_every_public_name_is_documented():
    targets = set()
    for page in (DOCS / "api").glob("*.md"):
        targets |= set(re.findall(r"^:::\s*(unlearnx[\w.]*)", page.read_text(), re.M))
    documented = set()
    for target in targets:
        obj = ux
        for part in target.split(".")[1:]:
            obj = getattr(obj, part)
        documented.add(id(obj))
    missing = [
        name
        for name, obj in _public_objects().items()
        if name != "unlearnx"
        and not isinstance(obj, (str, types.ModuleType))
        and id(obj) not in documented
    ]
    assert not missing, f"public names without a `::: ...` entry under docs/api/: {missing}"
