"""DeepFeatureTransformer: pooled timm CNN features of images, one row per image."""

from __future__ import annotations

import os
import reprlib
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._cache import FeatureCache, weights_digest
from ._core.device import DeviceMixin, resolve_device
from ._core.memory import check_fits_in_memory
from ._core.persistence import (
    OPTIONAL,
    FittedAttribute,
    PersistenceMixin,
    check_fitted,
)
from ._core.validation import (
    a_string,
    finite_floats,
    layer_names,
    positive_ints,
    reject_bools,
)
from ._imaging.allocator import keep_freed_memory
from ._imaging.backbone import (
    backbone_state,
    build_backbone,
    layer_name,
    rebuild_backbone,
    weights_source,
)
from ._imaging.features import with_feature_shape
from ._imaging.images import MAX_IMAGE_PIXELS, as_image_collection, model_input

__all__ = ["TRANSFORMER_ATTRIBUTES", "DeepFeatureTransformer", "pool_feature_maps"]

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Parameters that decide what the features are: after fit, the fitted values are
#: used, and a changed one is an error until the next fit.
_FEATURE_PARAMS = (
    "backbone",
    "layer",
    "input_size",
    "pooling_kernel_size",
    "precision",
)
_PRECISIONS = ("float32", *_AUTOCAST_DTYPES)


def _feature_params(name, value, sizes):
    """The recorded feature parameters: known names, values fit accepts."""

    def kernel(v):
        return isinstance(v, Integral) and not isinstance(v, bool) and v >= 1

    if not (
        isinstance(value, dict)
        and "backbone" in value
        and set(value) <= set(_FEATURE_PARAMS)
        and isinstance(value["backbone"], str)
        and kernel(value.get("pooling_kernel_size", 1))
        and value.get("precision", "float32") in _PRECISIONS
    ):
        raise ValueError(
            f"{name} is not a dict of {', '.join(_FEATURE_PARAMS)} holding values "
            "fit accepts."
        )
    return value


#: Every fitted attribute, all set by fit (the ``.skdfm`` allow-list reads it; the
#: class docstring documents each; ``_check_state`` checks them on load, with the
#: check each row names).
TRANSFORMER_ATTRIBUTES = (
    # checked by rebuilding the network from them (and, in a model file, by
    # weights_digest_), after the rest is checked
    FittedAttribute("backbone_", "fit", default=OPTIONAL),
    FittedAttribute("layer_", "fit", layer_names),
    FittedAttribute("feature_shape_", "fit", positive_ints(3)),
    FittedAttribute("input_size_", "fit", positive_ints(2)),
    FittedAttribute("image_mean_", "fit", finite_floats(3)),
    # images are divided by it
    FittedAttribute("image_std_", "fit", finite_floats(3, positive=True)),
    FittedAttribute("device_", "fit"),
    # skdfm 0.1.0 did not record these: __setstate__ computes them
    FittedAttribute("weights_digest_", "fit", a_string, default=OPTIONAL),
    FittedAttribute("weights_source_", "fit", a_string, default=OPTIONAL),
    FittedAttribute("feature_params_", "fit", _feature_params, default=OPTIONAL),
)
#: ``weights_source_`` of a model saved before skdfm recorded it.
_SOURCE_NOT_RECORDED = "not recorded (saved by an skdfm that did not record it)"


def pool_feature_maps(feature_maps, kernel: int) -> torch.Tensor:
    """The pooled (N, C, h, w) float32 map of one or several layers' maps: the
    transformer's rows before flattening (also what exported graphs compute)."""
    if len(feature_maps) == 1:
        feature_map = feature_maps[0].float()
        return F.avg_pool2d(feature_map, kernel) if kernel > 1 else feature_map
    return torch.cat(_common_grid(feature_maps, kernel), dim=1)


