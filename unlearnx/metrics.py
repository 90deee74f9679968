"""Metrics of unlearning quality.

Compare an unlearned posterior with exact retraining (`distance`, `agreement`), check how
far it is from optimal on the edited data (`gradient_residual`), and score predictions
(`accuracy`, `nll`, `ece`).
"""

from ._metrics import (
    accuracy as accuracy,
    agreement as agreement,
    distance as distance,
    distance_closed as distance_closed,
    ece as ece,
    gradient_residual as gradient_residual,
    nll as nll,
)
