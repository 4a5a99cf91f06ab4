"""Image files and pixel arrays without torch: decoding, sizes, channel layouts.

What both the torch pipeline (:mod:`skdfm._imaging.images`) and the torch-free
runtime of
exported models (:mod:`skdfm._deploy.runtime`) need: Pillow decoding with skdfm's own
decompression-bomb guard and 16-bit handling, the ``(height, width)`` of a file,
and the rules that find the channel axis of an array and scale its pixels.
"""

from __future__ import annotations

import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "FileBatch",
    "LAYOUT_HELP",
    "MAX_IMAGE_PIXELS",
    "NUMPY_SCALES",
    "ORIGINAL_SIZE",
    "REDUCE_ABOVE_PIXELS",
    "SIXTEEN_BIT_MODES",
    "THIRTY_TWO_BIT_MODES",
    "UINT16_PIXELS",
    "batch_channel_axis",
    "channel_axis",
    "decode_image_file",
    "file_kind",
    "image_files_below",
    "is_out_of_memory",
    "one_ahead",
    "open_image",
    "original_size",
    "pil_pixels",
    "read_image_files",
    "read_image_size",
]

# Unsigned integers are scaled by their dtype's maximum; floats must lie in [0, 1].
NUMPY_SCALES = {
    np.dtype(np.uint8): 255.0,
    np.dtype(np.uint16): 65535.0,
    np.dtype(np.float16): None,
    np.dtype(np.float32): None,
    np.dtype(np.float64): None,
}
LAYOUT_HELP = (
    "Batches are (N, H, W) grayscale, or (N, H, W, C) / (N, C, H, W) with C = 1 or 3; "
    "single images in a list are (H, W), (H, W, C) or (C, H, W)."
)


def channel_axis(shape: tuple[int, ...], axes: tuple[int, int], what: str) -> int:
    """The one axis among ``axes`` (first or last) whose size is 1 or 3."""
    first, last = (shape[a] for a in axes)
    is_channel = [size in (1, 3) for size in (first, last)]
    if all(is_channel):
        raise ValueError(
            f"Ambiguous {what} of shape {shape}: both axis {axes[0]} and axis "
            f"{axes[1]} could hold the colour channels. {LAYOUT_HELP}"
        )
    if is_channel[0]:
        return axes[0]
    if is_channel[1]:
        return axes[1]
    if first in (2, 4) or last in (2, 4):
        raise ValueError(
            f"{what.capitalize()} of shape {shape} has 2 or 4 channels; only "
            "grayscale (1) and RGB (3) are supported. Drop an alpha channel first "
            "(e.g. X[..., :3])."
        )
    raise ValueError(
        f"{what.capitalize()} of shape {shape} has no channel axis of size 1 or 3. "
        f"{LAYOUT_HELP}"
    )


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


#: Default of ``max_image_pixels``: 16384 x 16384. Larger files are refused: a few
#: kB of PNG can declare gigapixels (a decompression bomb).
MAX_IMAGE_PIXELS = 2**28
#: Files above Pillow's own bomb threshold (~89 MP), which anomalib cannot read,
#: are decoded at a reduced scale (JPEG: in the DCT, others: box reduction) so a
#: line-scan image never sits decoded at full size as floats.
REDUCE_ABOVE_PIXELS = 89_478_485
_PILLOW_LIMIT = threading.Lock()


@contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """Pillow's bomb limit off (skdfm checks its own), under a lock: Pillow reads
    it from a module global when it opens and again when it loads some formats."""
    with _PILLOW_LIMIT:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _decode_error(name: str, exc: BaseException) -> ValueError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    # Pillow names the file object skdfm opened it through: name the file
    reason = re.sub(r"<_io\.BufferedReader name=(.*?)>", r"\1", reason)
    if reason.startswith("Cannot decode image file"):
        return ValueError(reason)
    return ValueError(f"Cannot decode image file {name!r}: {reason}")


