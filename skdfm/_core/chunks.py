"""How many rows the torch kernels take at a time: scikit-learn's ``working_memory``.

Every kernel that walks a feature matrix (means, scatter and Gram products,
projections, scores, residual grids) takes it in chunks of rows so that its float64
temporaries stay within a budget, as scikit-learn's ``pairwise_distances_chunked``
does with :func:`sklearn.utils.get_chunk_n_rows`. The budget is scikit-learn's
``working_memory`` setting (``sklearn.set_config`` / ``config_context``), capped at
:data:`MAX_CHUNK_MIB`: larger chunks make the GEMMs no faster, while fresh buffers of
hundreds of MiB are page-faulted anew at every batch (see ``docs/performance.rst``).
"""

from __future__ import annotations

import sklearn

__all__ = ["MAX_CHUNK_MIB", "chunk_rows"]

#: Upper bound of a chunk's temporaries, in MiB, whatever ``working_memory`` says.
MAX_CHUNK_MIB = 64


def chunk_rows(n_rows: int, row_bytes: int) -> int:
    """Rows per chunk: as many as fit the budget, at least 1, at most ``n_rows``.

    Parameters
    ----------
    n_rows : int
        Rows there are.
    row_bytes : int
        Bytes of temporaries one row needs.

    Examples
    --------
    >>> from sklearn import config_context
    >>> from skdfm._core.chunks import chunk_rows
    >>> chunk_rows(10_000, 8 * 4096)  # 64 MiB of float64 rows of 4096 features
    2048
    >>> with config_context(working_memory=1):
    ...     chunk_rows(10_000, 8 * 4096)
    32
    """
    budget_mib = min(float(sklearn.get_config()["working_memory"]), MAX_CHUNK_MIB)
    fit = int(budget_mib * 2**20 // max(1, row_bytes))
    return max(1, min(n_rows, fit))
