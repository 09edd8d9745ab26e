"""Covariate modelling: relation forms, relation sets for model factories, stepwise covariate search.

- `power`, `exponential`, `linear`, `categorical`: factors on a typical value, each 1 at its centre.
- `Relation`, `Relations`: the parameter-covariate relations a model includes (``rel.factors(pop)``
  inside a model made by a factory ``make_model(rel)``).
- `scm`: stepwise covariate modelling (forward inclusion, backward elimination by likelihood-ratio
  tests, as PsN's ``scm``), candidate fits run on any executor with ``submit``.
"""

from ._forms import categorical as categorical
from ._forms import exponential as exponential
from ._forms import linear as linear
from ._forms import power as power
from ._relations import Relation as Relation
from ._relations import Relations as Relations
from ._relations import baseline as baseline

__all__ = ["Relation", "Relations", "baseline", "categorical", "exponential", "linear", "power"]
from ._scm import SCMResult as SCMResult  # noqa: E402
from ._scm import SequentialExecutor as SequentialExecutor  # noqa: E402
from ._scm import scm as scm  # noqa: E402

__all__ += ["SCMResult", "SequentialExecutor", "scm"]
