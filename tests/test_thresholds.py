import copy

import numpy as np
import pytest
from sklearn.metrics import f1_score

from skdfm import (
    DFMDetector,
    calibrate_threshold,
    f1_adaptive_threshold,
    normalized_scores,
)


def brute_force_f1_threshold(y, scores):
    """Try flagging ``score <= s`` for every distinct s; keep the first best F1."""
    best, best_f1 = None, -1.0
    for s in np.sort(np.unique(scores)):  # fewest flagged first
        f1 = f1_score(y == -1, scores <= s)
        if f1 > best_f1:
            best, best_f1 = s, f1
    return best, best_f1


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(60) < 0.3, -1, 1)
    scores = np.round(rng.normal(size=60) + 1.5 * (y == 1), 1)  # with ties
    offset = f1_adaptive_threshold(y, scores)
    cut, best_f1 = brute_force_f1_threshold(y, scores)
    flagged = scores < offset
    np.testing.assert_array_equal(flagged, scores <= cut)
    assert f1_score(y == -1, flagged) == pytest.approx(best_f1)


def test_f1_threshold_without_anomalies_warns_and_flags_the_worst():
    scores = np.array([-1.0, -3.0, -2.0])
    with pytest.warns(UserWarning, match="undefined"):
        offset = f1_adaptive_threshold([1, 1, 1], scores)
    assert (scores < offset).tolist() == [False, True, False]


def test_f1_threshold_refuses_zero_one_labels():
    with pytest.raises(ValueError, match="0/1"):
        f1_adaptive_threshold([0, 1, 0], [1.0, 2.0, 3.0])


@pytest.fixture
def detector_and_validation(features):
    train, held_out = features
    rng = np.random.default_rng(1)
    anomalies = held_out[:15] + rng.normal(0, 1.0, held_out[:15].shape)
    X_val = np.vstack([held_out, anomalies])
    y_val = np.r_[np.ones(len(held_out)), -np.ones(15)].astype(int)
    return DFMDetector(device="cpu").fit(train), X_val, y_val


def test_calibrate_f1_sets_offset_range_and_method(detector_and_validation):
    det, X_val, y_val = detector_and_validation
    assert det.threshold_method_ == "contamination"
    scores = det.score_samples(X_val)
    assert calibrate_threshold(det, X_val, y_val) is det
    assert det.offset_ == f1_adaptive_threshold(y_val, scores)
    assert det.threshold_method_ == "f1"
    assert det.score_range_ == (scores.min(), scores.max())
    np.testing.assert_array_equal(
        det.predict(X_val), np.where(scores < det.offset_, -1, 1)
    )


def test_calibrate_contamination_on_held_out_normals(detector_and_validation, features):
    det, X_val, y_val = detector_and_validation
    # In-sample threshold flags far more new normal rows than contamination says.
    new_normal = X_val[y_val == 1]
    in_sample_rate = np.mean(det.predict(new_normal) == -1)
    calibrate_threshold(det, new_normal, method="contamination", contamination=0.05)
    flagged = np.mean(det.predict(new_normal) == -1)
    # the 5 % quantile: at most 5 % of these rows flagged, and not one row fewer
    assert 0.05 - 1 / len(new_normal) <= flagged <= 0.05 < in_sample_rate
    offset = det.offset_
    # labels given: only the normal samples count, the anomalies change nothing
    calibrate_threshold(det, X_val, y_val, method="contamination", contamination=0.05)
    assert det.offset_ == offset


def test_calibrate_errors(detector_and_validation):
    det, X_val, y_val = detector_and_validation
    with pytest.raises(ValueError, match="needs labels"):
        calibrate_threshold(det, X_val)
    with pytest.raises(ValueError, match="method="):
        calibrate_threshold(det, X_val, y_val, method="youden")
    with pytest.raises(ValueError, match="0/1"):
        calibrate_threshold(det, X_val, (y_val == -1).astype(int))
    with pytest.raises(ValueError, match="labels"):
        calibrate_threshold(det, X_val, y_val[:-1])
    with pytest.raises(ValueError, match="contamination"):
        calibrate_threshold(det, X_val, method="contamination", contamination=0.7)


