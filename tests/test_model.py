"""What a DFM model is (split_model) and moving one between devices (move_model)."""

import copy

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from skdfm import DeepFeatureTransformer, DFMDetector
from skdfm._tools.model import move_model, split_model

from .conftest import SMALL_BACKBONE


def test_split_a_detector_and_a_pipeline(fitted_pipeline, features):
    det = DFMDetector(device="cpu").fit(features[0])
    assert split_model(det) == (None, det)
    transformer, detector = split_model(fitted_pipeline)
    assert transformer is fitted_pipeline[0] and detector is fitted_pipeline[1]
    with_passthrough = Pipeline(
        [("a", fitted_pipeline[0]), ("skip", "passthrough"), ("b", fitted_pipeline[1])]
    )
    assert split_model(with_passthrough) == (transformer, detector)


def test_fitted_is_required_unless_asked_otherwise():
    pipe = make_pipeline(DeepFeatureTransformer(**SMALL_BACKBONE), DFMDetector())
    with pytest.raises(NotFittedError):
        split_model(pipe)
    transformer, detector = split_model(pipe, fitted=False)
    assert isinstance(transformer, DeepFeatureTransformer)
    assert isinstance(detector, DFMDetector)
    with pytest.raises(NotFittedError):
        split_model(DFMDetector())


@pytest.mark.parametrize(
    "model, message",
    [
        (StandardScaler(), "got StandardScaler"),
        (make_pipeline(StandardScaler(), DFMDetector()), "StandardScaler"),
        (
            make_pipeline(DeepFeatureTransformer(), StandardScaler(), DFMDetector()),
            "exactly a DeepFeatureTransformer and a DFMDetector",
        ),
        (make_pipeline(DFMDetector(), DeepFeatureTransformer()), "exactly"),
    ],
)
def test_anything_else_is_refused_by_name(model, message):
    for fitted in (True, False):
        with pytest.raises(ValueError, match=message):
            split_model(model, fitted=fitted)


def test_move_model_sets_parameters_devices_and_state(fitted_pipeline, defect_images):
    images = defect_images[0][:6]
    model = copy.deepcopy(fitted_pipeline)
    model.set_params(deepfeaturetransformer__device="auto", dfmdetector__device="auto")
    before = model.score_samples(images)
    state = model[1]._scoring
    move_model(model, "cpu")
    for part in model:
        assert part.device == "cpu" and part.device_ == "cpu"
    assert model[1]._scoring is not state  # rebuilt for the new device
    assert next(model[0].backbone_.parameters()).device == torch.device("cpu")
    np.testing.assert_array_equal(model.score_samples(images), before)
    with pytest.raises(ValueError, match="not a valid device"):
        move_model(model, "gpu")
    with pytest.raises(NotFittedError):
        move_model(DFMDetector(), "cpu")


@pytest.mark.cuda
def test_move_model_to_cuda_and_back(fitted_pipeline, defect_images):
    images = defect_images[0][:6]
    model = copy.deepcopy(fitted_pipeline)
    reference = model.score_samples(images)
    move_model(model, "cuda")
    assert next(model[0].backbone_.parameters()).is_cuda
    assert model[1]._scoring.components.is_cuda and model[1].device_.startswith("cuda")
    np.testing.assert_allclose(model.score_samples(images), reference, rtol=1e-4)
    move_model(model, "cpu")
    assert not model[1]._scoring.components.is_cuda
    np.testing.assert_allclose(model.score_samples(images), reference, rtol=1e-4)
