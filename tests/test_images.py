"""Input rules and preprocessing (skdfm/_imaging/images.py)."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import skdfm._imaging.decode
import skdfm._imaging.images as images_module
from skdfm._imaging.images import as_image_collection, model_input

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def prepare(X, size=(32, 32), batch_size=64):
    """Every batch of ``X`` as model input, concatenated."""
    collection = as_image_collection(X)
    return torch.cat(
        [
            model_input(
                batch, start, device=torch.device("cpu"), size=size, mean=MEAN, std=STD
            )
            for start, batch in collection.batches(batch_size)
        ]
    )


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)


def test_preprocessing_equals_torchvision_pipeline(rgb):
    """RGB [0, 1] -> bilinear anti-aliased resize -> normalisation, as anomalib."""
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize((32, 40), antialias=True),
            v2.Normalize(MEAN.tolist(), STD.tolist()),
        ]
    )
    expected = torch.stack([reference(Image.fromarray(image)) for image in rgb])
    got = prepare(rgb, size=(32, 40))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_layouts_and_kinds_give_the_same_input(rgb, tmp_path):
    expected = prepare(rgb)
    paths = []
    for i, image in enumerate(rgb):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    nchw = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))
    variants = {
        "nchw": nchw,
        "fortran": np.asfortranarray(rgb),
        "strided": np.repeat(rgb, 2, axis=2)[:, :, ::2],
        "float nhwc": rgb.astype(np.float32) / 255,
        "float64 nchw": nchw.astype(np.float64) / 255,
        "uint16": rgb.astype(np.uint16) * 257,
        "tensor nchw": torch.from_numpy(nchw),
        "tensor float nhwc": torch.from_numpy(rgb).float() / 255,
        "list hwc": list(rgb),
        "list chw tensors": list(torch.from_numpy(nchw)),
        "pil": [Image.fromarray(image) for image in rgb],
        "paths": [str(p) for p in paths],
        "pathlib": paths,
        "array of paths": np.array([str(p) for p in paths]),
    }
    for name, X in variants.items():
        torch.testing.assert_close(prepare(X), expected, atol=2e-6, rtol=0, msg=name)


def test_grayscale_is_replicated_to_rgb():
    gray = np.random.default_rng(1).integers(0, 256, (4, 20, 20), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    expected = prepare(rgb)
    for X in (gray, gray[..., None], gray[:, None], list(gray), list(gray[:, None])):
        torch.testing.assert_close(prepare(X), expected)
    pil = [Image.fromarray(image, mode="L") for image in gray]
    torch.testing.assert_close(prepare(pil), expected)


def test_images_of_different_sizes_are_resized_one_by_one(rgb):
    big = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mixed = [rgb[0], big, rgb[1]]
    got = prepare(mixed, batch_size=3)
    torch.testing.assert_close(got[[0, 2]], prepare(rgb[:2]), atol=2e-6, rtol=0)
    torch.testing.assert_close(got[1:2], prepare(big[None]), atol=2e-6, rtol=0)


def test_read_only_memmap_input(rgb, tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, rgb)
    mapped = np.load(path, mmap_mode="r")
    assert not mapped.flags.writeable
    torch.testing.assert_close(prepare(mapped), prepare(rgb))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 5), "2-D array"),
        ((4,), "1 dimensions"),
        ((2, 3, 8, 8, 3), "5 dimensions"),
        ((2, 8, 8, 4), "2 or 4 channels"),
        ((2, 2, 8, 8), "2 or 4 channels"),
        ((2, 8, 8, 5), "no channel axis"),
        ((2, 3, 8, 3), "Ambiguous"),
        ((8, 8, 3), "Ambiguous"),
        ((0, 8, 8, 3), "no images"),
        ((2, 0, 8, 3), "empty image dimension"),
    ],
)
def test_bad_shapes_are_rejected(shape, message):
    with pytest.raises(ValueError, match=message):
        as_image_collection(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool, np.object_])
def test_unsupported_dtypes_are_rejected(dtype):
    with pytest.raises(ValueError, match="images must be"):
        as_image_collection(np.zeros((2, 8, 8, 3), dtype))


def test_complex_and_sparse_are_rejected():
    with pytest.raises(ValueError, match="Complex data not supported"):
        as_image_collection(np.zeros((2, 8, 8, 3), np.complex64))
    from scipy.sparse import csr_matrix

    with pytest.raises(TypeError, match="Sparse input"):
        as_image_collection(csr_matrix(np.eye(3)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_name_the_image(bad):
    X = np.full((4, 8, 8, 3), 0.5, np.float32)
    X[2, 3, 3, 1] = bad
    with pytest.raises(ValueError, match="Image 2 has NaN or infinite"):
        prepare(X, batch_size=3)


@pytest.mark.parametrize("bad", [-0.1, 1.5, 255.0])
def test_float_pixels_outside_unit_range_are_rejected(bad):
    X = np.full((2, 8, 8, 3), 0.5, np.float32)
    X[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"Image 1 has pixel values outside \[0, 1\]"):
        prepare(X)


def test_empty_and_non_image_inputs_are_rejected(rgb):
    with pytest.raises(ValueError, match="no images"):
        as_image_collection([])
    with pytest.raises(ValueError, match="single path"):
        as_image_collection("image.png")
    with pytest.raises(ValueError, match="single PIL image"):
        as_image_collection(Image.fromarray(rgb[0]))
    with pytest.raises(ValueError, match="wrap an iterator in list"):
        as_image_collection(iter(rgb))
    with pytest.raises(ValueError, match=r"X\[1\] is a int"):
        as_image_collection([rgb[0], 3])


def test_data_frames_ask_for_a_column(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"path": ["a.png", "b.png"]})
    with pytest.raises(ValueError, match="data frame; pass one column"):
        as_image_collection(frame)
    assert len(as_image_collection(frame["path"])) == 2


def test_mixed_element_types_are_rejected(rgb, tmp_path):
    with pytest.raises(ValueError, match=r"mixes element types: path .*X\[0\].* pil"):
        as_image_collection(["a.png", Image.fromarray(rgb[0])])
    with pytest.raises(ValueError, match="mixes element types"):
        as_image_collection([rgb[0], "a.png"])


def test_bad_list_elements_are_rejected(rgb):
    with pytest.raises(ValueError, match=r"X\[1\] has shape \(20, 24, 3, 1\)"):
        as_image_collection([rgb[0], rgb[1][..., None]])
    with pytest.raises(ValueError, match=r"X\[0\] has dtype int64"):
        as_image_collection([rgb[0].astype(np.int64)])
    with pytest.raises(ValueError, match="2 or 4 channels"):
        prepare([np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ValueError, match="Ambiguous image"):
        prepare([np.zeros((3, 8, 3), np.uint8)])


def test_missing_and_corrupt_files_name_the_file(rgb, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb[0]).save(good)
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        prepare([good, missing])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="Cannot decode image file .*corrupt.png"):
        prepare([good, corrupt])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="Cannot decode image file .*truncated.png"):
        prepare([truncated])


def test_files_are_decoded_at_most_one_batch_ahead(rgb, tmp_path, monkeypatch):
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb[i % 5]).save(paths[-1])
    decoded, threads = [], set()
    read = images_module.read_image_file

    def spy(path, *args):
        threads.add(threading.current_thread().name)
        decoded.append(path)
        return read(path, *args)

    monkeypatch.setattr(images_module, "read_image_file", spy)
    collection = as_image_collection(paths)
    assert decoded == []  # validation reads no pixel
    batches = collection.batches(4)
    start, batch = next(batches)
    # The next batch may already be decoding in the background, never more.
    assert (start, len(batch)) == (0, 4) and 4 <= len(decoded) <= 8
    start, batch = next(batches)
    assert (start, len(batch)) == (4, 4) and 8 <= len(decoded) <= 10
    assert [start for start, _ in batches] == [8]
    assert decoded == paths
    assert all(name.startswith("skdfm-decode") for name in threads)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_files_read_like_uint16_arrays(tmp_path, suffix):
    from skdfm import DeepFeatureTransformer, make_defect_images
    from skdfm._imaging.images import decode_image_file, read_image_file

    from .conftest import SMALL_BACKBONE

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (3, 40, 48), dtype=np.uint16)
    pixels[0, :, :] //= 64  # a dark image (a 10-bit sensor): far from white
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"{i}{suffix}")
        Image.fromarray(image).save(paths[-1])
    assert Image.open(paths[0]).mode.startswith("I;16")
    expected = torch.from_numpy(pixels[0].astype(np.float32) / 65535.0)
    torch.testing.assert_close(read_image_file(paths[0])[0], expected, rtol=0, atol=0)
    train, _, _ = make_defect_images(4, 0, image_size=64, random_state=0)
    tr = DeepFeatureTransformer(**SMALL_BACKBONE).fit(train)
    from_arrays = tr.transform(list(pixels))
    np.testing.assert_array_equal(tr.transform(paths), from_arrays)  # file path
    decoded = [decode_image_file(p) for p in paths]  # what the command scores
    np.testing.assert_array_equal(tr.transform(decoded), from_arrays)
    # not the saturated white image convert("RGB") gave
    white = tr.transform([np.full((40, 48), 65535, np.uint16)])
    assert not np.allclose(from_arrays[0], white[0])


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_overlays_show_16_bit_images_at_their_brightness(dtype):
    from skdfm import overlay_anomaly_map

    dark = np.full((4, 4), 1000, dtype)  # big-endian: a I;16B TIFF's array
    overlay = overlay_anomaly_map(dark, np.zeros((4, 4)), alpha=0.0)
    assert overlay.max() <= 4  # 1000 / 65535 of white, not saturated


@pytest.mark.parametrize("to", [np.asarray, torch.as_tensor])
def test_one_colour_image_is_never_three_grayscale_ones(to):
    image = to(np.zeros((3, 40, 48), np.uint8))  # torchvision's (C, H, W)
    with pytest.raises(ValueError, match=r"X\[None\].*X\[:, None\]"):
        as_image_collection(image)
    assert len(as_image_collection(image[None])) == 1  # one colour image
    assert len(as_image_collection(image[:, None])) == 3  # three grayscale ones
    assert len(as_image_collection(to(np.zeros((2, 40, 48), np.uint8)))) == 2


def test_stream_fit_counts_colour_images_once():
    from sklearn.pipeline import make_pipeline

    from skdfm import DeepFeatureTransformer, DFMDetector, stream_fit

    from .conftest import SMALL_BACKBONE

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 3, 64, 64), np.uint8)
    model = make_pipeline(
        DeepFeatureTransformer(**SMALL_BACKBONE), DFMDetector(pca_level=3, device="cpu")
    )
    with pytest.raises(ValueError, match="Ambiguous"):
        stream_fit(model, iter(images))  # single (3, H, W) images: refused
    stream_fit(model, (images[i : i + 4] for i in (0, 4)))
    assert model[-1].n_samples_seen_ == 8


@pytest.mark.parametrize("suffix", [".png", ".tif"])  # TIFF checks again at load
def test_large_files_are_read_and_bombs_refused_with_the_file_named(
    tmp_path, monkeypatch, suffix
):
    from skdfm._imaging.images import decode_image_file, read_image_size

    big = tmp_path / f"line_scan{suffix}"
    Image.fromarray(np.full((600, 2000), 128, np.uint8)).save(big)
    # Pillow's own guard, lowered here to stand for a 15 000 x 15 000 file, would
    # raise DecompressionBombError (neither OSError nor ValueError): skdfm's own
    # limit replaces it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert decode_image_file(big).size == (2000, 600)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # restored
    with pytest.raises(ValueError, match=r"line_scan.* is 2000x600 = 1,200,000"):
        decode_image_file(big, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="max_image_pixels=1,000,000"):
        read_image_size(big, max_pixels=1_000_000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_files_above_pillows_threshold_are_decoded_at_a_reduced_scale(
    tmp_path, monkeypatch, fmt
):
    from skdfm import DeepFeatureTransformer
    from skdfm._imaging import images

    from .conftest import SMALL_BACKBONE

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (150, 200, 3), np.uint8)
    pixels = np.kron(small, np.ones((8, 8, 1), np.uint8))  # smooth, 1200 x 1600
    path = tmp_path / f"huge.{fmt.lower()}"
    Image.fromarray(pixels).save(path, fmt, quality=95)
    tr = DeepFeatureTransformer(**SMALL_BACKBONE).fit(pixels[None])
    full = tr.transform([path])
    # ~1/4 the area
    monkeypatch.setattr(skdfm._imaging.decode, "REDUCE_ABOVE_PIXELS", 200_000)
    reduced = images.decode_image_file(path)
    assert reduced.width * reduced.height <= 4 * 200_000 < 1200 * 1600
    approx = tr.transform([path])
    np.testing.assert_allclose(approx, full, rtol=0.05, atol=0.05)
    assert tr.transform_with_sizes([path])[1] == [(1200, 1600)]  # maps: full size


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_colour_files_read_like_uint16_arrays(tmp_path, suffix):
    imagecodecs = pytest.importorskip("imagecodecs")
    from skdfm import DeepFeatureTransformer, make_defect_images
    from skdfm._imaging.images import decode_image_file, read_image_file

    from .conftest import SMALL_BACKBONE

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (2, 40, 48, 3), dtype=np.uint16)
    pixels[0] //= 64  # a dark 10-bit image: its low bits matter
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"{i}{suffix}")
        imagecodecs.imwrite(paths[-1], image)
    assert Image.open(paths[0]).mode == "RGB"  # what Pillow alone sees: 8 bits
    expected = torch.from_numpy(pixels[0].astype(np.float32) / 65535).permute(2, 0, 1)
    torch.testing.assert_close(read_image_file(paths[0]), expected, rtol=0, atol=0)
    train, _, _ = make_defect_images(4, 0, image_size=64, random_state=0)
    tr = DeepFeatureTransformer(**SMALL_BACKBONE).fit(train)
    from_arrays = tr.transform(list(pixels))
    np.testing.assert_array_equal(tr.transform(paths), from_arrays)
    decoded = [decode_image_file(p) for p in paths]  # what the command scores
    np.testing.assert_array_equal(tr.transform(decoded), from_arrays)
    # derived images (resized, flipped) are no longer those pixels: each is read
    # as what it shows, not from the file's 16-bit pixels
    for derived in (decoded[0].resize((24, 20)), decoded[0].transpose(0)):
        np.testing.assert_array_equal(
            tr.transform([derived]), tr.transform([np.asarray(derived)])
        )


def test_16_bit_colour_without_imagecodecs_warns(tmp_path, monkeypatch):
    imagecodecs = pytest.importorskip("imagecodecs")
    import sys

    from skdfm._imaging import images

    path = tmp_path / "rgb16.png"
    imagecodecs.imwrite(path, np.full((8, 8, 3), 4000, np.uint16))
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # not installed
    monkeypatch.setattr(skdfm._imaging.decode, "_warned_sixteen_bit", False)
    with pytest.warns(UserWarning, match=r"skdfm\[16bit\]"):
        tensor = images.read_image_file(path)
    assert tensor.dtype == torch.uint8  # Pillow's 8 bits, said so


def test_a_damaged_16_bit_colour_file_is_a_one_line_error(tmp_path):
    imagecodecs = pytest.importorskip("imagecodecs")
    from skdfm._imaging.images import read_image_file

    path = tmp_path / "rgb16.png"
    imagecodecs.imwrite(path, np.full((32, 32, 3), 4000, np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:60] + bytes(len(data) - 60))  # header kept, pixels gone
    with pytest.raises(ValueError) as error:
        read_image_file(path)
    message = str(error.value)
    assert message.startswith(f"Cannot decode image file '{path}'")
    assert "\n" not in message and message.count("Cannot decode") == 1
