"""Many fits at once: nonparametric bootstrap, SIR and multistart on any executor (local or Dask).

``executor=`` takes ``None`` (this process), a ``distributed.Client`` (see `dask_client`) or any
`concurrent.futures.Executor`; see :mod:`nlmegen.parallel.executor`.
"""

from .bootstrap import BootstrapResult as BootstrapResult
from .bootstrap import bootstrap as bootstrap
from .executor import LocalExecutor as LocalExecutor
from .executor import as_executor as as_executor
from .executor import dask_client as dask_client
from .executor import set_compilation_cache as set_compilation_cache
from .multistart import MultistartResult as MultistartResult
from .multistart import multistart as multistart
from .sir import SIRResult as SIRResult
from .sir import sir as sir

__all__ = ["BootstrapResult", "LocalExecutor", "MultistartResult", "SIRResult", "as_executor", "bootstrap",
           "dask_client", "multistart", "set_compilation_cache", "sir"]
