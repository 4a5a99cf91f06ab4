"""Cross-fitted scores (skdfm/_kernels/crossfit.py)."""

import numpy as np
import pytest
import torch

from skdfm import DFMDetector
from skdfm._kernels.crossfit import cross_fitted_scores

from .conftest import make_features


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_each_fold_is_scored_by_a_model_fitted_on_the_others(score_type):
    X = make_features(40, 30)
    scores = cross_fitted_scores(torch.from_numpy(X), 4, 5, score_type)
    assert scores.dtype == torch.float64 and scores.shape == (40,)
    rows = np.arange(40)
    for fold in range(4):
        held, kept = rows[fold::4], rows[rows % 4 != fold]
        model = DFMDetector(pca_level=5, score_type=score_type, device="cpu")
        expected = -model.fit(X[kept]).score_samples(X[held])
        np.testing.assert_allclose(scores[held].numpy(), expected, rtol=1e-9)


def test_folds_keep_at_most_what_their_rows_allow():
    X = make_features(8, 30)  # 4 folds of 2: each model fits 6 rows, rank <= 5
    scores = cross_fitted_scores(torch.from_numpy(X), 4, 20, "fre")
    assert torch.isfinite(scores).all() and (scores > 0).all()


def test_image_scores_need_the_grid_and_use_it():
    X = make_features(20, 48)
    rows = torch.from_numpy(X)
    summed = cross_fitted_scores(rows, 2, 3, "fre", feature_shape=(3, 4, 4))
    largest = cross_fitted_scores(
        rows, 2, 3, "fre", feature_shape=(3, 4, 4), image_score="max"
    )
    assert (largest <= summed + 1e-12).all() and (largest < summed).any()


def test_the_detector_takes_its_threshold_from_these_scores():
    X = make_features(60, 40)
    det = DFMDetector(pca_level=0.9, threshold_cv=3, device="cpu").fit(X)
    scores = cross_fitted_scores(torch.from_numpy(X), 3, det.n_components_, "fre")
    assert det.offset_ == pytest.approx(np.percentile(-scores.numpy(), 10))
    assert det.threshold_method_ == "contamination, 3-fold cross-fit"


@pytest.mark.parametrize("n_rows, n_folds", [(7, 4), (10, 1)])
def test_too_few_rows_or_folds_are_refused(n_rows, n_folds):
    with pytest.raises(ValueError, match="at least 2 folds of 2 rows"):
        cross_fitted_scores(torch.zeros(n_rows, 5), n_folds, 1, "fre")
