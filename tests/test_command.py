"""The command's frame (``skdfm.cli.command``): every failure is one line that says
something, every file name the folder takes is written, and a name it does not take
is refused before any work is done."""

import os

import numpy as np
import pytest
from PIL import Image

import skdfm
import skdfm._imaging.backbone
import skdfm.cli.export
from skdfm.cli import main
from skdfm.cli.options import describe

from .conftest import CLI_TINY

TINY = [*CLI_TINY, "--random-init"]
pytestmark = pytest.mark.usefixtures("no_download")


@pytest.fixture
def good_dir(tmp_path):
    images, _, _ = skdfm.make_defect_images(8, 0, image_size=64, random_state=0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


def test_a_model_named_as_long_as_the_folder_allows_is_saved(good_dir, tmp_path):
    # 255 bytes: the temporary file beside it used to be 14 bytes too long, so the
    # fit ran, then failed to save and the fitted model was lost.
    target = tmp_path / ("m" * 249 + ".skdfm")
    assert main(["fit", str(good_dir), "-o", str(target), *TINY]) == 0
    assert skdfm.load(target).steps[0][1].backbone == "test_resnet"
    assert sorted(os.listdir(tmp_path)) == sorted(["good", target.name])


def test_a_name_the_folder_does_not_take_is_refused_before_fitting(
    good_dir, tmp_path, capsys, monkeypatch
):
    import skdfm._imaging.decode

    def refuse(*args):
        raise AssertionError("an image was read")

    monkeypatch.setattr(skdfm._imaging.decode, "decode_image_file", refuse)
    target = tmp_path / ("m" * 250 + ".skdfm")  # 256 bytes
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(good_dir), "-o", str(target), *TINY])
    assert exit_info.value.code == 2
    assert "is 256 bytes long" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, line",
    [
        (MemoryError(), "skdfm: error: out of memory\n"),
        (
            MemoryError("cannot allocate 7.1 GB"),
            "out of memory: cannot allocate 7.1 GB",
        ),
        (ValueError(), "skdfm: error: ValueError (no message)\n"),
        (OSError(28, "No space left on device"), "No space left on device"),
    ],
)
def test_an_error_is_never_an_empty_line(tmp_path, capsys, monkeypatch, error, line):
    def fail(args):
        raise error

    monkeypatch.setattr(skdfm.cli.export, "run", fail)
    model = tmp_path / "m.skdfm"
    model.write_bytes(b"")  # never read: run fails first
    assert main(["export", str(model), str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert line in err
    assert err.strip() != "skdfm: error:"


def test_describe_keeps_messages():
    assert describe(ValueError("bad value")) == "bad value"
    assert describe(KeyError()) == "KeyError (no message)"


def test_complex_feature_rows_are_refused_in_one_short_line():
    rng = np.random.default_rng(0)
    detector = skdfm.DFMDetector().fit(rng.random((20, 6)))
    X = rng.random((2000, 6)) + 1j  # scikit-learn's message printed all of it
    for call in (skdfm.DFMDetector().fit, detector.score_samples, detector.predict):
        for rows in (X, X.tolist()):
            with pytest.raises(ValueError, match="Complex data not supported") as info:
                call(rows)
            assert len(str(info.value)) < 200


def test_a_command_needing_a_missing_package_says_what_to_install(tmp_path):
    # As where only skdfm-runtime is installed: torch cannot be imported. The
    # command ends in one line naming the package, not a traceback.
    import subprocess
    import sys
    import textwrap

    folder = tmp_path / "good"
    folder.mkdir()
    script = textwrap.dedent(
        f"""
        import sys

        class Absent:  # import torch: ModuleNotFoundError, as if not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "timm"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Absent())
        from skdfm.cli import main
        sys.exit(main(["fit", {str(folder)!r}, "-o", {str(tmp_path / "m.skdfm")!r},
                       "--random-init"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "skdfm fit needs torch, which is not installed" in done.stderr
