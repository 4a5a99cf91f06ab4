import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn import config_context

from skdfm._kernels.pca import fit_pca
from skdfm._kernels.scores import (
    VARIANCE_FLOOR,
    ScoringState,
    check_has_grid,
    check_image_score,
    gaussian_variances,
    score_projection,
    score_rows,
)

from .conftest import make_features


def _state(X, k):
    pca = fit_pca(torch.from_numpy(X), lambda ev, total, tol: k)
    n = X.shape[0]
    return ScoringState(
        pca.mean, pca.components, gaussian_variances(pca.singular_values, n)
    )


def _z_and_norm(X, state):
    xc = torch.from_numpy(X).double() - state.mean
    return xc @ state.components, (xc * xc).sum(1)


def test_nll_is_minus_twice_the_log_density_without_its_constant():
    rng = np.random.default_rng(0)
    variances = torch.from_numpy(rng.uniform(0.1, 3.0, size=4))
    z = rng.normal(size=(10, 4))
    expected = -2 * multivariate_normal(np.zeros(4), np.diag(variances)).logpdf(z)
    expected -= 4 * np.log(2 * np.pi)
    state = ScoringState(torch.zeros(4), torch.eye(4), variances)
    got = score_projection(torch.from_numpy(z), torch.zeros(10), state, "nll")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_variances_are_biased_and_floored():
    s = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    v = gaussian_variances(s, n_samples=8)
    np.testing.assert_allclose(v[:2].numpy(), [2.0, 0.5])
    assert float(v[2]) == 2.0 * VARIANCE_FLOOR
    state = ScoringState(torch.zeros(3), torch.eye(3, dtype=torch.float64), v)
    z = torch.ones(1, 3, dtype=torch.float64)
    assert torch.isfinite(score_projection(z, torch.ones(1), state, "nll")).all()


def test_no_components_gives_zero_nll():
    v = gaussian_variances(torch.empty(0, dtype=torch.float64), n_samples=3)
    state = ScoringState(torch.zeros(2), torch.empty(2, 0), v)
    z = torch.empty(2, 0, dtype=torch.float64)
    assert score_projection(z, torch.ones(2), state, "nll").tolist() == [0.0, 0.0]


def test_fre_equals_the_explicit_residual():
    X = make_features(80, 60)
    state = _state(X, 8)
    new = make_features(20, 60, seed=3)
    xc = torch.from_numpy(new).double() - state.mean
    residual = xc - xc @ state.components @ state.components.T
    fre, _ = score_rows(torch.from_numpy(new), state, "fre")
    torch.testing.assert_close(fre, (residual**2).sum(1), rtol=1e-10, atol=0)


def test_fre_is_never_negative_in_the_subspace():
    state = _state(make_features(80, 60), 8)
    # rows exactly in the subspace: the two terms cancel to rounding noise
    inside = state.mean + torch.randn(500, 8, dtype=torch.float64) @ (
        state.components.T * 1e3
    )
    fre, _ = score_rows(inside, state, "fre")
    sq_norm = ((inside - state.mean) ** 2).sum(1)
    assert (fre >= 0).all()  # the clamp: rounding never gives a negative error
    assert float((fre / sq_norm).max()) < 1e-12  # and rounding is all there is


