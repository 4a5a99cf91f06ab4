"""skdfm.distributed under faults: workers killed at chosen moments, a scheduler
address that stays silent or answers garbage, a computation past its timeout.

Real Dask throughout: a LocalCluster of two worker processes on loopback, killed
with SIGKILL (their nannies restart them), and plain sockets for the bad servers.
"""

import concurrent.futures
import functools
import os
import signal
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from sklearn.pipeline import make_pipeline

from skdfm import DeepFeatureTransformer, DFMDetector

from .conftest import RESTART_TIME, SMALL_BACKBONE

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
db = pytest.importorskip("dask.bag")

from skdfm import distributed as skd  # noqa: E402


def _pipeline():
    return make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE, layer="layer2", batch_size=4),
        DFMDetector(pca_level=0.95, device="cpu"),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, defect_images):
    """The 42 parts as PNG files: (paths, y)."""
    images, y, _ = defect_images
    root = tmp_path_factory.mktemp("faults")
    paths = []
    for i, image in enumerate(images):
        paths.append(str(root / f"{i:03d}.png"))
        Image.fromarray(image).save(paths[-1])
    return np.array(paths), y


@pytest.fixture(scope="module")
def fitted(files):
    paths, y = files
    model = _pipeline().fit(list(paths[y == 1][:20]))
    model[-1].set_threshold(
        model.score_samples(list(paths[y == 1][20:])), contamination=0.1
    )
    return model


@pytest.fixture(scope="module")
def cluster():
    # Killed workers' restarts may take longer than the LocalCluster's 15 s (see
    # conftest.RESTART_TIME): without this, it closes their nannies.
    with (
        dask.config.set(RESTART_TIME),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
    ):
        yield cluster


@pytest.fixture
def client(cluster):
    """A client of the two workers, both up (a previous test may have killed
    them)."""
    with distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        yield client


def _worker_pids(client) -> set:
    return set(client.run(os.getpid).values())


