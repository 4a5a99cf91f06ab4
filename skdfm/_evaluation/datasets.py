"""Data sets: synthetic textured parts with defects and masks; the MVTec AD layout."""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.utils import Bunch, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from .._imaging.decode import image_files_below
from .._imaging.images import IMAGE_SUFFIXES, open_image, read_image_size

__all__ = [
    "load_mvtec",
    "make_defect_images",
    "read_mask",
    "read_mvtec_mask",
    "training_images",
    "validation_images",
]

TEXTURES = ("woven", "brushed", "grain")
DEFECTS = ("scratch", "crack", "stain", "hole")


def _texture(rng, kind: str, size: int) -> np.ndarray:
    """A (size, size) gray texture in about [0.2, 0.8], varying from part to part."""
    y, x = np.mgrid[:size, :size] / size
    if kind == "woven":
        freq = 40 * size / 128 * rng.uniform(0.95, 1.05)
        phase = rng.uniform(0, 2 * np.pi, 2)
        image = 0.5 + 0.18 * np.sin(freq * x + phase[0]) * np.sin(freq * y + phase[1])
        noise_sigma = 0.02
    elif kind == "brushed":
        streaks = ndimage.gaussian_filter(
            rng.normal(size=(size, size)), sigma=(0.6, size / 6)
        )
        image = 0.55 + 0.9 * streaks / (np.abs(streaks).max() + 1e-12) * 0.15
        noise_sigma = 0.015
    else:  # grain: smooth blotches at two scales, like leather or wood fibre board
        coarse = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 25)
        fine = ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.0)
        image = 0.5 + 0.12 * coarse / coarse.std() + 0.05 * fine / fine.std()
        noise_sigma = 0.01
    lighting = rng.uniform(0.9, 1.1) + 0.05 * (x - 0.5) * rng.uniform(-1, 1)
    return image * lighting + rng.normal(0, noise_sigma, image.shape)


def _curve_distance(points: np.ndarray, size: int) -> np.ndarray:
    """Distance of every pixel to a polyline sampled densely by ``points`` (n, 2)."""
    grid = np.stack(np.mgrid[:size, :size], axis=-1).reshape(-1, 1, 2)
    distance = np.full(size * size, np.inf)
    for start in range(0, len(points), 64):
        chunk = points[None, start : start + 64]
        distance = np.minimum(distance, np.linalg.norm(grid - chunk, axis=-1).min(1))
    return distance.reshape(size, size)


def _densify(vertices: np.ndarray) -> np.ndarray:
    steps = [
        np.linspace(a, b, max(2, int(np.ceil(np.linalg.norm(b - a) * 2))))
        for a, b in zip(vertices[:-1], vertices[1:], strict=True)
    ]
    return np.concatenate(steps)