def test_normalized_scores_are_half_at_the_threshold(detector_and_validation):
    det, X_val, y_val = detector_and_validation
    calibrate_threshold(det, X_val, y_val)
    scores = det.score_samples(X_val)
    normalized = normalized_scores(det, X_val)
    assert normalized.min() >= 0 and normalized.max() <= 1
    np.testing.assert_array_equal(normalized > 0.5, det.predict(X_val) == -1)
    # higher score (more normal) never normalises higher
    order = np.argsort(scores)
    assert (np.diff(normalized[order]) <= 0).all()
    # linear inside (0, 1): the score range the threshold came from spans one unit
    low, high = det.score_range_
    inside = (normalized > 0) & (normalized < 1)
    i, j = np.flatnonzero(inside)[[0, -1]]
    assert normalized[i] - normalized[j] == pytest.approx(
        (scores[j] - scores[i]) / (high - low)
    )
    # a sample exactly at the threshold normalises to exactly 0.5
    det.set_threshold(scores, offset=scores[3], method="f1")
    assert normalized_scores(det, X_val)[3] == 0.5


def test_normalized_scores_after_fit_use_the_training_range(features):
    train, _ = features
    det = DFMDetector(device="cpu", contamination=0.1).fit(train)
    normalized = normalized_scores(det, train)
    assert np.mean(normalized > 0.5) == pytest.approx(0.1, abs=1 / len(train))


def test_calibrate_a_pipeline_on_images(fitted_pipeline, defect_images):
    images, y, _ = defect_images
    model = copy.deepcopy(fitted_pipeline)  # the fixture is shared
    # the first 20 normal images were trained on
    held_out = np.r_[np.flatnonzero(y == 1)[20:], np.flatnonzero(y == -1)]
    X_val, y_val = images[held_out], y[held_out]
    assert calibrate_threshold(model, X_val, y_val) is model
    assert model[-1].threshold_method_ == "f1"
    assert fitted_pipeline[-1].threshold_method_ == "contamination"
    predicted = model.predict(X_val)
    assert f1_score(y_val == -1, predicted == -1) >= 0.8


@pytest.mark.parametrize("method", ["f1", "contamination"])
def test_thresholds_of_a_max_image_score_are_in_its_units(
    fitted_pipeline, defect_images, method
):
    from sklearn.base import clone

    from skdfm import anomaly_maps

    images, y, _ = defect_images
    model = clone(fitted_pipeline).set_params(dfmdetector__image_score="max")
    model.fit(images[y == 1][:20])
    held_out = np.r_[np.flatnonzero(y == 1)[20:], np.flatnonzero(y == -1)]
    X_val, y_val = images[held_out], y[held_out]
    if method == "f1":
        calibrate_threshold(model, X_val, y_val, method="f1")
    else:
        calibrate_threshold(model, X_val[y_val == 1], method="contamination")
    # offset_ and the score range come from the maxima of the grids
    maxima = (
        -anomaly_maps(model, X_val, size="grid").maps.reshape(len(X_val), -1).max(1)
    )
    detector = model[-1]
    used = maxima if method == "f1" else maxima[y_val == 1]
    assert detector.score_range_ == pytest.approx((used.min(), used.max()), rel=1e-12)
    if method == "f1":
        assert np.isclose(maxima, detector.offset_, rtol=1e-12).any()
    np.testing.assert_array_equal(
        model.predict(X_val), np.where(maxima - detector.offset_ >= 0, 1, -1)
    )
    normalized = normalized_scores(model, X_val)
    assert ((normalized >= 0) & (normalized <= 1)).all()


# -- pixel threshold ----------------------------------------------------------------


