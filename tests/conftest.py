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