def _defect(rng, kind: str, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Alpha (strength in [0, 1]) and target intensity change of one defect.

    Returns ``(alpha, mask, shift)``: the image becomes ``image + alpha * shift``
    (with a tint for stains); ``mask`` marks the visibly changed pixels.
    """
    centre = rng.uniform(0.25, 0.75, 2) * size
    if kind in ("scratch", "crack"):
        length = rng.uniform(0.25, 0.5) * size
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        if kind == "scratch":  # a smooth arc
            t = np.linspace(-0.5, 0.5, 40)[:, None]
            bend = rng.uniform(-0.15, 0.15) * length
            normal = np.array([-direction[1], direction[0]])
            vertices = centre + t * length * direction + (1 - 4 * t**2) * bend * normal
            width = rng.uniform(0.8, 1.6) * size / 128
        else:  # a jagged random walk
            n = 12
            steps = direction * length / n + rng.normal(0, length / n * 0.6, (n, 2))
            vertices = centre - direction * length / 2 + np.cumsum(steps, axis=0)
            vertices = np.vstack([centre - direction * length / 2, vertices])
            width = rng.uniform(0.7, 1.2) * size / 128
        distance = _curve_distance(_densify(vertices), size)
        alpha = np.exp(-((distance / width) ** 2))
        shift = rng.choice([-0.45, 0.35]) if kind == "scratch" else -0.45
        return alpha, alpha > 0.3, shift
    y, x = np.mgrid[:size, :size]
    radius = rng.uniform(0.05, 0.1) * size
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, np.pi)
    dy, dx = y - centre[0], x - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    if kind == "stain":  # soft, irregular blob
        wobble = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 32)
        r = np.hypot(u, v) / radius + 0.8 * wobble / (np.abs(wobble).max() + 1e-12)
        alpha = 1 / (1 + np.exp((r - 1.2) * 6))
        return alpha, alpha > 0.3, rng.choice([-0.25, 0.25])
    r = np.hypot(u, v) / radius  # hole: dark inside, a bright rim
    alpha = np.clip(1.5 - r, 0, 1) ** 0.5
    return alpha, r <= 1.0, -0.5


@validate_params(
    {
        "n_normal": [Interval(Integral, 0, None, closed="left")],
        "n_anomalous": [Interval(Integral, 0, None, closed="left")],
        "image_size": [Interval(Integral, 32, None, closed="left")],
        "texture": [StrOptions(set(TEXTURES))],
        "defects": [list, tuple],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_defect_images(
    n_normal=60,
    n_anomalous=30,
    *,
    image_size=128,
    texture="woven",
    defects=DEFECTS,
    shuffle=True,
    random_state=None,
):
    """Generate textured inspection images, some with defects, and their masks.

    Normal images are a texture (``"woven"`` fabric, ``"brushed"`` metal or
    ``"grain"``) whose phase, lighting and noise vary from part to part. An
    anomalous image also carries one defect drawn from ``defects``: a thin bright
    or dark ``"scratch"`` (a smooth arc), a jagged dark ``"crack"``, a soft tinted
    ``"stain"`` or a dark ``"hole"`` with a bright rim. The pixel mask marks where
    the defect visibly changes the image. The same ``random_state`` gives the
    same images on every machine.

    Parameters
    ----------
    n_normal : int, default=60
        Number of defect-free images.
    n_anomalous : int, default=30
        Number of images with one defect each.
    image_size : int, default=128
        Height and width of the square images (at least 32).
    texture : {"woven", "brushed", "grain"}, default="woven"
        The surface.
    defects : sequence of str, default=("scratch", "crack", "stain", "hole")
        The defect kinds to draw from, uniformly.
    shuffle : bool, default=True
        Shuffle the images; otherwise normal images come first.
    random_state : int, RandomState instance or None, default=None
        Determines everything drawn. Pass an int for reproducible output.

    Returns
    -------
    images : ndarray of shape (n_normal + n_anomalous, image_size, image_size, 3)
        RGB images, uint8.
    y : ndarray of shape (n_normal + n_anomalous,)
        ``1`` for a normal image, ``-1`` for an anomalous one (scikit-learn's
        outlier convention).
    masks : ndarray of shape (n_normal + n_anomalous, image_size, image_size)
        Boolean defect masks (all False for normal images).

    Examples
    --------
    >>> from skdfm import make_defect_images
    >>> images, y, masks = make_defect_images(4, 2, image_size=64, random_state=0)
    >>> images.shape, images.dtype, y.tolist()
    ((6, 64, 64, 3), dtype('uint8'), [-1, 1, 1, -1, 1, 1])
    >>> bool(masks[y == 1].any()), bool(masks[y == -1].any(axis=(1, 2)).all())
    (False, True)
    """
    unknown = sorted(set(defects) - set(DEFECTS))
    if unknown or len(defects) == 0:
        raise ValueError(
            f"defects={tuple(defects)!r} must be a non-empty sequence of "
            f"{DEFECTS}; unknown: {unknown}."
        )
    if n_normal + n_anomalous == 0:
        raise ValueError("n_normal + n_anomalous must be at least 1.")
    rng = check_random_state(random_state)
    n = n_normal + n_anomalous
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    masks = np.zeros((n, image_size, image_size), bool)
    y = np.r_[np.ones(n_normal, int), -np.ones(n_anomalous, int)]
    tint = np.array([1.0, 0.95, 0.85])
    for i in range(n):
        gray = _texture(rng, texture, image_size)
        rgb = gray[..., None] * tint
        if y[i] == -1:
            kind = defects[rng.randint(len(defects))]
            alpha, mask, shift = _defect(rng, kind, image_size)
            colour = np.array([1.0, 0.8, 0.5]) if kind == "stain" else np.ones(3)
            rgb = rgb + alpha[..., None] * shift * colour
            masks[i] = mask
        images[i] = np.round(np.clip(rgb, 0, 1) * 255)
    if shuffle:
        order = rng.permutation(n)
        images, y, masks = images[order], y[order], masks[order]
    return images, y, masks


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted: every entry with an image
    suffix that is not a folder, also broken symlinks, FIFOs and devices (a reader
    refuses those with the reason, without opening them: listed, never dropped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
    )


def _mask_of(image: Path, mask_folder: Path) -> Path:
    for suffix in (image.suffix, ".png"):
        candidate = mask_folder / f"{image.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"No ground-truth mask for {image}: expected {mask_folder / image.stem}"
        "_mask.png (MVTec AD layout: ground_truth/<defect>/<name>_mask.png)."
    )


def _split_listing(folder: Path, ground_truth: Path | None, missing_masks: str):
    """``(paths, y, kinds, mask_paths)`` of ``folder/<defect>/`` (``good``: normal);
    the masks looked for in ``ground_truth/<defect>/`` (None: no masks)."""
    paths, y, kinds, mask_paths = [], [], [], []
    for defect_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        kind = defect_dir.name
        for image in _image_files(defect_dir):
            paths.append(os.fspath(image))
            kinds.append(kind)
            y.append(1 if kind == "good" else -1)
            if kind == "good" or ground_truth is None:
                mask_paths.append(None)
                continue
            try:
                mask = os.fspath(_mask_of(image, ground_truth / kind))
            except FileNotFoundError:
                if missing_masks == "raise":
                    raise
                mask = None
            mask_paths.append(mask)
    if not paths:
        raise FileNotFoundError(f"No images found under {folder}/<defect>/.")
    return paths, y, kinds, mask_paths


def read_mask(path) -> np.ndarray:
    """A ground-truth mask file as a boolean array (True where the pixel is not 0);
    errors name the file."""
    with open_image(path) as mask:
        return np.asarray(mask.convert("L")) > 0


def load_mvtec(category_dir, *, split="test", load_masks=True, missing_masks="raise"):
    """Paths, labels and masks of one category in the MVTec AD folder layout.

    The layout is ``<category>/train/good/*.png``, ``<category>/test/<defect>/*.png``
    (``good`` for normal images) and
    ``<category>/ground_truth/<defect>/<name>_mask.png``. Nothing is downloaded:
    pass the folder of a category you have (e.g. ``mvtec_anomaly_detection/bottle``)
    or any folder laid out the same way.

    Parameters
    ----------
    category_dir : str or path-like
        The category folder.
    split : {"train", "test"}, default="test"
        Which split to list.
    load_masks : bool, default=True
        Read the masks (``split="test"`` only): boolean arrays of each image's size,
        all False for normal images. Otherwise ``masks`` is None.
    missing_masks : {"raise", "none"}, default="raise"
        A defective image without a mask file raises ``FileNotFoundError``, or gets
        ``None`` as its mask path (``"none"``, with ``load_masks=False``: for
        callers that skip such images and say so).

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        ``paths`` (list of str, sorted by defect type then name), ``y`` (ndarray
        of int, ``1`` normal, ``-1`` defective), ``defect_type`` (list of str,
        ``"good"`` for normal images), ``mask_paths`` (list of str or None) and
        ``masks`` (list of bool ndarrays, or None).

    Raises
    ------
    FileNotFoundError
        When the folder, the split or a defect's mask is missing.
    """
    root = Path(category_dir)
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'.")
    if missing_masks not in ("raise", "none") or (
        missing_masks == "none" and load_masks
    ):
        raise ValueError(
            f"missing_masks={missing_masks!r} must be 'raise', or 'none' with "
            "load_masks=False."
        )
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; {root} does not look like an MVTec AD "
            "category (expected train/good, test/<defect>, ground_truth/<defect>)."
        )
    paths, y, kinds, mask_paths = _split_listing(
        folder, root / "ground_truth" if split == "test" else None, missing_masks
    )
    masks = None
    if load_masks and split == "test":
        masks = [
            read_mask(m) if m else np.zeros(read_image_size(p), bool)
            for p, m in zip(paths, mask_paths, strict=True)
        ]
    return Bunch(
        paths=paths,
        y=np.asarray(y, int),
        defect_type=kinds,
        mask_paths=mask_paths,
        masks=masks,
    )


def read_mvtec_mask(data, index: int, size: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask of image ``index`` of an MVTec category.

    For callers that keep going past a defective image without a usable mask
    (``skdfm evaluate`` leaves it out of the pixel metrics only): each reason is
    a ``ValueError`` naming it.

    Parameters
    ----------
    data : Bunch
        :func:`load_mvtec`'s result (``load_masks=False, missing_masks="none"``
        lists the images without reading a mask).
    index : int
        The image, in ``data.paths``.
    size : tuple of (int, int)
        ``(height, width)`` of the image file (a decoded image's original size).

    Returns
    -------
    mask : ndarray of bool of shape ``size``
        True on defective pixels; all False for a good image.

    Raises
    ------
    ValueError
        The mask file is missing, cannot be read, or is not of ``size``.
    """
    size = tuple(size)
    if data.y[index] == 1:
        return np.zeros(size, bool)
    path = data.mask_paths[index]
    if path is None:
        raise ValueError(
            "no ground-truth mask (expected ground_truth/<defect>/<name>_mask.png)"
        )
    try:
        mask = read_mask(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"unreadable mask: {error}") from error
    if mask.shape != size:
        raise ValueError(
            f"its mask {path} is {mask.shape[0]}x{mask.shape[1]}, the image "
            f"{size[0]}x{size[1]}"
        )
    return mask


#: What to pass instead of a folder that mixes kinds of images.
_TRAINING_ADVICE = (
    "pass an MVTec AD category (its train/good is used), CATEGORY/train/good, or a "
    "folder of good images only"
)


def _images_below(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files at any depth below ``folder``, sorted, and the folders that
    could not be listed: symlinked folders followed, each real folder once; also
    broken symlinks, pipes and devices, which a reader lists as unreadable
    (:func:`~skdfm._imaging.decode.image_files_below`)."""
    return image_files_below(folder)


def _check_good_images_only(root: Path, files: list[str]) -> None:
    """Refuse a folder whose tree has the marks of the MVTec AD layout: a split
    (``train``, ``test``), ground-truth masks, or ``good/`` beside other folders
    of images (good and defective images side by side)."""

    def refuse(why: str):
        raise ValueError(f"{root}: {why}; {_TRAINING_ADVICE}")

    if root.name == "ground_truth":
        refuse("holds ground-truth masks (ground_truth/), not training images")
    if (root / "train").is_dir():
        refuse("has train/ without train/good (the MVTec AD training images)")
    for name in ("test", "ground_truth"):
        if (root / name).is_dir():
            refuse(
                f"has {name}/ but no train/good: it looks like an MVTec AD category "
                "without its training images"
            )
    # every folder below root that holds images (at any depth), as relative parts
    holding = {Path(f).relative_to(root).parent.parts for f in files}
    holding = {parts[:n] for parts in holding for n in range(len(parts) + 1)}
    for parts in sorted(holding):
        if parts and parts[-1] in ("train", "test", "ground_truth"):
            refuse(
                f"holds {Path(*parts)}/ (an MVTec AD split or its masks) among its "
                "images"
            )
        children = sorted(c[-1] for c in holding if c[:-1] == parts and c != parts)
        if "good" in children and len(children) > 1:
            others = ", ".join(f"{c}/" for c in children if c != "good")
            where = f"{Path(*parts)}/" if parts else "it"
            refuse(
                f"{where} holds good/ beside {others} (the layout of a test split: "
                "good and defective images)"
            )


def training_images(folder) -> Bunch:
    """The good images to fit on in a folder: an MVTec AD category's ``train/good``,
    or a folder (tree) of good images.

    The rule of ``skdfm fit``, so that defective images and masks never become
    training images:

    * a folder with ``train/good`` is an MVTec AD category: the images of
      ``train/good`` are taken (at any depth), ``test/`` and ``ground_truth/``
      never;
    * any other folder is a folder of good images: every image file in its tree
      (subfolders, e.g. one per day or per camera, are searched; symlinked
      folders are followed, each real folder once), unless the tree
      has the marks of the MVTec AD layout, which are refused: ``train/`` without
      ``good``, ``test/`` or ``ground_truth/`` (at any depth), or a ``good/``
      folder beside other folders of images (``good/`` and ``scratch/`` side by
      side: a test split). Defect folders named otherwise cannot be told from
      good ones: keep them out of the folder.

    Nothing is decoded; the file names alone decide. Files that are not regular
    files (FIFOs, devices, broken symlinks) are kept in ``paths``: a reader refuses
    them, without opening them, and says why.

    Parameters
    ----------
    folder : str or path-like
        The category folder, or a folder of good images.

    Returns
    -------
    images : :class:`~sklearn.utils.Bunch`
        ``paths`` (list of str, sorted; may be empty), ``unlisted`` (list of
        ``(folder, reason)``: folders of the tree that could not be listed),
        ``layout`` (``"mvtec"`` or ``"folder"``), ``folder`` (str, the folder the
        images were taken from) and ``description`` (str, what was taken, for messages).

    Raises
    ------
    FileNotFoundError
        ``folder`` is not a folder.
    ValueError
        The folder mixes kinds of images (the message says what to pass).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from skdfm import training_images
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("train/good/000.png", "test/good/000.png",
    ...              "test/crack/000.png", "ground_truth/crack/000_mask.png"):
    ...     (root / name).parent.mkdir(parents=True, exist_ok=True)
    ...     Image.new("RGB", (8, 8)).save(root / name)
    >>> images = training_images(root)
    >>> images.layout, [pathlib.Path(p).relative_to(root).as_posix()
    ...                 for p in images.paths]
    ('mvtec', ['train/good/000.png'])
    >>> training_images(root / "test")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...test: it holds good/ beside crack/ (the layout of a test split: ...
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    good = root / "train" / "good"
    if good.is_dir():
        files, unlisted = _images_below(good)
        _check_good_images_only(good, files)
        return Bunch(
            paths=files,
            unlisted=unlisted,
            layout="mvtec",
            folder=os.fspath(good),
            description=f"{good} (the MVTec AD category's train/good; test/ and "
            "ground_truth/ not used)",
        )
    files, unlisted = _images_below(root)
    _check_good_images_only(root, files)
    return Bunch(
        paths=files,
        unlisted=unlisted,
        layout="folder",
        folder=os.fspath(root),
        description=f"{root} (a folder of good images, searched recursively)",
    )


def validation_images(folder) -> Bunch:
    """Labelled validation images in the MVTec AD layout, for F1 thresholds.

    ``folder`` is a category (its ``test/<defect>/`` images, ``good`` for normal
    ones, and the masks of ``ground_truth/<defect>/``) or a test split itself
    (``good/`` beside defect folders; the masks of a ``ground_truth/`` folder
    beside it when it is named ``test``). Image files directly in the split are
    not labelled and left out. Nothing is decoded.

    Parameters
    ----------
    folder : str or path-like

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        What :func:`load_mvtec` gives with ``load_masks=False,
        missing_masks="none"`` (``paths``, ``y``, ``defect_type``,
        ``mask_paths``, ``masks=None``; :func:`read_mvtec_mask` reads a mask),
        plus ``has_masks`` (a ``ground_truth`` folder was found), ``n_good``,
        ``n_defective`` and ``description`` (str, for messages).

    Raises
    ------
    FileNotFoundError
        ``folder`` is not a folder, or holds no labelled image.
    ValueError
        No good or no defective image: the F1 threshold needs both.
    """
    root = Path(folder)
    if (root / "test").is_dir():
        split, truth = root / "test", root / "ground_truth"
    elif root.is_dir():
        split = root
        truth = root.parent / "ground_truth" if root.name == "test" else None
    else:
        raise FileNotFoundError(f"{folder} is not a folder")
    has_masks = truth is not None and truth.is_dir()
    try:
        paths, y, kinds, mask_paths = _split_listing(
            split, truth if has_masks else None, "none"
        )
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder}: no labelled images: expected an MVTec AD category "
            "(test/good/ and test/<defect>/) or a test split (good/ beside defect "
            "folders)"
        ) from None
    y = np.asarray(y, int)
    n_good, n_defective = int(np.sum(y == 1)), int(np.sum(y == -1))
    if not n_good or not n_defective:
        missing = "good (good/)" if not n_good else "defective (<defect>/)"
        raise ValueError(
            f"{folder}: {n_good} good and {n_defective} defective images under "
            f"{split}: the F1 threshold needs {missing} images too (an MVTec AD "
            "test split: good/ beside defect folders)"
        )
    truth_text = f", masks in {truth}" if has_masks else ", no ground_truth masks"
    return Bunch(
        paths=paths,
        y=y,
        defect_type=kinds,
        mask_paths=mask_paths,
        masks=None,
        has_masks=has_masks,
        n_good=n_good,
        n_defective=n_defective,
        description=f"{split}{truth_text}",
    )
