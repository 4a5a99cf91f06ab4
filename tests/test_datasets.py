import os

import numpy as np
import pytest

from skdfm import load_mvtec, make_defect_images

from .conftest import write_mvtec_tree


def test_make_defect_images_shapes_labels_masks():
    images, y, masks = make_defect_images(7, 5, image_size=48, random_state=1)
    assert images.shape == (12, 48, 48, 3) and images.dtype == np.uint8
    assert masks.shape == (12, 48, 48) and masks.dtype == bool
    assert sorted(y.tolist()) == [-1] * 5 + [1] * 7
    assert not masks[y == 1].any()
    assert masks[y == -1].any(axis=(1, 2)).all()
    # defects are local: a mask covers a small part of the image
    assert masks[y == -1].mean() < 0.2


def test_make_defect_images_is_deterministic_and_seed_dependent():
    a = make_defect_images(4, 4, image_size=40, random_state=3)
    b = make_defect_images(4, 4, image_size=40, random_state=3)
    c = make_defect_images(4, 4, image_size=40, random_state=4)
    for x, z in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, z)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("texture", ["woven", "brushed", "grain"])
@pytest.mark.parametrize("defect", ["scratch", "crack", "stain", "hole"])
def test_every_texture_and_defect_changes_the_masked_pixels(texture, defect):
    images, y, masks = make_defect_images(
        0, 3, image_size=64, texture=texture, defects=[defect], random_state=0
    )
    clean, _, _ = make_defect_images(
        3, 0, image_size=64, texture=texture, random_state=0
    )
    assert (y == -1).all()
    for image, mask in zip(images.astype(float), masks, strict=True):
        assert 5 <= mask.sum() < 0.2 * mask.size
        # the defect differs from its surroundings
        ring = ~mask
        assert abs(image[mask].mean() - image[ring].mean()) > 5


def test_unshuffled_puts_normal_first():
    _, y, _ = make_defect_images(3, 2, image_size=32, shuffle=False, random_state=0)
    assert y.tolist() == [1, 1, 1, -1, -1]


def test_make_defect_images_validates():
    with pytest.raises(ValueError, match="unknown"):
        make_defect_images(2, 2, defects=["dent"])
    with pytest.raises(ValueError, match="at least 1"):
        make_defect_images(0, 0)
    with pytest.raises(ValueError, match="texture"):
        make_defect_images(2, 2, texture="marble")
    with pytest.raises(ValueError, match="image_size"):
        make_defect_images(2, 2, image_size=8)


def test_load_mvtec_test_split(tmp_path):
    root = write_mvtec_tree(tmp_path / "bottle")
    data = load_mvtec(root)
    assert data.defect_type == ["good", "good", "hole", "scratch", "scratch"]
    assert data.y.tolist() == [1, 1, -1, -1, -1]
    assert data.paths[2].endswith("test/hole/000.png")
    assert data.mask_paths[:2] == [None, None]
    assert data.mask_paths[3].endswith("ground_truth/scratch/000_mask.png")
    assert all(m.shape == (20, 24) and m.dtype == bool for m in data.masks)
    assert not data.masks[0].any()
    assert data.masks[3].sum() == 4 * 6 and data.masks[3][2, 3]


def test_load_mvtec_train_split_has_no_masks(tmp_path):
    root = write_mvtec_tree(tmp_path / "bottle")
    data = load_mvtec(root, split="train")
    assert len(data.paths) == 3 and (data.y == 1).all() and data.masks is None


def test_load_mvtec_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="MVTec AD category"):
        load_mvtec(tmp_path)
    root = write_mvtec_tree(tmp_path / "bottle")
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="No ground-truth mask"):
        load_mvtec(root)
    with pytest.raises(ValueError, match="split"):
        load_mvtec(root, split="validation")


def test_missing_masks_can_be_left_to_the_caller(tmp_path):
    root = write_mvtec_tree(tmp_path / "bottle")
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="No ground-truth mask"):
        load_mvtec(root)
    data = load_mvtec(root, load_masks=False, missing_masks="none")
    missing = [
        p
        for p, m, y in zip(data.paths, data.mask_paths, data.y, strict=True)
        if y == -1 and m is None
    ]
    assert [p.split("/")[-2:] for p in missing] == [["hole", "000.png"]]
    with pytest.raises(ValueError, match="missing_masks"):
        load_mvtec(root, missing_masks="none")  # masks cannot be loaded then


