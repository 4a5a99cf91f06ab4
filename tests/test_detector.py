import re

import joblib
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError

import skdfm._kernels.scores
from skdfm import DFMDetector
from skdfm._core.validation import check_device_rows

from .conftest import make_features


def reference_dfm(X_train, X_test, k):
    """Independent float64 numpy implementation of anomalib's DFM formulas.

    Full SVD of the centred training matrix; FRE as the norm of the explicit
    residual; NLL from a Gaussian fitted to the projected training rows (mean and
    biased covariance, eigendecomposed as anomalib does), correctly centred.
    """
    X = np.asarray(X_train, dtype=np.float64)
    mean = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    V = vt[:k].T
    Y = np.asarray(X_test, dtype=np.float64) - mean
    residual = Y - Y @ V @ V.T
    fre = (residual**2).sum(axis=1)
    z_train = (X - mean) @ V
    m = z_train.mean(axis=0)
    cov = np.cov(z_train, rowvar=False, bias=True).reshape(k, k)
    sigma2, U = np.linalg.eigh(cov)
    w = ((Y @ V - m) @ U) / np.sqrt(sigma2)
    nll = (w**2).sum(axis=1) + np.log(sigma2).sum()
    return fre, nll


@pytest.mark.parametrize("solver", ["gram", "covariance"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_equal_float64_reference(features, solver, dtype):
    X_train, X_test = (x.astype(dtype) for x in features)
    if solver == "covariance":  # N > D for the covariance route's usual regime
        X_train, X_test = X_train[:, :60], X_test[:, :60]
    k = 12
    fre_ref, nll_ref = reference_dfm(X_train, X_test, k)
    for score_type, expected in (("fre", fre_ref), ("nll", nll_ref)):
        det = DFMDetector(pca_level=k, score_type=score_type, solver=solver)
        det.set_params(device="cpu").fit(X_train)
        got = -det.score_samples(X_test)
        assert det.n_components_ == k
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        in_sample = reference_dfm(X_train, X_train, k)[score_type == "nll"]
        np.testing.assert_allclose(-det.score_samples(X_train), in_sample, rtol=1e-5)


def test_fre_equals_sklearn_pca_reconstruction_error(features):
    X_train, X_test = (x.astype(np.float64) for x in features)
    det = DFMDetector(pca_level=0.9, device="cpu").fit(X_train)
    pca = PCA(n_components=0.9, svd_solver="full").fit(X_train)
    assert det.n_components_ == pca.n_components_
    recon = pca.inverse_transform(pca.transform(X_test))
    np.testing.assert_allclose(
        -det.score_samples(X_test), ((X_test - recon) ** 2).sum(1), rtol=1e-8
    )
    np.testing.assert_allclose(det.explained_variance_, pca.explained_variance_)
    np.testing.assert_allclose(
        det.explained_variance_ratio_, pca.explained_variance_ratio_
    )
    np.testing.assert_allclose(det.singular_values_, pca.singular_values_)
    np.testing.assert_allclose(
        np.abs(det.components_ @ pca.components_.T),
        np.eye(det.n_components_),
        atol=1e-8,
    )


def test_nll_is_the_centred_gaussian_log_likelihood(features):
    from scipy.stats import multivariate_normal

    X_train, X_test = features
    det = DFMDetector(pca_level=0.8, score_type="nll", device="cpu").fit(X_train)
    k = det.n_components_
    z_train = (X_train - det.mean_) @ det.components_.T
    z_test = (X_test - det.mean_) @ det.components_.T
    gaussian = multivariate_normal(z_train.mean(0), np.cov(z_train.T, bias=True))
    expected = -2 * gaussian.logpdf(z_test) - k * np.log(2 * np.pi)
    np.testing.assert_allclose(-det.score_samples(X_test), expected, rtol=1e-5)


def test_nll_is_centred_at_the_training_mean():
    # Far from the origin, anomalib's double centring would score the mean row as
    # a far outlier; the correctly centred Gaussian scores it as the most normal.
    X = make_features(100, 30) + 100.0
    det = DFMDetector(pca_level=5, score_type="nll", device="cpu").fit(X)
    assert det.score_samples(det.mean_[None])[0] > det.score_samples(X).max()


def test_float_level_keeps_sklearn_count_and_integer_is_exact(features):
    X_train, _ = features
    det = DFMDetector(pca_level=0.97, device="cpu").fit(X_train)
    assert det.n_components_ == PCA(0.97, svd_solver="full").fit(X_train).n_components_
    assert det.explained_variance_ratio_.sum() > 0.97
    assert det.explained_variance_ratio_[:-1].sum() <= 0.97
    assert DFMDetector(pca_level=7, device="cpu").fit(X_train).n_components_ == 7
    # 1 is an integer (one component), 1.0 a level (the numerical rank)
    assert DFMDetector(pca_level=1, device="cpu").fit(X_train).n_components_ == 1
    full = DFMDetector(pca_level=1.0, score_type="nll", device="cpu").fit(X_train)
    assert full.n_components_ == len(X_train) - 1


def test_fre_never_keeps_every_feature():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2)) * [3.0, 2.0]
    det = DFMDetector(pca_level=0.999, device="cpu").fit(X)
    assert det.n_components_ == 1
    assert np.ptp(det.score_samples(X)) > 0
    nll = DFMDetector(pca_level=0.999, score_type="nll", device="cpu").fit(X)
    assert nll.n_components_ == 2


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_too_many_components_is_an_error(features, score_type):
    X_train, _ = features
    n, d = X_train[:10].shape
    with pytest.raises(ValueError, match=r"at most 9 can be kept"):
        DFMDetector(pca_level=10, score_type=score_type, device="cpu").fit(X_train[:10])
    d_cap = 4 if score_type == "fre" else 5
    X = X_train[:, :5]
    DFMDetector(pca_level=d_cap, score_type=score_type, device="cpu").fit(X)
    with pytest.raises(ValueError, match=f"at most {d_cap} can be kept"):
        DFMDetector(pca_level=d_cap + 1, score_type=score_type, device="cpu").fit(X)