#: What a path that is not a regular file is, by ``stat``'s file type.
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def file_kind(path) -> str | None:
    """None for a regular file (also through symlinks) or a path that cannot be
    stat'ed (missing, a dangling or looping link: opening it gives the reason);
    else what it is (``"a FIFO (named pipe)"``, ``"a character device"``, ...).
    Nothing is opened: reading a FIFO or a device can block forever or never end.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a file")


def _not_regular(name: str, kind: str) -> ValueError:
    return ValueError(
        f"Image file {name!r} is {kind}, not a regular file: not read (reading it "
        "could block forever or never end)"
    )


def _open_regular(path):
    """A binary file object of ``path``, refused unless it is a regular file:
    checked before opening, and again on the open file (opened non-blocking, so
    a FIFO swapped in meanwhile cannot block)."""
    name = os.fspath(path)
    kind = file_kind(path)
    if kind is not None:
        raise _not_regular(name, kind)
    handle = open(  # noqa: SIM115 (closed by open_image)
        path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)
    )
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise _not_regular(name, "not a regular file")
    return handle


@contextmanager
def open_image(path, max_pixels: int | None = MAX_IMAGE_PIXELS):
    """``Image.open`` with errors that name the file: FileNotFoundError, ValueError.

    Only regular files are opened (also through symlinks): a FIFO, a device or a
    socket is refused (ValueError) before it is opened, since reading one can
    block forever. Pillow's own decompression-bomb limit is replaced by
    ``max_pixels`` (None: no limit), checked from the header before any pixel is
    decoded.
    """
    name = os.fspath(path)
    handle = None
    try:
        handle = _open_regular(path)
        with _pillow_limit_lifted():
            image = Image.open(handle)
        with image:
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise ValueError(
                    f"Image file {name!r} is {image.width}x{image.height} = {pixels:,} "
                    f"pixels, more than max_image_pixels={max_pixels:,} (a guard "
                    "against decompression bombs); raise max_image_pixels if the "
                    "file is trusted."
                )
            yield image
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {name!r}") from None
    except ValueError as exc:
        if str(exc).startswith(f"Image file {name!r}"):
            raise
        raise _decode_error(name, exc) from exc
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise _decode_error(name, exc) from exc
    except MemoryError as exc:
        raise _out_of_memory(name, "decoding") from exc
    finally:
        if handle is not None:
            handle.close()


#: What allocators say when memory runs out: torch on the CPU and on CUDA,
#: onnxruntime, OpenVINO (C++ ``std::bad_alloc``).
_OUT_OF_MEMORY_TEXTS = (
    "can't allocate memory",
    "out of memory",
    "failed to allocate memory",
    "bad_alloc",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: MemoryError (numpy, Pillow), or an
    engine's error saying so (torch's ``can't allocate memory`` / CUDA ``out of
    memory``, onnxruntime's ``Failed to allocate memory``, ``std::bad_alloc``)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return any(words in text for words in _OUT_OF_MEMORY_TEXTS)


def _out_of_memory(name: str, doing: str) -> MemoryError:
    return MemoryError(
        f"Image file {name!r}: out of memory while {doing} it; lower "
        "max_image_pixels (--max-image-pixels) to refuse such files up front, or "
        "reduce the batch size"
    )


#: Pillow's modes of 16-bit single-channel images (16-bit PNG and TIFF from
#: industrial cameras): read as 0..65535, like a numpy uint16 array.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


#: The attribute where a decoded 16-bit colour file keeps its full-precision pixels
#: (Pillow has no 16-bit RGB mode; the image holds their top 8 bits, for display).
#: An attribute, not ``info``: Pillow copies ``info`` into every derived image
#: (flipped, converted), whose pixels are then other ones.
UINT16_PIXELS = "skdfm_uint16_pixels"
#: The attribute where an image decoded at a reduced scale keeps the file's own
#: ``(height, width)``: maps and masks are at that size.
ORIGINAL_SIZE = "skdfm_original_size"
_warned_sixteen_bit = False


def _is_sixteen_bit_colour(image: Image.Image) -> bool:
    """A 16-bit-per-channel RGB(A) PNG or TIFF, which Pillow reads as 8-bit."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    for tile in image.tile:
        rawmode = tile.args[0] if isinstance(tile.args, tuple) else tile.args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _sixteen_bit_colour_pixels(path) -> np.ndarray | None:
    """(H, W, 3) uint16 pixels, with imagecodecs (the ``16bit`` extra); None and a
    warning, once, without it."""
    global _warned_sixteen_bit
    try:
        import imagecodecs
    except ImportError:
        if not _warned_sixteen_bit:
            _warned_sixteen_bit = True
            warnings.warn(
                f"{os.fspath(path)!r} is a 16-bit colour image, which Pillow reads "
                "with 8 bits per channel (up to 1/255 from the 16-bit values a uint16 "
                "array gives). pip install 'skdfm[16bit]' (imagecodecs) to read such "
                "files at full precision.",
                UserWarning,
                stacklevel=4,
            )
        return None
    codec = "png" if Path(path).suffix.lower() == ".png" else "tiff"
    try:
        pixels = imagecodecs.imread(os.fspath(path), codec=codec)
    except Exception as exc:  # imagecodecs raises its own error classes
        raise _decode_error(os.fspath(path), exc) from exc
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        return None
    return np.ascontiguousarray(pixels[..., :3])


