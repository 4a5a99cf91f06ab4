"""FeatureCache: features kept across fits; a grid search runs each image once."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import uuid
import weakref
from collections import OrderedDict

import numpy as np
import torch

__all__ = ["FeatureCache", "adopted_caches", "weights_digest"]

#: Every FeatureCache alive in this process, by token (weakly: a cache goes when no
#: transformer holds it).
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: Caches a worker process received by pickle, held for the process's lifetime so
#: that the next task's copy of the estimator finds the rows of the previous ones.
_ADOPTED: dict = {}
_REGISTRY_LOCK = threading.RLock()


def _restore(token: str, max_bytes):
    """Unpickle a FeatureCache: the live one of this token when this process has it
    (the process that made it, or a worker that already received it), else a new
    empty one under the same token, kept for good in a worker process."""
    with _REGISTRY_LOCK:
        cache = _LIVE.get(token)
        if cache is None:
            cache = FeatureCache(max_bytes)
            _LIVE.pop(cache._token, None)
            cache._token = token
            _LIVE[token] = cache
            if multiprocessing.parent_process() is not None:  # a worker process
                _ADOPTED[token] = cache
    return cache


def adopted_caches() -> list:
    """The caches this worker process received by pickle and keeps (see
    :class:`FeatureCache`); empty in a main process."""
    with _REGISTRY_LOCK:
        return list(_ADOPTED.values())


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: equal digests, equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in model.state_dict().items():
        array = np.ascontiguousarray(value.detach().cpu().numpy())
        digest.update(name.encode())
        digest.update(array.dtype.str.encode())
        digest.update(str(array.shape).encode())
        digest.update(array.data)
    return digest.hexdigest()


class FeatureCache:
    """In-memory store of feature rows, shared by every clone of a transformer.

    Pass one instance as ``DeepFeatureTransformer(cache=...)``. ``transform`` then
    looks each image up by its identity (a file's absolute path, size and
    modification time; a digest of an array's or PIL image's pixels) and by the
    configuration that determines its features (backbone name, a digest of the
    truncated backbone's weights, layer, input size, pooling, precision, memory
    layout), runs the backbone only on the images it has not seen with that
    configuration, and stores their rows. A ``GridSearchCV`` over ``layer`` and
    ``pca_level`` therefore runs each image through the backbone once per layer,
    however many folds and candidates it has.

    The cache survives :func:`sklearn.base.clone` (a deep copy returns the same
    instance, so every candidate of a search shares it). A pickle carries no rows,
    only which cache it is, so saved models stay small: unpickled in the process
    that holds the cache, it is that cache; in a worker process (``n_jobs > 1``
    with joblib's process-based backend, or a Dask worker under
    ``joblib.parallel_backend("dask")``) the first task to receive it makes an
    empty one, which that worker keeps for its lifetime (:func:`adopted_caches`)
    and every later task there shares. A search on worker processes therefore runs
    each image through the backbone at most once per layer and worker; threads
    share the one cache. A model loaded in a new (main) process starts with an
    empty cache.

    Parameters
    ----------
    max_bytes : int or None, default=None
        Evict the least recently used rows beyond this many bytes of features;
        None keeps everything (resnet50/layer3 rows take 64 KiB per image and
        layer).

    Attributes
    ----------
    hits : int
        Images whose features were found.
    misses : int
        Images that had to be run through a backbone.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DeepFeatureTransformer, FeatureCache
    >>> cache = FeatureCache()
    >>> images = np.zeros((3, 64, 64, 3), np.uint8)
    >>> tr = DeepFeatureTransformer(backbone="resnet18", pretrained=False,
    ...                             input_size=64, device="cpu", random_state=0,
    ...                             cache=cache)
    >>> _ = tr.fit_transform(images)
    >>> _ = tr.transform(images[:2])
    >>> cache.misses, cache.hits
    (3, 2)
    """

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0 or None.")
        self.max_bytes = max_bytes
        self._rows: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._token = uuid.uuid4().hex
        with _REGISTRY_LOCK:
            _LIVE[self._token] = self

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def n_bytes(self) -> int:
        """Bytes of feature rows held."""
        return self._bytes

    def clear(self) -> None:
        """Drop every row and reset the counters."""
        with self._lock:
            self._rows.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def lookup(self, config: tuple, keys: list[tuple]) -> dict[int, np.ndarray]:
        """Rows found for ``keys`` under ``config``, by position in ``keys``."""
        found = {}
        with self._lock:
            for position, key in enumerate(keys):
                row = self._rows.get((config, key))
                if row is not None:
                    self._rows.move_to_end((config, key))
                    found[position] = row
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def store(self, config: tuple, keys: list[tuple], rows: np.ndarray) -> None:
        """Keep ``rows[i]`` under ``(config, keys[i])`` (copies, read-only)."""
        with self._lock:
            for key, row in zip(keys, rows, strict=True):
                if key is None:
                    continue  # an unreadable file has no identity
                row = row.copy()
                row.setflags(write=False)
                old = self._rows.pop((config, key), None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._rows[(config, key)] = row
                self._bytes += row.nbytes
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                _, evicted = self._rows.popitem(last=False)
                self._bytes -= evicted.nbytes

    def __deepcopy__(self, memo):
        # clone() deep-copies parameters: every clone must share this store.
        return self

    def __reduce__(self):
        # The rows never travel: a pickle names the cache (a token), and unpickling
        # finds or makes that cache in the receiving process.
        return (_restore, (self._token, self.max_bytes))

    def __repr__(self) -> str:
        return f"FeatureCache(max_bytes={self.max_bytes})"
