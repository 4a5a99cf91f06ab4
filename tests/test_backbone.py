"""Truncated timm backbones, weights and their offline failure.

(skdfm/_imaging/backbone.py)
"""

import socket
import time

import pytest
import timm
import timm.models
import torch

import skdfm._imaging.backbone as backbone_module
from skdfm._imaging.backbone import backbone_state, build_backbone, rebuild_backbone


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def offline(monkeypatch):
    """No cached weights and no route to the hub, as on an air-gapped machine."""
    monkeypatch.setattr(backbone_module, "_cached_weights", lambda cfg: None)

    def refuse(address, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for variable in backbone_module._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_layer_names_and_indices_are_the_same_layer():
    by_name = build_backbone("resnet18", "layer2", pretrained=False, seed=0)
    by_index = build_backbone("resnet18", 2, pretrained=False, seed=0)
    assert by_name.layer_name == by_index.layer_name == "layer2"
    for a, b in zip(
        by_name.model.state_dict().values(),
        by_index.model.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert by_name.mean == (0.485, 0.456, 0.406)
    assert by_name.std == (0.229, 0.224, 0.225)


def test_nothing_past_the_layer_is_built_or_run():
    cut = build_backbone("resnet18", "layer3", pretrained=False, seed=0).model
    full = timm.create_model("resnet18", pretrained=False)
    keys = list(cut.state_dict())
    assert not any(k.startswith(("layer4", "fc")) for k in keys)
    assert any(k.startswith("layer3") for k in keys)
    assert n_parameters(cut) < 0.25 * n_parameters(full)
    assert [name for name, _ in cut.named_children()][-1] == "layer3"


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100"])
def test_models_whose_timm_wrapper_keeps_every_block_are_cut_too(name):
    cut = build_backbone(name, 2, pretrained=False, seed=0).model
    everything = timm.create_model(name, pretrained=False, features_only=True)
    assert n_parameters(cut) < 0.2 * n_parameters(everything)
    with torch.inference_mode():
        (feature_map,) = cut(torch.zeros(1, 3, 64, 64))
    assert feature_map.shape[1] == everything.feature_info.channels()[2]


def test_models_timm_cannot_cut_are_rejected():
    with pytest.raises(ValueError, match="cannot be cut after a layer"):
        build_backbone("vit_tiny_patch16_224", 0, pretrained=False)


def test_seed_makes_random_weights_reproducible():
    a = build_backbone("test_resnet", "layer2", pretrained=False, seed=3).model
    b = build_backbone("test_resnet", "layer2", pretrained=False, seed=3).model
    c = build_backbone("test_resnet", "layer2", pretrained=False, seed=4).model
    wa, wb, wc = (m.state_dict()["conv1.0.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_model_is_in_eval_mode_without_gradients():
    model = build_backbone("test_resnet", "layer1", pretrained=False, seed=0).model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_backbone_lists_close_names():
    with pytest.raises(ValueError, match=r"'resnet5O' is not a timm model.*resnet5"):
        build_backbone("resnet5O", "layer3", pretrained=False)


@pytest.mark.parametrize(
    "layer, message",
    [
        ("layer9", r"layer='layer9' is not a feature layer of 'resnet18'; valid names"),
        (5, r"layer=5 is out of range for 'resnet18': valid indices are 0\.\.4"),
    ],
)
def test_unknown_layer_lists_the_valid_ones(layer, message):
    with pytest.raises(ValueError, match=message) as error:
        build_backbone("resnet18", layer, pretrained=False)
    assert "'act1', 'layer1', 'layer2', 'layer3', 'layer4'" in str(error.value)


def test_offline_without_cache_fails_fast_and_says_what_to_do(offline):
    start = time.perf_counter()
    with pytest.raises(OSError) as error:
        build_backbone("resnet18", "layer3", pretrained=True)  # offline
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "not in the local cache and cannot be downloaded" in message
    assert "huggingface.co cannot be reached" in message
    assert "checkpoint_path=" in message and "pretrained=False" in message


def test_hf_hub_offline_fails_without_touching_the_network(offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", pytest.fail)  # must not even probe
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        build_backbone("resnet18", "layer3", pretrained=True)  # offline


@pytest.mark.parametrize(
    "failure", [OSError("connection reset by peer"), RuntimeError("HTTP 503")]
)
def test_a_download_error_is_reworded(offline, monkeypatch, failure):
    """Network reachable, download still fails: same clear message."""
    monkeypatch.setattr(backbone_module, "_download_blocker", lambda cfg: None)

    def failing_download(*args, **kwargs):
        raise failure

    monkeypatch.setattr(
        "timm.models._builder.load_state_dict_from_hf", failing_download
    )
    with pytest.raises(OSError, match=f"{failure}.*checkpoint_path="):
        build_backbone("resnet18", "layer3", pretrained=True)  # offline


@pytest.fixture
def checkpoint(tmp_path):
    """A full-model timm checkpoint on disk, as a user would copy one over."""
    torch.manual_seed(7)
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    return path, full.state_dict()


def test_checkpoint_path_loads_local_weights(checkpoint, offline):
    path, weights = checkpoint
    model = build_backbone(
        "resnet18",
        "layer3",
        pretrained=True,  # offline: a local file
        checkpoint_path=path,
    ).model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_cached_weights_load_with_no_network(checkpoint, offline, monkeypatch):
    path, weights = checkpoint
    monkeypatch.setattr(backbone_module, "_cached_weights", lambda cfg: str(path))
    model = build_backbone("resnet18", "layer2", pretrained=True).model  # offline
    torch.testing.assert_close(
        model.state_dict()["conv1.weight"], weights["conv1.weight"], rtol=0, atol=0
    )


def test_cached_weights_are_found_in_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    found = tmp_path / "model.safetensors"
    calls = []

    def lookup(repo, filename, revision=None):
        calls.append((repo, filename))
        return str(found) if filename == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lookup)
    cfg = timm.models.get_pretrained_cfg("resnet50")
    assert backbone_module._cached_weights(cfg) == str(found)
    assert calls[0] == ("timm/resnet50.a1_in1k", "model.safetensors")


def test_bad_checkpoints_are_clear_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("resnet18", 3, checkpoint_path=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="does not fit backbone='resnet50'"):
        build_backbone("resnet50", 3, checkpoint_path=path)


def test_model_without_pretrained_weights_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda *a, **k: None)
    with pytest.raises(ValueError, match="timm has no pretrained weights"):
        build_backbone("resnet18", 3, pretrained=True)  # offline


def test_state_round_trip_rebuilds_the_same_model():
    built = build_backbone("test_resnet", "layer2", pretrained=False, seed=11)
    state = backbone_state(built.model)
    assert all(type(v).__module__ == "numpy" for v in state.values())
    rebuilt = rebuild_backbone("test_resnet", "layer2", state)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x)[0], built.model(x)[0], rtol=0, atol=0)
