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

#: How many caches received by pickle a worker process keeps alive between tasks
#: (the most recent ones): one per search running there, a bound on what an old
#: search can keep in a long-lived worker.
ADOPTED_MAX = 2


class _Store:
    """The rows and counters of a cache: every FeatureCache of one token (clones,
    unpickled copies in one process) reads and writes the same store."""

    def __init__(self):
        self.rows: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0


#: The store of every cache alive in this process, by token (weakly: a store goes
#: when no cache holds it).
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: Stores a worker process received by pickle, most recent last (see ADOPTED_MAX).
_ADOPTED: OrderedDict = OrderedDict()
_REGISTRY_LOCK = threading.Lock()


def _store_for(token: str, *, received: bool) -> _Store:
    """The live store of ``token`` in this process, else a new empty one, which a
    worker process keeps alive between tasks when it ``received`` the cache by
    pickle (not for caches it makes itself)."""
    with _REGISTRY_LOCK:
        store = _LIVE.get(token)
        if store is None:
            store = _LIVE[token] = _Store()
            if received and multiprocessing.parent_process() is not None:
                _ADOPTED[token] = store
                while len(_ADOPTED) > ADOPTED_MAX:
                    _ADOPTED.popitem(last=False)
    return store


def adopted_caches() -> list[tuple[int, int, int]]:
    """``(rows, hits, misses)`` of each cache this worker process received by pickle
    and keeps between tasks (see :class:`FeatureCache`); empty in a main process."""
    with _REGISTRY_LOCK:
        return [(len(s.rows), s.hits, s.misses) for s in _ADOPTED.values()]


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
    empty one, which that worker keeps between tasks and every later task there
    shares (the two most recent such caches per worker are kept; a Dask worker
    started without a nanny is not recognised as a worker and keeps none). A search
    on worker processes therefore runs each image through the backbone at most once
    per layer and worker; threads share the one cache. A model loaded in a new
    (main) process starts with an empty cache. ``max_bytes`` bounds each copy.

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
        self._token = uuid.uuid4().hex
        self._store = _store_for(self._token, received=False)

    @property
    def hits(self) -> int:
        return self._store.hits

    @hits.setter
    def hits(self, value: int) -> None:
        self._store.hits = value

    @property
    def misses(self) -> int:
        return self._store.misses

    @misses.setter
    def misses(self, value: int) -> None:
        self._store.misses = value

    def __len__(self) -> int:
        return len(self._store.rows)

    @property
    def n_bytes(self) -> int:
        """Bytes of feature rows held."""
        return self._store.bytes

    def clear(self) -> None:
        """Drop every row and reset the counters."""
        store = self._store
        with store.lock:
            store.rows.clear()
            store.bytes = 0
            store.hits = store.misses = 0

    def lookup(self, config: tuple, keys: list[tuple]) -> dict[int, np.ndarray]:
        """Rows found for ``keys`` under ``config``, by position in ``keys``."""
        found = {}
        store = self._store
        with store.lock:
            for position, key in enumerate(keys):
                row = store.rows.get((config, key))
                if row is not None:
                    store.rows.move_to_end((config, key))
                    found[position] = row
            store.hits += len(found)
            store.misses += len(keys) - len(found)
        return found

    def store(self, config: tuple, keys: list[tuple], rows: np.ndarray) -> None:
        """Keep ``rows[i]`` under ``(config, keys[i])`` (copies, read-only)."""
        store = self._store
        with store.lock:
            for key, row in zip(keys, rows, strict=True):
                if key is None:
                    continue  # an unreadable file has no identity
                row = row.copy()
                row.setflags(write=False)
                old = store.rows.pop((config, key), None)
                if old is not None:
                    store.bytes -= old.nbytes
                store.rows[(config, key)] = row
                store.bytes += row.nbytes
            while self.max_bytes is not None and store.bytes > self.max_bytes:
                _, evicted = store.rows.popitem(last=False)
                store.bytes -= evicted.nbytes

    def __deepcopy__(self, memo):
        # clone() deep-copies parameters: every clone must share this store.
        return self

    def __getstate__(self):
        # The rows never travel: a pickle names the cache (its token), and
        # unpickling joins that cache's store in the receiving process.
        return {"max_bytes": self.max_bytes, "token": self._token}

    def __setstate__(self, state):
        self.max_bytes = state["max_bytes"]
        self._token = state["token"]
        self._store = _store_for(self._token, received=True)

    def __repr__(self) -> str:
        return f"FeatureCache(max_bytes={self.max_bytes})"
