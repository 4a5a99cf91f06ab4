import numpy as np
import pytest
import torch
from sklearn import config_context
from sklearn.decomposition import PCA

from skdfm._kernels.pca import (
    choose_solver,
    fit_pca,
    n_components_for_level,
    pca_from_scatter,
)
from skdfm._kernels.scatter import Scatter

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


def test_chunked_passes_equal_unchunked():
    X = torch.from_numpy(make_features(64, 100))
    whole = fit_pca(X, _keep(6), "gram")
    with config_context(working_memory=8 * 64 * 7 / 2**20):  # 7 columns / rows a chunk
        for solver in ("gram", "covariance"):
            chunked = fit_pca(X, _keep(6), solver)
            torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-12, atol=0)
            torch.testing.assert_close(
                _projector(chunked.components),
                _projector(whole.components),
                atol=1e-10,
                rtol=0,
            )


def test_pca_from_scatter_equals_the_covariance_route():
    X = make_features(90, 40)
    fitted = fit_pca(torch.from_numpy(X), _keep(5), "covariance")
    scatter = Scatter(40, torch.device("cpu"))
    for batch in np.array_split(X, [1, 30, 31]):
        scatter.update(torch.from_numpy(batch), chunk_rows=16)
    streamed = pca_from_scatter(scatter, _keep(5))
    assert streamed.solver == "covariance" and streamed.training_projection is None
    torch.testing.assert_close(streamed.mean, fitted.mean, rtol=1e-12, atol=1e-12)
    # the same sign normalisation: the components themselves agree, not only spans
    torch.testing.assert_close(
        streamed.components, fitted.components, rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        streamed.singular_values, fitted.singular_values, rtol=1e-10, atol=0
    )
    streamed.mean.add_(1.0)  # the fit owns its mean: the statistics are untouched
    assert not torch.equal(streamed.mean, scatter.mean)


def test_pca_from_scatter_needs_two_rows():
    scatter = Scatter(3, torch.device("cpu")).update(torch.ones(1, 3), chunk_rows=1)
    with pytest.raises(ValueError, match="at least 2"):
        pca_from_scatter(scatter, _keep(1))


def test_zero_variance_is_an_error():
    X = torch.ones(5, 4)
    with pytest.raises(ValueError, match="identical"):
        fit_pca(X, _keep(1))


def test_gram_route_gives_the_training_projection_for_free():
    X = torch.from_numpy(make_features(50, 120))
    pca = fit_pca(X, _keep(9), "gram")
    z, sq = pca.training_projection
    xc = X.double() - pca.mean
    z_ref, sq_ref = xc @ pca.components, (xc * xc).sum(1)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-12)
    assert fit_pca(X, _keep(9), "covariance").training_projection is None