def _common_grid(feature_maps, kernel: int) -> list[torch.Tensor]:
    """Float32 maps of several layers average-pooled onto one grid.

    The coarsest map (rows h, columns w) is pooled by ``kernel`` as a single layer
    is, which drops trailing rows and columns that do not fill a kernel: its grid,
    ``(h // kernel, w // kernel)``, covers the first ``grid * kernel / h`` of the
    image. Every finer map is cropped to that same region and pooled onto that
    grid, with a plain kernel when the region divides (a resnet layer2 map, twice
    as fine as layer3: twice ``kernel``), else by adaptive average pooling.
    """
    rows = min(m.shape[2] for m in feature_maps)
    cols = min(m.shape[3] for m in feature_maps)
    grid = (rows // kernel, cols // kernel)
    pooled = []
    for feature_map in feature_maps:
        feature_map = feature_map.float()
        height, width = feature_map.shape[2:]
        if (height, width) == (rows, cols):
            pooled.append(
                F.avg_pool2d(feature_map, kernel) if kernel > 1 else feature_map
            )
            continue
        crop = (
            round(grid[0] * kernel * height / rows),
            round(grid[1] * kernel * width / cols),
        )
        feature_map = feature_map[:, :, : crop[0], : crop[1]]
        if crop[0] % grid[0] == 0 and crop[1] % grid[1] == 0:
            feature_map = F.avg_pool2d(
                feature_map, (crop[0] // grid[0], crop[1] // grid[1])
            )
        else:
            feature_map = F.adaptive_avg_pool2d(feature_map, grid)
        pooled.append(feature_map)
    return pooled


class DeepFeatureTransformer(
    DeviceMixin, PersistenceMixin, TransformerMixin, BaseEstimator
):
    """Pooled features of a pretrained CNN: images in, one feature row per image.

    Each image is turned into RGB floats in [0, 1], resized to ``input_size``
    (bilinear, anti-aliased, aspect ratio not kept), normalised with the
    backbone's own mean and standard deviation, run through a timm backbone cut
    after ``layer``, average-pooled with a ``pooling_kernel_size`` kernel and
    flattened in (channel, row, column) order. This is the feature extractor of
    anomalib's DFM model; pair it with :class:`~skdfm.DFMDetector`.

    Parameters
    ----------
    backbone : str, default="resnet50"
        A timm model name, optionally with a weight tag (``"resnet18.tv_in1k"``).
        Untagged ``"resnet50"`` means timm's default ``resnet50.a1_in1k`` weights,
        as in anomalib.
    layer : str, int or list of them, default="layer3"
        The feature layer to keep, by its name in the model's
        ``feature_info`` (ResNets: ``"act1"``, ``"layer1"`` ... ``"layer4"``) or
        its index there. Nothing past it is built or computed. A list keeps
        several layers from one forward pass, on one grid (see Notes).
    pretrained : bool, default=True
        Load timm's pretrained weights (from the local cache when present,
        otherwise downloaded). anomalib calls this switch ``pre_trained``.
        ``False`` gives random weights (seeded by ``random_state``), for tests and
        experiments only.
    checkpoint_path : str or path-like, default=None
        A local checkpoint of the full timm model (``model.safetensors`` or a
        saved ``state_dict``), loaded instead of downloading: the way to use
        pretrained weights on a machine without network. Requires
        ``pretrained=True``.
    pooling_kernel_size : int, default=4
        Kernel and stride of the average pooling of the feature map; trailing
        rows and columns that do not fill a kernel are dropped. ``1`` keeps the
        map as is.
    input_size : int or tuple of (int, int), default=256
        Size every image is resized to, as ``size`` or ``(height, width)``.
    batch_size : int, default=16
        Images decoded and run through the backbone at a time. Only memory and
        speed depend on it (measured in :doc:`/performance`; GPUs want larger
        batches).
    device : str or torch.device, default="auto"
        ``"auto"`` (the current CUDA device when available, else CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``. Resolved at fit into ``device_``.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        ``"bfloat16"`` or ``"float16"`` run the backbone under torch autocast:
        faster on GPUs and on CPUs with bf16 units, but the features change
        (see Notes). Pooling and the output stay float32.
    channels_last : bool, default=True
        Run the backbone in channels-last memory format, faster for convolutions
        on CPU and on tensor-core GPUs (see :doc:`/performance`); features equal
        NCHW ones (anomalib's) up to rounding. ``False`` runs NCHW. Either way the
        layout is fixed by this parameter, never by the layout of the input.
    output : {"numpy", "torch"}, default="numpy"
        What ``transform`` returns: a float32 numpy array, or a float32 tensor on
        ``device_``. With ``"torch"`` on a GPU, the features of a
        ``Pipeline(DeepFeatureTransformer, DFMDetector)`` stay on the GPU from the
        backbone into the detector (no copy to the host and back).
    progress : bool, default=False
        Show a tqdm progress bar over batches in ``transform``.
    random_state : int, RandomState instance or None, default=None
        Seeds the random weights when ``pretrained=False``; ignored otherwise.
    max_image_pixels : int or None, default=2**28
        Image files with more pixels (width x height, from the header) are
        refused with an error naming the file, before any pixel is decoded: a
        guard against decompression bombs that replaces Pillow's lower one, so
        line-scan images up to 16384 x 16384 are read. Files above Pillow's own
        threshold (~89 MP), which anomalib cannot read, are decoded at a reduced
        scale before the usual resize. None: no limit.
    cache : FeatureCache or None, default=None
        Reuse the features of images already seen with the same backbone,
        weights, layer and preprocessing (see :class:`~skdfm.FeatureCache`): with
        one cache shared by a grid search, each image runs through the backbone
        once per layer. Outputs are identical with and without it.

    Attributes
    ----------
    backbone_ : torch.nn.Module
        The truncated backbone, in eval mode, on ``device_``. Pickles carry its
        weights as CPU arrays.
    layer_ : str or tuple of str
        Name of the feature layer; for a list, the names in network order.
    feature_shape_ : tuple of (int, int, int)
        ``(channels, rows, columns)`` of the pooled feature map; a row of
        ``transform`` is this map flattened in C order, so it has
        ``prod(feature_shape_)`` entries.
    input_size_ : tuple of (int, int)
        ``(height, width)`` images are resized to.
    image_mean_, image_std_ : tuple of 3 floats
        The backbone's normalisation (from its timm pretrained config).
    device_ : str
        The device the backbone runs on. A model loaded on a machine without that
        device moves to ``"cpu"`` with a :class:`~skdfm.DeviceWarning`.
    weights_digest_ : str
        A digest of the truncated backbone's weights (every parameter and
        buffer), computed once at fit: equal digests, equal weights. Part of the
        key of :class:`~skdfm.FeatureCache`.
    weights_source_ : str
        Where the weights came from: ``"random init (seed N)"``, timm's
        pretrained weights (``"timm pretrained <name>: <file or hub id>"``), or
        a checkpoint (the origin it records, e.g. the offline EfficientNet-Lite0
        of :func:`~skdfm.offline_weights` with its SHA-256, else
        ``"checkpoint <file name>"``). With ``weights_digest_`` it says whether
        two models were built alike on machines with and without network.
    feature_params_ : dict
        The values of ``backbone``, ``layer``, ``input_size``,
        ``pooling_kernel_size`` and ``precision`` at fit: what the features are
        made with. Changing one of these parameters afterwards makes
        ``transform`` raise ``NotFittedError`` until the next ``fit``.

    See Also
    --------
    DFMDetector : The DFM head that scores these features.

    Notes
    -----
    **Accepted images.** ``X`` may be

    - a numpy array or torch tensor of shape ``(N, H, W)`` (grayscale),
      ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``C`` 1 or 3: the channel axis is
      the one of axes 1 and 3 whose size is 1 or 3; if both are, the array is
      ambiguous and rejected. A 3-D array whose last axis has 4 or fewer entries,
      or whose first axis is 3, is rejected as ambiguous too: one colour image,
      ``(H, W, 3)`` or ``(3, H, W)``, is never read as three grayscale ones (pass
      it as ``X[None]``; three grayscale images as ``X[:, None]``);
    - a list (or other sequence) of file paths, decoded with Pillow's
      ``convert("RGB")`` as anomalib does (palettes expanded, grayscale
      replicated, alpha dropped, EXIF orientation not applied; 16-bit grayscale
      files are read as 0..65535, like uint16 arrays, and 16-bit colour files
      too with the ``16bit`` extra), one batch at a time;
    - a list of PIL images (converted the same way), or of single-image arrays
      or tensors ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``; sizes may differ.

    ``uint8`` (and numpy ``uint16``) pixels are scaled by their dtype's maximum;
    float pixels must be finite and within [0, 1]. Grayscale is replicated to
    RGB. Two or four channels, other dtypes, and lists mixing element kinds are
    errors.

    **Several layers.** With ``layer=["layer2", "layer3"]`` the backbone runs
    once, cut after the deepest layer, and each layer's map is average-pooled onto
    one grid: the coarsest map pooled by ``pooling_kernel_size`` (as for one
    layer, trailing rows and columns that do not fill a kernel dropped), finer
    maps cropped to the image region that grid covers and pooled onto it (a
    resnet layer2 map, twice as fine as layer3, by twice the kernel; by adaptive
    average pooling where the region does not divide). The rows then equal a
    ``FeatureUnion`` of one transformer per layer with those kernels, from one
    forward pass instead of one per layer. The channels are stacked in network
    order, so a row is a ``(C2 + C3, h, w)`` map: every
    cell describes one image region at every depth, anomaly maps and
    ``image_score="max"`` keep their meaning, and the row is no wider than the
    channels times the coarse grid. (Upsampling the coarse map to the fine grid
    instead would make rows 4x wider and the PCA up to 16x dearer, with
    interpolated values that add no information.)

    **Speed and precision options** (measured in :doc:`/performance`).
    ``channels_last`` changes features by rounding only (<= 3e-7 relative on
    resnet18/resnet50). On glibc Linux the first CPU ``transform`` tunes malloc to
    keep freed memory in the heap; set the environment variable
    ``SKDFM_KEEP_FREED_MEMORY=0`` to keep glibc's defaults.
    ``precision="bfloat16"`` keeps about 3 significant digits per activation:
    features moved by about 3e-3 relative (float16: 4e-4); scores are then not
    comparable with float32 ones, so fit and score with the same setting. It pays
    on GPUs and on CPUs with native bf16 (AVX-512 BF16, AMX); on a CPU without,
    it is several times slower.

    **Weights offline.** When the weights are neither cached nor downloadable,
    ``fit`` raises :class:`OSError` at once (no retry loop) and says how to pass
    ``checkpoint_path``.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DeepFeatureTransformer
    >>> images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), "uint8")
    >>> tr = DeepFeatureTransformer(backbone="resnet18", pretrained=False,
    ...                             input_size=64, device="cpu", random_state=0)
    >>> tr.fit_transform(images).shape
    (2, 256)
    >>> tr.feature_shape_
    (256, 1, 1)
    """

    _parameter_constraints: dict = {
        "backbone": [str],
        "layer": [str, Interval(Integral, 0, None, closed="left"), list, tuple],
        "pretrained": ["boolean"],
        "checkpoint_path": [str, os.PathLike, None],
        "pooling_kernel_size": [Interval(Integral, 1, None, closed="left")],
        "input_size": [Interval(Integral, 1, None, closed="left"), tuple],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "precision": [StrOptions({"float32", "bfloat16", "float16"})],
        "channels_last": ["boolean"],
        "output": [StrOptions({"numpy", "torch"})],
        "progress": ["boolean"],
        "random_state": ["random_state"],
        "max_image_pixels": [Interval(Integral, 1, None, closed="left"), None],
        "cache": [FeatureCache, None],
    }

    def __init__(
        self,
        *,
        backbone="resnet50",
        layer="layer3",
        pretrained=True,
        checkpoint_path=None,
        pooling_kernel_size=4,
        input_size=256,
        batch_size=16,
        device="auto",
        precision="float32",
        channels_last=True,
        output="numpy",
        progress=False,
        random_state=None,
        max_image_pixels=MAX_IMAGE_PIXELS,
        cache=None,
    ):
        self.backbone = backbone
        self.layer = layer
        self.pretrained = pretrained
        self.checkpoint_path = checkpoint_path
        self.pooling_kernel_size = pooling_kernel_size
        self.input_size = input_size
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.output = output
        self.progress = progress
        self.random_state = random_state
        self.max_image_pixels = max_image_pixels
        self.cache = cache

    def _validate_params(self):
        reject_bools(self, ("layer", "pooling_kernel_size", "input_size", "batch_size"))
        super()._validate_params()

    def _input_size(self) -> tuple[int, int]:
        size = self.input_size
        if isinstance(size, Integral):
            return (int(size), int(size))
        if len(size) == 2 and all(
            isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in size
        ):
            return (int(size[0]), int(size[1]))
        raise ValueError(
            f"input_size={size!r} must be a positive int or a (height, width) "
            "tuple of positive ints."
        )

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the truncated backbone and load its weights.

        Only the structure of ``X`` is checked; no image is decoded.

        Parameters
        ----------
        X : array-like, tensor or sequence of images
            Images; see Notes of the class for the accepted forms.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted transformer.
        """
        device = resolve_device(self.device)
        size = self._input_size()
        if self.checkpoint_path is not None and not self.pretrained:
            raise ValueError(
                "checkpoint_path is set but pretrained=False; a checkpoint holds "
                "pretrained weights: set pretrained=True, or drop checkpoint_path."
            )
        as_image_collection(X, self.max_image_pixels)
        seed = None
        if not self.pretrained:
            seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        built = build_backbone(
            self.backbone,
            self.layer,
            pretrained=self.pretrained,
            checkpoint_path=self.checkpoint_path,
            seed=seed,
        )
        digest = weights_digest(built.model)  # on the host, before any device copy
        source = weights_source(
            self.backbone, self.pretrained, self.checkpoint_path, seed, built.model
        )
        model = self._place(built.model, device)
        feature_shape = self._pooled_shape(model, device, size, built.layer_name)
        self.backbone_ = model
        self.device_ = str(device)
        self.layer_ = built.layer_name
        self.input_size_ = size
        self.image_mean_ = built.mean
        self.image_std_ = built.std
        self.feature_shape_ = feature_shape
        self.weights_digest_ = digest
        self.weights_source_ = source
        self.feature_params_ = {name: getattr(self, name) for name in _FEATURE_PARAMS}
        return self

    def _same_as_fitted(self, name: str, now) -> bool:
        """Whether parameter ``name`` still means what it meant at fit (48 and
        (48, 48) are one input size, 2 and "layer2" one layer of a ResNet)."""
        fitted = self.feature_params_[name]
        if name == "input_size":
            try:
                return self._input_size() == self.input_size_
            except ValueError:
                return False
        integral = isinstance(now, Integral) and not isinstance(now, bool)
        if name == "layer":
            if isinstance(now, str):
                return now == self.layer_
            if isinstance(now, (list, tuple)) and (
                tuple(now) == self.layer_
                or (isinstance(fitted, (list, tuple)) and list(now) == list(fitted))
            ):
                return True  # the names in network order, or as fitted
            if not (integral or isinstance(now, (list, tuple))):
                return False
            if integral and isinstance(fitted, Integral) and int(now) == int(fitted):
                return True  # as fitted: no need to look the name up
            try:
                return layer_name(self.feature_params_["backbone"], now) == (
                    self.layer_
                )
            except ValueError:
                return False
        if name == "pooling_kernel_size":
            return integral and int(now) == int(fitted)
        return isinstance(now, str) and now == fitted  # backbone, precision

    def _check_feature_params(self) -> None:
        """What was fitted is what transforms: a changed parameter says so."""
        for name, fitted in self.feature_params_.items():
            now = getattr(self, name)
            if not self._same_as_fitted(name, now):
                raise NotFittedError(
                    f"{name}={now!r} was set after this DeepFeatureTransformer was "
                    f"fitted with {name}={fitted!r}: fit it again to use the new "
                    f"value, or set {name}={fitted!r} back."
                )

    def _place(self, model: torch.nn.Module, device: torch.device):
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _pooled_shape(self, model, device, size, layer) -> tuple[int, int, int]:
        """(C, h, w) of the pooled map, from one forward pass of a blank image."""
        height, width = size
        # A CNN's first stage holds ~64 float32 channels at half the resolution,
        # twice (convolution and normalisation): ~140 bytes per input pixel, a floor.
        check_fits_in_memory(
            140 * height * width,
            device,
            f"A forward pass of one {height}x{width} image",
            "use a smaller input_size (images are resized to it).",
        )
        with torch.inference_mode():
            probe = torch.zeros((1, 3, *size), device=device)
            shapes = [tuple(m.shape[1:]) for m in model(probe)]
        rows = min(shape[1] for shape in shapes)
        cols = min(shape[2] for shape in shapes)
        k = self.pooling_kernel_size
        if rows < k or cols < k:
            raise ValueError(
                f"input_size={size} gives a {rows}x{cols} feature map at layer "
                f"{layer!r} of {self.backbone!r}, smaller than "
                f"pooling_kernel_size={k}; use a larger input_size, an earlier "
                "layer or a smaller kernel."
            )
        channels = sum(shape[0] for shape in shapes)
        return (int(channels), int(rows) // k, int(cols) // k)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, flattened float32 features of a prepared batch."""
        dtype = _AUTOCAST_DTYPES.get(self.feature_params_["precision"])
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            feature_maps = self.backbone_(x)
        kernel = self.feature_params_["pooling_kernel_size"]
        # Several layers: the coarsest map pooled as one layer would be, finer
        # ones cropped to the image region that grid covers and averaged onto it
        # (see Notes of the class).
        return pool_feature_maps(feature_maps, kernel).flatten(1)

    def transform(self, X):
        """Pooled backbone features of each image.

        Parameters
        ----------
        X : array-like, tensor or sequence of images
            Images; see Notes of the class for the accepted forms. Files are
            decoded one batch at a time.

        Returns
        -------
        features : ndarray or torch.Tensor of shape (n_images, n_features), float32
            ``n_features`` is ``prod(feature_shape_)``; a tensor on ``device_``
            when ``output="torch"``.
        """
        check_is_fitted(self)
        return self._features_of(as_image_collection(X, self.max_image_pixels))

    def transform_with_sizes(self, X):
        """``transform(X)`` and each image's original ``(height, width)``.

        What :func:`~skdfm.anomaly_maps` needs to bring maps back to each image's
        own size: files are read for their header only, nothing is decoded
        twice.

        Parameters
        ----------
        X : array-like, tensor or sequence of images

        Returns
        -------
        features : ndarray or torch.Tensor of shape (n_images, n_features)
            As ``transform(X)``.
        sizes : list of (int, int)
            ``(height, width)`` of each image before resizing.
        """
        check_is_fitted(self)
        images = as_image_collection(X, self.max_image_pixels)
        return self._features_of(images), images.sizes()

    def _features_of(self, images):
        """Feature rows that carry their grid (see :mod:`skdfm._imaging.features`)."""
        self._check_feature_params()
        on_device = self.output == "torch"
        if self.cache is None:
            out = self._run_backbone(images, on_device=on_device)
        else:
            out = self._cached_features(images)
            if on_device:
                out = torch.from_numpy(out).to(self._fitted_device)
        return with_feature_shape(out, self.feature_shape_)

    def _cached_features(self, images) -> np.ndarray:
        """Rows from ``cache``; only the images it lacks run through the backbone."""
        config = self._cache_config()
        keys = images.identity_keys()
        found = self.cache.lookup(config, keys)
        if not found:
            out = self._run_backbone(images)
            self.cache.store(config, keys, out)
            return out
        out = np.empty((len(images), int(np.prod(self.feature_shape_))), np.float32)
        out[list(found)] = np.stack(list(found.values()))
        todo = np.setdiff1d(np.arange(len(images)), list(found))
        if len(todo):
            out[todo] = rows = self._run_backbone(images.subset(todo))
            self.cache.store(config, [keys[i] for i in todo], rows)
        return out

    def _cache_config(self) -> tuple:
        return (
            self.backbone,
            self.weights_digest_,
            self.layer_,
            self.input_size_,
            self.pooling_kernel_size,
            self.precision,
            self.channels_last,
        )

    def _run_backbone(self, images, on_device: bool = False):
        """Feature rows of an image collection, batch by batch: a numpy array, or a
        tensor on ``device_`` when ``on_device`` (nothing then leaves the device)."""
        device = self._fitted_device
        mean = torch.tensor(self.image_mean_, dtype=torch.float32, device=device)
        std = torch.tensor(self.image_std_, dtype=torch.float32, device=device)
        shape = (len(images), int(np.prod(self.feature_shape_)))
        if device.type == "cpu":
            keep_freed_memory()
        if on_device:
            out = torch.empty(shape, dtype=torch.float32, device=device)
        else:
            out = np.empty(shape, np.float32)
        batches = tqdm(
            images.batches(self.batch_size),
            total=-(-len(images) // self.batch_size),
            desc="features",
            unit="batch",
            disable=not self.progress,
        )
        with torch.inference_mode():
            for start, batch in batches:
                x = model_input(
                    batch,
                    start,
                    device=device,
                    size=self.input_size_,
                    mean=mean,
                    std=std,
                    channels_last=self.channels_last,
                )
                rows = self._features(x)
                out[start : start + len(x)] = rows if on_device else rows.cpu().numpy()
        return out

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns: ``"<layer>_c<channel>_y<row>_x<column>"``.

        With several layers, each layer's channels are numbered from 0 under its
        own name.

        Parameters
        ----------
        input_features : None
            Images have no input feature names; must be None.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        if input_features is not None:
            raise ValueError(
                "input_features must be None: images have no input feature names."
            )
        channels, rows, cols = self.feature_shape_
        blocks = self._layer_channels()
        return np.asarray(
            [
                f"{layer}_c{c}_y{y}_x{x}"
                for layer, layer_channels in blocks
                for c in range(layer_channels)
                for y in range(rows)
                for x in range(cols)
            ],
            dtype=object,
        )

    def _layer_channels(self) -> list[tuple[str, int]]:
        """(layer name, channels) of each layer, in the order rows stack them."""
        if isinstance(self.layer_, str):
            return [(self.layer_, self.feature_shape_[0])]
        channels = self.backbone_.feature_info.channels()
        return list(zip(self.layer_, channels, strict=True))

    def __getstate__(self):
        state = super().__getstate__()
        if "backbone_" in state:
            state["backbone_"] = backbone_state(state["backbone_"])
        return state

    def _check_state(self) -> None:
        super()._check_state()
        fitted = vars(self)
        if "feature_shape_" not in fitted:
            return
        check_fitted(TRANSFORMER_ATTRIBUTES, fitted, {})
        if "feature_params_" in fitted:
            self._check_recorded_params()

    def _check_recorded_params(self) -> None:
        """``feature_params_`` names the input size and layer fit resolved into
        ``input_size_`` and ``layer_`` (a loaded model's record must agree)."""
        recorded = self.feature_params_
        size = recorded.get("input_size", self.input_size_)
        if isinstance(size, Integral) and not isinstance(size, bool):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and tuple(size) == self.input_size_):
            raise ValueError(
                f"feature_params_ records input_size={reprlib.repr(size)}, but "
                f"input_size_ is {self.input_size_}."
            )
        layer = recorded.get("layer", self.layer_)
        if layer == self.layer_ or (
            isinstance(layer, (tuple, list)) and tuple(layer) == self.layer_
        ):
            return
        try:
            named = layer_name(recorded["backbone"], layer)
        except (ValueError, TypeError):
            named = None
        if named != self.layer_:
            raise ValueError(
                f"feature_params_ records layer={reprlib.repr(layer)} of "
                f"{recorded['backbone']!r}, but layer_ is {self.layer_!r}."
            )

    def __setstate__(self, state):
        state.setdefault("max_image_pixels", MAX_IMAGE_PIXELS)  # skdfm 0.1.0
        weights = state.pop("backbone_", None)
        super().__setstate__(state)
        if weights is not None:
            if "feature_params_" not in state:  # saved by skdfm 0.1.0
                self.feature_params_ = {n: getattr(self, n) for n in _FEATURE_PARAMS}
            name = self.feature_params_["backbone"]
            model = rebuild_backbone(name, self.layer_, weights)
            if "weights_digest_" not in state:  # saved by skdfm 0.1.0
                self.weights_digest_ = weights_digest(model)
            if "weights_source_" not in state:  # saved before it was recorded
                self.weights_source_ = _SOURCE_NOT_RECORDED
            self.backbone_ = self._place(model, self._fitted_device)

    def _move_fitted_state(self, device: torch.device) -> None:
        self.backbone_ = self._place(self.backbone_, device)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = []
        return tags
