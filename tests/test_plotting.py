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
