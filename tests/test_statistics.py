import pickle

import numpy as np
import pytest
import torch

from skdfm._kernels.pca import fit_pca, n_components_for_level
from skdfm._kernels.statistics import FeatureStatistics

D = 40


def _rule(eigenvalues, total, rank_tol):
    return n_components_for_level(eigenvalues, total, 0.9, rank_tol)


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(6, D))
    return torch.from_numpy(
        rng.normal(size=(n, 6)) @ basis + 0.1 * rng.normal(size=(n, D)) + 5
    ).float()


def _statistics(*batches, shape=None):
    statistics = FeatureStatistics(D, "cpu", feature_shape=shape)
    for batch in batches:
        statistics.update(batch)
    return statistics


def _assert_same_fit(statistics, X):
    got = statistics.fit(_rule)
    want = fit_pca(X, _rule)
    assert got.solver == want.solver
    assert got.components.shape == want.components.shape
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    np.testing.assert_allclose(got.singular_values, want.singular_values, rtol=1e-9)
    np.testing.assert_allclose(
        got.components @ got.components.T,
        want.components @ want.components.T,
        atol=1e-8,
    )


def test_rows_are_kept_while_they_are_no_more_than_the_features():
    a, b, c = _rows(25, 0), _rows(15, 1), _rows(1, 2)
    statistics = _statistics(a, b)
    assert statistics.route == "gram" and statistics.count == D
    assert statistics.nbytes == 40 * D * 4  # the rows, in float32
    _assert_same_fit(statistics, torch.cat([a, b]))
    a[:] = 0  # the caller's buffer is not kept
    _assert_same_fit(statistics, torch.cat([_rows(25, 0), b]))
    statistics.update(c)  # one row past the features: folded into the scatter
    assert statistics.route == "covariance" and statistics.count == D + 1
    assert statistics.nbytes == 8 * (D * (D + 1) // 2 + D)
    _assert_same_fit(statistics, torch.cat([_rows(25, 0), b, c]))


@pytest.mark.parametrize(
    "sizes", [(10, 12), (30, 30), (50, 3), (3, 50), (45, 50)]
)  # rows + rows within D, rows + rows past D, scatter + rows, rows + scatter, both
def test_merge_equals_one_pass_over_all_rows(sizes):
    a, b = _rows(sizes[0], 3), _rows(sizes[1], 4)
    merged = _statistics(a).merge(_statistics(b))
    assert merged.count == sum(sizes)
    assert merged.route == ("gram" if sum(sizes) <= D else "covariance")
    _assert_same_fit(merged, torch.cat([a, b]))


def test_a_tree_of_merges_of_pickled_statistics_equals_one_pass():
    parts = [_rows(n, seed) for seed, n in enumerate([7, 1, 30, 25, 9, 2])]
    level = [
        pickle.loads(pickle.dumps(_statistics(p, shape=(10, 2, 2)))) for p in parts
    ]
    while len(level) > 1:  # pairwise, as a tree reduction
        level = [
            level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
        level = [pickle.loads(pickle.dumps(s)) for s in level]  # each hop travels
    assert level[0].count == 74 and level[0].feature_shape == (10, 2, 2)
    _assert_same_fit(level[0], torch.cat(parts))


def test_statistics_that_do_not_match_are_not_merged():
    with pytest.raises(ValueError, match="statistics of 3 features into .* 40"):
        _statistics(_rows(3, 0)).merge(FeatureStatistics(3, "cpu"))
    with pytest.raises(ValueError, match=r"\(5, 2, 4\) feature grid .* \(10, 2, 2\)"):
        _statistics(_rows(3, 0), shape=(10, 2, 2)).merge(
            _statistics(_rows(3, 1), shape=(5, 2, 4))
        )
    with pytest.raises(ValueError, match=r"rows of shape \(3, 7\)"):
        _statistics().update(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="into themselves"):
        one = _statistics(_rows(3, 0))
        one.merge(one)
    with pytest.raises(ValueError, match="seen 1 sample; at least 2"):
        _statistics(_rows(1, 0)).fit(_rule)
