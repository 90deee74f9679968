"""The precision structures by their `structure=` name, imported on first use."""

from __future__ import annotations

import importlib

#: name -> (module, class). Ordered from the most to the least memory-hungry.
STRUCTURES: dict[str, tuple[str, str]] = {
    "full": ("unlearnx._curvature._precision", "DensePrecision"),
    "last_layer": ("unlearnx._curvature._lastlayer", "LastLayerPrecision"),
    "ekfac": ("unlearnx._curvature._kfac", "EKFACPrecision"),
    "kfac": ("unlearnx._curvature._kfac", "KFACPrecision"),
    "lowrank": ("unlearnx._curvature._lowrank", "LowRankPrecision"),
    "diag": ("unlearnx._curvature._precision", "DiagonalPrecision"),
    "matrix_free": ("unlearnx._curvature._matfree", "MatrixFreePrecision"),
}


def structure_class(name: str):
    """The precision class for a `structure=` name (ValueError for an unknown one)."""
    if name not in STRUCTURES:
        raise ValueError(
            f"unknown `structure={name!r}`; use one of {', '.join(map(repr, STRUCTURES))}."
        )
    module, cls = STRUCTURES[name]
    return getattr(importlib.import_module(module), cls)


def available() -> list[str]:
    """The structure names whose module is present."""
    out = []
    for name, (module, cls) in STRUCTURES.items():
        try:
            getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            continue
        out.append(name)
    return out
