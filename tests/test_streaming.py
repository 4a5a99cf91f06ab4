"""partial_fit on the detector and stream_fit on detectors and Pipelines."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import skdfm._detector
from skdfm import (
    DeepFeatureTransformer,
    DFMDetector,
    calibrate_threshold,
    make_defect_images,
    stream_fit,
)

from .conftest import SMALL_BACKBONE, make_features


def _pipeline(device="cpu", **transformer):
    """The tiny-backbone Pipeline these tests stream into."""
    return Pipeline(
        [
            (
                "features",
                DeepFeatureTransformer(
                    **dict(SMALL_BACKBONE, device=device, **transformer)
                ),
            ),
            ("dfm", DFMDetector(pca_level=0.9, device=device)),
        ]
    )


def _streamed(X, sizes, **params):
    det = DFMDetector(device="cpu", **params)
    for batch in np.array_split(X, np.cumsum(sizes)[:-1]):
        det.partial_fit(batch)
    return det


def _assert_same_model(streamed, fitted, X_test):
    # Scoring finishes a pending streaming fit: compare scores first.
    np.testing.assert_allclose(
        streamed.score_samples(X_test), fitted.score_samples(X_test), rtol=1e-6
    )
    assert streamed.n_components_ == fitted.n_components_
    np.testing.assert_allclose(streamed.mean_, fitted.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        streamed.components_ @ streamed.components_.T,
        np.eye(fitted.n_components_),
        atol=1e-10,
    )
    # Same subspace: projectors agree.
    P_s = streamed.components_.T @ streamed.components_
    P_f = fitted.components_.T @ fitted.components_
    np.testing.assert_allclose(P_s, P_f, atol=1e-7)
    np.testing.assert_allclose(
        streamed.singular_values_, fitted.singular_values_, rtol=1e-9
    )


@pytest.mark.parametrize("shape", [(400, 60), (90, 300)])  # N > D and N < D
@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_partial_fit_equals_fit(shape, score_type):
    X = make_features(shape[0] + 40, shape[1], latent=40)
    X_train, X_test = X[: shape[0]], X[shape[0] :]
    sizes = [1, 13, shape[0] // 2, shape[0] - 14 - shape[0] // 2]
    streamed = _streamed(X_train, sizes, score_type=score_type, pca_level=0.95)
    fitted = DFMDetector(device="cpu", score_type=score_type, pca_level=0.95)
    fitted.fit(X_train)
    assert streamed.n_samples_seen_ == shape[0]
    _assert_same_model(streamed, fitted, X_test)
    # The cheaper exact route for what was seen, as fit picks it.
    assert streamed.solver_ == fitted.solver_
    assert streamed.solver_ == ("gram" if shape[0] <= shape[1] else "covariance")
    np.testing.assert_allclose(
        streamed.explained_variance_ratio_, fitted.explained_variance_ratio_, rtol=1e-9
    )


def test_partial_fit_can_continue_after_scoring(features):
    X_train, X_test = features
    det = _streamed(X_train[:60], [30, 30], pca_level=0.9)
    det.score_samples(X_test)  # finishes the fit from the statistics so far
    first_k = det.n_components_
    det.partial_fit(X_train[60:])
    assert "components_" not in vars(det)  # invalidated, recomputed on use
    _assert_same_model(
        det, DFMDetector(pca_level=0.9, device="cpu").fit(X_train), X_test
    )
    assert det.n_samples_seen_ == 120 and first_k > 0


def test_components_are_computed_by_an_explicit_finish(features, monkeypatch):
    X_train, X_test = features
    det = _streamed(X_train, [60, 60])
    # Reading a derived attribute computes nothing: it says how to get it.
    with pytest.raises(AttributeError, match="finish_partial_fit"):
        det.components_  # noqa: B018
    assert not hasattr(det, "n_components_")
    calls = []
    original = skdfm._kernels.statistics.FeatureStatistics.fit

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(skdfm._kernels.statistics.FeatureStatistics, "fit", counting)
    assert det.finish_partial_fit() is det
    assert det.n_components_ > 0 and len(calls) == 1
    det.finish_partial_fit()
    det.score_samples(X_test)
    assert len(calls) == 1  # nothing new merged: nothing recomputed
    det.partial_fit(X_test)
    det.score_samples(X_test)  # new rows: the next use recomputes
    assert len(calls) == 2 and det.n_samples_seen_ == 160
    det.finish_partial_fit(release=True)
    assert "_statistics" not in vars(det) and det.finish_partial_fit() is det
    with pytest.raises(NotFittedError, match="statistics of partial_fit"):
        DFMDetector(device="cpu").fit(X_train).finish_partial_fit()


def test_restart_starts_a_new_streaming_fit_without_a_warning(features):
    X_train, X_test = features
    det = _streamed(X_train[:60], [30, 30])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.partial_fit(X_train[60:], restart=True)
    assert det.n_samples_seen_ == 60
    _assert_same_model(det, DFMDetector(device="cpu").fit(X_train[60:]), X_test)
    assert "set_partial_fit_request" not in dir(det)  # restart is not metadata


def test_threshold_needs_a_second_pass(features):
    X_train, X_test = features
    det = _streamed(X_train, [60, 60])
    det.score_samples(X_test)  # scores work
    for method in (det.predict, det.decision_function):
        with pytest.raises(NotFittedError, match="calibrate_threshold"):
            method(X_test)
    assert not hasattr(det, "offset_")
    calibrate_threshold(det, X_train, method="contamination", contamination=0.1)
    fitted = DFMDetector(device="cpu").fit(X_train)  # contamination 0.1 in-sample
    assert det.offset_ == pytest.approx(fitted.offset_, rel=1e-6)
    np.testing.assert_array_equal(det.predict(X_test), fitted.predict(X_test))


def test_fit_discards_streaming_statistics(features):
    X_train, X_test = features
    det = _streamed(X_train, [60, 60])
    det.fit(X_train[:50])
    assert not hasattr(det, "n_samples_seen_")
    with pytest.raises(NotFittedError, match="holds no streaming statistics"):
        det.streaming_statistics()
    assert det.n_samples_ == 50
    with pytest.warns(UserWarning, match="fitted with fit"):
        det.partial_fit(X_train[:10])  # nothing to continue from: a new fit
    assert det.n_samples_seen_ == 10 and "n_samples_" not in vars(det)
    fresh = clone(det).partial_fit(X_train[:10])  # no warning on a fresh clone
    assert fresh.n_samples_seen_ == 10


def test_partial_fit_validates_batches(features):
    X_train, _ = features
    det = DFMDetector(device="cpu").partial_fit(X_train[:1])
    with pytest.raises(ValueError, match="at least 2"):
        det.score_samples(X_train)
    with pytest.raises(ValueError, match="features"):
        det.partial_fit(X_train[:5, :-1])
    with pytest.raises(ValueError, match="NaN|infinity"):
        det.partial_fit(np.full((3, X_train.shape[1]), np.nan))
    with pytest.raises(ValueError, match="pca_level=50"):
        DFMDetector(pca_level=50, device="cpu").partial_fit(X_train[:20]).score_samples(
            X_train
        )


def test_pickling_finishes_the_fit_without_the_statistics(features):
    X_train, X_test = features
    det = _streamed(X_train, [60, 60])
    calibrate_threshold(det, X_test, method="contamination")
    blob = pickle.dumps(det)
    assert len(blob) < 2 * det.components_.nbytes + 10 * X_train.shape[1] * 8
    assert not {k for k in det.__getstate__() if k.startswith("_")} - {
        "_skdfm_version",
        "_sklearn_version",
    }
    loaded = pickle.loads(blob)
    with pytest.raises(NotFittedError, match="holds no streaming statistics"):
        loaded.streaming_statistics()
    np.testing.assert_array_equal(loaded.predict(X_test), det.predict(X_test))
    with pytest.warns(UserWarning, match="loaded from a file"):
        loaded.partial_fit(X_train)  # the rows seen before saving are not in it


def test_stream_fit_detector_from_a_generator(features):
    X_train, X_test = features
    batches = (X_train[i : i + 25] for i in range(0, 120, 25))
    det = stream_fit(
        DFMDetector(device="cpu"),
        batches,
        threshold_batches=[X_test],
        contamination=0.2,
    )
    fitted = DFMDetector(device="cpu").fit(X_train)
    _assert_same_model(det, fitted, X_test)
    assert det.threshold_method_ == "contamination"
    assert det.offset_ == pytest.approx(
        np.percentile(fitted.score_samples(X_test), 20), rel=1e-6
    )


def test_stream_fit_refits_from_scratch(features):
    X_train, X_test = features
    det = stream_fit(DFMDetector(device="cpu"), [X_train[:60]])
    stream_fit(det, [X_train[60:]])
    assert det.n_samples_seen_ == 60


def test_stream_fit_pipeline_equals_pipeline_fit():
    images, _, _ = make_defect_images(n_normal=40, n_anomalous=0, image_size=64)
    test_images, _, _ = make_defect_images(
        n_normal=5, n_anomalous=5, image_size=64, random_state=1
    )

    streamed = stream_fit(_pipeline(), (images[i : i + 16] for i in range(0, 40, 16)))
    fitted = _pipeline().fit(images)
    np.testing.assert_allclose(
        streamed.score_samples(test_images),
        fitted.score_samples(test_images),
        rtol=1e-6,
    )


def test_stream_fit_groups_single_paths_into_batches(tmp_path, monkeypatch):
    images, _, _ = make_defect_images(n_normal=12, n_anomalous=0, image_size=64)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    seen = []
    original = DFMDetector.partial_fit

    def spy(self, X, y=None, **kwargs):
        seen.append(len(X))
        return original(self, X, y, **kwargs)

    monkeypatch.setattr(DFMDetector, "partial_fit", spy)
    model = _pipeline()
    stream_fit(model, iter(paths), batch_size=5)
    assert seen == [5, 5, 2]
    reference = _pipeline().fit(images)
    np.testing.assert_allclose(
        model.score_samples(images), reference.score_samples(images), rtol=1e-5
    )


def test_stream_fit_rejects_what_it_cannot_stream(features):
    X_train, _ = features
    with pytest.raises(ValueError, match="no batches"):
        stream_fit(DFMDetector(device="cpu"), [])
    with pytest.raises(ValueError, match="DeepFeatureTransformer"):
        stream_fit(
            Pipeline([("scale", StandardScaler()), ("dfm", DFMDetector())]), [X_train]
        )
    with pytest.raises(ValueError, match="mixed"):
        stream_fit(DFMDetector(device="cpu"), ["a.png", X_train])
    for bad in (0.9, -1, 0, True):
        det = DFMDetector(device="cpu")
        with pytest.raises(ValueError, match=r"contamination=.*\(0, 0.5\]"):
            stream_fit(det, [X_train], threshold_batches=[X_train], contamination=bad)
        assert not hasattr(det, "n_samples_seen_")  # refused before any batch ran


@pytest.mark.cuda
def test_partial_fit_on_cuda_matches_cpu(features):
    X_train, X_test = features
    det = DFMDetector(device="cuda")
    for batch in (X_train[:50], torch.from_numpy(X_train[50:]).cuda()):
        det.partial_fit(batch)
    assert det.device_.startswith("cuda")
    statistics = det.streaming_statistics()  # what a worker would send
    assert statistics.device.type == "cuda" and statistics.rows.is_cuda
    det.fit_from_statistics(statistics)
    _assert_same_model(det, DFMDetector(device="cpu").fit(X_train), X_test)


@pytest.mark.cuda
def test_stream_fit_pipeline_on_cuda_keeps_features_on_the_gpu(host_copies):
    images, _, _ = make_defect_images(n_normal=24, n_anomalous=0, image_size=64)
    model = _pipeline(device="cuda", output="torch")
    stream_fit(
        model, (images[i : i + 8] for i in range(0, 24, 8)), threshold_batches=[images]
    )
    assert model[1].device_.startswith("cuda")
    n_features = int(np.prod(model[0].feature_shape_))
    # the one 2-D array that comes back is components_, never a batch of rows
    matrices = [shape for shape in host_copies if len(shape) == 2]
    assert matrices == [(model[1].n_components_, n_features)]
    assert (len(images),) in host_copies  # the spy sees copies: the scores
    reference = _pipeline().fit(images)
    np.testing.assert_allclose(
        model.score_samples(images), reference.score_samples(images), rtol=1e-3
    )


def test_a_failed_stream_fit_keeps_the_previous_model(tmp_path):
    images, _, _ = make_defect_images(n_normal=24, n_anomalous=0, image_size=64)
    model = stream_fit(_pipeline(), [images[:12], images[12:]])
    before = model.score_samples(images)
    state = {name: dict(vars(part)) for name, part in model.steps}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    good = []
    for i, image in enumerate(images[:8]):
        good.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(good[-1])
    for batches in (
        [images[:8], images[8:16], np.full((4, 64, 64), 2.0)],  # bad pixels in batch 3
        [good[:4], good[4:], [broken]],  # a decode error in batch 3
    ):
        with pytest.raises(ValueError):
            stream_fit(model, batches, threshold_batches=[images])
        for name, part in model.steps:
            assert vars(part).keys() == state[name].keys()
        np.testing.assert_array_equal(model.score_samples(images), before)
    assert "n_samples_seen_" in vars(model[-1])  # still the earlier streaming fit


def test_a_failed_fit_keeps_the_previous_fit(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    before = det.score_samples(X_test)
    for bad in (np.full_like(X_train, np.nan), X_train[:1], np.ones_like(X_train)):
        with pytest.raises(ValueError):
            det.fit(bad)
        np.testing.assert_array_equal(det.score_samples(X_test), before)


@pytest.mark.parametrize("layer", ["layer2", ["layer2", "layer3"]])
def test_stream_fit_with_image_score_max_equals_fit(layer):
    images, _, _ = make_defect_images(n_normal=40, n_anomalous=0, image_size=64)
    test_images, _, _ = make_defect_images(
        n_normal=5, n_anomalous=5, image_size=64, random_state=1
    )
    pipe = _pipeline(layer=layer).set_params(dfm__image_score="max")
    batches = [images[i : i + 16] for i in range(0, 40, 16)]
    streamed = stream_fit(clone(pipe), iter(batches), threshold_batches=iter(batches))
    fitted = clone(pipe).fit(images)
    assert streamed[-1].feature_shape_ == fitted[-1].feature_shape_
    assert streamed[-1].image_score_ == "max"
    np.testing.assert_allclose(
        streamed.score_samples(test_images),
        fitted.score_samples(test_images),
        rtol=1e-6,
    )
    assert streamed[-1].offset_ == pytest.approx(fitted[-1].offset_, rel=1e-6)


def test_partial_fit_refuses_a_batch_of_another_grid(features):
    from skdfm._imaging.features import with_feature_shape

    X, _ = features
    det = DFMDetector(image_score="max", device="cpu")
    det.partial_fit(with_feature_shape(X[:60].copy(), (12, 5, 5)))
    with pytest.raises(ValueError, match="fitted on a \\(12, 5, 5\\) grid"):
        det.partial_fit(with_feature_shape(X[60:].copy(), (3, 10, 10)))
    det.partial_fit(X[60:])  # plain rows: the grid of the fit is kept
    assert det.finish_partial_fit().feature_shape_ == (12, 5, 5)


def test_statistics_of_several_detectors_merge_into_one_fit(features):
    X_train, X_test = features
    parts = [DFMDetector(device="cpu").partial_fit(b) for b in np.split(X_train, 3)]
    handed = [part.streaming_statistics() for part in parts]
    # handing over leaves a detector unfitted: no two owners of one statistics
    assert not hasattr(parts[0], "n_features_in_")
    with pytest.raises(NotFittedError, match="call partial_fit first"):
        parts[0].streaming_statistics()
    merged = handed[0].merge(handed[1]).merge(handed[2])
    det = DFMDetector(device="cpu", pca_level=0.95).fit_from_statistics(merged)
    want = DFMDetector(device="cpu", pca_level=0.95).fit(X_train)
    assert det.n_samples_seen_ == 120 and det.solver_ == "gram"
    np.testing.assert_allclose(
        det.score_samples(X_test), want.score_samples(X_test), rtol=1e-6
    )
    # a grid that contradicts the detector's feature_shape is refused, and the
    # detector stays as it was
    stats = DFMDetector(device="cpu").partial_fit(X_train[:10]).streaming_statistics()
    stats.feature_shape = (12, 5, 5)
    with pytest.raises(ValueError, match="feature_shape"):
        det.set_params(feature_shape=(3, 10, 10)).fit_from_statistics(stats)
    assert det.n_samples_seen_ == 120
