"""Images in, normalised model-input batches out.

The input rules of :class:`~skdfm.DeepFeatureTransformer` live here: which
collections count as images, how their layout is read, and how a batch becomes the
backbone's input (RGB float in [0, 1], bilinear anti-aliased resize, the backbone's
normalisation), as anomalib prepares images for DFM. Collections are validated
cheaply up front; pixels are decoded and checked one batch at a time, so a list of
100 000 file paths never sits decoded in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.sparse import issparse

from .._core.device import check_has_data
from .decode import (
    IMAGE_SUFFIXES,
    LAYOUT_HELP,
    MAX_IMAGE_PIXELS,
    NUMPY_SCALES,
    FileBatch,
    batch_channel_axis,
    channel_axis,
    decode_image_file,
    one_ahead,
    open_image,
    original_size,
    pil_pixels,
    read_image_files,
    read_image_size,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "FileBatch",
    "ImageCollection",
    "as_image_collection",
    "decode_image_file",
    "model_input",
    "open_image",
    "original_size",
    "read_image_file",
    "read_image_files",
    "read_image_size",
]

_TORCH_DTYPES = {
    torch.uint8: 255.0,
    torch.float16: None,
    torch.bfloat16: None,
    torch.float32: None,
    torch.float64: None,
}


def _scale_of(dtype, what: str) -> float | None:
    is_torch = isinstance(dtype, torch.dtype)
    table = _TORCH_DTYPES if is_torch else NUMPY_SCALES
    if dtype.is_complex if is_torch else np.dtype(dtype).kind == "c":
        raise ValueError(f"Complex data not supported: {what} has dtype {dtype}.")
    if dtype not in table:
        allowed = ", ".join(str(d).replace("torch.", "") for d in table)
        raise ValueError(
            f"{what} has dtype {dtype}; images must be {allowed}. Integer images "
            "are read as 0..max of their dtype, float images must lie in [0, 1]."
        )
    return table[dtype]


def _to_chw_tensor(image) -> torch.Tensor:
    """A validated single image array/tensor as a (C, H, W) tensor."""
    tensor = image if isinstance(image, torch.Tensor) else _from_numpy(image)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    axis = channel_axis(tuple(tensor.shape), (0, 2), "image")
    return tensor if axis == 0 else tensor.permute(2, 0, 1)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint16:  # torch has too few uint16 kernels: go through float
        return torch.from_numpy(array.astype(np.float32) / 65535.0)
    if not array.flags.writeable:  # torch warns on read-only memory; copy the batch
        array = np.array(array)
    return torch.from_numpy(np.ascontiguousarray(array))


def read_image_file(path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """:func:`decode_image_file` as a (C, H, W) tensor: uint8 RGB, or one channel
    of floats in [0, 1] for 16-bit grayscale."""
    return _from_pil(decode_image_file(path, max_pixels))


def _from_pil(image: Image.Image) -> torch.Tensor:
    """(C, H, W): uint8 RGB, or for 16-bit files floats scaled by 65535, the same
    values as a numpy uint16 array of the pixels gives."""
    pixels = pil_pixels(image)
    if pixels.ndim == 2:
        return _from_numpy(pixels)[None]
    return _from_numpy(pixels).permute(2, 0, 1)


def _digest(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _array_key(image) -> tuple:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.ascontiguousarray(image)
    return ("pixels", image.shape, image.dtype.str, _digest(image.data))


def image_sizes(batch) -> list[tuple[int, int]]:
    """``(height, width)`` of each image of a batch of ``ImageCollection.batches``."""
    if isinstance(batch, list):
        return [tuple(image.shape[-2:]) for image in batch]
    return [tuple(batch.shape[-2:])] * len(batch)


@dataclass(frozen=True)
class ImageCollection:
    """A validated collection of images, decoded batch by batch.

    ``kind`` is ``"array"`` (one 3-D/4-D array or tensor), ``"path"``, ``"pil"`` or
    ``"element"`` (a list of per-image arrays or tensors).
    """

    kind: str
    data: object
    channel_axis: int | None = None
    max_pixels: int | None = MAX_IMAGE_PIXELS  #: files with more are refused

    def __len__(self) -> int:
        return len(self.data)

    def subset(self, indices) -> ImageCollection:
        """The images at ``indices``, same kind and layout, still undecoded."""
        if self.kind == "array":
            return ImageCollection(self.kind, self.data[indices], self.channel_axis)
        data = [self.data[i] for i in indices]
        return ImageCollection(self.kind, data, max_pixels=self.max_pixels)

    def identity_keys(self) -> list[tuple | None]:
        """One hashable key per image that changes when the image does.

        Files are identified by absolute path, size and modification time (nothing
        is decoded); arrays, tensors and PIL images by a digest of their pixels,
        shape and dtype.
        """
        if self.kind == "path":
            keys = []
            for item in self.data:
                path = os.path.abspath(os.fspath(item))
                try:
                    stat = os.stat(path)
                except OSError:  # no identity; reading it raises the clear error
                    keys.append(None)
                    continue
                keys.append(("path", path, stat.st_size, stat.st_mtime_ns))
            return keys
        if self.kind == "pil":
            return [
                ("pil", image.mode, image.size, _digest(image.tobytes()))
                for image in self.data
            ]
        return [_array_key(image) for image in self.data]

    def sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of each image; files are read for their header only."""
        if self.kind == "array":
            shape = tuple(self.data.shape)
            size = shape[-2:] if self.channel_axis in (None, 1) else shape[1:3]
            return [tuple(int(s) for s in size)] * len(self)
        if self.kind == "pil":
            return [original_size(image) for image in self.data]
        if self.kind == "path":
            return [read_image_size(item, self.max_pixels) for item in self.data]
        return [size for _, batch in self.batches(64) for size in image_sizes(batch)]

    def batches(self, batch_size: int) -> Iterator[tuple[int, object]]:
        """Yield ``(start, batch)``: a (B, C, H, W) tensor or a list of (C, H, W).

        Files are decoded one batch ahead in a background thread (Pillow releases
        the GIL while decoding), so decoding overlaps the backbone's work on the
        previous batch; errors surface at the batch they belong to.
        """
        starts = range(0, len(self), batch_size)

        def batch_at(start):
            return start, self._batch(start, min(start + batch_size, len(self)))

        if self.kind != "path":
            return map(batch_at, starts)
        return one_ahead(batch_at, starts)

    def _batch(self, start: int, stop: int):
        if self.kind == "array":
            chunk = self.data[start:stop]
            if isinstance(chunk, np.ndarray):
                chunk = _from_numpy(chunk)
            if self.channel_axis is None:
                return chunk.unsqueeze(1)
            return chunk if self.channel_axis == 1 else chunk.permute(0, 3, 1, 2)
        items = self.data[start:stop]
        if self.kind == "path":
            return [read_image_file(item, self.max_pixels) for item in items]
        if self.kind == "pil":
            return [_from_pil(item) for item in items]
        return [_to_chw_tensor(item) for item in items]


