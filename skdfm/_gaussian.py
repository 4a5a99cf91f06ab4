"""The Gaussian of DFM's ``nll`` score, in the principal subspace.

The training rows projected on the principal axes, z = (x - mean) V, have mean zero
(the mean is the training mean) and the biased covariance diag(s^2 / N), s being the
singular values of the centred training matrix. anomalib fits this Gaussian after
centring the data twice, so its Gaussian is centred at the origin instead of the
training mean; this one is centred correctly.
"""

from __future__ import annotations

import torch

__all__ = ["VARIANCE_FLOOR", "gaussian_variances", "negative_log_likelihood"]

#: Variances are raised to at least this fraction of the largest one, so a direction
#: with no training spread gives a large but finite score rather than inf or NaN.
VARIANCE_FLOOR = 1e-12


def gaussian_variances(singular_values: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Biased (1/N) variances s^2 / N of the projected training rows, floored."""
    variances = singular_values.to(torch.float64) ** 2 / n_samples
    if variances.numel() == 0:
        return variances
    floor = max(
        float(variances.max()) * VARIANCE_FLOOR, torch.finfo(torch.float64).tiny
    )
    return variances.clamp_min(floor)


def negative_log_likelihood(z: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """Sum_j z_j^2 / var_j + sum_j log var_j for each row of ``z``.

    This is -2 log N(z; 0, diag(var)) - k log(2 pi): anomalib's score, with its
    constant dropped.
    """
    return (z * z / variances).sum(dim=1) + variances.log().sum()