def _kill_first_worker_on(item, *, pids, marker, at=None):
    """Kills each worker process of ``pids`` at the first item it reads (or at
    ``item == at``); the workers that replace them run on."""
    if os.getpid() not in pids or (at is not None and item != at):
        return item
    try:
        fd = os.open(f"{marker}-{os.getpid()}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return item
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _killing(bag, client, tmp_path, at=None):
    """``bag`` whose reading kills every current worker (the moment: its first
    item, or the item ``at``)."""
    pids = _worker_pids(client)
    hook = functools.partial(
        _kill_first_worker_on, pids=pids, marker=str(tmp_path / "killed"), at=at
    )
    return bag.map(hook), pids


def _killed(tmp_path) -> int:
    return sum(name.startswith("killed-") for name in os.listdir(tmp_path))


def _kill_every_worker(client) -> int:
    pids = _worker_pids(client)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def _fit(client, paths, **kwargs):
    return skd.fit(_pipeline(), paths, client=client, timeout=300, **kwargs)


def _assert_same(got, want, X):
    np.testing.assert_allclose(
        got[-1].singular_values_, want[-1].singular_values_, rtol=1e-6
    )
    np.testing.assert_allclose(got.score_samples(X), want.score_samples(X), rtol=1e-6)
    if hasattr(got[-1], "offset_"):
        np.testing.assert_allclose(got[-1].offset_, want[-1].offset_, rtol=1e-6)


# -- workers killed ----------------------------------------------------------------


@pytest.mark.slow
def test_score_survives_the_loss_of_every_worker_before_it_runs(client, fitted, files):
    """The moment before the work starts: the model is on the cluster, the table
    not computed yet, and every worker (every one that held the model) dies."""
    paths, _ = files
    bag = skd.image_bag(list(paths[:12]), npartitions=3)
    want = skd.score(fitted, bag, client=client, compute=True, timeout=300)
    table = skd.score(fitted, bag, client=client)
    distributed.wait(distributed.futures_of(table), timeout=60)  # placed
    assert _kill_every_worker(client) == 2
    client.wait_for_workers(2, timeout=120)
    got = client.compute(table).result(timeout=300)
    np.testing.assert_allclose(got["anomaly_score"], want["anomaly_score"], rtol=1e-6)
    assert got["label"].tolist() == want["label"].tolist()


@pytest.mark.slow
def test_a_score_table_is_recomputed_after_its_workers_died(client, fitted, files):
    """After: computed once, every worker lost, computed again."""
    paths, _ = files
    table = skd.score(fitted, skd.image_bag(list(paths[:8]), npartitions=2))
    first = client.compute(table).result(timeout=300)
    assert _kill_every_worker(client) == 2
    client.wait_for_workers(2, timeout=120)
    again = client.compute(table).result(timeout=300)
    np.testing.assert_allclose(again["anomaly_score"], first["anomaly_score"])


@pytest.mark.slow
@pytest.mark.parametrize("at", [None, 5], ids=["first image", "sixth image"])
def test_score_with_every_worker_killed_while_partitions_run(
    client, fitted, files, tmp_path, at
):
    paths, _ = files
    items = list(paths[:12])
    want = fitted.score_samples(items)
    bag, _ = _killing(
        skd.image_bag(items, npartitions=3),
        client,
        tmp_path,
        at=None if at is None else items[at],
    )
    frame = skd.score(fitted, bag, client=client, compute=True, timeout=300)
    assert _killed(tmp_path) >= 1
    assert frame["error"].isna().all()
    np.testing.assert_allclose(frame["anomaly_score"], -want, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["statistics", "threshold"])
def test_fit_with_every_worker_killed_while_partitions_run(
    client, files, tmp_path, moment
):
    """Each worker that started the fit dies at the first image it reads, in the
    statistics pass or in the threshold pass; the model is the one a fit without a
    loss makes, no image lost or counted twice."""
    paths, y = files
    train, held = list(paths[y == 1][:20]), list(paths[y == 1][20:])
    kwargs = dict(contamination=0.2)
    want = _fit(
        client,
        skd.image_bag(train, npartitions=4),
        threshold_images=skd.image_bag(held, npartitions=2),
        **kwargs,
    )
    bags = [skd.image_bag(train, npartitions=4), skd.image_bag(held, npartitions=2)]
    index = 0 if moment == "statistics" else 1
    bags[index], _ = _killing(bags[index], client, tmp_path)
    model = _fit(client, bags[0], threshold_images=bags[1], **kwargs)
    assert _killed(tmp_path) >= 1
    assert model[-1].n_samples_seen_ == 20
    _assert_same(model, want, list(paths[30:]))


def test_fit_survives_every_worker_dying_at_its_first_image(client, files, tmp_path):
    """The model (scattered data once) is lost with the workers that held it."""
    paths, y = files
    train = list(paths[y == 1][:16])
    bag, _ = _killing(skd.image_bag(train, npartitions=4), client, tmp_path)
    model = _fit(client, bag)
    assert _killed(tmp_path) >= 1
    assert model[-1].n_samples_seen_ == 16
    _assert_same(model, _pipeline().fit(train), list(paths[30:34]))


class _FlakyImage(Image.Image):
    """A PIL image whose first read in another process (a worker) fails, with an
    OSError as a flaky file system gives; read again, it is the image."""

    def load(self):
        marker, here = self.info.get("flaky", (None, None))
        if marker and os.getpid() != here:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                raise OSError("a flaky read, this once")
        return super().load()


def _flaky(images, marker):
    flaky = []
    for image in images:
        image = Image.fromarray(image)
        image.__class__ = _FlakyImage
        image.info["flaky"] = (str(marker), os.getpid())
        flaky.append(image)
    return flaky


def test_an_image_task_that_fails_once_is_retried(client, defect_images, tmp_path):
    images, y, _ = defect_images
    train = images[y == 1][:8]
    bag = db.from_sequence(_flaky(train, tmp_path / "failed"), npartitions=2)
    model = _fit(client, bag)
    assert (tmp_path / "failed").exists()  # a task did fail once
    assert model[-1].n_samples_seen_ == 8
    _assert_same(model, _pipeline().fit(train), images[30:34])


@pytest.mark.slow
def test_a_scoring_task_that_fails_once_is_retried(
    client, fitted, defect_images, tmp_path
):
    images, _, _ = defect_images
    bag = db.from_sequence(_flaky(images[:6], tmp_path / "failed"), 2)
    frame = skd.score(fitted, bag, client=client, compute=True, timeout=300)
    assert (tmp_path / "failed").exists()
    np.testing.assert_allclose(
        frame["anomaly_score"], -fitted.score_samples(images[:6]), rtol=1e-6
    )


# -- bounded waits -----------------------------------------------------------------


def _slow(item, seconds):
    time.sleep(seconds)
    return item


def test_fit_past_its_timeout_is_a_clear_timeout_error(client, files):
    paths, y = files
    bag = skd.image_bag(list(paths[y == 1][:4]), npartitions=2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"statistics pass over 2 partitions.*"):
        skd.fit(
            _pipeline(),
            bag.map(functools.partial(_slow, seconds=2)),
            client=client,
            timeout=0.5,
        )
    assert time.monotonic() - start < 5


def test_score_past_its_timeout_is_a_clear_timeout_error(client, fitted, files):
    paths, _ = files
    bag = skd.image_bag(list(paths[:2]), npartitions=2)
    with pytest.raises(TimeoutError, match=r"scoring 2 partitions did not finish"):
        skd.score(
            fitted,
            bag.map(functools.partial(_slow, seconds=2)),
            client=client,
            compute=True,
            timeout=0.5,
        )


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), True, "10"])
def test_bad_timeouts_are_refused(fitted, files, timeout):
    paths, _ = files
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        skd.fit(_pipeline(), skd.image_bag(list(paths)), timeout=timeout)
    with pytest.raises(ValueError, match="pass compute=True"):
        skd.score(fitted, skd.image_bag(list(paths)), timeout=10)


