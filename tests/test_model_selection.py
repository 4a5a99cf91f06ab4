import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline

import skdfm._transformer as transformer_module
from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    FeatureCache,
    InlierKFold,
    aupro_scorer,
    image_auroc_scorer,
    pixel_auroc_scorer,
)

from .conftest import SMALL_BACKBONE


def test_inlier_kfold_trains_on_inliers_and_tests_every_outlier():
    y = np.array([1, -1, 1, 1, -1, 1, 1, 1, -1, 1])
    inliers, outliers = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    splits = list(InlierKFold(n_splits=3).split(np.zeros((10, 2)), y))
    assert len(splits) == 3 == InlierKFold(n_splits=3).get_n_splits()
    seen = []
    for train, test in splits:
        assert (y[train] == 1).all()
        assert set(outliers) <= set(test)
        assert not set(train) & set(test)
        seen.extend(np.intersect1d(test, inliers))
    assert sorted(seen) == inliers.tolist()  # each inlier tested exactly once


def test_inlier_kfold_shuffle_is_seeded():
    y = np.r_[np.ones(12), -np.ones(3)].astype(int)
    a = [
        t.tolist() for _, t in InlierKFold(3, shuffle=True, random_state=0).split(y, y)
    ]
    b = [
        t.tolist() for _, t in InlierKFold(3, shuffle=True, random_state=0).split(y, y)
    ]
    c = [t.tolist() for _, t in InlierKFold(3).split(y, y)]
    assert a == b != c


def test_inlier_kfold_takes_masks_as_y():
    masks = np.zeros((6, 4, 4), bool)
    masks[[1, 4], 2, 2] = True
    tests = [t.tolist() for _, t in InlierKFold(2).split(masks, masks)]
    assert tests == [[0, 1, 2, 4], [1, 3, 4, 5]]


@pytest.mark.parametrize(
    "y, match",
    [
        (np.array([0, 0, 1, 0, 0]), "0/1"),
        (None, "y is required"),
        (np.array([1, 1, -1]), "Cannot split 2 normal"),
    ],
)
def test_inlier_kfold_errors(y, match):
    with pytest.raises(ValueError, match=match):
        list(
            InlierKFold(n_splits=3).split(np.zeros((5 if y is None else len(y), 1)), y)
        )
    with pytest.raises(ValueError, match="n_splits"):
        InlierKFold(n_splits=1)


def test_scorers_refuse_zero_one_labels(fitted_pipeline, defect_images):
    images, y, _ = defect_images
    with pytest.raises(ValueError, match="0/1"):
        image_auroc_scorer(fitted_pipeline, images, (y == -1).astype(int))


def test_scorers_on_labels_and_masks(fitted_pipeline, defect_images):
    images, y, masks = defect_images
    by_labels = image_auroc_scorer(fitted_pipeline, images, y)
    assert by_labels == image_auroc_scorer(fitted_pipeline, images, masks)
    assert 0.5 < by_labels <= 1
    assert 0.5 < pixel_auroc_scorer(fitted_pipeline, images, masks) <= 1
    assert 0 < aupro_scorer(fitted_pipeline, images, masks) <= 1
    with pytest.raises(ValueError, match="masks of shape"):
        pixel_auroc_scorer(fitted_pipeline, images, y)


def count_forwards(monkeypatch):
    """Count images run through any backbone, and backbone forward calls."""
    counts = {"images": 0, "calls": 0}
    original = transformer_module.DeepFeatureTransformer._features

    def counting(self, x):
        counts["images"] += len(x)
        counts["calls"] += 1
        return original(self, x)

    monkeypatch.setattr(
        transformer_module.DeepFeatureTransformer, "_features", counting
    )
    return counts