def test_outlier_api_and_contamination(features):
    X_train, X_test = features
    det = DFMDetector(contamination=0.05, device="cpu").fit(X_train)
    scores = det.score_samples(X_test)
    assert scores.dtype == np.float64 and scores.shape == (len(X_test),)
    np.testing.assert_array_equal(det.decision_function(X_test), scores - det.offset_)
    pred = det.predict(X_test)
    assert pred.dtype.kind == "i"
    np.testing.assert_array_equal(pred, np.where(scores - det.offset_ >= 0, 1, -1))
    assert np.sum(det.predict(X_train) == -1) == 6  # 5 % of 120
    np.testing.assert_array_equal(det.fit_predict(X_train), det.predict(X_train))
    assert det.offset_ == pytest.approx(np.percentile(det.score_samples(X_train), 5))


def test_defects_score_lower_than_normal_rows(features):
    X_train, X_test = features
    rng = np.random.default_rng(0)
    defects = X_test + rng.normal(scale=3 * X_test.std(), size=X_test.shape)
    for score_type in ("fre", "nll"):
        det = DFMDetector(score_type=score_type, device="cpu").fit(X_train)
        assert det.score_samples(defects).max() < det.score_samples(X_test).min()


def test_in_sample_scores_are_optimistic(features):
    # The documented pitfall: with N close to k, training rows are reconstructed
    # almost exactly, so an in-sample threshold flags most new normal rows.
    X_train, X_test = features
    det = DFMDetector(pca_level=0.99, device="cpu").fit(X_train)
    assert det.n_components_ > len(X_train) / 2
    assert np.median(-det.score_samples(X_test)) > 5 * np.median(
        -det.score_samples(X_train)
    )
    assert np.mean(det.predict(X_test) == -1) > 0.5


def test_cross_fitted_threshold_holds_on_new_rows(features):
    # The in-sample threshold of the test above flags most new normal rows; the
    # cross-fitted one flags about contamination of them, from the same rows.
    X = make_features(1120, 300)
    X_train, X_new = X[:120], X[120:]
    flagged = {}
    for cv in (None, 5):
        det = DFMDetector(pca_level=0.99, device="cpu", threshold_cv=cv).fit(X_train)
        flagged[cv] = np.mean(det.predict(X_new) == -1)
    assert flagged[None] > 0.5
    assert 0.03 <= flagged[5] <= 0.15  # contamination 0.1, 1000 new rows
    assert det.threshold_method_ == "contamination, 5-fold cross-fit"
    # the same components as without it: only offset_ changes
    plain = DFMDetector(pca_level=0.99, device="cpu").fit(X_train)
    np.testing.assert_array_equal(det.components_, plain.components_)
    # each row's score is that of a model fitted on the other folds
    scores = np.empty(120)
    for fold in range(5):  # with as many components as the fitted model
        other = DFMDetector(pca_level=min(det.n_components_, 95), device="cpu")
        other.fit(np.delete(X_train, np.s_[fold::5], axis=0))
        scores[fold::5] = other.score_samples(X_train[fold::5])
    assert det.offset_ == pytest.approx(np.percentile(scores, 10), rel=1e-9)
    assert det.score_range_ == pytest.approx((scores.min(), scores.max()), rel=1e-9)


@pytest.mark.parametrize(
    "params, error",
    [
        (dict(threshold_cv=1), "threshold_cv"),
        (dict(threshold_cv=True), "threshold_cv"),
        (dict(threshold_cv=61), "threshold_cv=61 needs at least 122 samples"),
    ],
)
def test_bad_threshold_cv_is_refused(features, params, error):
    with pytest.raises(ValueError, match=error):
        DFMDetector(device="cpu", **params).fit(features[0])


