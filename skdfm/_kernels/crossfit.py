"""Cross-fitted scores: each row scored by a model that did not see it.

In-sample scores of a PCA are optimistic (the components are fitted to those rows),
so a threshold taken from them flags far more than its share of new normal rows.
:func:`cross_fitted_scores` splits the rows into k folds (rows ``i, i + k, ...``
form fold ``i``), fits a model on the other k - 1 folds and scores the fold with
it: k more eigenproblems of (k - 1) / k of the rows, no extra data.
"""

from __future__ import annotations

import numpy as np
import torch

from .pca import fit_pca
from .scores import ScoringState, gaussian_variances, max_components, score_rows

__all__ = ["cross_fitted_scores"]


def cross_fitted_scores(
    X: torch.Tensor,
    n_folds: int,
    n_components: int,
    score_type: str,
    *,
    solver: str = "auto",
    feature_shape: tuple[int, int, int] | None = None,
    image_score="sum",
) -> torch.Tensor:
    """Anomaly scores of the rows of ``X``, each by a model fitted without its fold.

    Each fold's model keeps ``n_components`` (when its rows allow): it stands in
    for the model fitted on every row, so its size should match; re-applying a
    variance level to a fold's spectrum keeps fewer, and the held-out scores then
    overstate what the full model gives new rows (measured in docs/thresholds.rst).

    Parameters
    ----------
    X : torch.Tensor of shape (n, D), float32 or float64
        At least 2 rows per fold.
    n_folds : int >= 2
    n_components : int
        The components of the model the scores stand in for.
    score_type : {"fre", "nll"}
    solver : {"auto", "gram", "covariance"}, default="auto"
    feature_shape : tuple of (int, int, int), default=None
        The grid each row flattens; needed for an ``image_score`` but ``"sum"``.
    image_score : {"sum", "max"} or int, default="sum"

    Returns
    -------
    scores : torch.Tensor of shape (n,), float64, on ``X``'s device
        Higher = more anomalous, as :func:`~skdfm._kernels.scores.score_rows`.
    """
    n, d = X.shape
    if n_folds < 2 or n < 2 * n_folds:
        raise ValueError(
            f"cross-fitting needs at least 2 folds of 2 rows: got {n_folds} folds "
            f"of {n} rows."
        )
    scores = torch.empty(n, dtype=torch.float64, device=X.device)
    rows = torch.arange(n, device=X.device)
    for fold in range(n_folds):
        held = rows[fold::n_folds]
        train = X[rows % n_folds != fold]
        most = max_components(train.shape[0], d, score_type)

        def same_size(eigenvalues, total, rank_tol, most=most):
            rank = int(np.count_nonzero(eigenvalues > rank_tol))
            return min(n_components, most, rank)

        pca = fit_pca(train, same_size, solver)
        model = ScoringState(
            pca.mean,
            pca.components,
            gaussian_variances(pca.singular_values, train.shape[0]),
        )
        scores[held], _ = score_rows(
            X[held],
            model,
            score_type,
            feature_shape=feature_shape,
            image_score=image_score,
        )
    return scores