def test_read_mvtec_mask_gives_the_mask_or_the_reason(tmp_path):
    from PIL import Image

    from skdfm._evaluation.datasets import read_mvtec_mask

    root = write_mvtec_tree(tmp_path / "bottle")
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    (root / "ground_truth" / "scratch" / "000_mask.png").write_bytes(b"broken")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(
        root / "ground_truth" / "scratch" / "001_mask.png"
    )
    data = load_mvtec(root, load_masks=False, missing_masks="none")
    good = read_mvtec_mask(data, 0, (20, 24))
    assert good.shape == (20, 24) and good.dtype == bool and not good.any()
    with pytest.raises(ValueError, match="no ground-truth mask"):
        read_mvtec_mask(data, 2, (20, 24))  # hole/000
    with pytest.raises(ValueError, match="unreadable mask"):
        read_mvtec_mask(data, 3, (20, 24))  # scratch/000
    with pytest.raises(ValueError, match="001_mask.png is 10x10, the image 20x24"):
        read_mvtec_mask(data, 4, (20, 24))
    full = load_mvtec(write_mvtec_tree(tmp_path / "intact"))
    partial = load_mvtec(tmp_path / "intact", load_masks=False, missing_masks="none")
    for i, mask in enumerate(full.masks):
        np.testing.assert_array_equal(read_mvtec_mask(partial, i, mask.shape), mask)


def _touch_images(root, names):
    from PIL import Image

    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    return root


def test_training_images_of_a_category_are_train_good_only(tmp_path):
    from skdfm import training_images

    root = write_mvtec_tree(tmp_path / "cat")
    images = training_images(root)
    assert images.layout == "mvtec"
    assert images.paths == sorted(str(p) for p in (root / "train/good").glob("*.png"))
    assert {os.path.relpath(p, root).split(os.sep)[0] for p in images.paths} == {
        "train"
    }
    assert "train/good" in images.description
    # train/good itself, or a tree of good images, is a plain folder
    assert training_images(root / "train" / "good").paths == images.paths
    tree = _touch_images(tmp_path / "good", ["a.png", "day1/b.png", "day2/c.jpg"])
    (tree / "notes.txt").write_text("not an image")
    plain = training_images(tree)
    assert plain.layout == "folder" and len(plain.paths) == 3


@pytest.mark.parametrize(
    "names, message",
    [
        (["good/a.png", "crack/a.png"], "holds good/ beside crack/"),
        (["train/a.png"], "has train/ without train/good"),
        (["ground_truth/crack/a_mask.png"], "has ground_truth/ but no train/good"),
        (["x/test/good/a.png"], "holds x/test/ (an MVTec AD split"),
    ],
)
def test_training_images_refuses_folders_mixing_kinds(tmp_path, names, message):
    from skdfm import training_images

    root = _touch_images(tmp_path / "data", names)
    with pytest.raises(ValueError, match="a folder of good images only") as error:
        training_images(root)
    assert message in str(error.value)
    with pytest.raises(FileNotFoundError):
        training_images(tmp_path / "missing")


def test_validation_images_of_a_category_and_of_a_test_split(tmp_path):
    from skdfm import validation_images
    from skdfm._evaluation.datasets import read_mvtec_mask

    root = write_mvtec_tree(tmp_path / "cat")
    data = validation_images(root)
    assert (data.n_good, data.n_defective, data.has_masks) == (2, 3, True)
    assert data.paths == load_mvtec(root, load_masks=False).paths
    split = validation_images(root / "test")  # masks from ground_truth beside it
    assert split.paths == data.paths and split.mask_paths == data.mask_paths
    assert read_mvtec_mask(split, data.y.tolist().index(-1), (20, 24)).any()
    (tmp_path / "val").mkdir()
    for kind in ("good", "scratch"):
        (root / "test" / kind).rename(tmp_path / "val" / kind)
    alone = validation_images(tmp_path / "val")  # not named test: no masks
    assert not alone.has_masks and alone.mask_paths == [None] * 4
    with pytest.raises(ValueError, match="needs defective"):
        validation_images(_touch_images(tmp_path / "g", ["good/a.png"]))
    with pytest.raises(ValueError, match="needs good"):
        validation_images(_touch_images(tmp_path / "b", ["hole/a.png"]))
    with pytest.raises(FileNotFoundError, match="no labelled images"):
        validation_images(_touch_images(tmp_path / "flat", ["a.png"]))
