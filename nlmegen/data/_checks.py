"""Checks of a `Population` before it is fitted (the reader's checks cannot know the purpose)."""

from __future__ import annotations

import numpy as np

from .._errors import DataError

__all__ = ["check_observed"]


def check_observed(pop) -> None:
    """Refuse to fit observation records that have no DV.

    A population read with ``allow_missing_dv=True`` (a simulation design) stores missing DVs as 0
    and marks them in ``pop.dv_missing``; fitting them would fit zeros as measurements. The error
    names the subjects and the times of the records, so they can be dropped (or given MDV=1).
    """
    missing = getattr(pop, "dv_missing", None)
    if missing is None:
        return
    missing = np.asarray(missing) & np.asarray(pop.mask)
    if not missing.any():
        return
    subj, slot = np.nonzero(missing)
    times, outputs = np.asarray(pop.times), np.asarray(pop.dvid)
    listed = [f"subject {pop.ids[i]!r} at TIME {times[i, j]:g}"
              + (f" (output {pop.outputs[outputs[i, j]]})" if len(pop.outputs) > 1 else "")
              for i, j in zip(subj[:5], slot[:5], strict=True)]
    more = f" and {len(subj) - 5} more" if len(subj) > 5 else ""
    raise DataError(f"{len(subj)} observation record(s) have no DV, column DV: {'; '.join(listed)}{more}. The data "
                    "were read with allow_missing_dv=True (for simulation); to fit, drop these records or mark "
                    "them MDV=1 (EVID 2) and read the table again")
