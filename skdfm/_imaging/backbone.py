"""timm backbones truncated after their feature layers: building, weights, pickling.

Layer names come from timm's ``feature_info`` (never from a hard-coded table). The
model is cut after the chosen layer, or the deepest of several chosen layers (timm's
``FeatureListNet``, which then returns one map per layer from one forward pass), so
no weight and no compute past it exist. Pretrained weights come from the local cache
with no network call when they are there; otherwise a fast reachability check turns
an air-gapped download (which huggingface_hub retries for ~50 s) into an immediate,
clear error.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

# timm (and torchvision with it, ~190 MB resident) is imported where a backbone is
# built, so processes that only score features never load it.

__all__ = [
    "Backbone",
    "backbone_state",
    "build_backbone",
    "layer_name",
    "mismatched_tensors",
    "rebuild_backbone",
    "timm_weights_unavailable",
    "weights_source",
]

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class Backbone:
    """A truncated backbone and what the transformer needs to know about it."""

    model: torch.nn.Module
    layer_name: str | tuple[str, ...]  #: a tuple when several layers were asked
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    stem = name.split(".")[0]
    close = timm.list_models(f"*{stem[:5]}*")[:8]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"backbone={name!r} is not a timm model (see timm.list_models()).{hint}"
    )


def _layer_index(name: str, layer, names: list[str]) -> int:
    """Index in ``names`` (the model's feature_info) of a layer name or index."""
    if isinstance(layer, str):
        if layer not in names:
            raise ValueError(
                f"layer={layer!r} is not a feature layer of {name!r}; valid names "
                f"are {names} (or their indices 0..{len(names) - 1})."
            )
        return names.index(layer)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(
            f"layer={layer!r} must be a layer name, its index, or a list of them."
        )
    if not 0 <= layer < len(names):
        raise ValueError(
            f"layer={layer} is out of range for {name!r}: valid indices are "
            f"0..{len(names) - 1} for the layers {names}."
        )
    return int(layer)


def _layer_indices(name: str, layer, names: list[str]) -> list[int]:
    """Sorted indices of one layer or of a list of distinct layers."""
    if not isinstance(layer, (list, tuple)):
        return [_layer_index(name, layer, names)]
    if not layer:
        raise ValueError("layer=[] names no layer; give one or more.")
    indices = [_layer_index(name, item, names) for item in layer]
    if len(set(indices)) != len(indices):
        raise ValueError(f"layer={list(layer)!r} names a layer twice.")
    return sorted(indices)


def _feature_kwargs(name: str, layer) -> tuple[dict, str | tuple[str, ...]]:
    """``create_model`` keywords that cut ``name`` after ``layer``, on the meta device.

    ``layer`` is a name, an index, or a list of them; the layer name returned is a
    str for one layer and a tuple of names in network order for a list.

    timm's own ``features_only`` wrapper truncates ResNet-like models; EfficientNet and
    MobileNet wrappers keep every block, so they are rebuilt as a ``FeatureListNet``.
    Models that cannot be cut that way (ViTs, whose feature getters index blocks
    differently) are rejected rather than run whole or at the wrong block.
    """
    import timm
    from timm.models import FeatureDictNet

    with torch.device("meta"):
        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except RuntimeError as exc:
            raise ValueError(
                f"backbone={name!r} cannot return intermediate features "
                f"(timm features_only): {exc}"
            ) from exc
        names = probe.feature_info.module_name()
        indices = _layer_indices(name, layer, names)
        wanted = [names[i] for i in indices]
        kwargs = dict(features_only=True, out_indices=tuple(indices), exportable=True)
        if not isinstance(probe, FeatureDictNet):
            kwargs.update(feature_cls="list", feature_cfg={"flatten_sequential": True})
            try:
                cut = timm.create_model(name, pretrained=False, **kwargs)
            except (AssertionError, RuntimeError, TypeError, KeyError) as exc:
                raise ValueError(
                    f"backbone={name!r} cannot be cut after a layer by timm "
                    f"(FeatureListNet: {exc}); use a CNN backbone such as a ResNet, "
                    "Wide ResNet, EfficientNet or ConvNeXt."
                ) from exc
            if cut.feature_info.module_name() != wanted:
                raise ValueError(
                    f"backbone={name!r}: timm cuts it at "
                    f"{cut.feature_info.module_name()}, not at {wanted}."
                )
    return kwargs, tuple(wanted) if isinstance(layer, (list, tuple)) else wanted[0]


def _cached_weights(cfg) -> str | None:
    """Path of the pretrained weights of ``cfg`` in the local caches, if present."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        filenames = (
            [cfg.hf_hub_filename]
            if cfg.hf_hub_filename
            else [
                "model.safetensors",
                "pytorch_model.bin",
            ]
        )
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        checkpoint = Path(
            torch.hub.get_dir(), "checkpoints", Path(urlparse(cfg.url).path).name
        )
        if checkpoint.is_file():
            return str(checkpoint)
    return None


def _download_blocker(cfg) -> str | None:
    """Why a download of the weights of ``cfg`` cannot work here, or None if it may."""
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        source = urlparse(constants.ENDPOINT)
    else:
        source = urlparse(cfg.url)
    host = source.hostname
    port = source.port or (80 if source.scheme == "http" else 443)
    if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return None  # only the proxy can tell; let the download try
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc})"
    return None


def _offline_message(name: str, reason: str) -> str:
    return (
        f"The pretrained weights of backbone={name!r} are not in the local cache and "
        f"cannot be downloaded: {reason}. Either copy a timm checkpoint of {name!r} "
        "(e.g. the model.safetensors of its Hugging Face repository, or "
        "torch.save(timm.create_model(name, pretrained=True).state_dict(), path) on "
        "a machine with network) to this machine and pass "
        "checkpoint_path='/path/to/weights', or fill the Hugging Face cache "
        "(~/.cache/huggingface) and run again, or use pretrained=False for random "
        "weights (tests and experiments only)."
    )


def _weights_kwargs(name: str, pretrained: bool, checkpoint_path) -> dict:
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint_path={str(path)!r} is not a file.")
        return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if not pretrained:
        return dict(pretrained=False)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(
            f"timm has no pretrained weights for backbone={name!r}; pass "
            "checkpoint_path=... or use pretrained=False."
        )
    cached = _cached_weights(cfg)
    if cached is not None:
        return dict(pretrained=True, pretrained_cfg_overlay=dict(file=cached))
    blocker = _download_blocker(cfg)
    if blocker is not None:
        raise OSError(_offline_message(name, blocker))
    return dict(pretrained=True)


def layer_name(name: str, layer) -> str | tuple[str, ...]:
    """The ``feature_info`` name of ``layer`` (a name or an index) in ``name``; for
    a list of layers, the tuple of their names in network order."""
    return _feature_kwargs(name, layer)[1]


def build_backbone(
    name: str,
    layer,
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    seed: int | None = None,
) -> Backbone:
    """Create ``name`` cut after ``layer``, in eval mode, without gradients, on CPU.

    Parameters
    ----------
    name : str
        A timm model name, optionally with a pretrained tag (``"resnet18.tv_in1k"``).
    layer : str, int or list of them
        A name from the model's ``feature_info`` or its index; a list keeps
        several layers (one map each, from one forward pass).
    pretrained : bool
        Load timm's pretrained weights (local cache first, then download).
    checkpoint_path : path-like or None
        A local timm checkpoint of the full model, loaded instead of downloading.
    seed : int or None
        Seed of the random initialisation (``pretrained=False``).

    Raises
    ------
    ValueError
        Unknown model or layer, or a checkpoint that does not fit the model.
    OSError
        Pretrained weights neither cached nor downloadable.
    """
    import timm

    _check_model_name(name)
    features, layer_name = _feature_kwargs(name, layer)
    weights = _weights_kwargs(name, pretrained, checkpoint_path)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = timm.create_model(name, **features, **weights)
        except Exception as exc:
            if checkpoint_path is not None and isinstance(
                exc, (RuntimeError, KeyError, ValueError)
            ):
                raise ValueError(
                    f"checkpoint_path={os.fspath(checkpoint_path)!r} does not fit "
                    f"backbone={name!r}: {exc}"
                ) from exc
            downloading = (
                weights["pretrained"] and "pretrained_cfg_overlay" not in weights
            )
            if downloading:  # a download fails in many ways: HTTP, SSL, I/O
                raise OSError(_offline_message(name, str(exc))) from exc
            raise
    model.eval().requires_grad_(False)
    cfg = model.pretrained_cfg
    return Backbone(model, layer_name, tuple(cfg["mean"]), tuple(cfg["std"]))


def backbone_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` as CPU numpy arrays (portable in any pickle)."""
    return {
        key: value.detach().cpu().numpy() for key, value in model.state_dict().items()
    }


def mismatched_tensors(expected: dict, given: dict) -> list[str]:
    """The tensor names (sorted) whose presence or shape differ between two
    ``{name: shape}`` maps; empty when they fit."""
    return sorted(set(expected) ^ set(given)) or sorted(
        k for k in expected if expected[k] != given[k]
    )


def rebuild_backbone(
    name: str, layer: str | tuple[str, ...], state: dict[str, np.ndarray]
) -> torch.nn.Module:
    """Rebuild a truncated backbone from :func:`backbone_state`, with no network.

    The architecture is first built on the meta device (no memory) and its
    parameter names and shapes compared with ``state``: weights that do not fit are
    refused before a real (and possibly large) model is allocated.
    """
    import timm

    _check_model_name(name)
    features, _ = _feature_kwargs(name, layer)
    with torch.device("meta"):
        skeleton = timm.create_model(name, pretrained=False, **features)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    given = {k: tuple(np.shape(v)) for k, v in state.items()}
    wrong = mismatched_tensors(expected, given)
    if wrong:
        raise ValueError(
            f"the saved weights do not fit {name!r} cut after {layer!r} "
            f"({len(given)} arrays for {len(expected)} expected; first mismatches: "
            f"{wrong[:3]})."
        )
    model = build_backbone(name, layer, pretrained=False, seed=0).model
    model.load_state_dict({key: torch.tensor(value) for key, value in state.items()})
    return model


def weights_source(
    name: str, pretrained: bool, checkpoint_path, seed, model: torch.nn.Module
) -> str:
    """Where a backbone's weights came from, in words (``weights_source_``)."""
    if not pretrained:
        return f"random init (seed {seed})"
    if checkpoint_path is not None:
        from .weights import checkpoint_source

        return checkpoint_source(checkpoint_path) or (
            f"checkpoint {Path(checkpoint_path).name}"
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = ".".join(str(p) for p in (cfg.get("architecture", name), cfg.get("tag")) if p)
    where = cfg.get("hf_hub_id") or cfg.get("url") or "timm"
    return f"timm pretrained {tag}: {where}"


def timm_weights_unavailable(name: str) -> str | None:
    """Why timm's pretrained weights of ``name`` cannot be had here, or None when
    they can (in the local cache, or a download may work; no download is made)."""
    from timm.models import get_pretrained_cfg

    _check_model_name(name)
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f"timm has no pretrained weights for {name!r}"
    if _cached_weights(cfg) is not None:
        return None
    return _download_blocker(cfg)
