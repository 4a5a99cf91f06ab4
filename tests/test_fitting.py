"""The one fit path (skdfm/_tools/fitting.py): the same checks, errors and
threshold rule for DFMDetector.fit, stream_fit, distributed.fit and the command."""

import warnings

import numpy as np
import pytest

from skdfm import DFMDetector, stream_fit
from skdfm._tools.fitting import (
    SmallThresholdSampleWarning,
    ThresholdRequest,
    check_threshold_request,
    fit_then_threshold,
    holdout_split,
    threshold_from_scores,
)

from .conftest import make_features


def test_contamination_without_threshold_data_is_refused():
    det = DFMDetector(contamination=0.05)
    with pytest.raises(ValueError, match="caller: contamination .* pass data too"):
        check_threshold_request(det, None, 0.1, caller="caller", data_name="data")
    assert check_threshold_request(
        det, None, None, caller="c", data_name="d"
    ) == ThresholdRequest(None)
    # with data: the given contamination, else the detector's, checked
    assert check_threshold_request(det, [1], 0.2, caller="c", data_name="d") == (0.2,)
    assert check_threshold_request(det, [1], None, caller="c", data_name="d") == (0.05,)
    with pytest.raises(ValueError, match="contamination=0.7"):
        check_threshold_request(det, [1], 0.7, caller="c", data_name="d")


def test_stream_fit_and_distributed_fit_refuse_the_same_way():
    """stream_fit used to accept contamination without threshold batches and
    ignore it; distributed.fit raised. Both raise now, before any batch is read."""
    X = make_features(60, 20)
    read = []

    def batches():
        read.append(1)
        yield X

    with pytest.raises(ValueError, match="stream_fit: contamination .* pass "):
        stream_fit(DFMDetector(device="cpu"), batches(), contamination=0.1)
    assert read == []
    da = pytest.importorskip("dask.array")
    from skdfm.distributed import fit

    with pytest.raises(ValueError, match="distributed.fit: contamination .* pass "):
        fit(DFMDetector(device="cpu"), da.from_array(X, chunks=30), contamination=0.1)


def test_the_threshold_is_the_quantile_of_the_threshold_scores():
    X = make_features(200, 30)
    det = stream_fit(
        DFMDetector(pca_level=0.9, device="cpu"),
        [X[:150]],
        threshold_batches=[X[150:]],
        contamination=0.1,
    )
    held = det.score_samples(X[150:])
    assert det.offset_ == pytest.approx(np.percentile(held, 10))
    assert det.threshold_method_ == "contamination"
    assert det.score_range_ == (held.min(), held.max())


def test_a_failure_in_the_threshold_pass_keeps_the_previous_fit():
    X = make_features(100, 20)
    det = DFMDetector(pca_level=0.9, device="cpu").fit(X)
    before = det.components_.copy(), det.offset_

    def fit_statistics():
        det.fit(make_features(100, 20, seed=3))

    def threshold_scores():
        raise RuntimeError("the cluster went away")

    with pytest.raises(RuntimeError, match="went away"):
        fit_then_threshold(det, fit_statistics, threshold_scores, ThresholdRequest(0.1))
    np.testing.assert_array_equal(det.components_, before[0])
    assert det.offset_ == before[1]


def test_too_few_threshold_scores_warn_and_none_are_refused():
    det = DFMDetector(pca_level=0.9, device="cpu").fit(make_features(50, 10))
    with pytest.warns(SmallThresholdSampleWarning, match="at least 100 samples"):
        threshold_from_scores(det, [-1.0, -2.0, -3.0], 0.01)
    assert -3.0 < det.offset_ < -2.0  # between the two most anomalous scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threshold_from_scores(det, -np.arange(100.0), 0.01)
        threshold_from_scores(det, [-1.0], 0.01, warn_few=False)
    with pytest.raises(ValueError, match="none of the threshold samples"):
        threshold_from_scores(det, [], 0.1)


