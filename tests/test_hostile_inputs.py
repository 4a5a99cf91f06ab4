"""Hostile inputs the commands and readers meet (issue 24): symlinked folders, FIFOs
and devices, small files declaring huge images, 32-bit TIFFs, file names that are
spreadsheet formulas. Every test that could block is bounded (an alarm in the main
thread, or a subprocess with a timeout), so the suite never hangs."""

import csv
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

import skdfm
import skdfm._evaluation.map_files
from skdfm import make_defect_images
from skdfm._imaging.decode import decode_image_file, read_image_size
from skdfm.cli import main


class Hung(Exception):  # noqa: N818 (what happened)
    pass


@contextmanager
def deadline(seconds=20):
    """Raise Hung in the main thread if the block runs longer than ``seconds``
    (a blocking open() of a FIFO is interrupted by the signal)."""

    def hung(signum, frame):
        raise Hung(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def images():
    pictures, _, _ = make_defect_images(8, 0, image_size=64, random_state=0)
    return pictures


@pytest.fixture(scope="module")
def model_file(fitted_pipeline, defect_images, tmp_path_factory):
    """The tiny fitted Pipeline of conftest, with a pixel threshold, as a file."""
    import copy

    from skdfm import calibrate_pixel_threshold

    pictures, y, _ = defect_images
    model = copy.deepcopy(fitted_pipeline)  # the shared one stays without a threshold
    calibrate_pixel_threshold(model, pictures[y == 1][20:])
    return skdfm.save(model, tmp_path_factory.mktemp("model") / "m.skdfm")


def save_images(folder, images, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images, strict=False):
        Image.fromarray(image).save(folder / name)
    return [folder / name for name in names]


def table_paths(out: str) -> list[str]:
    return [line.split("\t")[0] for line in out.strip().splitlines()[1:]]


# -- 1. symlinked folders ----------------------------------------------------------


def test_score_follows_symlinked_folders_once_without_looping(
    model_file, images, tmp_path, capsys
):
    real = tmp_path / "real"
    save_images(real, images, ["a.png", "b.png"])
    top = tmp_path / "top"
    save_images(top, images[2:], ["c.png"])
    (top / "linked").symlink_to(real)  # a folder elsewhere: followed
    (top / "sub").mkdir()
    save_images(top / "sub", images[3:], ["d.png"])
    (top / "sub" / "up").symlink_to(top)  # a link to an ancestor: no loop
    (top / "again").symlink_to(top / "sub")  # a folder of the tree: once, by its path
    capsys.readouterr()
    with deadline():
        code = main(["score", str(model_file), str(top), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert table_paths(captured.out) == [
        str(top / "c.png"),
        str(top / "linked" / "a.png"),
        str(top / "linked" / "b.png"),
        str(top / "sub" / "d.png"),
    ]
    assert "scored 4 images, " in captured.err and "0 skipped" in captured.err


def test_training_images_follow_symlinked_folders_as_score_does(images, tmp_path):
    from skdfm import training_images
    from skdfm.cli.common import collect_images

    real = tmp_path / "elsewhere"
    save_images(real, images, ["a.png", "b.png", "c.png"])
    good = tmp_path / "bottle" / "train" / "good"
    save_images(good, images[3:], ["d.png"])
    (good / "day2").symlink_to(real)
    (good / "day2_again").symlink_to(real)  # the same real folder: once
    (real / "loop").symlink_to(good)  # back up the tree: no loop
    expected = [str(good / "d.png")] + [
        str(good / "day2" / n) for n in ("a.png", "b.png", "c.png")
    ]
    found = training_images(tmp_path / "bottle")
    assert found.paths == expected and found.unlisted == []
    assert collect_images([str(good)]) == (expected, [])


# -- 2. FIFOs, devices -------------------------------------------------------------


def test_fifos_and_devices_are_refused_without_being_opened(images, tmp_path):
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (link, "a FIFO"), (zero, "a character")):
        with deadline():
            with pytest.raises(ValueError, match=rf"'{path}' is {kind}.*not read"):
                decode_image_file(path)
            with pytest.raises(ValueError, match="not a regular file"):
                read_image_size(path)


def run_command(args, timeout=60):
    """The command in a fresh process, killed after ``timeout`` seconds."""
    code = f"import sys\nfrom skdfm.cli import main\nsys.exit(main({args!r}))\n"
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"skdfm {' '.join(args)} blocked for more than {timeout} s")


def test_fifos_on_the_command_line_or_in_folders_never_block(
    model_file, images, tmp_path
):
    folder = tmp_path / "shots"
    save_images(folder, images, ["a.png", "b.png"])
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    (folder / "camera.png").symlink_to(fifo)
    (folder / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.png")
    named = run_command(["score", str(model_file), str(fifo), str(folder / "a.png")])
    assert named.returncode == 2, named.stderr
    assert f"{fifo} is a FIFO (named pipe), not an image file" in named.stderr
    found = run_command(["score", str(model_file), str(folder), "--no-progress"])
    assert found.returncode == 3, found.stderr
    assert table_paths(found.stdout) == [str(folder / "a.png"), str(folder / "b.png")]
    for name, kind in (("camera", "a FIFO"), ("pipe", "a FIFO"), ("zero", "a char")):
        assert f"skipped {folder / name}.png: Image file " in found.stderr
        assert f"{name}.png' is {kind}" in found.stderr
    assert "scored 2 images, 0 anomalous, 3 skipped" in found.stderr


# -- 3. memory: capped maps, one image failing not the run --------------------------


def test_maps_and_masks_of_large_images_are_capped(
    model_file, images, tmp_path, monkeypatch, capsys
):
    small = save_images(tmp_path / "in", images, ["a.png"])[0]
    big = tmp_path / "in" / "big.png"  # compressible: a few kB declaring 600 x 900
    Image.fromarray(
        np.kron(images[1], np.ones((10, 15, 1), np.uint8))[:600, :900]
    ).save(big)
    # stand-ins for 4096 x 4096 and 2048 x 2048: 60 x 90 and 30 x 45
    monkeypatch.setattr(
        skdfm._evaluation.map_files, "MAX_MAP_PIXELS", 5400, raising=False
    )
    monkeypatch.setattr(
        skdfm._evaluation.map_files, "MAX_OVERLAY_PIXELS", 1350, raising=False
    )
    maps, masks = tmp_path / "maps", tmp_path / "masks"
    capsys.readouterr()
    code = main(["score", str(model_file), str(small), str(big), "--maps", str(maps),
                 "--masks", str(masks), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(masks / "big.png_mask.png").size == (90, 60)
    assert Image.open(maps / "big.png_map.png").width == 45  # then the legend
    # images within the caps keep their own size, and their masks are the library's
    assert Image.open(masks / "a.png_mask.png").size == (64, 64)
    model = skdfm.load(model_file)
    written = np.asarray(Image.open(masks / "a.png_mask.png")) > 0
    np.testing.assert_array_equal(written, skdfm.anomaly_maps(model, [small]).masks[0])


@pytest.mark.parametrize("maps", [False, True])
def test_an_image_running_out_of_memory_is_skipped_not_the_run(
    model_file, images, tmp_path, monkeypatch, capsys, maps
):
    from skdfm import DeepFeatureTransformer

    files = save_images(tmp_path / "in", images, ["a.png", "b.png", "d.png"])
    big = tmp_path / "in" / "c.png"
    Image.fromarray(np.kron(images[2], np.ones((4, 4, 1), np.uint8))).save(big)
    transform = DeepFeatureTransformer.transform

    def allocation_fails_on_big_images(self, X):  # what torch raises then
        if any(getattr(image, "width", 0) > 200 for image in X):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 3221225472 bytes."
            )
        return transform(self, X)

    monkeypatch.setattr(
        DeepFeatureTransformer, "transform", allocation_fails_on_big_images
    )
    out_csv = tmp_path / "scores.csv"
    args = ["score", str(model_file), *map(str, files[:2]), str(big), str(files[2]),
            "--csv", str(out_csv), "--batch-size", "4", "--no-progress"]  # fmt: skip
    if maps:
        args += ["--maps", str(tmp_path / "maps")]
    capsys.readouterr()
    assert main(args) == 3
    captured = capsys.readouterr()
    assert f"skipped {big}: out of memory while scoring it (RuntimeError)" in (
        captured.err
    )
    assert "scored 3 images, 0 anomalous, 1 skipped" in captured.err
    expected = [str(f) for f in files]
    assert table_paths(captured.out) == expected
    assert [row["path"] for row in csv.DictReader(out_csv.open())] == expected


def test_an_image_running_out_of_memory_while_decoding_is_skipped(
    model_file, images, tmp_path, monkeypatch, capsys
):
    from PIL import ImageFile

    files = save_images(tmp_path / "in", images, ["a.png", "b.png", "c.png"])
    load = ImageFile.ImageFile.load

    def decoder_fails_on_b(self):  # what Pillow raises when its buffer cannot be had
        if os.path.basename(getattr(self.fp, "name", "")) == "b.png":
            raise MemoryError()
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoder_fails_on_b)
    out_csv = tmp_path / "scores.csv"
    capsys.readouterr()
    code = main(["score", str(model_file), *map(str, files), "--csv", str(out_csv),
                 "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 3
    assert f"skipped {files[1]}: Image file '{files[1]}': out of memory while " in (
        captured.err
    )
    assert len(list(csv.DictReader(out_csv.open()))) == 2


# -- 4. 32-bit TIFFs ---------------------------------------------------------------


def test_32_bit_tiffs_read_as_16_bit_or_refused_never_black_or_white(tmp_path):
    from skdfm._imaging.images import read_image_file

    ramp = np.linspace(0, 1, 48 * 64).reshape(48, 64)
    as_uint16 = read_image_file_of(
        tmp_path, "u16.tif", np.round(ramp * 65535), "uint16"
    )
    floats = read_image_file_of(tmp_path, "f32.tif", ramp, "float32")
    np.testing.assert_allclose(floats, as_uint16, atol=1 / 65535)
    assert floats.max() > 0.99  # not black
    integers = read_image_file_of(tmp_path, "i32.tif", np.round(ramp * 65535), "int32")
    np.testing.assert_array_equal(integers, as_uint16)  # not white
    for name, values, dtype, message in (
        ("hot.tif", ramp * 4000, "float32", r"float image with pixels in \[0, 4000\]"),
        ("nan.tif", np.where(ramp > 0.5, np.nan, ramp), "float32", "NaN or infinite"),
        (
            "big.tif",
            ramp * 1e6,
            "int32",
            r"integer image with pixels in \[0, 1000000\]",
        ),
        ("neg.tif", ramp * 100 - 50, "int32", r"pixels in \[-50, 50\]"),
    ):
        path = tmp_path / name
        Image.fromarray(values.astype(dtype)).save(path)
        with pytest.raises(ValueError, match=rf"^Image file '{path}' is a 32-bit .*"
                           + message):  # fmt: skip
            read_image_file(path)


def read_image_file_of(folder, name, values, dtype):
    from skdfm._imaging.images import read_image_file

    Image.fromarray(np.asarray(values).astype(dtype)).save(folder / name)
    pixels = read_image_file(folder / name)
    assert pixels.shape == (1, 48, 64) and pixels.dtype.is_floating_point
    return pixels.numpy()


# -- 5. file names that are spreadsheet formulas -------------------------------------

FORMULAS = ['=HYPERLINK("x","y").png', "=1+1.png", "@SUM(A1).png", "+1.png",
            "-1.png", "\tx.png", "\rx.png"]  # fmt: skip


def test_csv_cells_never_start_a_formula(
    model_file, images, tmp_path, monkeypatch, capsys
):
    from .conftest import write_mvtec_tree

    monkeypatch.chdir(tmp_path)
    save_images(tmp_path, images, [*FORMULAS, "plain.png"])
    capsys.readouterr()
    args = ["score", str(model_file), "--csv", "s.csv", "--no-progress", "--"]
    assert main([*args, *FORMULAS, "plain.png"]) == 0
    rows = list(csv.DictReader(open("s.csv", newline="")))
    assert [r["path"] for r in rows] == [f"'{n}" for n in FORMULAS] + ["plain.png"]
    root = write_mvtec_tree(tmp_path / "bottle", size=(64, 64))
    (root / "test" / "scratch").rename(root / "test" / "=1+1")
    (root / "ground_truth" / "scratch").rename(root / "ground_truth" / "=1+1")
    assert main(["evaluate", str(model_file), "bottle", "--csv", "e.csv",
                 "--no-progress"]) == 0  # fmt: skip
    rows = list(csv.DictReader(open("e.csv", newline="")))
    assert {r["defect_type"] for r in rows} == {"'=1+1", "good", "hole"}
    assert all(not r["path"].startswith(("=", "+", "-", "@")) for r in rows)