def _bf16(X):
    return torch.from_numpy(X).to(torch.bfloat16)


@pytest.mark.parametrize(
    "convert, held",
    [
        (lambda X: X.tolist(), lambda X: X),
        (torch.from_numpy, lambda X: X),
        (lambda X: torch.from_numpy(X).double(), lambda X: X),
        (_bf16, lambda X: _bf16(X).float().numpy()),  # scored as the values it holds
    ],
    ids=["list", "tensor-fp32", "tensor-fp64", "tensor-bf16"],
)
def test_accepts_lists_and_tensors(features, convert, held):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    np.testing.assert_allclose(
        det.score_samples(convert(X_test)), det.score_samples(held(X_test)), rtol=1e-6
    )
    refit = DFMDetector(device="cpu").fit(convert(X_train))
    np.testing.assert_allclose(
        refit.mean_, DFMDetector(device="cpu").fit(held(X_train)).mean_, rtol=1e-6
    )


def test_device_is_resolved_into_a_fitted_attribute(features, monkeypatch):
    X_train, _ = features
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    det = DFMDetector().fit(X_train)
    assert det.device == "auto"
    assert det.device_ == "cpu"
    assert DFMDetector(device=torch.device("cpu")).fit(X_train).device_ == "cpu"


def test_fitted_attributes_are_numpy(features):
    det = DFMDetector(device="cpu").fit(features[0])
    for name in (
        "mean_",
        "components_",
        "explained_variance_",
        "explained_variance_ratio_",
        "singular_values_",
    ):
        assert isinstance(getattr(det, name), np.ndarray), name
    assert isinstance(det.offset_, float)
    assert det.n_features_in_ == features[0].shape[1]


# --- bad input -------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(features, bad):
    X_train, X_test = features
    X_bad = X_train.copy()
    X_bad[3, 4] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        DFMDetector(device="cpu").fit(X_bad)
    det = DFMDetector(device="cpu").fit(X_train)
    with pytest.raises(ValueError, match="NaN|infinity"):
        det.score_samples(X_bad)
    with pytest.raises(ValueError, match="NaN|infinity"):
        det.fit(torch.from_numpy(X_bad))


