import sys

import numpy as np
import pytest

from skdfm import anomaly_map_grid, overlay_anomaly_map, plot_anomaly_maps


def test_overlay_colours_cold_blue_and_hot_red():
    image = np.full((2, 2, 3), 128, np.uint8)
    amap = np.array([[0.0, 0.0], [0.0, 1.0]])
    out = overlay_anomaly_map(image, amap, alpha=1.0)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0, 2] > out[0, 0, 0]  # coldest: blue
    assert out[1, 1, 0] > out[1, 1, 2]  # hottest: red
    np.testing.assert_array_equal(overlay_anomaly_map(image, amap, alpha=0.0), image)


def test_overlay_accepts_gray_float_and_chw():
    amap = np.random.default_rng(0).random((5, 6))
    gray = overlay_anomaly_map(np.zeros((5, 6)), amap)
    chw = overlay_anomaly_map(np.zeros((3, 5, 6)), amap)
    np.testing.assert_array_equal(gray, chw)
    fixed = overlay_anomaly_map(np.zeros((5, 6)), amap, vmin=0, vmax=10)
    assert not np.array_equal(fixed, gray)


def test_overlay_needs_the_image_size():
    with pytest.raises(ValueError, match="size='image'"):
        overlay_anomaly_map(np.zeros((4, 4, 3)), np.zeros((2, 2)))


def test_grid_stacks_images_over_overlays_with_mask_outline():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    maps = np.zeros((3, 8, 8))
    masks = np.zeros((3, 8, 8), bool)
    masks[1, 2:6, 2:6] = True
    grid = anomaly_map_grid(images, maps, masks=masks)
    assert grid.shape == (16, 24, 3)
    overlay = grid[8:, 8:16]
    assert (overlay[2, 2] == (0, 255, 0)).all()  # outline
    assert not (overlay[3, 3] == (0, 255, 0)).all()  # inside is not drawn over


def test_plot_anomaly_maps_makes_a_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    images = np.zeros((3, 8, 8, 3), np.uint8)
    maps = np.random.default_rng(0).random((3, 8, 8))
    masks = maps > 0.8
    figure = plot_anomaly_maps(
        images, maps, masks=masks, titles=["a", "b", "c"], ncols=2
    )
    axes = figure.get_axes()
    assert len(axes) == 4 and [ax.get_title() for ax in axes[:3]] == ["a", "b", "c"]


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"skdfm\[plot\]"):
        plot_anomaly_maps([np.zeros((2, 2))], [np.zeros((2, 2))])


def test_maps_are_drawn_over_image_files_too(fitted_pipeline, defect_images, tmp_path):
    from PIL import Image

    from skdfm import anomaly_map_grid, anomaly_maps, overlay_anomaly_map

    images, _, masks = defect_images
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(images[i]).save(paths[-1])
    result = anomaly_maps(fitted_pipeline, paths)
    from_files = anomaly_map_grid(paths, result.maps, masks=masks[:3])
    np.testing.assert_array_equal(
        from_files, anomaly_map_grid(images[:3], result.maps, masks=masks[:3])
    )
    np.testing.assert_array_equal(
        overlay_anomaly_map(paths[0], result.maps[0]),
        overlay_anomaly_map(images[0], result.maps[0]),
    )
    # titled: a band above, a colour bar below, the grid itself unchanged
    titled = anomaly_map_grid(
        paths, result.maps, titles=["a\nb", "c", "d"], vmin=0, vmax=1, threshold=0.5
    )
    plain = anomaly_map_grid(paths, result.maps, vmin=0, vmax=1)
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]
    rows = [
        r for r in range(titled.shape[0] - plain.shape[0] + 1)
        if np.array_equal(titled[r : r + plain.shape[0]], plain)
    ]  # fmt: skip
    assert len(rows) == 1 and 0 < rows[0] < titled.shape[0] - plain.shape[0]


