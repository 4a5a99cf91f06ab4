"""Atomic writes: a writer killed at any moment leaves the old file or the new one."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import skdfm
from skdfm._core.files import (
    atomic_write,
    temporary_name,
)

SIZE = 32 * 2**20  # each version: 32 MiB of one repeated byte, written in 1 MiB chunks

# A writer that loads skdfm/_core/files.py on its own (no torch import: it starts in
# milliseconds), then rewrites the file with versions 1, 2, 3, ... forever.
WRITER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("files", {module!r})
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    path, handle_term = sys.argv[1], sys.argv[2] == "1"
    chunk = 2**20

    def write(version):
        with files.atomic_write(path) as out:
            for _ in range({size} // chunk):
                out.write(bytes([version % 256]) * chunk)
                time.sleep(0.001)

    write(1)
    version = 2
    if handle_term:
        with files.terminate_as_exception():
            print("ready", flush=True)  # only once SIGTERM is handled
            while True:
                write(version)
                version += 1
    print("ready", flush=True)
    while True:
        write(version)
        version += 1
    """
)


def complete_version(path: Path) -> int:
    data = path.read_bytes()
    assert len(data) == SIZE, f"a partial file of {len(data)} bytes"
    assert data.count(data[:1]) == SIZE, "a mix of two versions"
    return data[0]


def temporary_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def writer_script(tmp_path):
    module = Path(skdfm.__file__).parent / "_core" / "files.py"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(module=str(module), size=SIZE))
    return script


@pytest.mark.parametrize(
    "kill, handle_term",
    [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
)
@pytest.mark.slow
def test_killed_writers_leave_a_complete_file(
    writer_script, tmp_path, kill, handle_term
):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "model.bin"
    seen = set()
    for delay in (0.0, 0.05, 0.13, 0.29, 0.41, 0.6):  # several moments of a write
        process = subprocess.Popen(
            [sys.executable, str(writer_script), str(target), str(int(handle_term))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(kill)
        process.wait(timeout=30)
        seen.add(complete_version(target))
        if handle_term:  # SIGTERM unwinds: the temporary file is removed
            assert process.returncode == 1  # the Terminated traceback
            assert temporary_files(folder) == []
        for name in temporary_files(folder):  # a hard kill may leave one behind
            (folder / name).unlink()
    assert seen  # every kill left a whole version (1 = the one written before)


def test_a_normal_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as handle:
        handle.write(b"new")
        assert target.read_bytes() == b"old"  # not replaced until complete
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
    with atomic_write(tmp_path / "t.txt", "w") as handle:
        handle.write("text")
    assert (tmp_path / "t.txt").read_text() == "text"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as handle:
            handle.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    with pytest.raises(FileNotFoundError, match="no folder"):
        with atomic_write(tmp_path / "missing" / "m.bin"):
            pass


def test_save_is_atomic_too(tmp_path):
    rng = np.random.default_rng(0)
    det = skdfm.DFMDetector(pca_level=3, device="cpu").fit(rng.normal(size=(20, 6)))
    target = tmp_path / "m.skdfm"
    target.write_bytes(b"old")

    class Unsaveable:
        pass

    det.offset_note_ = Unsaveable()  # fails while encoding, before any byte
    with pytest.raises(ValueError, match="offset_note_"):
        skdfm.save(det, target)
    assert target.read_bytes() == b"old"
    del det.offset_note_
    skdfm.save(det, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.skdfm"]
    assert skdfm.load(target).n_components_ == 3


# Signals sent to the process itself are sent in a fresh one: the test process holds
# torch's, onnxruntime's and OpenVINO's native threads by then, and a self-sent
# SIGTERM there ended pytest with a segmentation fault in 3 of 7 long runs (not in a
# fresh process: 200 in a row with those libraries loaded, none).
RESTORES = textwrap.dedent(
    """
    import importlib.util, os, signal, time
    spec = importlib.util.spec_from_file_location("files", {module!r})
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    before = signal.getsignal(signal.SIGTERM)
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    for _ in range(3):
        try:
            with files.terminate_as_exception():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            raise SystemExit("not terminated")
        except files.Terminated:
            pass
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.set_wakeup_fd(wakeup) == wakeup
        with files.terminate_as_exception():
            pass
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.set_wakeup_fd(wakeup) == wakeup
    print("restored", flush=True)
    """
)


def test_terminate_as_exception_restores_the_handler_and_the_wakeup_fd():
    module = str(Path(skdfm.__file__).parent / "_core" / "files.py")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", RESTORES.format(module=module)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "restored\n"
    assert time.monotonic() - start < 15  # raised at once, never after the sleep


# A process stuck in native code that never returns to Python: onnxruntime running a
# Loop of 2**62 iterations (it releases the GIL, as torch and Pillow do). Python's
# SIGTERM handler cannot run there; the watchdog must end the process and remove the
# temporary file being written.
STUCK = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np, onnx, onnxruntime
    from onnx import TensorProto, helper
    spec = importlib.util.spec_from_file_location("files", {module!r})
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "body",
        [value("i", TensorProto.INT64, []), value("c_in", TensorProto.BOOL, []),
         value("x_in", TensorProto.FLOAT, [1])],
        [value("c_out", TensorProto.BOOL, []), value("x_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "c", "x0"], ["y"], body=body)], "loop",
        [value("x0", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("n", TensorProto.INT64, [], [2**62]),
         helper.make_tensor("c", TensorProto.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString())
    with files.terminate_as_exception(grace=0.5):
        with files.atomic_write(sys.argv[1]) as out:
            out.write(b"partial")
            print("ready", flush=True)
            session.run(None, {{"x0": np.zeros(1, np.float32)}})
    """
)


def test_sigterm_ends_a_process_stuck_in_native_code(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    module = str(Path(skdfm.__file__).parent / "_core" / "files.py")
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK.format(module=module), str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout.readline() == b"ready\n"
        time.sleep(0.2)  # inside session.run
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = process.wait(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        process.kill()
        process.wait()
    assert code == 143
    assert elapsed < 10, elapsed  # the 0.5 s grace, plus the exit
    assert b"terminated" in process.stderr.read()
    # The temporary file was removed, the old file kept.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize(
    "name",
    [
        "m" * 249 + ".skdfm",  # 255 bytes: the longest name the folder takes
        "é" * 124 + ".skdfm",  # 254 bytes in 130 characters
    ],
)
def test_the_longest_file_names_are_written(tmp_path, name):
    # The temporary name (".name.XXXXXXXX.tmp") is 14 bytes longer than the name;
    # it is shortened to fit, the file keeps its name.
    target = tmp_path / name
    with atomic_write(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == [name]


def test_temporary_names_fit_and_keep_whole_characters():
    for name in ("a" * 300, "é" * 200, "short.csv"):
        prefix = temporary_name(name)
        assert len(prefix.encode()) + 8 + len(".tmp") <= 255
        assert prefix.startswith(".") and prefix.endswith(".")
        assert name.startswith(prefix[1:-1])
    assert temporary_name("short.csv") == ".short.csv."
