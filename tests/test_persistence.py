import pickle

import numpy as np
import pytest

import skdfm
from skdfm import DFMDetector, SkdfmVersionWarning


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