def grid_search(X, masks, cache):
    pipe = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, cache=cache),
        DFMDetector(device="cpu"),
    )
    grid = {
        "deepfeaturetransformer__layer": ["layer1", "layer2"],
        "dfmdetector__pca_level": [0.8, 0.95],
    }
    search = GridSearchCV(
        pipe,
        grid,
        cv=InlierKFold(3),
        scoring={"image_auroc": image_auroc_scorer, "pixel_auroc": pixel_auroc_scorer},
        refit=False,
        error_score="raise",
    )
    return search.fit(X, masks)


def test_grid_search_runs_each_image_once_per_layer(defect_images, monkeypatch):
    images, y, masks = defect_images
    X, masks = images[:24], masks[:24]
    n_images = len(X)
    counts = count_forwards(monkeypatch)
    cache = FeatureCache()
    cached = grid_search(X, masks, cache)
    assert counts["images"] == 2 * n_images  # 2 layers, each image once
    assert cache.misses == 2 * n_images and cache.hits > 0

    counts.update(images=0, calls=0)
    plain = grid_search(X, masks, None)
    # per candidate and fold: fit on the training fold, then 2 scorers on the test fold
    per_search = sum(
        len(train) + 2 * len(test) for train, test in InlierKFold(3).split(X, masks)
    )
    assert counts["images"] == 4 * per_search  # 2 x 2 candidates
    for key in ("mean_test_image_auroc", "mean_test_pixel_auroc"):
        np.testing.assert_array_equal(cached.cv_results_[key], plain.cv_results_[key])


def test_refit_on_inliers_hits_the_cache(defect_images, monkeypatch):
    images, y, _ = defect_images
    cache = FeatureCache()
    pipe = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2", cache=cache),
        DFMDetector(device="cpu"),
    )
    cross_validate(pipe, images, y, cv=InlierKFold(3), scoring=image_auroc_scorer)
    counts = count_forwards(monkeypatch)
    pipe.fit(images[y == 1]).score_samples(images)
    assert counts["images"] == 0


def assert_fitted_like(detector, reference):
    for name in ("mean_", "components_", "offset_", "n_samples_"):
        np.testing.assert_allclose(
            getattr(detector, name), getattr(reference, name), rtol=1e-10
        )


def test_refit_trains_on_normal_rows_only():
    from skdfm import OutlierLabelWarning

    rng = np.random.default_rng(0)
    X = rng.normal(size=(36, 12)) @ rng.normal(size=(12, 12))
    y = np.where(np.arange(36) % 4 == 0, -1, 1)
    X[y == -1] += 4.0
    search = GridSearchCV(
        DFMDetector(device="cpu"),
        {"pca_level": [0.6, 0.9]},
        cv=InlierKFold(3),
        scoring=image_auroc_scorer,
        refit=True,
        error_score="raise",
    )
    with pytest.warns(OutlierLabelWarning, match="Left 9 of 36 rows out"):
        search.fit(X, y)
    best = search.best_estimator_
    assert_fitted_like(best, DFMDetector(**best.get_params()).fit(X[y == 1]))


def test_refit_of_a_pipeline_trains_on_normal_images_only(defect_images):
    from sklearn.base import clone

    from skdfm import OutlierLabelWarning

    images, y, masks = defect_images
    pipe = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2", cache=FeatureCache()),
        DFMDetector(device="cpu"),
    )
    search = GridSearchCV(
        pipe,
        {"dfmdetector__pca_level": [0.9, 0.97]},
        cv=InlierKFold(3),
        scoring={"image_auroc": image_auroc_scorer, "pixel_auroc": pixel_auroc_scorer},
        refit="image_auroc",
        error_score="raise",
    )
    with pytest.warns(OutlierLabelWarning, match=f"Left {(y == -1).sum()} of"):
        search.fit(images, masks)  # the masks of the refit mark the defects
    best = search.best_estimator_
    reference = clone(best).fit(images[y == 1])
    assert_fitted_like(best[-1], reference[-1])
    assert best[-1].feature_shape_ == reference[-1].feature_shape_