def test_wrong_number_of_features_is_rejected(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    with pytest.raises(ValueError, match="300 features"):
        det.predict(X_test[:, :-1])


def test_one_sample_is_rejected(features):
    with pytest.raises(ValueError, match="1 sample"):
        DFMDetector(device="cpu").fit(features[0][:1])


def test_wrong_ndim_is_rejected(features):
    with pytest.raises(ValueError, match="2D array"):
        DFMDetector(device="cpu").fit(features[0][0])
    with pytest.raises(ValueError, match="dim 3"):
        DFMDetector(device="cpu").fit(features[0].reshape(4, 30, 300))


def test_identical_samples_are_rejected():
    with pytest.raises(ValueError, match="identical"):
        DFMDetector(device="cpu").fit(np.ones((5, 8)))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"pca_level": 0.0}, "pca_level"),
        ({"pca_level": 1.5}, "pca_level"),
        ({"pca_level": -3}, "pca_level"),
        ({"pca_level": "all"}, "pca_level"),
        ({"score_type": "mahalanobis"}, "score_type"),
        ({"contamination": 0.6}, "contamination"),
        ({"solver": "svd"}, "solver"),
        ({"device": 3}, "device"),
        ({"pca_level": True}, "'pca_level' parameter of DFMDetector must be a number"),
        ({"contamination": True}, "contamination"),
        ({"pca_level": np.bool_(True)}, "not a bool"),
    ],
)
def test_invalid_parameters_are_rejected(features, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DFMDetector(**params).fit(features[0])
    with pytest.raises(ValueError, match=re.escape(message)):
        DFMDetector(**params).partial_fit(features[0])


@pytest.mark.parametrize(
    "level, expected",
    [(np.float32(0.9), 0.9), (np.float64(0.9), 0.9), (np.int64(3), 3), (3, 3)],
)
def test_numpy_scalars_are_levels_and_counts_like_python_ones(
    features, level, expected
):
    got = DFMDetector(pca_level=level, device="cpu").fit(features[0]).n_components_
    assert (
        got
        == DFMDetector(pca_level=expected, device="cpu").fit(features[0]).n_components_
    )


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_unknown_device_is_rejected(features, device):
    with pytest.raises(ValueError, match="not a valid device|not supported"):
        DFMDetector(device=device).fit(features[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_rejected(features):
    with pytest.raises(ValueError, match="CUDA is not available"):
        DFMDetector(device="cuda").fit(features[0])


def test_unfitted_model_raises_not_fitted(features):
    for method in ("score_samples", "decision_function", "predict"):
        with pytest.raises(NotFittedError):
            getattr(DFMDetector(), method)(features[1])


# --- persistence -----------------------------------------------------------


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_joblib_round_trip_gives_identical_scores(features, tmp_path, score_type):
    X_train, X_test = features
    det = DFMDetector(score_type=score_type, device="cpu").fit(X_train)
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_array_equal(
        loaded.score_samples(X_test), det.score_samples(X_test)
    )
    assert loaded.offset_ == det.offset_


def test_model_fitted_on_cuda_loads_on_a_machine_without_cuda(
    features, tmp_path, monkeypatch
):
    from skdfm import DeviceWarning

    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    expected = det.score_samples(X_test)
    det.set_params(device="cuda")
    det.device_ = "cuda:0"  # as a fit on a GPU machine leaves it
    joblib.dump(det, tmp_path / "det.joblib")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(DeviceWarning, match="cuda:0"):
        loaded = joblib.load(tmp_path / "det.joblib")
    assert loaded.device_ == "cpu"
    np.testing.assert_array_equal(loaded.score_samples(X_test), expected)


# --- CUDA (skipped without a GPU) --------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("score_type", ["fre", "nll"])
@pytest.mark.parametrize("solver", ["gram", "covariance"])
def test_cuda_fit_matches_cpu(features, score_type, solver):
    X_train, X_test = features
    params = dict(score_type=score_type, solver=solver, pca_level=10)
    cpu = DFMDetector(device="cpu", **params).fit(X_train)
    gpu = DFMDetector(device="cuda", **params).fit(X_train)
    assert gpu.device_.startswith("cuda:")
    assert isinstance(gpu.components_, np.ndarray)
    np.testing.assert_allclose(
        gpu.score_samples(X_test), cpu.score_samples(X_test), rtol=1e-6
    )
    np.testing.assert_allclose(
        gpu.score_samples(torch.from_numpy(X_test).cuda()),
        cpu.score_samples(X_test),
        rtol=1e-6,
    )


@pytest.mark.cuda
def test_cuda_model_round_trips_with_joblib(features, tmp_path):
    X_train, X_test = features
    det = DFMDetector(device="cuda").fit(X_train)
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    assert loaded.device_ == det.device_
    np.testing.assert_array_equal(
        loaded.score_samples(X_test), det.score_samples(X_test)
    )


def test_device_tensors_are_validated_where_they_are(features):
    # The checks that keep GPU tensors off the host, exercised on a CPU tensor.
    X_train, _ = features
    X = torch.from_numpy(X_train)
    assert check_device_rows(X, 2) is not None
    checks = [
        (X[0], "2D"),
        (X[:1], "minimum of 2"),
        (X[:, :0], "0 feature"),
        (torch.full_like(X, float("nan")), "NaN or infinity"),
        (X.to(torch.complex64), "Complex"),
    ]
    for bad, message in checks:
        with pytest.raises(ValueError, match=message):
            check_device_rows(bad, 2)
    assert check_device_rows(X.half(), 1).dtype == torch.float32
    assert check_device_rows(X.int(), 1).dtype == torch.float64


@pytest.mark.cuda
def test_cuda_tensor_input_is_scored_without_leaving_the_gpu(features, host_copies):
    X_train, X_test = features
    det = DFMDetector(device="cuda").fit(torch.from_numpy(X_train).cuda())
    ref = DFMDetector(device="cpu").fit(X_train)
    X_gpu = torch.from_numpy(X_test).cuda()
    host_copies.clear()
    scores = det.score_samples(X_gpu)
    # only the scores come back: no feature row, no fitted array per call
    assert host_copies == [(len(X_test),)]
    np.testing.assert_allclose(scores, ref.score_samples(X_test), rtol=1e-6)
    with pytest.raises(ValueError, match="NaN or infinity"):
        det.score_samples(torch.full((2, 300), float("nan"), device="cuda"))
    assert det.n_features_in_ == 300
    with pytest.raises(ValueError, match="expecting 300 features"):
        det.score_samples(X_gpu[:, :-1])


# -- the detector's interface to the rest of the package ------------------------------


def test_set_threshold_is_the_one_threshold_setter(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    scores = det.score_samples(X_test)
    assert det.set_threshold(scores, contamination=np.float32(0.25)) is det
    assert det.threshold_method_ == "contamination"
    flagged = np.mean(det.predict(X_test) == -1)
    assert 0.25 - 1 / len(X_test) <= flagged <= 0.25
    assert det.score_range_ == (scores.min(), scores.max())
    det.set_threshold(scores, offset=float(np.median(scores)), method="f1")
    assert det.threshold_method_ == "f1" and np.mean(det.predict(X_test) == -1) == 0.5
    bad_calls = [
        (dict(contamination=0.9), r"contamination=0.9 must be a float in \(0, 0.5\]"),
        (dict(contamination=-1), "contamination=-1"),
        (dict(contamination=True), "contamination=True"),
        (dict(contamination=0.1, offset=1.0), "exactly one"),
        ({}, "exactly one"),
        (dict(offset=1.0), "method"),
        (dict(offset=np.nan, method="f1"), "finite offset"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            det.set_threshold(scores, **kwargs)
    for bad_scores in ([], [1.0, np.nan]):
        with pytest.raises(ValueError, match="at least one score, all finite"):
            det.set_threshold(bad_scores, contamination=0.1)
    with pytest.raises(NotFittedError):
        DFMDetector().set_threshold(scores, contamination=0.1)


def test_labels_from_scores_equal_predict(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    X = np.vstack([X_train[:20], X_test])  # training rows are mostly inliers
    labels = det.labels_from_scores(det.score_samples(X))
    np.testing.assert_array_equal(labels, det.predict(X))
    assert set(labels) == {-1, 1}


def test_score_samples_with_grid(features):
    X_train, X_test = features  # 300 features = 12 channels on a 5 x 5 grid
    det = DFMDetector(device="cpu").fit(X_train)
    scores, grid = det.score_samples_with_grid(X_test, (12, 5, 5))
    np.testing.assert_array_equal(scores, det.score_samples(X_test))  # same bits
    assert grid.shape == (len(X_test), 5, 5) and grid.dtype == torch.float64
    np.testing.assert_allclose(-grid.sum((1, 2)).numpy(), scores, rtol=1e-9)
    with pytest.raises(ValueError, match=r"feature_shape=\(12, 5, 4\) has 240"):
        det.score_samples_with_grid(X_test, (12, 5, 4))
    with pytest.raises(ValueError, match="score_type='fre'"):
        DFMDetector(score_type="nll", device="cpu").fit(
            X_train
        ).score_samples_with_grid(X_test, (12, 5, 5))
    with pytest.raises(NotFittedError):
        DFMDetector().score_samples_with_grid(X_test, (12, 5, 5))


def test_fitted_subspace_stays_on_the_device_between_calls(features, monkeypatch):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    scoring = det._scoring
    # On CPU the device copy is the fitted arrays themselves.
    assert np.shares_memory(scoring.components.numpy(), det.components_)
    assert np.shares_memory(scoring.mean.numpy(), det.mean_)

    def refuse(*args, **kwargs):
        raise AssertionError("the fitted arrays were converted again")

    monkeypatch.setattr(skdfm._kernels.scores.ScoringState, "from_arrays", refuse)
    for method in (det.score_samples, det.decision_function, det.predict):
        method(X_test)
    assert det._scoring is scoring
    det.fit(X_test)  # a new fit, new scoring tensors
    assert det._scoring is not scoring


def test_to_device_moves_a_streaming_fit_too(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu")
    det.partial_fit(X_train[:60])
    assert det.to_device("cpu") is det and det.device == "cpu"
    det.partial_fit(X_train[60:])
    np.testing.assert_allclose(
        det.score_samples(X_test),
        DFMDetector(device="cpu").fit(X_train).score_samples(X_test),
        rtol=1e-6,
    )


def test_replaced_fitted_arrays_are_what_scores(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    before = det.score_samples(X_test)
    det.mean_ = det.mean_ + 1.0  # a new array: the device state follows it
    assert not np.allclose(det.score_samples(X_test), before)
    det.mean_ = det.mean_ - 1.0
    np.testing.assert_allclose(det.score_samples(X_test), before, rtol=1e-12)


@pytest.mark.cuda
def test_to_device_moves_state_and_statistics_to_cuda(features):
    X_train, X_test = features
    reference = DFMDetector(device="cpu").fit(X_train).score_samples(X_test)
    det = DFMDetector(device="cpu").fit(X_train).to_device("cuda")
    assert det._scoring.components.is_cuda and det.device_.startswith("cuda")
    np.testing.assert_allclose(det.score_samples(X_test), reference, rtol=1e-6)
    streaming = DFMDetector(device="cpu").partial_fit(X_train[:60])
    streaming.to_device("cuda")
    streaming.partial_fit(X_train[60:])
    statistics = streaming.streaming_statistics()
    assert statistics.device.type == "cuda" and statistics.rows.is_cuda
    streaming.fit_from_statistics(statistics)
    np.testing.assert_allclose(streaming.score_samples(X_test), reference, rtol=1e-6)


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_finite_extreme_magnitudes_are_refused_not_nan(features, score_type):
    X_train, X_test = features
    det = DFMDetector(score_type=score_type, device="cpu")
    with pytest.raises(ValueError, match="overflows above 1e.150"):
        det.fit(X_train.astype(np.float64) * 1e154)
    with pytest.raises(ValueError, match="underflow"):
        det.fit(X_train.astype(np.float64) * 1e-300)
    det.fit(X_train)
    with pytest.raises(ValueError, match=r"magnitude up to .*e\+153"):
        det.score_samples(X_test.astype(np.float64) * 1e154)
    # large but representable: finite scores, the same ranking as unscaled
    big = DFMDetector(score_type=score_type, device="cpu")
    big.fit(X_train.astype(np.float64) * 1e100)
    scores = big.score_samples(X_test.astype(np.float64) * 1e100)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(
        np.argsort(scores), np.argsort(det.score_samples(X_test))
    )
    # tiny rows to score are fine (the model was fitted on representable ones)
    assert np.isfinite(det.score_samples(X_test.astype(np.float64) * 1e-300)).all()


def test_what_was_fitted_is_what_scores(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    before = det.predict(X_test)
    assert det.score_type_ == "fre"
    det.set_params(score_type="nll")  # offset_ is an FRE quantile
    for method in (det.score_samples, det.predict, det.decision_function):
        with pytest.raises(NotFittedError, match="score_type='nll' was set after"):
            method(X_test)
    det.set_params(score_type="fre")
    np.testing.assert_array_equal(det.predict(X_test), before)
    det.set_params(score_type="nll").fit(X_train)
    assert det.score_type_ == "nll" and np.isfinite(det.score_samples(X_test)).all()
    det.set_params(pca_level=0.5, contamination=0.2, solver="gram")  # fit-only
    det.score_samples(X_test)


def test_meta_tensors_and_oversized_statistics_are_clear_errors(features, monkeypatch):
    import skdfm._core.memory as memory

    X_train, _ = features
    meta = torch.empty(X_train.shape, device="meta")
    for call in (DFMDetector().fit, DFMDetector().partial_fit):
        with pytest.raises(ValueError, match="'meta' device, which has a shape"):
            call(meta)
    # D = 262 144 would need a 512 GiB scatter matrix, which 2 rows do not need
    # (their statistics are the rows: the Gram route)
    monkeypatch.setattr(memory, "total_bytes", lambda device: 24 * 2**30)
    wide = np.zeros((2, 262_144), np.float32)
    wide[0, 0] = 1.0
    assert DFMDetector(device="cpu").partial_fit(wide).n_samples_seen_ == 2
    # once the rows outnumber the features the scatter is needed: said before
    # allocating it (D = 1024: 8 MiB, on a device of 6 MiB)
    monkeypatch.setattr(memory, "total_bytes", lambda device: 6 * 2**20)
    det = DFMDetector(device="cpu").partial_fit(
        np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
    )
    with pytest.raises(MemoryError, match=r"D x D float64 scatter .* 0.0 GiB"):
        det.partial_fit(np.zeros((1, 1024), np.float32))
    assert det.n_samples_seen_ == 1024  # the refused batch changed nothing
    with pytest.raises(MemoryError, match="N x N float64 Gram matrix of 60000"):
        DFMDetector(device="cpu", solver="gram").fit(
            np.broadcast_to(np.eye(1, 300, dtype=np.float32), (60_000, 300))
        )


# -- image_score ------------------------------------------------------------------

GRID = (12, 5, 5)  # 300 features, the width of the ``features`` fixture


def _grid_maxima(det, X, k=1):
    """The k largest cells' mean of each row's residual grid, computed by hand."""
    xc = np.asarray(X, np.float64) - det.mean_
    residual = xc - xc @ det.components_.T @ det.components_
    cells = (residual**2).reshape(len(X), *GRID).sum(1).reshape(len(X), -1)
    return np.sort(cells, axis=1)[:, ::-1][:, :k].mean(1)


@pytest.mark.parametrize("solver", ["gram", "covariance"])
@pytest.mark.parametrize("image_score", ["max", 3])
def test_image_score_is_the_largest_cells_everywhere(features, solver, image_score):
    X_train, X_test = features
    det = DFMDetector(
        image_score=image_score, feature_shape=GRID, solver=solver, device="cpu"
    ).fit(X_train)
    assert det.feature_shape_ == GRID and det.image_score_ == image_score
    k = 1 if image_score == "max" else image_score
    expected = -_grid_maxima(det, X_test, k)
    np.testing.assert_allclose(det.score_samples(X_test), expected, rtol=1e-10)
    # the threshold is a quantile of the training rows' image scores
    train_scores = -_grid_maxima(det, X_train, k)
    assert det.offset_ == pytest.approx(np.percentile(train_scores, 10), rel=1e-10)
    np.testing.assert_allclose(
        det.decision_function(X_test), expected - det.offset_, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_array_equal(det.predict(X_test), det.labels_from_scores(expected))
    scores, grid = det.score_samples_with_grid(X_test)
    np.testing.assert_array_equal(scores, det.score_samples(X_test))
    # the same components as anomalib's sum: only the image score differs
    plain = DFMDetector(solver=solver, device="cpu").fit(X_train)
    np.testing.assert_array_equal(plain.components_, det.components_)
    np.testing.assert_allclose(
        -plain.score_samples(X_test), grid.sum((1, 2)).numpy(), rtol=1e-9
    )


def test_image_score_needs_a_grid_and_fre(features):
    X_train, X_test = features
    with pytest.raises(ValueError, match="needs the grid the feature rows flatten"):
        DFMDetector(image_score="max", device="cpu").fit(X_train)
    with pytest.raises(ValueError, match="needs score_type='fre'"):
        DFMDetector(
            image_score="max", score_type="nll", feature_shape=GRID, device="cpu"
        ).fit(X_train)
    with pytest.raises(ValueError, match="has only 25"):
        DFMDetector(image_score=26, feature_shape=GRID, device="cpu").fit(X_train)
    with pytest.raises(ValueError, match="has 300 entries but the rows have 299"):
        DFMDetector(feature_shape=GRID, device="cpu").fit(X_train[:, 1:])
    with pytest.raises(ValueError, match="image_score"):
        DFMDetector(image_score=True, feature_shape=GRID, device="cpu").fit(X_train)
    with pytest.raises(ValueError, match="image_score"):
        DFMDetector(image_score="mean", feature_shape=GRID, device="cpu").fit(X_train)
    # anomalib's score needs no grid, for fre and nll alike
    for score_type in ("fre", "nll"):
        det = DFMDetector(score_type=score_type, device="cpu").fit(X_train)
        assert det.feature_shape_ is None and det.image_score_ == "sum"


def test_changed_image_score_is_refused_until_the_next_fit(features):
    X_train, X_test = features
    det = DFMDetector(feature_shape=GRID, device="cpu").fit(X_train)
    det.set_params(image_score="max")  # offset_ is a quantile of FRE sums
    with pytest.raises(NotFittedError, match="image_score='max' was set after"):
        det.predict(X_test)
    det.fit(X_train)
    np.testing.assert_allclose(
        det.score_samples(X_test), -_grid_maxima(det, X_test), rtol=1e-10
    )


def test_rows_of_another_grid_are_refused(features):
    from skdfm._imaging.features import with_feature_shape

    X_train, X_test = features
    det = DFMDetector(image_score="max", device="cpu")
    det.fit(with_feature_shape(X_train.copy(), GRID))
    assert det.feature_shape_ == GRID  # read from the rows
    with pytest.raises(ValueError, match=r"flattens a \(3, 10, 10\) feature grid"):
        det.score_samples(with_feature_shape(X_test.copy(), (3, 10, 10)))
    det.score_samples(X_test)  # plain rows: the fitted grid is used


@pytest.mark.parametrize("image_score", ["sum", "max", 2])
def test_image_score_round_trips(features, tmp_path, image_score):
    import skdfm

    X_train, X_test = features
    det = DFMDetector(image_score=image_score, feature_shape=GRID, device="cpu").fit(
        X_train
    )
    joblib.dump(det, tmp_path / "det.joblib")
    skdfm.save(det, tmp_path / "det.skdfm")
    for loaded in (
        joblib.load(tmp_path / "det.joblib"),
        skdfm.load(tmp_path / "det.skdfm"),
    ):
        assert loaded.image_score_ == image_score and loaded.feature_shape_ == GRID
        assert loaded.get_params() == det.get_params()
        np.testing.assert_array_equal(
            loaded.score_samples(X_test), det.score_samples(X_test)
        )


def test_grid_conflicts_and_changes_are_refused(features):
    from skdfm._imaging.features import with_feature_shape

    X_train, X_test = features
    carried = with_feature_shape(X_train.copy(), GRID)
    with pytest.raises(ValueError, match="X says its rows flatten a \\(12, 5, 5\\)"):
        DFMDetector(feature_shape=(3, 10, 10), device="cpu").fit(carried)
    det = DFMDetector(feature_shape=list(GRID), device="cpu").fit(carried)
    assert det.feature_shape_ == GRID
    det.set_params(feature_shape=(3, 10, 10))
    with pytest.raises(NotFittedError, match="feature_shape=\\(3, 10, 10\\) was set"):
        det.score_samples(X_test)
    det.set_params(feature_shape=None).score_samples(X_test)


def test_a_refused_first_batch_keeps_the_previous_fit(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    before = det.score_samples(X_test)
    det.set_params(image_score="max")  # plain rows: no grid to take a maximum of
    with pytest.raises(ValueError, match="needs the grid"):
        det.partial_fit(X_train, restart=True)
    det.set_params(image_score="sum")
    np.testing.assert_array_equal(det.score_samples(X_test), before)
    assert "n_samples_seen_" not in vars(det)


def documented_attributes(cls) -> set[str]:
    """The names in the numpydoc Attributes section of ``cls``'s docstring."""
    section = cls.__doc__.split("Attributes\n    ----------\n")[1]
    section = section.split("\n    See Also\n")[0]
    entries = re.findall(r"^    (\w+(?:, \w+)*) :", section, re.MULTILINE)
    return {name for entry in entries for name in entry.split(", ")}


def test_every_fitted_attribute_is_in_the_table_and_documented(features):
    from skdfm._detector import DETECTOR_ATTRIBUTES

    names = [row.name for row in DETECTOR_ATTRIBUTES]
    assert len(set(names)) == len(names)
    assert set(names) == documented_attributes(DFMDetector)
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    det.set_pixel_threshold(1.0, method="by hand")
    streamed = DFMDetector(device="cpu").partial_fit(X_train).finish_partial_fit()
    for fitted in (det, streamed):
        assert {k for k in vars(fitted) if k.endswith("_")} <= set(names)


# -- y: rows labelled -1 are left out of the fit --------------------------------------


def labelled_rows(n=40, n_anomalous=8, n_features=30):
    """Feature rows and labels: the last ``n_anomalous`` rows shifted, labelled -1."""
    X = make_features(n, n_features)
    y = np.ones(n, dtype=int)
    y[-n_anomalous:] = -1
    X[-n_anomalous:] += 5.0
    return X, y


FITTED = ("mean_", "components_", "singular_values_", "offset_", "n_samples_")


def assert_same_fit(a, b):
    for name in FITTED:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12)


@pytest.mark.parametrize("threshold_cv", [None, 3])
def test_fit_leaves_out_rows_labelled_anomalous(threshold_cv):
    from skdfm import OutlierLabelWarning

    X, y = labelled_rows()
    detector = DFMDetector(device="cpu", threshold_cv=threshold_cv)
    with pytest.warns(OutlierLabelWarning, match="Left 8 of 40 rows out"):
        detector.fit(X, y)
    assert_same_fit(detector, DFMDetector(**detector.get_params()).fit(X[y == 1]))
    assert detector.n_features_in_ == X.shape[1]
    masks = np.zeros((len(X), 4, 4), dtype=bool)
    masks[y == -1, 1, 2] = True  # pixel masks mark the same rows
    with pytest.warns(OutlierLabelWarning, match="Left 8 of 40"):
        assert_same_fit(DFMDetector(**detector.get_params()).fit(X, masks), detector)


def test_partial_fit_leaves_out_rows_labelled_anomalous():
    from skdfm import OutlierLabelWarning

    X, y = labelled_rows()
    streamed = DFMDetector(device="cpu")
    with pytest.warns(OutlierLabelWarning, match="Left 8 of 40"):
        streamed.partial_fit(X, y)
    assert streamed.n_samples_seen_ == 32
    with pytest.raises(ValueError, match="at least 1 normal row"):
        streamed.partial_fit(X[y == -1], y[y == -1])
    assert streamed.n_samples_seen_ == 32  # the refused batch changed nothing
    streamed.finish_partial_fit()
    clean = DFMDetector(device="cpu").partial_fit(X[y == 1]).finish_partial_fit()
    np.testing.assert_allclose(streamed.components_, clean.components_, rtol=1e-12)


@pytest.mark.parametrize("n_normal", [0, 1])
def test_fit_refuses_labels_leaving_too_few_normal_rows(n_normal):
    X, _ = labelled_rows()
    y = -np.ones(len(X), dtype=int)
    y[:n_normal] = 1
    with pytest.raises(ValueError, match="needs at least 2 normal row"):
        DFMDetector(device="cpu").fit(X, y)


@pytest.mark.parametrize(
    "y, match",
    [
        ([1, -1, 0, 1] * 10, "must hold only 1 \\(normal\\) and -1"),
        ([1, -1] * 10, "y has 20 labels or masks for 40 rows"),
        (np.ones((40, 2), dtype=int) * -1, "must be a 1-D array"),
    ],
)
def test_fit_refuses_malformed_outlier_labels(y, match):
    X, _ = labelled_rows()
    with pytest.raises(ValueError, match=match):
        DFMDetector(device="cpu").fit(X, y)


def test_fit_ignores_zero_one_labels_with_the_label_guards_message():
    from skdfm import OutlierLabelWarning

    X, y = labelled_rows()
    detector = DFMDetector(device="cpu")
    with pytest.warns(OutlierLabelWarning, match="0/1 labels, which are ambiguous"):
        detector.fit(X, np.where(y == -1, 1, 0))  # anomalib's 1 = anomalous
    assert_same_fit(detector, DFMDetector(device="cpu").fit(X))


@pytest.mark.parametrize("kind", ["ones", "classes", "floats", "strings"])
def test_fit_with_y_holding_no_minus_one_is_unchanged(kind, recwarn):
    X, _ = labelled_rows()
    y = {
        "ones": np.ones(len(X), dtype=int),
        "classes": np.arange(len(X)) % 3,  # scikit-learn's checks pass these
        "floats": np.linspace(0.5, 3.0, len(X)),
        "strings": np.array(["good", "bad"] * 20),
    }[kind]
    detector = DFMDetector(device="cpu").fit(X, y)
    assert not recwarn.list
    assert_same_fit(detector, DFMDetector(device="cpu").fit(X))