class _Server:
    """A TCP listener on loopback that accepts and then stays silent or writes
    ``answer`` bytes, never speaking Dask's protocol."""

    def __init__(self, answer=b""):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.socket.getsockname()[1]}"
        self.answer, self.accepted = answer, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)
            if self.answer:
                try:
                    connection.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def server(request):
    server = _Server(request.param)
    yield server
    server.close()


RANDOM = np.random.default_rng(0).bytes(4096)
HUGE = (32 << 30).to_bytes(8, "little") + bytes(64)  # announces 32 GiB


@pytest.mark.parametrize("server", [b""], indirect=True)
def test_a_silent_server_is_refused_within_the_timeout(server):
    start = time.monotonic()
    with pytest.raises(
        TimeoutError, match="did not answer as a Dask scheduler within timeout=1 s"
    ):
        skd.connect(server.address, timeout=1)
    assert time.monotonic() - start < 3
    assert server.accepted  # it was reached: the handshake is what timed out


@pytest.mark.parametrize(
    "server", [RANDOM, HUGE], indirect=True, ids=["random", "huge"]
)
def test_a_server_answering_garbage_is_refused_without_allocating(server):
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionError, match="does not speak Dask's protocol"):
            skd.connect(server.address, timeout=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 4
    assert peak < 64 << 20


def test_the_command_refuses_a_silent_scheduler_within_the_timeout(
    fitted, files, tmp_path, capsys
):
    import skdfm
    from skdfm.cli import main

    paths, _ = files
    model = tmp_path / "m.skdfm"
    skdfm.save(fitted, model)
    silent = _Server()
    start = time.monotonic()
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            code = main(
                ["score", str(model), str(paths[0]), "--device", "cpu",
                 "--scheduler", silent.address]
            )  # fmt: skip
    finally:
        silent.close()
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Dask scheduler at {silent.address}" in err
    assert "did not answer as a Dask scheduler within timeout=1 s" in err
    assert time.monotonic() - start < 5


def test_a_cluster_without_workers_ends_the_wait(files, monkeypatch):
    # Every worker lost and none back (here: none ever joined): without a timeout
    # the wait used to last for ever; it ends once the cluster has had no worker
    # for NO_WORKER_TIMEOUT seconds, its tasks cancelled.
    monkeypatch.setattr(skd, "NO_WORKER_TIMEOUT", 1.0)
    paths, y = files
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with (
            distributed.LocalCluster(
                n_workers=0, processes=True, host="127.0.0.1", dashboard_address=None
            ) as empty,
            distributed.Client(empty) as client,
        ):
            bag = skd.image_bag(list(paths[y == 1][:4]))
            fitting = pool.submit(skd.fit, _pipeline(), bag, client=client)
            try:
                error = fitting.exception(timeout=60)
            except TimeoutError:  # a regression: the client's close ends its wait
                error = "still waiting after 60 s"
    finally:
        pool.shutdown(wait=False)
    assert isinstance(error, TimeoutError), error
    assert "has had no worker for 1 s" in str(error)
