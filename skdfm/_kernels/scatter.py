"""Streaming sufficient statistics of a feature matrix: count, mean, centred scatter.

A :class:`Scatter` holds, in float64 on one device, the number of rows seen, their
mean and their centred scatter matrix sum_i (x_i - mean)(x_i - mean)^T. Batches are
merged with the pairwise update of Chan, Golub and LeVeque: a batch's own centred
scatter plus the rank-one correction n_a n_b / (n_a + n_b) * delta delta^T for the
shift between the two means. No row is kept, so memory is D^2 float64 whatever the
number of rows, and the result equals the two-pass statistics of all rows up to
float64 rounding (the rows are never centred on a stale mean, which is what makes
the naive one-pass sum of x x^T lose digits).

Only the lower triangle of the scatter is accumulated (the eigensolver reads no
more), in blocks, so each batch costs about half a full GEMM.
"""

from __future__ import annotations

import torch

__all__ = ["Scatter"]

# Columns per block of the triangular product: large enough for efficient GEMMs,
# small enough that the blocks above the diagonal skipped save about half the flops.
_SYRK_BLOCK = 2048
# Rows of the matrix copied to the host at a time when it is pickled.
_PACK_ROWS = 512


def lower_syrk_(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out += rows^T rows`` on the lower triangle (and diagonal blocks) only.

    ``rows`` is (n, d) and ``out`` is (d, d); blocks strictly above the diagonal are
    left untouched. About half the flops of the full product for large d.
    """
    d = rows.shape[1]
    for start in range(0, d, _SYRK_BLOCK):
        stop = min(start + _SYRK_BLOCK, d)
        # Block row [start:stop) against columns [0:stop): the diagonal block and
        # everything to its left.
        out[start:stop, :stop].addmm_(rows[:, start:stop].T, rows[:, :stop])
    return out


def _row_blocks(d: int):
    """``(first row, stop, mask)`` of each block of rows of a d x d matrix; the mask
    marks the lower triangle (with the diagonal) of ``matrix[first:stop, :stop]``."""
    for row in range(0, d, _PACK_ROWS):
        stop = min(row + _PACK_ROWS, d)
        yield row, stop, torch.ones(stop - row, stop, dtype=torch.bool).tril(row)


class Scatter:
    """Count, mean and centred scatter of rows seen so far, merged batch by batch.

    Parameters
    ----------
    n_features : int
    device : torch.device

    Attributes
    ----------
    count : int
    mean : torch.Tensor of shape (n_features,), float64
    matrix : torch.Tensor of shape (n_features, n_features), float64
        Lower triangle of the centred scatter (what the eigensolver reads); the
        strict upper triangle is scratch space.
    """

    def __init__(self, n_features: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.matrix = torch.zeros(
            (n_features, n_features), dtype=torch.float64, device=device
        )

    def to(self, device: torch.device) -> Scatter:
        """Move the statistics to ``device`` (in place; a failed move changes
        nothing)."""
        mean, matrix = self.mean.to(device), self.matrix.to(device)
        self.mean, self.matrix = mean, matrix
        return self

    def update(self, X: torch.Tensor, chunk_rows: int) -> Scatter:
        """Merge the rows of ``X`` (n, D), ``chunk_rows`` at a time (the caller
        sizes the chunks: each is copied to float64 and centred)."""
        for start in range(0, X.shape[0], chunk_rows):
            self._merge_batch(X[start : start + chunk_rows].to(torch.float64))
        return self

    def _merge_batch(self, batch: torch.Tensor) -> None:
        n_b = batch.shape[0]
        mean_b = batch.mean(dim=0)
        centred = batch - mean_b
        n_a = self.count
        total = n_a + n_b
        if n_a:
            delta = mean_b - self.mean
            # Chan et al.: M = M_a + M_b + n_a n_b / n * delta delta^T, the rank-one
            # term folded into the same product as one extra row.
            weight = (n_a * n_b / total) ** 0.5
            centred = torch.cat([centred, weight * delta[None]])
            self.mean += delta * (n_b / total)
        else:
            self.mean.copy_(mean_b)
        lower_syrk_(self.matrix, centred)
        self.count = total

    def merge(self, other: Scatter) -> Scatter:
        """Merge another ``Scatter`` into this one (in place), exactly.

        Chan, Golub and LeVeque's pairwise formula, for two sets of rows A and B:
        ``M = M_a + M_b + n_a n_b / (n_a + n_b) * delta delta^T`` with ``delta =
        mean_b - mean_a``, and the count-weighted mean. The result equals the
        statistics of the rows of both up to float64 rounding, whatever the order
        or grouping of the merges (what a tree reduction needs).
        """
        if other.mean.shape != self.mean.shape:
            raise ValueError(
                f"cannot merge statistics of {other.mean.shape[0]} features into "
                f"statistics of {self.mean.shape[0]} features."
            )
        n_a, n_b = self.count, other.count
        if n_b == 0:
            return self
        mean_b = other.mean.to(self.mean.device)
        matrix_b = other.matrix.to(self.matrix.device)
        if n_a == 0:
            self.mean.copy_(mean_b)
            self.matrix.copy_(matrix_b)
            self.count = n_b
            return self
        total = n_a + n_b
        delta = mean_b - self.mean
        # Only the lower triangle is meaningful on either side; adding the whole
        # matrices adds scratch to scratch above the diagonal.
        self.matrix += matrix_b
        lower_syrk_(self.matrix, ((n_a * n_b / total) ** 0.5) * delta[None])
        self.mean += delta * (n_b / total)
        self.count = total
        return self

    def __getstate__(self):
        # Only the lower triangle (with the diagonal) travels: D (D + 1) / 2 values,
        # half the bytes of the matrix, packed row by row. Unpickled statistics are
        # on the CPU (the host that reads them may have no GPU): move them with to().
        matrix = self.matrix
        d = matrix.shape[0]
        packed = torch.empty(d * (d + 1) // 2, dtype=matrix.dtype, device="cpu")
        start = 0
        for row, stop, mask in _row_blocks(d):
            values = matrix[row:stop, :stop][mask.to(matrix.device)]  # row-major
            packed[start : start + values.numel()] = values.cpu()
            start += values.numel()
        return {"count": self.count, "mean": self.mean.cpu(), "lower": packed}

    def __setstate__(self, state):
        packed = state["lower"]
        d = state["mean"].shape[0]
        if packed.shape != (d * (d + 1) // 2,):
            raise ValueError("the packed scatter matrix does not match its mean.")
        matrix = torch.zeros((d, d), dtype=torch.float64)
        start = 0
        for row, stop, mask in _row_blocks(d):
            block = matrix[row:stop, :stop]
            n = int(mask.sum())
            block[mask] = packed[start : start + n]  # fills row-major, as packed
            start += n
        self.count = int(state["count"])
        self.mean = state["mean"]
        self.matrix = matrix  # unpickled statistics are on the CPU

    @property
    def nbytes(self) -> int:
        """Bytes of the statistics as pickled (the packed lower triangle, the mean)."""
        d = self.mean.shape[0]
        return 8 * (d * (d + 1) // 2 + d)
