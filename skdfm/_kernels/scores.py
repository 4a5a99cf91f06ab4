"""DFM scores in torch: FRE, NLL and the FRE's residual grid, from one centred chunk.

A fitted DFM head is a mean, k orthonormal principal axes V (D x k) and, for the
``nll`` score, the variances of the training rows along them. For a row x with
xc = x - mean and z = xc V (its coordinates in the principal subspace):

* ``"fre"``, the feature reconstruction error, is ||xc - z V^T||^2, computed as
  ||xc||^2 - ||z||^2 (V is orthonormal), so the D-dimensional reconstruction is only
  formed when the map is asked for;
* ``"nll"`` is sum_j z_j^2 / var_j + sum_j log var_j: ``-2 log N(z; 0, diag(var))``
  without its constant ``k log(2 pi)``. The variances are the biased (1/N) ones of
  the projected training rows, s^2 / N, raised to at least :data:`VARIANCE_FLOOR` of
  the largest, so a direction without training spread gives a large, finite score.
  anomalib fits this Gaussian after centring the data twice, so its Gaussian sits at
  the origin instead of the training mean; this one is centred correctly;
* the **residual grid** of a row laid out as a (C, h, w) feature map is the squared
  residual (xc - z V^T)^2 summed over channels: an (h, w) map whose sum is the FRE,
  the anomaly map of anomalib's DFM before upsampling.

The **image score** of an FRE model is, by default, that sum (anomalib's score).
``image_score="max"`` takes the grid's largest cell instead and an integer k the
mean of its k largest cells: a defect that covers a few cells is then not diluted by
every normal one (see :doc:`/image_scores` for the measurements).

:func:`score_rows` centres and projects each chunk of rows once and derives the score
and, when asked, the grid from it. All of it runs in float64 on the device the
:class:`ScoringState` lives on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._core.chunks import chunk_rows
from .._core.device import as_tensor

__all__ = [
    "IMAGE_SCORES",
    "SCORE_TYPES",
    "VARIANCE_FLOOR",
    "ScoringState",
    "check_has_grid",
    "check_image_score",
    "reduce_grid",
    "gaussian_variances",
    "max_components",
    "score_projection",
    "score_rows",
]

SCORE_TYPES = ("fre", "nll")
#: Image scores of an FRE model besides an integer k (mean of the k largest cells).
IMAGE_SCORES = ("sum", "max")

#: Variances are raised to at least this fraction of the largest one, so a direction
#: with no training spread gives a large but finite score rather than inf or NaN.
VARIANCE_FLOOR = 1e-12


def max_components(n_samples: int, n_features: int, score_type: str) -> int:
    """The most components a fit of these rows can keep: ``n_samples - 1`` (the
    centred rows' rank) and, for ``"fre"``, one fewer than the features (with every
    axis kept the reconstruction is the identity and every FRE is zero)."""
    return min(n_samples - 1, n_features - (1 if score_type == "fre" else 0))


def check_has_grid(score_type: str) -> None:
    """Raise the error that explains why only ``"fre"`` has anomaly maps."""
    if score_type != "fre":
        raise ValueError(
            f"Anomaly maps need score_type='fre'; this detector uses "
            f"{score_type!r}, whose score (a likelihood of the projection) does not "
            "split over image locations. Fit a detector with score_type='fre' to "
            "localise defects."
        )


def check_image_score(image_score, score_type: str, feature_shape) -> None:
    """Raise when ``image_score`` cannot be computed for this score and grid."""
    if image_score == "sum":
        return
    if score_type != "fre":
        raise ValueError(
            f"image_score={image_score!r} needs score_type='fre': the NLL score "
            "does not split over image locations, so it has no map to take a "
            "maximum of. Use image_score='sum' with score_type='nll'."
        )
    if feature_shape is None:
        raise ValueError(
            f"image_score={image_score!r} needs the grid the feature rows flatten: "
            "fit the detector in a Pipeline after DeepFeatureTransformer (its rows "
            "carry their grid), or pass feature_shape=(channels, rows, columns)."
        )
    cells = int(feature_shape[1]) * int(feature_shape[2])
    if not isinstance(image_score, str) and image_score > cells:
        raise ValueError(
            f"image_score={image_score} averages the {image_score} largest cells, "
            f"but the feature grid {tuple(feature_shape[1:])} has only {cells}."
        )


def reduce_grid(grid: torch.Tensor, image_score) -> torch.Tensor:
    """Image scores (n,) from residual grids (n, h, w): ``"max"``, or the mean of
    the ``image_score`` largest cells."""
    cells = grid.flatten(1)
    if image_score == "max":
        return cells.amax(dim=1)
    return cells.topk(int(image_score), dim=1, sorted=False).values.mean(dim=1)


def gaussian_variances(singular_values: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Biased (1/N) variances s^2 / N of the projected training rows, floored."""
    variances = singular_values.to(torch.float64) ** 2 / n_samples
    if variances.numel() == 0:
        return variances
    floor = max(
        float(variances.max()) * VARIANCE_FLOOR, torch.finfo(torch.float64).tiny
    )
    return variances.clamp_min(floor)


