"""unlearnx: machine unlearning as a posterior update, in JAX."""

from . import (
    batch as batch,
    datasets as datasets,
    hsic as hsic,
    metrics as metrics,
    models as models,
    scenarios as scenarios,
)
from ._checkpoint import load as load, save as save
from ._curvature._kfac import EKFACPrecision as EKFACPrecision, KFACPrecision as KFACPrecision
from ._curvature._lastlayer import LastLayerPrecision as LastLayerPrecision
from ._curvature._lowrank import LowRankPrecision as LowRankPrecision
from ._curvature._matfree import MatrixFreePrecision as MatrixFreePrecision
from ._curvature._precision import (
    AbstractPrecision as AbstractPrecision,
    DensePrecision as DensePrecision,
    DiagonalPrecision as DiagonalPrecision,
    SolveInfo as SolveInfo,
)
from ._curvature._solvers import cg as cg, default_damping as default_damping, lissa as lissa
from ._data._dataset import Dataset as Dataset, DatasetSplit as DatasetSplit
from ._fit import FitInfo as FitInfo, fit as fit
from ._objective import objective as objective
from ._posterior._laplace import (
    LaplacePosterior as LaplacePosterior,
    laplace as laplace,
    tune_prior_precision as tune_prior_precision,
)
from ._requests import (
    Edit as Edit,
    Request as Request,
    bucket_size as bucket_size,
    forget_features as forget_features,
    forget_rows as forget_rows,
    relabel as relabel,
)
from ._unlearn._base import (
    AbstractUnlearner as AbstractUnlearner,
    Chain as Chain,
    Ledger as Ledger,
    UnlearnState as UnlearnState,
    chain as chain,
    identity as identity,
)
from ._unlearn._finetune import FineTuneInfo as FineTuneInfo, fine_tune as fine_tune
from ._unlearn._independence import (
    IndependenceInfo as IndependenceInfo,
    independence as independence,
    retrain_independent as retrain_independent,
)
from ._unlearn._influence import (
    FirstOrderInfo as FirstOrderInfo,
    SecondOrderInfo as SecondOrderInfo,
    first_order as first_order,
    second_order as second_order,
)
from ._unlearn._refine import (
    RefineInfo as RefineInfo,
    exact_retrain as exact_retrain,
    refine as refine,
    retrain as retrain,
)
from ._unlearn._reweight import (
    ReweightInfo as ReweightInfo,
    ReweightState as ReweightState,
    reweight as reweight,
)
from .hsic import hsic_test as hsic_test

__version__ = "0.1.0"