#: Pillow's modes of 32-bit single-channel images (TIFF): floats (``"F"``) and
#: signed integers (``"I"``), which ``convert("RGB")`` would clip to black or white.
#: They are read as 16-bit: floats must lie in [0, 1] (as float arrays must) and
#: are scaled to 0..65535; integers must lie in 0..65535 (16-bit data in a 32-bit
#: file) and are read as they are. Other values are refused, naming the file.
THIRTY_TWO_BIT_MODES = frozenset({"F", "I"})
#: Modes reduced before the RGB conversion (equal results, the full-size image is
#: held once, in its own mode); others are converted first.
_REDUCE_FIRST_MODES = frozenset({"L", "LA", "RGB", "RGBA", "F", "I"})


def _reduction(pixels: int) -> int:
    return math.ceil(math.sqrt(pixels / REDUCE_ABOVE_PIXELS))


def _thirty_two_bit_as_sixteen(name: str, image: Image.Image) -> Image.Image:
    """A loaded 32-bit image (mode ``"F"`` or ``"I"``) as a 16-bit one (``"I;16"``);
    a ValueError naming the file for values that have no 16-bit reading."""
    pixels = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(pixels).all():
            found = "NaN or infinite pixels"
        elif pixels.min() < 0 or pixels.max() > 1:
            found = f"pixels in [{pixels.min():.6g}, {pixels.max():.6g}]"
        else:
            found = None
        if found is not None:
            raise ValueError(
                f"Image file {name!r} is a 32-bit float image with {found}; float "
                "images must lie in [0, 1] (as float arrays must): rescale it, or "
                "save it as 8- or 16-bit."
            )
        return Image.fromarray(np.round(pixels * 65535.0).astype(np.uint16))
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(
            f"Image file {name!r} is a 32-bit integer image with pixels in [{low}, "
            f"{high}]; skdfm reads 32-bit integer files as 16-bit data (0..65535): "
            "rescale it, or save it as 8- or 16-bit."
        )
    return Image.fromarray(pixels.astype(np.uint16))


