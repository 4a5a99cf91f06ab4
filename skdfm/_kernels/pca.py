"""PCA kernels in torch: the principal subspace of a feature matrix, and projections.

The subspace is found by the cheapest route that is exact in float64 terms, picked by
shape (:func:`choose_solver`):

* ``"gram"`` (N <= D, the usual DFM case of few images with long feature rows): the
  N x N Gram matrix of the centred rows (float64, lower triangle only) is
  eigendecomposed, G = U diag(s^2) U^T, and the components are V = Xc^T U diag(1/s).
  A Gram matrix of float32 products moved scores by up to 4e-6 (relative) on flat
  spectra and left V orthonormal only to 4e-8; float64 gives 1e-12.
* ``"covariance"`` (N > D, and every streaming fit): the D x D scatter matrix,
  accumulated in float64 by :class:`~skdfm._kernels.scatter.Scatter` (Chan-merged
  chunks),
  is eigendecomposed; its eigenvectors are the components.

Either way only the top k eigenvectors are computed
(:func:`~skdfm._kernels.eigen.top_eigh`:
all eigenvalues, then k vectors), never a full SVD of the N x D matrix (anomalib's
O(N^2 D) float64 SVD with its ~9x memory), nor a copy of the centred matrix: every
pass walks the data in chunks of rows
(:func:`~skdfm._core.chunks.chunk_rows`: scikit-learn's
``working_memory``, at most 64 MiB). No randomized solver: on
backbone features the 97 % level keeps 25-60 % of min(N, D) components of a slowly
decaying spectrum, where randomized range finders miss the variance level by 1-7 %
or need a sketch nearly as large as the matrix (measured in ``docs/performance.rst``).

The scores of a fitted subspace live in :mod:`skdfm._kernels.scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._core.chunks import chunk_rows
from .._core.memory import check_fits_in_memory
from .eigen import top_eigh
from .scatter import Scatter, lower_syrk_

__all__ = [
    "ComponentRule",
    "PCAFit",
    "choose_solver",
    "column_mean",
    "fit_pca",
    "n_components_for_level",
    "new_scatter",
    "pca_from_scatter",
]

_EPS64 = float(np.finfo(np.float64).eps)

#: ``n_components(eigenvalues, total, rank_tol) -> k``: given the whole spectrum
#: (float64 numpy, decreasing), the squared Frobenius norm of the centred matrix and
#: the eigenvalue at or below which the spectrum is numerical noise, how many
#: components to keep.
ComponentRule = Callable[[np.ndarray, float, float], int]


@dataclass(frozen=True)
class PCAFit:
    """Result of :func:`fit_pca` (all tensors float64, on the input's device)."""

    mean: torch.Tensor  #: (D,) column means
    #: (D, k) orthonormal principal axes, by decreasing variance
    components: torch.Tensor
    singular_values: torch.Tensor  #: (k,) singular values of the centred matrix
    total_sum_squares: float  #: squared Frobenius norm of the centred matrix
    solver: str  #: "gram" or "covariance"
    #: ``(z, ||xc||^2)`` of the training rows (their coordinates z = (x - mean) V and
    #: squared centred norms) when the route gives them for free (the Gram route:
    #: z = U diag(s), ||xc||^2 = diag(G)), else None.
    training_projection: tuple[torch.Tensor, torch.Tensor] | None = None


def choose_solver(n_samples: int, n_features: int) -> str:
    """Pick the eigenproblem of the smaller side: N x N Gram or D x D covariance."""
    return "gram" if n_samples <= n_features else "covariance"


def column_mean(X: torch.Tensor) -> torch.Tensor:
    """Float64 mean of the rows of ``X``, summed chunk by chunk."""
    n, d = X.shape
    total = torch.zeros(d, dtype=torch.float64, device=X.device)
    step = chunk_rows(n, d * 8)
    for start in range(0, n, step):
        total += X[start : start + step].sum(dim=0, dtype=torch.float64)
    return total / n


def n_components_for_level(
    eigenvalues: np.ndarray, total: float, level: float, rank_tol: float
) -> int:
    """Smallest k whose cumulative explained-variance ratio exceeds ``level``.

    The rule of scikit-learn's ``PCA(n_components=level)``; anomalib keeps one
    component fewer. ``level == 1`` keeps every component whose eigenvalue exceeds
    ``rank_tol`` (the numerical rank), since rounding may keep the cumulative ratio
    just below 1.

    Parameters
    ----------
    eigenvalues : ndarray of shape (m,)
        Squared singular values of the centred matrix, in decreasing order.
    total : float
        Their exact sum, the squared Frobenius norm of the centred matrix.
    level : float in (0, 1]
    rank_tol : float
        Eigenvalues at or below this are numerically zero.
    """
    rank = int(np.count_nonzero(eigenvalues > rank_tol))
    if level >= 1.0:
        return rank
    cumulative = np.cumsum(eigenvalues / total)
    return min(int(np.searchsorted(cumulative, level, side="right")) + 1, rank)


def _centred_columns(X: torch.Tensor, mean: torch.Tensor):
    """Yield ``(slice, Xc[:, slice])`` float64 column blocks of the centred matrix."""
    n, d = X.shape
    step = chunk_rows(d, n * 8)
    for start in range(0, d, step):
        cols = slice(start, start + step)
        yield cols, X[:, cols].to(torch.float64) - mean[cols]


def _spectrum(matrix: torch.Tensor, n_components: ComponentRule):
    """Eigenvalues and top-k eigenvectors of a Gram or scatter matrix (lower triangle).

    Returns the eigenvalues (decreasing, clipped at 0, numpy), the k eigenvectors,
    the total sum of squares (the trace) and k.
    """
    total = float(matrix.diagonal().sum())
    if total == 0.0:
        raise ValueError(
            "All samples are identical (the centred data are zero): there is no "
            "variance to model."
        )

    def n_vectors(eigenvalues):
        rank_tol = float(eigenvalues[0]) * len(eigenvalues) * _EPS64
        return n_components(eigenvalues, total, rank_tol)

    eigenvalues, vectors = top_eigh(matrix, n_vectors)
    return eigenvalues, vectors, total, vectors.shape[1]


def _gram_route(X, n_components: ComponentRule):
    n = X.shape[0]
    check_fits_in_memory(
        8 * n * n,
        X.device,
        f"The N x N float64 Gram matrix of {n} samples",
        "fit on fewer samples, or stream them with partial_fit when the features "
        "are fewer than the samples.",
    )
    mean = column_mean(X)
    gram = torch.zeros((n, n), dtype=torch.float64, device=X.device)
    for _, block in _centred_columns(X, mean):
        lower_syrk_(gram, block.T)
    sq_norm = gram.diagonal().clone()
    eigenvalues, eigenvectors, total, k = _spectrum(gram, n_components)
    del gram
    eigenvalues = torch.as_tensor(eigenvalues[:k].copy(), device=X.device)
    singular_values = eigenvalues.sqrt()
    # V = Xc^T U / s is orthonormal to about eps64 * s_1^2 / s_k^2, i.e. to 1e-10 or
    # better down to s_k^2 / s_1^2 = 1e-6. Below that (an integer pca_level near or
    # past the numerical rank) orthonormalise explicitly.
    tiny = torch.finfo(torch.float64).tiny
    top = eigenvectors / singular_values.clamp_min(tiny)
    # Stored as (k, D) rows, the layout of components_: no copy at the end.
    basis = torch.empty((k, X.shape[1]), dtype=torch.float64, device=X.device).T
    for cols, block in _centred_columns(X, mean):
        basis[cols] = block.T @ top
    if k and float(eigenvalues[k - 1]) < float(eigenvalues[0]) * 1e-6:
        basis, _ = torch.linalg.qr(basis)
        return mean, basis, singular_values, total, None
    training = (eigenvectors * singular_values, sq_norm)
    return mean, basis, singular_values, total, training


def _scatter_route(scatter: Scatter, n_components: ComponentRule):
    eigenvalues, vectors, total, k = _spectrum(scatter.matrix, n_components)
    singular_values = torch.as_tensor(eigenvalues[:k].copy()).sqrt()
    return scatter.mean, vectors, singular_values.to(vectors.device), total, None


def _covariance_route(X, n_components: ComponentRule):
    scatter = new_scatter(X.shape[1], X.device)
    scatter.update(X, chunk_rows=chunk_rows(X.shape[0], X.shape[1] * 8))
    return _scatter_route(scatter, n_components)


def new_scatter(n_features: int, device: torch.device) -> Scatter:
    """An empty :class:`Scatter`, after checking its D x D matrix fits."""
    check_fits_in_memory(
        8 * n_features * n_features,
        device,
        f"The D x D float64 scatter matrix of {n_features} features",
        "use fewer features (a larger pooling_kernel_size, an earlier layer), or "
        "fit() on fewer samples than features (the N x N Gram route).",
    )
    return Scatter(n_features, device)


def _sign_normalised(components, training):
    """Flip each component so that its largest-magnitude entry is positive."""
    if components.shape[1]:
        # The sign of each column's largest-magnitude entry, without a D x k temporary.
        signs = torch.where(
            components.amax(dim=0) >= -components.amin(dim=0), 1.0, -1.0
        )
        components.mul_(signs)
        if training is not None:
            training = (training[0] * signs, training[1])
    return components, training


def fit_pca(
    X: torch.Tensor, n_components: ComponentRule, solver: str = "auto"
) -> PCAFit:
    """Fit the principal subspace of the rows of ``X``.

    Parameters
    ----------
    X : torch.Tensor of shape (N, D), float32 or float64
        The data, on the device where the work should run. It is not modified and
        not copied whole.
    n_components : ComponentRule
        ``n_components(eigenvalues, total, rank_tol) -> k``, called once with the
        whole spectrum.
    solver : {"auto", "gram", "covariance"}
        ``"auto"`` takes :func:`choose_solver`.

    Returns
    -------
    PCAFit
        Components are sign-normalised: the largest-magnitude entry of each is
        positive, so refits give identical components.
    """
    n, d = X.shape
    if solver == "auto":
        solver = choose_solver(n, d)
    route = _gram_route if solver == "gram" else _covariance_route
    mean, components, singular_values, total, training = route(X, n_components)
    components, training = _sign_normalised(components, training)
    return PCAFit(mean, components, singular_values, total, solver, training)


def pca_from_scatter(scatter: Scatter, n_components: ComponentRule) -> PCAFit:
    """The principal subspace of the rows merged into ``scatter`` (a streaming fit).

    Equal to :func:`fit_pca` with ``solver="covariance"`` on all those rows, up to
    float64 rounding, with the same sign normalisation. The scatter is only read
    (its matrix is used as workspace and restored), so more rows can be merged
    afterwards.
    """
    if scatter.count < 2:
        raise ValueError(
            f"partial_fit has seen {scatter.count} sample; at least 2 are needed "
            "to fit the components."
        )
    mean, components, singular_values, total, _ = _scatter_route(scatter, n_components)
    components, _ = _sign_normalised(components, None)
    return PCAFit(mean.clone(), components, singular_values, total, "covariance")
