import pickle
from pathlib import Path

import numpy as np
import pytest

import skdfm
from skdfm import DFMDetector, SkdfmVersionWarning
from skdfm._cache import weights_digest


def test_pickle_records_the_skdfm_version():
    det = DFMDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(20, 5)))
    assert det.__getstate__()["_skdfm_version"] == skdfm.__version__
    loaded = pickle.loads(pickle.dumps(det))
    assert not hasattr(loaded, "_skdfm_version")


def test_pickling_leaves_the_estimator_unchanged():
    det = DFMDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(20, 5)))
    before = dict(det.__dict__)
    pickle.dumps(det)
    assert det.__dict__.keys() == before.keys()


def test_loading_with_another_version_warns(monkeypatch):
    det = DFMDetector(device="cpu").fit(np.random.default_rng(0).normal(size=(20, 5)))
    blob = pickle.dumps(det)
    monkeypatch.setattr(skdfm, "__version__", "99.0")
    with pytest.warns(SkdfmVersionWarning, match=r"saved with skdfm 0\.\S+ .* 99\.0"):
        pickle.loads(blob)


def test_unfitted_estimator_pickles():
    loaded = pickle.loads(pickle.dumps(DFMDetector(pca_level=5)))
    assert loaded.get_params()["pca_level"] == 5


def test_models_saved_by_skdfm_0_1_0_load_and_score_the_same():
    """tests/data/skdfm-0.1.0-models.joblib was written by the commit before the
    seams refactoring (6e57529): a fre Pipeline (test_resnet, layer1) and a
    stream-fitted nll detector, with the images and the scores and maps they gave.
    The classes' pickled paths and state must keep loading into today's code."""
    import joblib

    from skdfm import anomaly_maps

    saved = joblib.load(Path(__file__).parent / "data" / "skdfm-0.1.0-models.joblib")
    model, images = saved["pipeline"], saved["images"]
    transformer, detector = model[0], model[1]
    assert isinstance(detector, DFMDetector)
    # state 0.1.0 did not have is rebuilt on load
    assert transformer.weights_digest_ == weights_digest(transformer.backbone_)
    assert detector._scoring.components.shape == detector.components_.T.shape
    # parameters and fitted attributes added since take anomalib's defaults
    assert detector.get_params()["image_score"] == detector.image_score_ == "sum"
    assert detector.feature_shape is None and detector.feature_shape_ is None
    assert transformer.layer_ == "layer1"
    np.testing.assert_allclose(model.score_samples(images), saved["scores"], rtol=1e-9)
    result = anomaly_maps(model, images)
    np.testing.assert_allclose(result.maps, saved["maps"], rtol=1e-9, atol=1e-12)
    nll = saved["nll_streamed"]
    assert nll.score_type == "nll" and nll.n_samples_seen_ == 16
    np.testing.assert_allclose(
        nll.score_samples(transformer.transform(images)),
        saved["nll_scores"],
        rtol=1e-9,
    )


def test_scoring_state_is_not_pickled_and_is_rebuilt(features):
    X_train, X_test = features
    det = DFMDetector(device="cpu").fit(X_train)
    state = det.__getstate__()
    # parameters and fitted attributes only: nothing private (device tensors,
    # streaming statistics) but the version stamps
    private = {k for k in state if k.startswith("_")}
    assert private <= {"_skdfm_version", "_sklearn_version"}
    loaded = pickle.loads(pickle.dumps(det))
    # on CPU the state shares memory with the fitted arrays: no second copy
    assert np.shares_memory(loaded._scoring.components.numpy(), loaded.components_)
    assert np.shares_memory(loaded._scoring.mean.numpy(), loaded.mean_)
    np.testing.assert_array_equal(
        loaded.score_samples(X_test), det.score_samples(X_test)
    )