def decode_image_file(path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file as anomalib does (Pillow, ``convert("RGB")``): a loaded
    RGB PIL image; 16-bit grayscale files stay 16-bit (mode ``"I;16"``), since
    ``convert("RGB")`` would saturate them to white; 32-bit grayscale TIFFs are read
    as 16-bit (see :data:`THIRTY_TWO_BIT_MODES`); 16-bit colour PNG/TIFF files
    keep their 16-bit pixels in the image's ``info`` (read with imagecodecs, the
    ``16bit`` extra), which the transformer uses. Files above
    :data:`REDUCE_ABOVE_PIXELS` are decoded at a reduced scale (JPEG in the DCT,
    others reduced before any copy is made). Only regular files are read. Errors
    name the file (see :func:`open_image`)."""
    name = os.fspath(path)
    with open_image(path, max_pixels) as image:
        size = (image.height, image.width)
        if _is_sixteen_bit_colour(image):
            full = _sixteen_bit_colour_pixels(path)
            if full is not None and full.shape[:2] == size:
                decoded = image.convert("RGB")  # 8 bits: for display and sizes
                setattr(decoded, UINT16_PIXELS, full)
                return decoded
        factor = _reduction(size[0] * size[1])
        if factor > 1 and image.format == "JPEG":
            # JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT, never below this.
            image.draft("RGB", (image.width // factor, image.height // factor))
            factor = _reduction(image.width * image.height)
        # Some formats (TIFF) check Pillow's limit again when they load.
        limit = Image.MAX_IMAGE_PIXELS
        lift = limit is not None and size[0] * size[1] > limit
        try:
            with _pillow_limit_lifted() if lift else nullcontext():
                image.load()
                if image.mode in SIXTEEN_BIT_MODES:
                    decoded = image.copy()
                else:
                    reduce_first = factor > 1 and image.mode in _REDUCE_FIRST_MODES
                    source = image.reduce(factor) if reduce_first else image
                    if image.mode in THIRTY_TWO_BIT_MODES:
                        decoded = _thirty_two_bit_as_sixteen(name, source)
                    else:
                        decoded = source.convert("RGB")
                    if not reduce_first and factor > 1 and decoded.mode == "RGB":
                        decoded = decoded.reduce(factor)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if str(exc).startswith(f"Image file {name!r}"):
                raise
            raise _decode_error(name, exc) from exc
    if (decoded.height, decoded.width) != size:
        setattr(decoded, ORIGINAL_SIZE, size)
    return decoded


def original_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of the file a PIL image was decoded from (also when
    :func:`decode_image_file` reduced it), else of the image itself."""
    return getattr(image, ORIGINAL_SIZE, (image.height, image.width))