def test_pixel_threshold_predicts_masks_and_persists(
    fitted_pipeline, defect_images, tmp_path
):
    import skdfm
    from skdfm import anomaly_maps, calibrate_pixel_threshold

    images, y, masks = defect_images
    model = copy.deepcopy(fitted_pipeline)
    assert anomaly_maps(model, images[:2]).masks is None  # none until calibrated
    # F1-adaptive on masks: the threshold of the best pixel F1 (brute force)
    calibrate_pixel_threshold(model, images[20:], masks[20:])
    detector = model[-1]
    assert detector.pixel_threshold_method_ == "f1"
    maps = anomaly_maps(model, images[20:]).maps
    truth = masks[20:].ravel().astype(bool)
    values = maps.ravel()
    # F1 of "value >= t" at every distinct t, counted independently: sort by
    # value, count the defective pixels at or above each threshold
    order = np.argsort(-values, kind="stable")
    ranked, hits = values[order], np.cumsum(truth[order])
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last of a tie
    tp, flagged = hits[ends], ends + 1
    f1 = 2 * tp / (flagged + truth.sum())
    best = ranked[ends][np.flatnonzero(f1 == f1.max())[-1]]  # anomalib: lowest
    assert f1_score(truth, values >= best) == pytest.approx(f1.max())
    assert detector.pixel_threshold_ == pytest.approx(best)
    result = anomaly_maps(model, images[20:])
    np.testing.assert_array_equal(result.masks, result.maps >= best)
    # good images only: a quantile of their pixels
    calibrate_pixel_threshold(model, images[y == 1][20:], pixel_contamination=0.01)
    good_maps = anomaly_maps(model, images[y == 1][20:]).maps
    assert detector.pixel_threshold_method_ == "contamination"
    assert np.mean(good_maps >= detector.pixel_threshold_) == pytest.approx(
        0.01, abs=0.002
    )
    # saved and loaded with the model
    skdfm.save(model, tmp_path / "m.skdfm")
    loaded = skdfm.load(tmp_path / "m.skdfm")
    assert loaded[-1].pixel_threshold_ == detector.pixel_threshold_
    np.testing.assert_array_equal(
        anomaly_maps(loaded, images[:3]).masks, anomaly_maps(model, images[:3]).masks
    )


def test_bad_pixel_thresholds_are_refused(fitted_pipeline, defect_images):
    from skdfm import calibrate_pixel_threshold

    images, y, masks = defect_images
    model = copy.deepcopy(fitted_pipeline)
    with pytest.raises(ValueError, match="no defective pixel"):
        calibrate_pixel_threshold(model, images[:3], masks[y == 1][:3])
    with pytest.raises(ValueError, match="3 images but 2 masks"):
        calibrate_pixel_threshold(model, images[:3], masks[:2])
    with pytest.raises(ValueError, match="pixel_contamination"):
        calibrate_pixel_threshold(model, images[:3], pixel_contamination=1.5)
    with pytest.raises(ValueError, match="finite threshold >= 0"):
        model[-1].set_pixel_threshold(-1.0, method="by hand")
    nll = copy.deepcopy(model)
    nll[-1].set_params(score_type="nll").fit(model[0].transform(images[y == 1]))
    with pytest.raises(ValueError, match="fre"):
        nll[-1].set_pixel_threshold(1.0, method="by hand")


def test_one_pixel_threshold_rule_at_the_input_size(fitted_pipeline, defect_images):
    """calibrate_pixel_threshold (images) and the fits (feature rows) share one
    rule: maps at the model's input size, whatever the images' sizes."""
    from PIL import Image

    from skdfm import anomaly_maps, calibrate_pixel_threshold
    from skdfm._tools.thresholds import calibrate_pixel_threshold_from_features

    images, y, masks = defect_images
    # images of two other sizes than the 64 px input: each weighs the same
    resized = [
        Image.fromarray(image).resize((96, 80) if i % 2 else (48, 40))
        for i, image in enumerate(images[20:])
    ]
    model = copy.deepcopy(fitted_pipeline)
    calibrate_pixel_threshold(model, resized, pixel_contamination=0.01)
    by_images = model[-1].pixel_threshold_
    maps = anomaly_maps(model, resized, size="input").maps
    assert by_images == pytest.approx(np.quantile(maps, 0.99))
    rows = model[0].transform(resized)
    calibrate_pixel_threshold_from_features(model, rows, pixel_contamination=0.01)
    assert model[-1].pixel_threshold_ == by_images
    # masks at each image's size are brought to the input size (nearest pixel)
    big = [np.kron(m, np.ones((2, 2), bool)) for m in masks[20:]]  # 128 px
    bigger = [Image.fromarray(image).resize((128, 128)) for image in images[20:]]
    calibrate_pixel_threshold(model, bigger, big)
    from_big = model[-1].pixel_threshold_
    calibrate_pixel_threshold_from_features(
        model, model[0].transform(bigger), list(masks[20:])
    )
    assert model[-1].pixel_threshold_ == from_big
    assert model[-1].pixel_threshold_method_ == "f1"
    with pytest.raises(ValueError, match="mask 0 has shape .* its image is"):
        calibrate_pixel_threshold(model, bigger, masks[20:])
    with pytest.raises(ValueError, match="pass the Pipeline"):
        calibrate_pixel_threshold(model[-1], rows)
    with pytest.raises(ValueError, match="pass the Pipeline"):
        calibrate_pixel_threshold_from_features(model[-1], rows)