@dataclass(frozen=True)
class ScoringState:
    """A fitted DFM head as float64 tensors on the device its scores are computed on.

    Built once per fit, load or device move (see ``DFMDetector``), so scoring never
    converts the fitted arrays again. On CPU the tensors share memory with the
    detector's numpy attributes.
    """

    mean: torch.Tensor  #: (D,)
    components: torch.Tensor  #: (D, k), orthonormal columns
    variances: torch.Tensor  #: (k,), floored, for ``"nll"``
    #: the fitted arrays it was built from (compared by identity, to notice a
    #: replaced ``mean_`` / ``components_`` / ``singular_values_``)
    source: tuple = field(default=(None, None, None), compare=False, repr=False)

    @classmethod
    def from_arrays(
        cls,
        mean: np.ndarray,
        components: np.ndarray,
        singular_values: np.ndarray,
        n_samples: int,
        device: torch.device,
    ) -> ScoringState:
        """From ``mean_`` (D,), ``components_`` (k, D), ``singular_values_`` (k,)."""
        mean_t = as_tensor(mean, device, torch.float64)
        rows = as_tensor(components, device, torch.float64)
        singular_values_t = as_tensor(singular_values, device, torch.float64)
        variances = gaussian_variances(singular_values_t, n_samples)
        return cls(mean_t, rows.T, variances, (mean, components, singular_values))

    @property
    def device(self) -> torch.device:
        return self.mean.device


def score_projection(
    z: torch.Tensor, sq_norm: torch.Tensor, state: ScoringState, score_type: str
) -> torch.Tensor:
    """Anomaly scores (n,) from coordinates z (n, k) and squared norms ||xc||^2 (n,).

    The FRE cancellation ||xc||^2 - ||z||^2 loses about 1e-16 of ||xc||^2 in float64;
    the clamp only removes the sign of rounding noise for rows in the subspace.
    """
    if score_type == "fre":
        return (sq_norm - torch.einsum("ij,ij->i", z, z)).clamp_min_(0.0)
    if score_type == "nll":
        variances = state.variances
        return (z * z / variances).sum(dim=1) + variances.log().sum()
    raise ValueError(f"score_type={score_type!r} must be one of {SCORE_TYPES}.")


def score_rows(
    X: torch.Tensor,
    state: ScoringState,
    score_type: str,
    *,
    feature_shape: tuple[int, int, int] | None = None,
    image_score="sum",
    return_grid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Anomaly scores of the rows of ``X`` and, when asked, their residual grids.

    Parameters
    ----------
    X : torch.Tensor of shape (n, D), float32 or float64, on ``state.device``
    state : ScoringState
    score_type : {"fre", "nll"}
    feature_shape : tuple of (int, int, int), default=None
        ``(C, h, w)`` of the feature map a row is the C-order flattening of; needed
        for ``return_grid`` and for an ``image_score`` other than ``"sum"``.
    image_score : {"sum", "max"} or int, default="sum"
        ``"sum"``: the FRE (or NLL), from the projection alone. ``"max"`` or k: the
        largest cell of the residual grid, or the mean of its k largest (``"fre"``).
    return_grid : bool, default=False
        Also return the grids (``"fre"`` only).

    Returns
    -------
    scores : torch.Tensor of shape (n,), float64
        Higher = more anomalous.
    grid : torch.Tensor of shape (n, h, w), float64, or None
        Channel sums of the squared residual; each grid sums to the row's FRE.
    """
    n, d = X.shape
    scores = torch.empty(n, dtype=torch.float64, device=X.device)
    need_grid = return_grid or image_score != "sum"
    grid = None
    if need_grid:
        check_has_grid(score_type)
        if feature_shape is None:
            raise ValueError("score_rows: the residual grid needs the feature_shape.")
        channels, rows, cols = feature_shape
        if return_grid:
            grid = torch.empty((n, rows, cols), dtype=torch.float64, device=X.device)
    mean, components = state.mean, state.components
    # The same chunking with or without the grid, so scores are bit-identical.
    step = chunk_rows(n, 2 * 8 * d)
    for start in range(0, n, step):
        # One float64 copy of the chunk, centred in place (a fresh result of the
        # subtraction would be a second chunk-sized buffer to fault in).
        xc = X[start : start + step].to(torch.float64, copy=True).sub_(mean)
        z = xc @ components
        if image_score == "sum":
            sq_norm = torch.einsum("ij,ij->i", xc, xc)
            scores[start : start + step] = score_projection(
                z, sq_norm, state, score_type
            )
        if need_grid:
            residual = xc.addmm_(z, components.T, alpha=-1.0)  # xc - z V^T, in place
            cells = residual.square_().reshape(-1, channels, rows, cols).sum(1)
            if image_score != "sum":
                scores[start : start + step] = reduce_grid(cells, image_score)
            if grid is not None:
                grid[start : start + step] = cells
    return scores, grid
