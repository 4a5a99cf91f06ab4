import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from skdfm import _pca
from skdfm._pca import (
    choose_solver,
    fit_pca,
    n_components_for_level,
    project,
    reconstruction_error,
)

from .conftest import make_features


def _keep(k):
    return lambda eigenvalues, total, rank_tol: k


def _projector(components):
    return components @ components.T


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.97, 0.999])
def test_n_components_for_level_matches_sklearn(level):
    X = make_features(150, 80).astype(np.float64)
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    k = n_components_for_level(s**2, float((s**2).sum()), level, rank_tol=0.0)
    assert k == PCA(n_components=level, svd_solver="full").fit(X).n_components_
    # anomalib keeps #{cumulative ratio < level}: one fewer
    assert k == np.count_nonzero(np.cumsum(s**2) / (s**2).sum() < level) + 1


def test_level_one_keeps_the_numerical_rank():
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(60, 7)) @ rng.normal(size=(7, 90)))
    pca = fit_pca(
        X, lambda ev, total, tol: n_components_for_level(ev, total, 1.0, tol), "gram"
    )
    assert pca.components.shape == (90, 7)


@pytest.mark.parametrize("shape", [(40, 120), (120, 40)])
def test_gram_and_covariance_match_float64_svd(shape):
    X = make_features(*shape)
    Xc = X.astype(np.float64) - X.astype(np.float64).mean(0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    k = 10
    for solver in ("gram", "covariance"):
        pca = fit_pca(torch.from_numpy(X), _keep(k), solver)
        V = pca.components.numpy()
        assert pca.solver == solver
        assert pca.components.dtype == torch.float64
        np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-10)
        np.testing.assert_allclose(_projector(V), _projector(vt[:k].T), atol=1e-9)
        np.testing.assert_allclose(pca.singular_values.numpy(), s[:k], rtol=1e-10)
        assert pca.total_sum_squares == pytest.approx((s**2).sum(), rel=1e-12)


def test_components_are_sign_normalised():
    X = torch.from_numpy(make_features(50, 30))
    V = fit_pca(X, _keep(5)).components
    peak = V.abs().argmax(dim=0)
    assert (V[peak, torch.arange(5)] > 0).all()


def test_integer_k_beyond_rank_stays_orthonormal():
    rng = np.random.default_rng(1)
    X = torch.as_tensor(rng.normal(size=(30, 3)) @ rng.normal(size=(3, 50)))
    V = fit_pca(X, _keep(10), "gram").components
    np.testing.assert_allclose((V.T @ V).numpy(), np.eye(10), atol=1e-10)


def test_choose_solver_by_shape():
    assert choose_solver(1000, 16384) == "gram"
    assert choose_solver(20000, 4096) == "covariance"


def test_chunked_passes_equal_unchunked(monkeypatch):
    X = torch.from_numpy(make_features(64, 100))
    whole = fit_pca(X, _keep(6), "gram")
    z_whole, sq_whole = project(X, whole.mean, whole.components)
    monkeypatch.setattr(_pca, "_CHUNK_BYTES", 8 * 64 * 7)  # 7 columns / rows a chunk
    for solver in ("gram", "covariance"):
        chunked = fit_pca(X, _keep(6), solver)
        torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            _projector(chunked.components),
            _projector(whole.components),
            atol=1e-10,
            rtol=0,
        )
    z, sq = project(X, whole.mean, whole.components)
    torch.testing.assert_close(sq, sq_whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(z, z_whole, rtol=1e-10, atol=1e-12)


def test_reconstruction_error_equals_explicit_residual():
    X = torch.from_numpy(make_features(80, 60))
    pca = fit_pca(X, _keep(8))
    new = torch.from_numpy(make_features(20, 60, seed=3))
    z, sq = project(new, pca.mean, pca.components)
    xc = new.double() - pca.mean
    residual = xc - xc @ pca.components @ pca.components.T
    torch.testing.assert_close(
        reconstruction_error(z, sq), (residual**2).sum(1), rtol=1e-10, atol=0
    )


def test_reconstruction_error_is_never_negative_in_the_subspace():
    X = torch.from_numpy(make_features(80, 60))
    pca = fit_pca(X, _keep(8))
    # points exactly in the subspace: the two terms cancel to rounding noise
    inside = (
        pca.mean + torch.randn(500, 8, dtype=torch.float64) @ pca.components.T * 1e3
    )
    fre = reconstruction_error(*project(inside, pca.mean, pca.components))
    assert (fre >= 0).all()
    assert float(fre.max()) < 1e-12 * float((inside - pca.mean).pow(2).sum(1).max())


def test_zero_variance_is_an_error():
    X = torch.ones(5, 4)
    with pytest.raises(ValueError, match="identical"):
        fit_pca(X, _keep(1))


def test_gram_route_gives_the_training_projection_for_free():
    X = torch.from_numpy(make_features(50, 120))
    pca = fit_pca(X, _keep(9), "gram")
    z, sq = pca.training_projection
    z_ref, sq_ref = project(X, pca.mean, pca.components)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-12)
    assert fit_pca(X, _keep(9), "covariance").training_projection is None