def read_image_size(path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header only, with the errors
    of :func:`read_image_file`."""
    with open_image(path, max_pixels) as image:
        return (image.height, image.width)


def batch_channel_axis(shape: tuple[int, ...]):
    """The channel axis (1 or 3) of a batch array of ``shape``, or None for N
    grayscale images (N, H, W); a clear error for any other or ambiguous shape."""
    if len(shape) == 2:
        raise ValueError(
            f"X is a 2-D array of shape {shape}, but images are expected: a batch of "
            f"images needs 3 or 4 dimensions (one grayscale image: X[None]). "
            f"{LAYOUT_HELP}"
        )
    if len(shape) not in (3, 4):
        raise ValueError(
            f"X has {len(shape)} dimensions (shape {shape}); expected 3 or 4. "
            f"{LAYOUT_HELP}"
        )
    if shape[0] == 0:
        raise ValueError("X contains no images (0 samples); at least 1 is required.")
    if len(shape) == 3:
        if shape[-1] <= 4:
            raise ValueError(
                f"Ambiguous array of shape {shape}: 3-D arrays are read as N "
                f"grayscale images (N, H, W), but a width of {shape[-1]} looks like "
                "the channels of one image; for one image pass X[None]."
            )
        if shape[0] == 3:
            raise ValueError(
                f"Ambiguous array of shape {shape}: three grayscale images (N, H, "
                "W) or one colour image (C, H, W), as torchvision lays it out? Pass "
                "one colour image as X[None] (1, 3, H, W), three grayscale images "
                "as X[:, None] (3, 1, H, W)."
            )
        axis = None
    else:
        axis = channel_axis(shape, (1, 3), "array")
    if min(shape) == 0:
        raise ValueError(f"X has an empty image dimension (shape {shape}).")
    return axis


def pil_pixels(image: Image.Image) -> np.ndarray:
    """The pixels of a decoded image: (H, W) uint16 for 16-bit grayscale (native
    byte order), (H, W, 3) uint16 for a 16-bit colour file read at full precision,
    else (H, W, 3) uint8 RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        return np.array(image).astype(np.uint16)
    full = getattr(image, UINT16_PIXELS, None)
    if isinstance(full, np.ndarray) and full.shape[:2] == (image.height, image.width):
        return full
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _folder_key(path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def image_files_below(folder) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files at any depth below ``folder``, sorted, and ``(folder, reason)``
    of the folders that could not be listed.

    Symlinked folders are followed, and every real folder is searched once: a
    folder of the tree is searched by its own path (a link to it, or to an
    ancestor, is not entered: no loop, no duplicate), a folder outside the tree by
    the first link to it. Every entry with an image suffix that is not a folder is
    kept, also symlinks (broken or looping ones too), FIFOs and devices: readers
    refuse those without opening them (:func:`open_image`), so they are listed
    with the reason, never silently dropped.
    """
    folder = os.fspath(folder)
    # the tree's own folders, without following links: searched by their own path
    own = {_folder_key(top) for top, _, _ in os.walk(folder)}
    searched, found, problems = set(), [], []

    def unreadable(error: OSError) -> None:
        problems.append((error.filename or folder, f"cannot list it: {error.strerror}"))

    for top, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        key = _folder_key(top)
        searched.add(key)
        keep = []
        for name in sorted(folders):
            path = os.path.join(top, name)
            key = _folder_key(path)
            linked = os.path.islink(path)
            if key in searched or (linked and key in own):
                continue  # searched already, or by its own path
            searched.add(key)
            keep.append(name)
        folders[:] = keep
        found.extend(
            os.fspath(Path(top, name))  # "x.png", not "./x.png", below "."
            for name in names
            if Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found), problems


def one_ahead(function: Callable, arguments: Iterable) -> Iterator:
    """``map(function, arguments)``, each call made while the previous result is
    being used (one background thread; Pillow releases the GIL while decoding).
    Errors surface at the item they belong to."""
    arguments = list(arguments)
    if len(arguments) < 2:
        yield from map(function, arguments)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skdfm-decode") as pool:
        pending = pool.submit(function, arguments[0])
        for index in range(1, len(arguments) + 1):
            result = pending.result()
            if index < len(arguments):
                pending = pool.submit(function, arguments[index])
            yield result


@dataclass(frozen=True)
class FileBatch:
    """Files of one batch of :func:`read_image_files`, each decoded once."""

    paths: list  #: the files that decoded, in input order
    images: list  #: their RGB PIL images (:func:`decode_image_file`)
    failed: list  #: ``(path, reason)`` of the files that did not


def read_image_files(
    paths: Sequence, batch_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> Iterator[FileBatch]:
    """Decode files ``batch_size`` at a time, one batch ahead, skipping bad ones.

    For callers that must keep going past an unreadable file (the command line):
    a file that is missing, not a regular file, cannot be decoded or runs out of
    memory while decoding lands in ``failed`` with the reason, the others are
    decoded exactly once. The images are what
    ``DeepFeatureTransformer`` reads from the same files.
    """

    def decode(start):
        batch = FileBatch([], [], [])
        for path in paths[start : start + batch_size]:
            try:
                image = decode_image_file(path, max_pixels)
            except (OSError, ValueError, MemoryError) as error:
                batch.failed.append((path, str(error)))
            else:
                batch.paths.append(path)
                batch.images.append(image)
        return batch

    return one_ahead(decode, range(0, len(paths), batch_size))
