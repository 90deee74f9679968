"""Models: Equinox modules with a per-example negative log-likelihood.

Every model maps one example to an output vector (`model(x)`) and has a `loss(x, y)`,
the per-example negative log-likelihood. Parameters are the floating-point arrays of the
module; the prior is `N(0, λ⁻¹ I)` on all of them, intercepts included.
"""

from ._models._base import AbstractModel as AbstractModel, n_params as n_params, ravel as ravel
from ._models._cnn import CNNClassifier as CNNClassifier
from ._models._glm import (
    LinearRegression as LinearRegression,
    LogisticRegression as LogisticRegression,
    SoftmaxRegression as SoftmaxRegression,
)
from ._models._likelihood import (
    AbstractLikelihood as AbstractLikelihood,
    Bernoulli as Bernoulli,
    Categorical as Categorical,
    Gaussian as Gaussian,
)
from ._models._mlp import MLPClassifier as MLPClassifier, MLPRegressor as MLPRegressor
