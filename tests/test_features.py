import pickle

import numpy as np
import pytest
import torch
from sklearn.utils.validation import check_array

from skdfm._imaging.features import (
    FeatureRows,
    check_feature_shape,
    feature_shape_of,
    with_feature_shape,
)


def _rows(n=4, shape=(3, 2, 5)):
    X = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape(n, -1)
    return with_feature_shape(X, shape)


def test_rows_carry_their_grid_through_views_and_pickles():
    X = _rows()
    assert isinstance(X, FeatureRows) and isinstance(X, np.ndarray)
    assert feature_shape_of(X, 30) == (3, 2, 5)
    assert feature_shape_of(X[1:3], 30) == (3, 2, 5)  # a row subset keeps it
    again = pickle.loads(pickle.dumps(X))
    assert again.feature_shape == (3, 2, 5)
    np.testing.assert_array_equal(again, X)
    # scikit-learn's validation gives a plain array: nothing downstream sees a subclass
    assert type(check_array(X)) is np.ndarray


def test_a_grid_that_no_longer_fits_the_rows_is_ignored():
    X = _rows()
    assert feature_shape_of(X[:, :10], 10) is None  # a column slice
    assert feature_shape_of(np.hstack([X, X]), 60) is None  # two blocks side by side
    assert feature_shape_of(np.asarray(X).copy(), 30) is None  # a plain array


def test_tensors_carry_the_grid_as_an_attribute():
    t = with_feature_shape(torch.zeros(2, 12), (3, 2, 2))
    assert feature_shape_of(t, 12) == (3, 2, 2)
    assert feature_shape_of(torch.zeros(2, 12), 12) is None


def _names(blocks, rows, cols):
    return [
        f"{layer}_c{c}_y{y}_x{x}"
        for layer, channels in blocks
        for c in range(channels)
        for y in range(rows)
        for x in range(cols)
    ]


def test_grid_from_feature_names_of_one_or_several_layers():
    X = np.zeros((2, 24))
    assert feature_shape_of(X, 24, _names([("layer2", 6)], 2, 2)) == (6, 2, 2)
    names = _names([("layer2", 2), ("layer3", 4)], 2, 2)
    assert feature_shape_of(X, 24, names) == (6, 2, 2)
    assert feature_shape_of(X, 24, _names([("l", 2)], 3, 4)) == (2, 3, 4)
    shuffled = list(reversed(names))
    assert feature_shape_of(X, 24, shuffled) is None  # not in C order
    assert feature_shape_of(X, 24, [f"x{i}" for i in range(24)]) is None
    assert feature_shape_of(X, 24, None) is None


@pytest.mark.parametrize("bad", [(2, 3), (2, 3, 0), (2.0, 3, 4), (True, 3, 4), "234"])
def test_check_feature_shape_refuses_what_is_not_a_grid(bad):
    with pytest.raises(ValueError, match="three positive ints"):
        check_feature_shape(bad)


def test_check_feature_shape_checks_the_width():
    assert check_feature_shape([2, 3, 4], 24) == (2, 3, 4)
    with pytest.raises(ValueError, match="has 24 entries but the rows have 25"):
        check_feature_shape((2, 3, 4), 25)


def test_only_what_keeps_the_columns_in_place_keeps_the_grid():
    X = _rows()
    for kept in (X[1:], X[[0, 2]], X[X[:, 0] > 0], X[:, :], X.copy(), X.astype(float)):
        assert feature_shape_of(kept, 30) == (3, 2, 5)
    lost = {
        "column permutation": X[:, ::-1],
        "fancy columns": X[:, np.arange(30)],
        "matrix product": X @ np.eye(30),
        "arithmetic": X * 2,
        "transpose": X.T.T,
        "ellipsis": X[..., :],
    }
    for what, array in lost.items():
        assert feature_shape_of(array, 30) is None, what
    assert type(X.max()) is not FeatureRows  # reductions are plain numbers
    assert type(X + 1) is np.ndarray