def test_grid_is_the_channel_sum_of_the_residual_and_sums_to_the_fre():
    shape = (5, 3, 4)
    X = make_features(90, 60)
    state = _state(X, 7)
    new = make_features(11, 60, seed=5)
    xc = torch.from_numpy(new).double() - state.mean
    residual = xc - xc @ state.components @ state.components.T
    expected = (residual**2).reshape(-1, *shape).sum(1)
    fre_alone, none = score_rows(torch.from_numpy(new), state, "fre")
    fre, grid = score_rows(
        torch.from_numpy(new), state, "fre", feature_shape=shape, return_grid=True
    )
    assert none is None and grid.shape == (11, 3, 4)
    torch.testing.assert_close(grid, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grid.sum((1, 2)), fre, rtol=1e-9, atol=0)
    assert torch.equal(fre, fre_alone)  # one chunking: the same bits either way


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_chunked_scores_equal_unchunked(score_type):
    X = make_features(120, 64)
    state = _state(X, 9)
    new = torch.from_numpy(make_features(50, 64, seed=2))
    whole, _ = score_rows(new, state, score_type)
    with config_context(working_memory=2 * 8 * 64 * 7 / 2**20):  # 7 rows a chunk
        chunked, _ = score_rows(new, state, score_type)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_nll_has_no_grid():
    state = _state(make_features(30, 12), 3)
    with pytest.raises(ValueError, match="score_type='fre'"):
        score_rows(
            torch.zeros(2, 12), state, "nll", feature_shape=(3, 2, 2), return_grid=True
        )
    with pytest.raises(ValueError, match="does not split"):
        check_has_grid("nll")
    check_has_grid("fre")  # no error
    with pytest.raises(ValueError, match="score_type="):
        score_projection(torch.zeros(1, 3), torch.zeros(1), state, "lof")


def test_state_from_arrays_shares_cpu_memory():
    X = make_features(40, 20)
    state = _state(X, 4)
    mean = state.mean.numpy()
    rows = np.ascontiguousarray(state.components.T.numpy())
    s = np.array([3.0, 2.0, 1.0, 0.5])
    again = ScoringState.from_arrays(mean, rows, s, 40, torch.device("cpu"))
    assert np.shares_memory(again.components.numpy(), rows)
    torch.testing.assert_close(again.components, state.components)
    torch.testing.assert_close(again.variances, gaussian_variances(torch.tensor(s), 40))


@pytest.mark.parametrize("image_score", ["max", 1, 3, 12])
def test_image_scores_are_the_largest_cells_of_the_grid(image_score):
    shape = (5, 3, 4)
    state = _state(make_features(90, 60), 7)
    new = torch.from_numpy(make_features(11, 60, seed=5))
    fre, grid = score_rows(new, state, "fre", feature_shape=shape, return_grid=True)
    scores, none = score_rows(
        new, state, "fre", feature_shape=shape, image_score=image_score
    )
    assert none is None
    k = 1 if image_score == "max" else image_score
    cells = np.sort(grid.reshape(11, -1).numpy(), axis=1)[:, ::-1]
    np.testing.assert_allclose(scores.numpy(), cells[:, :k].mean(1), rtol=1e-12)
    if k == 12:  # every cell: the FRE spread over the grid
        np.testing.assert_allclose(scores.numpy(), fre.numpy() / 12, rtol=1e-9)
    else:
        assert (scores.numpy() > fre.numpy() / 12).all()
    with config_context(working_memory=2 * 8 * 60 * 4 / 2**20):  # 4 rows a chunk
        chunked, _ = score_rows(
            new, state, "fre", feature_shape=shape, image_score=image_score
        )
    # Equal to rounding, not bit for bit: the grid comes from matrix products whose
    # kernel (so whose summation order) the BLAS may pick by the number of rows per
    # call (seen on a CPU with AMX: 1.4e-17 apart for image_score=3).
    torch.testing.assert_close(chunked, scores, rtol=1e-12, atol=0)


def test_image_scores_need_the_grid_and_fre():
    state = _state(make_features(30, 12), 3)
    with pytest.raises(ValueError, match="feature_shape"):
        score_rows(torch.zeros(2, 12), state, "fre", image_score="max")
    with pytest.raises(ValueError, match="score_type='fre'"):
        check_image_score("max", "nll", (3, 2, 2))
    with pytest.raises(ValueError, match="feature_shape=\\(channels"):
        check_image_score(2, "fre", None)
    with pytest.raises(ValueError, match="has only 4"):
        check_image_score(5, "fre", (3, 2, 2))
    check_image_score("sum", "nll", None)  # anomalib's score needs nothing
    check_image_score(4, "fre", (3, 2, 2))