def test_plot_anomaly_maps_takes_paths(fitted_pipeline, defect_images, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from skdfm import anomaly_maps, plot_anomaly_maps

    images, _, masks = defect_images
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path, image in zip(paths, images[:2], strict=True):
        Image.fromarray(image).save(path)
    figure = plot_anomaly_maps(paths, anomaly_maps(fitted_pipeline, paths).maps,
                               masks=masks[:2])  # fmt: skip
    assert len(figure.axes) == 2


# -- text that fits, outlines without scipy, words for known truths ------------------


@pytest.mark.parametrize("width", [32, 64, 224, 1024, 4096])
def test_overlay_captions_fit_the_picture_at_any_size(width):
    from skdfm._evaluation.map_files import map_caption, overlay_picture
    from skdfm._evaluation.plotting import legend_font_size, text_lines

    caption = map_caption(-123.456789, -1, -100.5)  # ... ANOMALOUS
    font, lines = text_lines(caption, width, legend_font_size(width))
    shown = "".join(lines).replace(" ", "")
    assert shown == caption.replace(" ", "")  # every character is on a line
    assert "ANOMALOUS" in shown  # the verdict, whatever the size
    for line in lines:
        assert font.getlength(line) <= width - 8, (line, width)
    if width >= 224:  # room for whole words: none is broken
        assert " ".join(lines) == caption and "ANOMALOUS" in lines[-1]
    if width >= 1024 and hasattr(font, "size"):  # large pictures, large text
        assert font.size >= 16
    # drawn: no ink in the right margin (text cut at the border would leave some)
    rng = np.random.default_rng(0)
    picture = overlay_picture(
        np.full((8, width, 3), 255, np.uint8), rng.random((8, width)),
        scale=(0.0, 1.0, 0.5), caption=caption,
    )  # fmt: skip
    pixels = np.asarray(picture)
    assert pixels.shape[1] == width
    text_rows = pixels[8 : 8 + 2 + len(lines) * (font.size if hasattr(font, "size")
                                                 else 11)]  # fmt: skip
    assert text_rows.size and (text_rows[:, -2:] == 255).all()
    assert (text_rows < 128).any()  # the caption is drawn


def test_colour_bar_ticks_never_leave_the_strip():
    from skdfm._evaluation.plotting import colour_bar

    for width in (32, 64, 224):
        strip = np.asarray(colour_bar(width, (0.0, 2.0, 1.0), "a caption"))
        assert strip.shape[1] == width and (strip[:, -1] > 100).any()


def test_mask_outline_equals_scipys_binary_erosion():
    ndimage = pytest.importorskip("scipy.ndimage")
    from skdfm._evaluation.plotting import mask_outline

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 5), (3, 3), (17, 23), (64, 48)]:
        for density in (0.3, 0.7, 0.95, 1.0):
            mask = rng.random(shape) < density
            expected = mask & ~ndimage.binary_erosion(mask, border_value=0)
            np.testing.assert_array_equal(mask_outline(mask), expected)


def test_map_pictures_need_no_scipy(tmp_path):
    import subprocess

    code = (
        "import sys, numpy as np\n"
        "from skdfm._evaluation.map_files import write_map_overlay, write_mask\n"
        "from skdfm._evaluation.plotting import anomaly_map_grid\n"
        "m = np.zeros((9, 9), bool); m[2:6, 2:6] = True\n"
        "anomaly_map_grid([np.zeros((9, 9, 3))], [np.ones((9, 9))], masks=[m],\n"
        "                 titles=['t'], threshold=0.5)\n"
        f"write_map_overlay({str(tmp_path / 'a.png')!r}, np.zeros((9, 9, 3)),\n"
        "                  np.ones((9, 9)), scale=(0, 1, 0.5), caption='c')\n"
        f"write_mask({str(tmp_path / 'b.png')!r}, m)\n"
        "assert 'scipy' not in sys.modules, sorted(\n"
        "    k for k in sys.modules if k.startswith('scipy'))[:3]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


def test_demo_picture_names_both_thresholds_and_the_truth():
    from skdfm.cli.demo import picture_legend, picture_titles

    truth = np.array([1, 1, -1, -1])
    labels = np.array([1, -1, -1, 1])
    scores = np.array([-1.0, -3.0, -4.0, -1.5])  # score_samples, threshold 2
    titles = picture_titles(truth, scores, labels, offset=-2.0)
    assert titles == [
        "good part: passed\nimage score 1 < 2",
        "good part: FLAGGED\nimage score 3 >= 2",
        "defective part: found\nimage score 4 >= 2",
        "defective part: MISSED\nimage score 1.5 < 2",
    ]
    legend = picture_legend(-2.0, 0.25)
    assert "image threshold 2" in legend and "pixel threshold 0.25" in legend


def test_grid_titles_wrap_to_their_column_and_the_legend_is_drawn():
    images, maps = np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 32, 32))
    short = anomaly_map_grid(images, maps, titles=["a", "b"], threshold=0.5,
                             vmin=0, vmax=1)  # fmt: skip
    long = anomaly_map_grid(
        images, maps, titles=["defective part: MISSED image score 1.5 < 2", "b"],
        threshold=0.5, vmin=0, vmax=1, legend="x " * 40,
    )  # fmt: skip
    assert long.shape[1] == short.shape[1] == 64
    assert long.shape[0] > short.shape[0]  # more lines, not wider


def test_plot_anomaly_maps_names_the_pixel_threshold_on_its_colour_bar():
    pytest.importorskip("matplotlib")
    images, maps = (
        np.zeros((2, 8, 8, 3), np.uint8),
        np.random.default_rng(0).random((2, 8, 8)),
    )
    figure = plot_anomaly_maps(images, maps, threshold=0.4, vmin=0, vmax=1)
    bar = figure.axes[-1]
    assert "pixel threshold 0.4" in bar.get_xlabel()
    assert len(plot_anomaly_maps(images, maps).axes) == 2  # no threshold, no bar