def test_holdout_split_is_fixed_sorted_and_leaves_two_to_fit():
    held, train = holdout_split(10, 0.2)
    assert len(held) == 2 and len(train) == 8
    assert sorted({*held, *train}) == list(range(10))
    assert (np.diff(held) > 0).all() and (np.diff(train) > 0).all()
    np.testing.assert_array_equal(holdout_split(10, 0.2)[0], held)
    assert len(holdout_split(10, 0)[0]) == 0
    with pytest.raises(ValueError, match="fewer than 2 to fit on"):
        holdout_split(3, 0.5)


# -- the command's one-machine fit: fit_with_holdout ----------------------------------


def test_fit_with_holdout_fits_on_the_rest_and_thresholds_on_the_held_out_rows():
    from skdfm._tools.fitting import fit_with_holdout

    X = make_features(200, 30)
    det, held, train = fit_with_holdout(
        DFMDetector(pca_level=0.9, device="cpu"), X, holdout=0.25, contamination=0.1
    )
    expected_held, expected_train = holdout_split(200, 0.25)
    np.testing.assert_array_equal(held, expected_held)
    np.testing.assert_array_equal(train, expected_train)
    one = DFMDetector(pca_level=0.9, device="cpu").fit(X[train])
    np.testing.assert_allclose(det.components_, one.components_)
    scores = det.score_samples(X[held])
    assert det.offset_ == pytest.approx(np.percentile(scores, 10))
    assert det.score_range_ == (scores.min(), scores.max())
    # holdout=0: fit's in-sample threshold, at the detector's contamination
    det, held, train = fit_with_holdout(
        DFMDetector(pca_level=0.9, contamination=0.05, device="cpu"), X, holdout=0
    )
    assert len(held) == 0 and len(train) == 200
    assert det.offset_ == pytest.approx(np.percentile(det.score_samples(X), 5))


def test_fit_with_holdout_refuses_like_every_fit_and_keeps_the_model():
    from skdfm._tools.fitting import fit_with_holdout, holdout_split

    X = make_features(100, 20)
    det = DFMDetector(pca_level=0.9, device="cpu").fit(X)
    before = det.components_.copy(), det.offset_
    with pytest.raises(ValueError, match="with holdout=0 the threshold is fit's"):
        fit_with_holdout(det, X, holdout=0, contamination=0.01)
    with pytest.raises(ValueError, match="holds none out"):
        fit_with_holdout(det, X[:4], holdout=0.1, contamination=0.01)
    with pytest.raises(ValueError, match="holds none out"):
        holdout_split(4, 0.1)
    with pytest.raises(ValueError, match="fewer than 2 to fit on"):
        fit_with_holdout(det, X[:3], holdout=0.5)
    with pytest.raises(ValueError, match="contamination=0.7"):
        fit_with_holdout(det, X, holdout=0.2, contamination=0.7)
    with pytest.raises(ValueError, match="needs the Pipeline"):
        fit_with_holdout(det, X, holdout=0.2, pixel_contamination=0.01)
    np.testing.assert_array_equal(det.components_, before[0])
    assert det.offset_ == before[1]
    with pytest.warns(SmallThresholdSampleWarning, match="at least 100 samples"):
        fit_with_holdout(det, X[:10], holdout=0.2, contamination=0.01)


def test_fit_with_holdout_sets_the_pixel_threshold_from_the_held_out_maps(
    defect_images,
):
    from sklearn.pipeline import make_pipeline

    from skdfm import DeepFeatureTransformer, anomaly_maps
    from skdfm._tools.fitting import fit_with_holdout

    from .conftest import SMALL_BACKBONE

    images, y, _ = defect_images
    good = images[y == 1]
    model = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2"),
        DFMDetector(pca_level=0.95, device="cpu"),
    )
    model[0].fit(good[:1])
    rows = model[0].transform(good)
    _, held, train = fit_with_holdout(
        model, rows, holdout=0.2, contamination=0.2, pixel_contamination=0.01
    )
    detector = model[-1]
    assert detector.n_samples_ == len(train) == 24
    assert detector.pixel_threshold_method_ == "contamination"
    maps = anomaly_maps(model, good[held], size="input").maps
    assert detector.pixel_threshold_ == pytest.approx(np.quantile(maps, 0.99))
