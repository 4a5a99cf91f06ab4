import numpy as np
import pytest
import torch

from skdfm._kernels.eigen import _WY_BLOCK, mirror_, top_eigh


def _spd(n, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, rank or n + 3)) * np.linspace(3, 0.1, rank or n + 3)
    return torch.from_numpy(A @ A.T)


def _projector(V):
    return V @ V.T


@pytest.mark.parametrize("reduce_twice", [False, True])
@pytest.mark.parametrize("n", [2, 5, _WY_BLOCK + 7, 3 * _WY_BLOCK + 1])
def test_top_eigh_matches_full_eigh(n, reduce_twice, monkeypatch):
    if reduce_twice:  # the path of large matrices, on a small one
        monkeypatch.setattr("skdfm._kernels.eigen._STEMR_MAX_N", 1)
    A = _spd(n)
    k = max(1, n // 3)
    # Garbage in the strict upper triangle: only the lower one may be read.
    M = torch.tril(A) + torch.triu(torch.full_like(A, 7.0), diagonal=1)
    seen = []
    values, vectors = top_eigh(M, lambda w: seen.append(w.copy()) or k)
    w, U = torch.linalg.eigh(A)
    w, U = w.flip(0).numpy(), U.flip(1)[:, :k]
    np.testing.assert_allclose(values, w, rtol=1e-10, atol=1e-12 * w[0])
    np.testing.assert_array_equal(seen[0], values)
    assert np.all(np.diff(values) <= 0)
    assert vectors.shape == (n, k)
    assert vectors.T.is_contiguous()  # the layout of components_, no copy needed
    assert vectors.untyped_storage().nbytes() == n * k * 8  # no n x n behind it
    np.testing.assert_allclose((vectors.T @ vectors).numpy(), np.eye(k), atol=1e-12 * n)
    np.testing.assert_allclose(
        _projector(vectors).numpy(), _projector(U).numpy(), atol=1e-10
    )
    # The caller's matrix comes back symmetric, its lower triangle unchanged.
    np.testing.assert_array_equal(M.numpy(), A.numpy())


def test_top_eigh_handles_k_zero_and_all():
    A = _spd(40)
    values, vectors = top_eigh(A.clone(), lambda w: 0)
    assert vectors.shape == (40, 0) and values.shape == (40,)
    _, vectors = top_eigh(A.clone(), lambda w: 40)
    np.testing.assert_allclose((vectors @ vectors.T).numpy(), np.eye(40), atol=1e-11)


def test_rank_deficient_eigenvalues_are_clipped_at_zero():
    values, _ = top_eigh(_spd(50, rank=4), lambda w: 4)
    assert values.min() >= 0
    assert np.all(values[4:] <= 1e-12 * values[0])


def test_mirror_copies_one_triangle_onto_the_other():
    A = torch.arange(2500.0, dtype=torch.float64).reshape(50, 50)
    lower = mirror_(A.clone(), from_lower=True)
    np.testing.assert_array_equal(lower.numpy(), np.tril(A) + np.tril(A, -1).T)
    upper = mirror_(A.clone(), from_lower=False)
    np.testing.assert_array_equal(upper.numpy(), np.triu(A) + np.triu(A, 1).T)


@pytest.mark.cuda
def test_top_eigh_on_cuda_matches_cpu():
    A = _spd(100)
    values, vectors = top_eigh(A.cuda(), lambda w: 10)
    ref_values, ref_vectors = top_eigh(A.clone(), lambda w: 10)
    assert vectors.device.type == "cuda"
    np.testing.assert_allclose(values, ref_values, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        _projector(vectors.cpu()).numpy(), _projector(ref_vectors).numpy(), atol=1e-9
    )