def _element_kind(item) -> str | None:
    if isinstance(item, (str, os.PathLike)):
        return "path"
    if isinstance(item, Image.Image):
        return "pil"
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return "element"
    return None


def as_image_collection(
    X, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> ImageCollection:
    """Validate the structure of ``X`` (no pixel is read) and wrap it; image files
    with more than ``max_pixels`` pixels are refused when read.

    Raises
    ------
    ValueError
        For an empty collection, a tabular (2-D) array, an ambiguous or unsupported
        layout, an unsupported dtype, or mixed or unsupported element types.
    """
    if isinstance(X, (str, os.PathLike)):
        raise ValueError(
            f"X is a single path ({os.fspath(X)!r}); pass a list of image paths."
        )
    if isinstance(X, Image.Image):
        raise ValueError("X is a single PIL image; pass a list of images.")
    if issparse(X):
        raise TypeError(
            "Sparse input is not supported: images must be dense arrays, tensors or "
            "a sequence of images."
        )
    if hasattr(X, "columns"):
        raise ValueError(
            "X is a data frame; pass one column of it (e.g. df['path']) or a list."
        )
    if isinstance(X, np.ndarray) and X.dtype.kind in "UO":
        X = list(X)
    if isinstance(X, (np.ndarray, torch.Tensor)):
        check_has_data(X)
        return _array_collection(X)
    if not hasattr(X, "__len__") or not hasattr(X, "__iter__"):
        raise ValueError(
            f"X must be an array, a tensor or a sequence of images, got "
            f"{type(X).__name__}; wrap an iterator in list()."
        )
    items = X if isinstance(X, Sequence) else list(X)
    if len(items) == 0:
        raise ValueError("X contains no images (0 samples); at least 1 is required.")
    kinds = {}
    for index, item in enumerate(items):
        kind = _element_kind(item)
        if kind is None:
            raise ValueError(
                f"X[{index}] is a {type(item).__name__}; images must be file paths, "
                "PIL images, numpy arrays or torch tensors."
            )
        kinds.setdefault(kind, (index, type(item).__name__))
    if len(kinds) > 1:
        found = ", ".join(
            f"{kind} (first at X[{index}], a {type_name})"
            for kind, (index, type_name) in kinds.items()
        )
        raise ValueError(
            f"X mixes element types: {found}; use one kind of image per call."
        )
    (kind,) = kinds
    if kind == "element":
        for index, item in enumerate(items):
            check_has_data(item, f"X[{index}]")
            _scale_of(item.dtype, f"X[{index}]")
            if item.ndim not in (2, 3) or min(item.shape) == 0:
                raise ValueError(
                    f"X[{index}] has shape {tuple(item.shape)}; expected one "
                    f"non-empty image. {LAYOUT_HELP}"
                )
            if item.ndim == 3:  # layout errors up front, not mid-transform
                channel_axis(tuple(item.shape), (0, 2), "image")
    return ImageCollection(kind, items, max_pixels=max_pixels)


def _array_collection(X) -> ImageCollection:
    shape = tuple(X.shape)
    _scale_of(X.dtype, "X")
    axis = batch_channel_axis(shape)
    return ImageCollection("array", X, axis)


def _as_unit_float(batch: torch.Tensor, first_index: int) -> torch.Tensor:
    """Integer pixels scaled to [0, 1]; float pixels checked to be finite, in range."""
    scale = _scale_of(batch.dtype, "Image batch")
    if scale is not None:
        return batch.to(torch.float32).div_(scale)
    batch = batch.to(torch.float32)
    finite = torch.isfinite(batch).flatten(1).all(1)
    inside = ((batch >= 0) & (batch <= 1)).flatten(1).all(1)
    bad = (~(finite & inside)).nonzero()
    if len(bad):
        position = int(bad[0, 0])
        problem = (
            "NaN or infinite pixel values"
            if not finite[position]
            else "pixel values outside [0, 1]"
        )
        index = first_index + position
        raise ValueError(
            f"Image {index} has {problem}; float images must be finite "
            "and lie in [0, 1] (divide 8-bit images by 255, or pass them as uint8)."
        )
    return batch


def _resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(batch.shape[-2:]) == size:
        return batch
    return F.interpolate(
        batch, size=size, mode="bilinear", align_corners=False, antialias=True
    )


def model_input(
    batch,
    first_index: int,
    *,
    device: torch.device,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    channels_last: bool = False,
) -> torch.Tensor:
    """Turn one batch from :meth:`ImageCollection.batches` into backbone input.

    The batch crosses to ``device`` once, in its own dtype (uint8 stays uint8 on the
    way). Images of different sizes are resized one by one where they are first.
    ``mean`` and ``std`` are (3,) float32 tensors on ``device``.
    """
    if isinstance(batch, list):
        shapes = {(tuple(image.shape), image.dtype) for image in batch}
        if len(shapes) == 1:
            batch = torch.stack(batch)
        else:
            batch = torch.cat(
                [
                    _resize(_as_unit_float(image[None], first_index + i), size).expand(
                        -1, 3, -1, -1
                    )
                    for i, image in enumerate(batch)
                ]
            )
    x = _as_unit_float(batch.to(device, non_blocking=True), first_index)
    x = _resize(x, size)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = (x - mean[:, None, None]) / std[:, None, None]
    # Elementwise ops keep the input's strides: an NHWC array would silently run the
    # backbone channels-last. Fix the layout so features never depend on it.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=layout)
