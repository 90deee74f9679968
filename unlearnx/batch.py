"""Many deletion requests at once: vmapped, sharded over devices, resumable jobs.

- [`unlearn`][unlearnx.batch.unlearn]: `N` independent requests against one posterior,
  vmapped over padded requests grouped by bucket size, sharded over local devices; the
  second-order step uses the shared Cholesky factor (Woodbury) instead of `N`
  refactorisations.
- [`unlearn_sequential`][unlearnx.batch.unlearn_sequential]: a queue applied in order,
  with the ledger.
- [`run_job`][unlearnx.batch.run_job] (the `unlearnx batch JOB.toml` command): requests
  from a CSV file, results written chunk by chunk, resumable;
  [`load_results`][unlearnx.batch.load_results] reads them back and
  [`merge_results`][unlearnx.batch.merge_results] combines the parts of a multi-process
  run.

Example:
    ```python
    import unlearnx as ux
    data = ux.datasets.diabetes().train
    model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
    post = ux.laplace(model, data)
    result = ux.batch.unlearn(post, data, [ux.forget_rows([i]) for i in range(10)])
    ```
"""

from ._batch._jobs import (
    load_results as load_results,
    merge_results as merge_results,
    read_job as read_job,
    run_job as run_job,
)
from ._batch._sharding import process_slice as process_slice, request_mesh as request_mesh
from ._batch._vmap import (
    BatchResult as BatchResult,
    SequentialResult as SequentialResult,
    batch_bucket as batch_bucket,
    unlearn as unlearn,
    unlearn_sequential as unlearn_sequential,
)

__all__ = [
    "BatchResult",
    "SequentialResult",
    "batch_bucket",
    "load_results",
    "merge_results",
    "read_job",
    "run_job",
    "process_slice",
    "request_mesh",
    "unlearn",
    "unlearn_sequential",
]
