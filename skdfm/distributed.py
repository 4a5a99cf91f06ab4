"""Fit and score on a Dask cluster: the same model as one machine fits, to rounding.

DFM is fitted from sufficient statistics (count, mean, centred scatter, or the rows
themselves while they are fewer than the features), and those merge exactly. So
each partition of the images runs the backbone on its worker and sends back only
its statistics; the statistics are merged pairwise in a tree (Chan's formula,
:class:`~skdfm._kernels.statistics.FeatureStatistics`), and the eigendecomposition runs
once, on the client. The fitted model equals ``fit`` (or :func:`~skdfm.stream_fit`)
on the same images up to float64 rounding.

Everything runs on Dask (``dask``, ``distributed``: ``pip install 'skdfm[dask]'``):
its scheduler places the tasks, moves the data, and recomputes what a lost worker
held, so a worker that dies in the middle of a fit or a scoring loses no image and
counts none twice. The model (its weights) is sent to the scheduler once per call,
as a task of its own (``Client.persist``), not once per task: workers fetch it
from each other, and when every worker holding it is lost the scheduler runs that
task again (data sent with ``Client.scatter`` would be lost for good). The image
tasks are retried (``retries``) when they fail, and every wait has a bound: the
handshake (:func:`connect`) and, with ``timeout``, the computation. Without a
``distributed.Client`` (none given and none current), Dask's local scheduler runs
the same graph in this process.

Images come as a ``dask.bag`` of image file paths (or of single image arrays / PIL
images; :func:`image_bag` makes one from paths) or as a ``dask.array`` of images
or, for a bare :class:`~skdfm.DFMDetector`, of feature rows (chunked along the rows
only). Files that cannot be read are skipped and reported: by a
:class:`SkippedImagesWarning` from :func:`fit`, in the ``error`` column of
:func:`score`'s table.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ._core.device import resolve_device
from ._deploy.runtime import require
from ._imaging.decode import read_image_files

__all__ = ["SkippedImagesWarning", "connect", "fit", "image_bag", "score"]

#: Columns of :func:`score`'s table, in order (``map`` only with ``maps_dir``).
SCORE_COLUMNS = (
    "partition",
    "position",
    "path",
    "anomaly_score",
    "normalized",
    "label",
    "error",
)


class SkippedImagesWarning(UserWarning):
    """Images a distributed fit could not read and left out.

    Attributes
    ----------
    skipped : list of (str, str)
        ``(image, reason)`` of each: a file's path, or ``"partition P, item I"``
        for an image given as an array.
    """

    def __init__(self, message: str, skipped: list):
        super().__init__(message)
        self.skipped = skipped


# -- work done on the workers -----------------------------------------------------


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


@dataclass
class _Batch:
    images: list  #: decoded images (PIL) or arrays, or one array block
    positions: list  #: their positions in the partition
    failed: list = field(default_factory=list)  #: (position, reason)


def _file_batches(items: list, batch_size: int, max_pixels):
    """Files decoded by :func:`~skdfm._imaging.decode.read_image_files` (one batch
    ahead,
    bad ones kept with their reason), with their positions in ``items``: its lists
    keep the input order and hold the input objects."""
    batches = read_image_files(items, batch_size, max_pixels)
    for start, files in zip(range(0, len(items), batch_size), batches, strict=True):
        decoded = iter(zip(files.paths, files.images, strict=True))
        failed = iter(files.failed)
        good, bad = next(decoded, None), next(failed, None)
        batch = _Batch([], [])
        for position in range(start, min(start + batch_size, len(items))):
            if good is not None and good[0] is items[position]:
                batch.images.append(good[1])
                batch.positions.append(position)
                good = next(decoded, None)
            else:
                batch.failed.append((position, bad[1]))
                bad = next(failed, None)
        yield batch


def _image_batches(items, transformer, batch_size: int):
    """A partition's images in batches; files are decoded one batch ahead, and the
    ones that cannot be read land in ``failed``."""
    if isinstance(items, np.ndarray):  # a block of a dask array: one batch
        for start in range(0, len(items), batch_size):
            stop = min(start + batch_size, len(items))
            yield _Batch(items[start:stop], list(range(start, stop)))
        return
    items = list(items)
    paths = [_is_path(item) for item in items]
    if any(paths) and not all(paths):
        raise ValueError(
            "a partition mixes image paths with image arrays; give a bag of one "
            "kind or the other."
        )
    if all(paths) and items:
        max_pixels = transformer.max_image_pixels if transformer is not None else None
        yield from _file_batches(items, batch_size, max_pixels)
        return
    for start in range(0, len(items), batch_size):
        stop = min(start + batch_size, len(items))
        yield _Batch(items[start:stop], list(range(start, stop)))


def _run_isolated(function, batch: _Batch):
    """``function(batch.images)``; when a batch of separate images is refused, each
    image alone, so that one bad array loses only itself. Returns the results and
    the positions of the images they cover (refused ones join ``batch.failed``)."""
    whole = isinstance(batch.images, np.ndarray)  # a block: one array, no parts
    try:
        return [function(batch.images)], list(batch.positions)
    except ValueError as error:
        if whole or len(batch.images) == 1:
            if whole:
                raise
            batch.failed.append((batch.positions[0], str(error)))
            return [], []
    results, kept = [], []
    for image, position in zip(batch.images, batch.positions, strict=True):
        try:
            results.append(function([image]))
        except ValueError as error:
            batch.failed.append((position, str(error)))
        else:
            kept.append(position)
    return results, kept


def _name(items, partition: int, position: int) -> str:
    item = items[position] if not isinstance(items, np.ndarray) else None
    if item is not None and _is_path(item):
        return os.fspath(item)
    return f"partition {partition}, item {position}"


_MOVE_LOCK = threading.Lock()


def _here(part):
    """A fitted part on this worker's own device when its ``device`` is "auto" (it
    was unpickled on the device the client resolved); moved once per worker."""
    if part is None or part.device != "auto":
        return part
    with _MOVE_LOCK:
        device = str(resolve_device("auto"))
        if part.device_ != device:
            part.to_device("auto")
    return part


def _assemble(transformer, detector):
    """The model the tasks run: the detector alone, or both parts in a Pipeline."""
    if transformer is None:
        return detector
    from sklearn.pipeline import make_pipeline

    return make_pipeline(transformer, detector)


@dataclass
class _Partial:
    """What a partition of a fit sends back: its statistics and its skipped images."""

    statistics: object  #: FeatureStatistics, or None when nothing was readable
    skipped: list  #: (image, reason)


def _fit_partition(items, partition, transformer, detector, batch_size):
    from sklearn.base import clone

    transformer = _here(transformer)
    part = clone(detector)
    items = items if isinstance(items, np.ndarray) else list(items)
    skipped, seen = [], False
    for batch in _image_batches(items, transformer, batch_size):
        if transformer is not None:
            rows, _ = _run_isolated(transformer.transform, batch)
        else:
            rows = [batch.images]
        skipped += [(_name(items, partition, p), r) for p, r in batch.failed]
        for block in rows:
            part.partial_fit(block, restart=not seen)
            seen = True
    statistics = part.streaming_statistics().to("cpu") if seen else None
    return _Partial(statistics, skipped)


def _merge(a: _Partial, b: _Partial) -> _Partial:
    # In place (no D x D copy): each partial has this merge as its only consumer,
    # and a lost worker's inputs are recomputed from their lineage. This assumes a
    # merge task that failed is not re-run on its stored inputs: do not compute
    # this graph with retries=.
    if a.statistics is None:
        statistics = b.statistics
    else:
        statistics = a.statistics
        if b.statistics is not None:
            statistics.merge(b.statistics)
    return _Partial(statistics, a.skipped + b.skipped)


def _score_partition(
    items, partition, transformer, detector, batch_size, maps_dir, root
):
    import pandas as pd

    from ._deploy.results import normalize_scores
    from ._evaluation.map_files import (
        colour_scale,
        map_caption,
        map_file,
        write_map_overlay,
    )
    from ._tools.maps import anomaly_maps

    transformer, detector = _here(transformer), _here(detector)
    model = _assemble(transformer, detector)
    block = isinstance(items, np.ndarray)
    items = items if block else list(items)
    n = len(items)
    paths = [None if block or not _is_path(i) else os.fspath(i) for i in items]
    scores = np.full(n, np.nan)
    errors: list = [None] * n
    map_files: list = [None] * n
    for batch in _image_batches(items, transformer, batch_size):
        images = batch.images

        def run(images):
            if maps_dir is not None:
                return anomaly_maps(model, images, size="image")
            return model.score_samples(images)

        results, kept = _run_isolated(run, batch)
        for position, reason in batch.failed:
            errors[position] = reason
        if maps_dir is None:
            values = np.concatenate(results) if results else np.empty(0)
        else:
            values = np.concatenate([r.score_samples for r in results] or [[]])
            by_position = dict(zip(batch.positions, images, strict=True))
            written = [
                (amap, score, label)
                for result in results
                for amap, score, label in zip(
                    result.maps, result.score_samples, result.labels, strict=True
                )
            ]
            scale = colour_scale(detector)
            for position, (amap, score, label) in zip(kept, written, strict=True):
                if paths[position] is not None:
                    target = map_file(maps_dir, paths[position], root)
                else:
                    target = os.path.join(
                        maps_dir,
                        f"partition-{partition:05d}",
                        f"item-{position:06d}_map.png",
                    )
                write_map_overlay(
                    target,
                    by_position[position],
                    amap,
                    scale=scale,
                    caption=map_caption(score, label, detector.offset_),
                )
                map_files[position] = os.fspath(target)
        scores[kept] = values
    ok = ~np.isnan(scores)
    labels = pd.array([None] * n, dtype="Int64")
    labels[ok] = detector.labels_from_scores(scores[ok])
    normalized = np.full(n, np.nan)
    normalized[ok] = normalize_scores(
        scores[ok], detector.offset_, detector.score_range_
    )
    table = {
        "partition": np.full(n, partition, dtype=np.int64),
        "position": np.arange(n, dtype=np.int64),
        "path": pd.array(paths, dtype="string"),
        "anomaly_score": -scores,
        "normalized": normalized,
        "label": labels,
        "error": pd.array(errors, dtype="string"),
    }
    if maps_dir is not None:
        table["map"] = pd.array(map_files, dtype="string")
    return pd.DataFrame(table)


def _threshold_partition(items, partition, transformer, detector, batch_size):
    transformer, detector = _here(transformer), _here(detector)
    model = _assemble(transformer, detector)
    items = items if isinstance(items, np.ndarray) else list(items)
    scores, skipped = [], []
    for batch in _image_batches(items, transformer, batch_size):
        results, _ = _run_isolated(model.score_samples, batch)
        scores += results
        skipped += [(_name(items, partition, p), r) for p, r in batch.failed]
    return (np.concatenate(scores) if scores else np.empty(0)), skipped


# -- the client side ---------------------------------------------------------------


def _dask():
    require("dask", "dask")
    import dask

    return dask


def _current_client(client):
    """The client to run on: the one given, else the current one, else None (Dask's
    local scheduler)."""
    if client is not None:
        return client
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:  # no client in this process
        return None


def _partitions(images, what: str) -> list:
    """One Delayed per partition of a bag, or per row block of an array."""
    _dask()
    import dask.array as da
    import dask.bag as db

    if isinstance(images, db.Bag):
        return list(images.to_delayed())
    if isinstance(images, da.Array):
        if images.ndim < 2:
            raise ValueError(
                f"{what} is a {images.ndim}-D dask array; give feature rows (2-D) "
                "or a batch of images (3-D or 4-D), chunked along the first axis."
            )
        images = images.rechunk({axis: -1 for axis in range(1, images.ndim)})
        return list(images.to_delayed().ravel())
    raise TypeError(
        f"{what} must be a dask.bag (of image paths or images) or a dask.array "
        f"(of images or feature rows), got {type(images).__name__}; "
        "skdfm.distributed.image_bag(paths) makes a bag of files."
    )


#: Retries of an image task that raised (a flaky file system, a worker's device
#: out of memory). A task lost with its worker is rerun by the scheduler anyway,
#: up to ``distributed.scheduler.allowed-failures`` times.
RETRIES = 2


def _shared(obj, client):
    """``obj`` placed once where every task can read it, and recomputable.

    On a distributed client it is persisted as a task of its own: the scheduler
    keeps the task (the pickled object) and runs it again when every worker that
    held the result is lost, which scattered data cannot survive. Else it is one
    key of the local graph."""
    dask = _dask()
    shared = dask.delayed(obj, pure=False, traverse=False)
    if client is None:
        return shared
    # Sent once, on purpose: Dask's warning is about data sent again and again.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1 PiB"}):
        return client.persist(shared)


def _image_task(function):
    """``function`` as a pure Delayed whose calls are retried when they raise:
    image tasks read their inputs only, so running one again is safe (the
    in-place merges are not retried: a merge that failed may have changed its
    inputs)."""
    dask = _dask()
    task = dask.delayed(function, pure=True)

    def call(*args):
        with dask.annotate(retries=RETRIES):
            return task(*args)

    return call


def _check_timeout(timeout, caller: str):
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"{caller}: timeout must be a positive number of seconds or None, "
            f"got {timeout!r}."
        )
    return time.monotonic() + float(timeout)


#: Seconds a computation waits on a cluster that has no worker at all (all lost and
#: none back, or none ever joined) before it ends with a TimeoutError: the bound of
#: a wait without ``timeout``, which would otherwise never end. Ten minutes: an
#: adaptive cluster scaled to zero may take minutes to start its first worker.
NO_WORKER_TIMEOUT = 600.0
_POLL_SECONDS = 0.5


def _workers(client) -> int:
    try:
        return len(client.scheduler_info(n_workers=-1).get("workers", ()))
    except TypeError:  # distributed releases without n_workers
        return len(client.scheduler_info().get("workers", ()))


def _compute(value, client, *, deadline=None, timeout=None, what="", caller=""):
    """``value`` computed; on a distributed client the wait ends by ``deadline``
    (a ``time.monotonic()`` time) with a TimeoutError naming ``what`` and the
    cluster, its tasks cancelled, and, whatever ``deadline``, once the cluster has
    had no worker for :data:`NO_WORKER_TIMEOUT` seconds."""
    dask = _dask()
    if client is None:
        return dask.compute(value)[0]
    from distributed import wait

    futures = client.compute(value)
    without_workers = None  # since when the cluster has had no worker
    while True:
        now = time.monotonic()
        step = _POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - now)
        try:
            wait(futures, timeout=max(step, 0.001))
            break
        except TimeoutError:
            pass
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            client.cancel(futures)
            raise TimeoutError(
                f"{caller}: {what} did not finish within timeout={timeout:g} s on "
                f"the Dask cluster at {client.scheduler.address} (its tasks were "
                "cancelled); give a larger timeout, or None to wait as long as the "
                "cluster works."
            ) from None
        if _workers(client):
            without_workers = None
        elif without_workers is None:
            without_workers = now
        elif now - without_workers >= NO_WORKER_TIMEOUT:
            client.cancel(futures)
            raise TimeoutError(
                f"{caller}: {what} stopped: the Dask cluster at "
                f"{client.scheduler.address} has had no worker for "
                f"{NO_WORKER_TIMEOUT:g} s (its tasks were cancelled); start workers, "
                "then run it again."
            ) from None
    return client.gather(futures)


def _tree(parts: list, combine):
    """Pairwise tree reduction of Delayed values: depth ceil(log2(n))."""
    dask = _dask()
    merge = dask.delayed(combine, pure=True)
    level = list(parts)
    while len(level) > 1:
        level = [
            merge(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    return level[0]


def _batch_size(transformer, batch_size):
    if batch_size is None:
        return transformer.batch_size if transformer is not None else 256
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    return batch_size


def _warn_skipped(skipped: list, what: str) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    warnings.warn(
        SkippedImagesWarning(
            f"{len(skipped)} {what} could not be read and were left out "
            f"(the warning's .skipped lists them all): {shown}{more}",
            skipped,
        ),
        stacklevel=3,
    )


#: The most a scheduler's first message (its handshake: a few hundred bytes) may
#: announce: a larger one is not Dask's protocol, and is refused before anything is
#: allocated for it.
HANDSHAKE_LIMIT = 1 << 20


def _read_exactly(sock, n: int, address: str, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            raise TimeoutError(
                "it accepted the connection but sent no Dask handshake"
                if not data
                else f"its handshake stopped after {len(data)} of {n} bytes"
            ) from None
        if not chunk:
            raise ConnectionError(
                f"the server at {address} closed the connection during Dask's "
                "handshake: is it a Dask scheduler?"
            )
        data += chunk
    return bytes(data)


def _check_handshake(address: str, deadline: float) -> None:
    """Read the first message of the server at a ``tcp://`` ``address`` (a Dask
    scheduler sends its handshake first) with every size and wait bounded, so that
    a server that stays silent or answers something else is refused before
    ``distributed`` waits on it without a bound or allocates what it announces."""
    from distributed.comm import parse_address, parse_host_port
    from distributed.protocol import loads
    from distributed.protocol.utils import unpack_frames

    scheme, location = parse_address(address)
    if scheme != "tcp":  # tls, ucx, inproc: their own handshakes
        return
    host, port = parse_host_port(location, default_port=8786)
    remaining = max(deadline - time.monotonic(), 0.001)
    try:
        sock = socket.create_connection((host, port), timeout=remaining)
    except TimeoutError:
        raise TimeoutError("the connection was not accepted") from None
    except OSError as error:  # refused, unreachable, unknown host
        raise ConnectionError(
            f"cannot connect to a Dask scheduler at {address}: {error}"
        ) from None
    with sock:
        header = "Q"
        (size,) = struct.unpack(
            header, _read_exactly(sock, struct.calcsize(header), address, deadline)
        )
        if size > HANDSHAKE_LIMIT:
            raise ConnectionError(
                f"the server at {address} does not speak Dask's protocol: its first "
                f"message announces {size} bytes (a Dask handshake is under "
                f"{HANDSHAKE_LIMIT} bytes); is the address a Dask scheduler's?"
            )
        try:
            frames, more = unpack_frames(
                _read_exactly(sock, size, address, deadline), partial=True
            )
            if sum(more) > HANDSHAKE_LIMIT:
                raise ValueError(f"{sum(more)} more bytes announced")
            frames += [_read_exactly(sock, n, address, deadline) for n in more]
            handshake = loads(frames, deserialize=False)
        except (ValueError, TypeError, IndexError, KeyError, struct.error) as error:
            raise ConnectionError(
                f"the server at {address} does not speak Dask's protocol (its "
                f"first message is not a handshake: {error}); is the address a "
                "Dask scheduler's?"
            ) from None
        if not isinstance(handshake, dict):
            raise ConnectionError(
                f"the server at {address} does not speak Dask's protocol (its "
                "first message is not a handshake); is the address a Dask "
                "scheduler's?"
            )


def connect(address, *, timeout=None):
    """A ``distributed.Client`` of the scheduler at ``address``, every wait bounded.

    ``distributed.Client(address, timeout=...)`` bounds the TCP connection but not
    the handshake that follows: a server that accepts and stays silent holds it
    forever, and one that answers other bytes makes it allocate whatever size they
    spell. Here the server's first message is read first, bounded in time and in
    size (``HANDSHAKE_LIMIT``, 1 MiB), and the client is made within what is left of
    ``timeout``.

    Parameters
    ----------
    address : str
        The scheduler's address, e.g. ``"tcp://10.0.0.5:8786"``; for ``tcp`` (the
        default scheme) the server is checked to speak Dask's protocol first.
    timeout : float, default=None
        Seconds for the whole connection, handshake included. Default Dask's
        ``distributed.comm.timeouts.connect`` (30 s unless configured).

    Returns
    -------
    distributed.Client
        Connected, and the current client (as ``distributed.Client`` makes it).

    Raises
    ------
    TimeoutError
        Nothing answered as a Dask scheduler within ``timeout``.
    ConnectionError
        The connection was refused or closed, or the server does not speak Dask's
        protocol.
    ValueError
        ``address`` or ``timeout`` is malformed.
    """
    _dask()
    import dask
    from dask.utils import parse_timedelta
    from distributed import Client

    if timeout is None:
        timeout = parse_timedelta(
            dask.config.get("distributed.comm.timeouts.connect"), default="seconds"
        )
    deadline = _check_timeout(timeout, "skdfm.distributed.connect")
    address = str(address)
    try:
        _check_handshake(address, deadline)
    except TimeoutError as error:
        raise TimeoutError(
            f"the server at {address} did not answer as a Dask scheduler within "
            f"timeout={timeout:g} s ({error}); is the address a Dask scheduler's, "
            "and is it running?"
        ) from None
    # What is left of the timeout bounds the client's own connection too: a daemon
    # thread makes it, and a client not made in time is given up.
    made: dict = {}

    def make():
        try:
            made["client"] = Client(
                address, timeout=max(deadline - time.monotonic(), 0.001)
            )
        except BaseException as error:  # noqa: BLE001 - raised below, in the caller
            made["error"] = error

    thread = threading.Thread(target=make, name="skdfm-connect", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0) + 1.0)
    if thread.is_alive():
        raise TimeoutError(
            f"the Dask scheduler at {address} did not accept this client within "
            f"timeout={timeout:g} s."
        )
    error = made.get("error")
    if isinstance(error, TimeoutError):
        raise TimeoutError(
            f"the Dask scheduler at {address} did not accept this client within "
            f"timeout={timeout:g} s: {error}"
        ) from error
    if isinstance(error, OSError):
        raise ConnectionError(
            f"cannot connect to the Dask scheduler at {address}: {error}"
        ) from error
    if error is not None:
        raise error
    return made["client"]


def image_bag(paths, *, npartitions=None, partition_size=None):
    """A ``dask.bag`` of image file paths, ready for :func:`fit` and :func:`score`.

    Parameters
    ----------
    paths : sequence of str or path-like
        Image files (not read here).
    npartitions : int, default=None
        About how many partitions (tasks): the paths are split into partitions of
        ``ceil(len(paths) / npartitions)``, which can make fewer. Default: 64 paths
        per partition.
    partition_size : int, default=None
        Paths per partition instead of ``npartitions``.

    Returns
    -------
    dask.bag.Bag

    Examples
    --------
    >>> from skdfm.distributed import image_bag
    >>> image_bag([f"img{i}.png" for i in range(130)]).npartitions
    3
    """
    _dask()
    import dask.bag as db

    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("image_bag got no paths.")
    if npartitions is not None and partition_size is not None:
        raise ValueError("give npartitions or partition_size, not both.")
    if npartitions is not None:
        partition_size = math.ceil(len(paths) / npartitions)
    return db.from_sequence(paths, partition_size=partition_size or 64)


def fit(
    model,
    images,
    *,
    client=None,
    threshold_images=None,
    contamination=None,
    batch_size=None,
    timeout=None,
):
    """Fit a model on a Dask cluster; equal to fitting it on one machine.

    Each partition of ``images`` runs on a worker: decoding, the backbone (for a
    Pipeline) and the partition's statistics (see the module's notes). The
    statistics are merged in a pairwise tree and the components are computed once,
    here. The components, singular values and scores equal those of
    :func:`~skdfm.stream_fit` (or ``fit``) on the same images up to float64
    rounding, whatever the partitioning; ``n_samples_seen_`` is the number of images
    used. What travels follows what each partition saw: a partition of no more
    images than features sends its rows (the Gram route), a larger one its D x D
    statistics (half of it: the lower triangle); merges keep the rows while the
    total stays within the features, so small data ends on the Gram route as
    ``fit`` would. Image paths are read by the workers: give absolute paths (or
    paths valid in the workers' working directory).

    As with :func:`~skdfm.stream_fit`, the threshold takes a second pass over
    normal images: over ``threshold_images`` (held-out good parts, or ``images``
    again for the in-sample rule), scored on the workers, it sets ``offset_`` to
    their ``contamination`` quantile; without it ``offset_`` stays unset and
    :func:`~skdfm.calibrate_threshold` can set it later.

    A worker lost on the way costs time, not images: its tasks run again, on
    another worker or its restarted self, and the model (held by the scheduler as
    a task, see the module's notes) is sent again to workers that need it.

    Parameters
    ----------
    model : DFMDetector or Pipeline
        A ``DFMDetector`` (for feature rows) or a ``Pipeline`` of a
        ``DeepFeatureTransformer`` and a ``DFMDetector``; refitted in place. The
        transformer is fitted here (its weights built or loaded) and then sent to
        every worker once.
    images : dask.bag.Bag or dask.array.Array
        Normal images: a bag of image paths, or of single images (arrays or PIL
        images); or an array of images (N, H, W[, C]) or, for a bare detector,
        of feature rows (N, D), chunked along the first axis.
    client : distributed.Client, default=None
        The cluster to run on; default the current client, else Dask's local
        scheduler in this process.
    threshold_images : dask.bag.Bag or dask.array.Array, default=None
        Normal images for the threshold pass.
    contamination : float in (0, 0.5], default=None
        Share of ``threshold_images`` to flag; the detector's ``contamination``
        when None. Only with ``threshold_images``.
    batch_size : int, default=None
        Images per backbone call on a worker; the transformer's ``batch_size``
        when None.
    timeout : float, default=None
        Seconds the whole fit (both passes) may wait for a distributed cluster;
        past it the tasks are cancelled and a ``TimeoutError`` names the pass.
        Default None: wait as long as the cluster works, as Dask does (a fit's
        length grows with the images, and lost workers are recovered from).
        Dask's local scheduler (no client) runs in this process, unbounded.

    Returns
    -------
    model : DFMDetector or Pipeline
        The fitted model.

    Raises
    ------
    TimeoutError
        The cluster did not finish within ``timeout``.

    Warns
    -----
    SkippedImagesWarning
        When some images could not be read; its ``skipped`` lists each with the
        reason.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from skdfm import DFMDetector
    >>> from skdfm.distributed import fit
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 5)) @ rng.normal(size=(5, 40))
    >>> det = fit(DFMDetector(pca_level=0.99, device="cpu"),
    ...           da.from_array(X, chunks=(250, 40)))  # four partitions
    >>> det.n_samples_seen_, det.n_components_
    (1000, 5)
    >>> one_machine = DFMDetector(pca_level=0.99, device="cpu").fit(X)
    >>> np.allclose(det.score_samples(X[:5]), one_machine.score_samples(X[:5]))
    True
    """
    from ._tools.fitting import check_threshold_request, fit_then_threshold
    from ._tools.model import split_model

    try:
        transformer, detector = split_model(model, fitted=False)
    except ValueError as error:
        raise ValueError(f"skdfm.distributed.fit: {error}") from None
    request = check_threshold_request(
        detector,
        threshold_images,
        contamination,
        caller="skdfm.distributed.fit",
        data_name="threshold_images",
    )
    size = _batch_size(transformer, batch_size)
    deadline = _check_timeout(timeout, "skdfm.distributed.fit")
    parts = _partitions(images, "images")
    threshold_parts = (
        None
        if threshold_images is None
        else _partitions(threshold_images, "threshold_images")
    )
    client = _current_client(client)
    weights = None

    def fit_statistics():
        nonlocal weights
        if transformer is not None:
            # Builds the backbone (only the form of X is checked): what the workers
            # get is what this process would run.
            transformer.fit(np.zeros((1, 32, 32, 3), np.uint8))
        # The weights travel once, for both passes, and stay recomputable; the
        # unfitted detector is a few parameters.
        weights = None if transformer is None else _shared(transformer, client)
        task = _image_task(_fit_partition)
        partials = [
            task(part, i, weights, detector, size) for i, part in enumerate(parts)
        ]
        result = _compute(
            _tree(partials, _merge),
            client,
            deadline=deadline,
            timeout=timeout,
            what=f"the statistics pass over {len(parts)} partitions",
            caller="skdfm.distributed.fit",
        )
        if result.statistics is None:
            raise ValueError(
                f"none of the images could be read ({len(result.skipped)} skipped; "
                f"first: {result.skipped[0][0]}: {result.skipped[0][1]})"
                if result.skipped
                else "images holds no images."
            )
        detector.fit_from_statistics(result.statistics)
        _warn_skipped(result.skipped, "training images")

    def threshold_scores():
        fitted = _shared(detector, client)  # the components, once
        task = _image_task(_threshold_partition)
        pieces = _compute(
            [
                task(part, i, weights, fitted, size)
                for i, part in enumerate(threshold_parts)
            ],
            client,
            deadline=deadline,
            timeout=timeout,
            what=f"the threshold pass over {len(threshold_parts)} partitions",
            caller="skdfm.distributed.fit",
        )
        _warn_skipped([x for _, s in pieces for x in s], "threshold images")
        return np.concatenate([s for s, _ in pieces])

    return fit_then_threshold(model, fit_statistics, threshold_scores, request)


def score(
    model,
    images,
    *,
    client=None,
    maps_dir=None,
    root=None,
    batch_size=None,
    compute=False,
    timeout=None,
):
    """Score images on a Dask cluster: a lazy dask DataFrame, one row per image.

    Nothing runs until the table is computed (``.compute()``, ``.to_csv(...)``,
    ``.to_parquet(...)``, or here with ``compute=True``); the model's weights are
    sent to the scheduler here, once, and stay recomputable: a table computed
    after every worker holding them was lost, or while workers die, equals one
    computed without a loss. Each partition of ``images`` is one partition of the
    table, in order.

    Columns: ``partition`` and ``position`` (where the image is in ``images``),
    ``path`` (the file, or missing for an image given as an array),
    ``anomaly_score`` (``-score_samples``: higher is more anomalous), ``normalized``
    (in [0, 1], 0.5 at the threshold, see :func:`~skdfm.normalized_scores`),
    ``label`` (+1 normal, -1 anomalous), ``error`` (why an image could not be
    scored, else missing; its scores and label are then missing too) and, with
    ``maps_dir``, ``map`` (the overlay file written).

    Parameters
    ----------
    model : DFMDetector or Pipeline
        A fitted model with a threshold (``offset_``).
    images : dask.bag.Bag or dask.array.Array
        As for :func:`fit`.
    client : distributed.Client, default=None
        The cluster the model is sent to; default the current client, else Dask's
        local scheduler. Compute the table on the same scheduler.
    maps_dir : str or path-like, default=None
        Write each image's anomaly map over it, as a PNG under this folder, by the
        command's rule (:mod:`skdfm._evaluation.map_files`): the file's place under
        ``root``
        mirrored, its whole name kept (``crack/000.png`` ->
        ``crack/000.png_map.png``); images given as arrays go to
        ``partition-P/item-I_map.png``. Written by the workers, atomically (a
        recomputed partition rewrites the same files). Needs ``score_type="fre"``.
    root : str or path-like, default=None
        The folder whose tree the maps mirror; default none: each file's absolute
        path is mirrored.
    batch_size : int, default=None
        Images per backbone call; the transformer's ``batch_size`` when None.
    compute : bool, default=False
        Compute the table here and return it as a pandas DataFrame.
    timeout : float, default=None
        With ``compute=True``: seconds to wait for a distributed cluster; past
        it the tasks are cancelled and a ``TimeoutError`` says so. Default None:
        wait as long as the cluster works. (A lazy table is bounded where it is
        computed, e.g. ``client.compute(table).result(timeout=...)``.)

    Returns
    -------
    dask.dataframe.DataFrame or pandas.DataFrame
        Lazy; a pandas DataFrame with ``compute=True``.

    Raises
    ------
    TimeoutError
        With ``compute=True``, the cluster did not finish within ``timeout``.
    """
    from ._tools.model import split_model

    transformer, detector = split_model(model)
    detector.offset_  # noqa: B018 - a model without a threshold: said now
    if maps_dir is not None and detector.score_type != "fre":
        raise ValueError(
            "maps_dir needs a model with score_type 'fre' (nll has no maps)."
        )
    size = _batch_size(transformer, batch_size)
    if not isinstance(compute, bool):
        raise ValueError(f"compute must be True or False, got {compute!r}.")
    if timeout is not None and not compute:
        raise ValueError(
            "skdfm.distributed.score: timeout bounds computing the table: pass "
            "compute=True, or bound the wait where the lazy table is computed."
        )
    deadline = _check_timeout(timeout, "skdfm.distributed.score")
    parts = _partitions(images, "images")
    require("pandas", "dask")
    import dask.dataframe as dd
    import pandas as pd

    client = _current_client(client)
    weights = None if transformer is None else _shared(transformer, client)
    fitted = _shared(detector, client)
    task = _image_task(_score_partition)
    # Absolute here: a worker's working directory is not this one.
    folder = None if maps_dir is None else os.path.abspath(maps_dir)
    root = None if root is None else os.path.abspath(root)
    frames = [
        task(part, i, weights, fitted, size, folder, root)
        for i, part in enumerate(parts)
    ]
    meta = pd.DataFrame(
        {
            "partition": pd.Series([], dtype="int64"),
            "position": pd.Series([], dtype="int64"),
            "path": pd.Series([], dtype="string"),
            "anomaly_score": pd.Series([], dtype="float64"),
            "normalized": pd.Series([], dtype="float64"),
            "label": pd.Series([], dtype="Int64"),
            "error": pd.Series([], dtype="string"),
            **({"map": pd.Series([], dtype="string")} if folder else {}),
        }
    )
    table = dd.from_delayed(frames, meta=meta, verify_meta=False)
    if not compute:
        return table
    return _compute(
        table,
        client,
        deadline=deadline,
        timeout=timeout,
        what=f"scoring {len(parts)} partitions",
        caller="skdfm.distributed.score",
    )
