"""Shared fixtures. Exactness tests run in float64."""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def diabetes():
    import unlearnx as ux

    return ux.datasets.diabetes()


@pytest.fixture(scope="session")
def adult():
    import unlearnx as ux

    return ux.datasets.adult()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop JAX's compiled executables after each test module. One process compiles
    hundreds of functions over the suite; each holds memory mappings for its code, and
    past Linux's default `vm.max_map_count` (65,530) LLVM's JIT aborts the process
    mid-compilation (seen once the suite passed about 430 tests)."""
    yield
    jax.clear_caches()
