"""`python -m train.tools.preview`: the grid holds exactly the images the trainer's dataset gives
for the options (augmented and flipped as in training), in the order the mode asks for."""

import numpy as np
import pytest
from PIL import Image

from train.data import Augmentation, build_train_dataset
from train.tools import preview

from trainer_fixtures import IMAGE_SIZE, make_face_folder


def tile(sheet: np.ndarray, k: int, columns: int, size: int) -> np.ndarray:
    x = preview.GAP + (k % columns) * (size + preview.GAP)
    y = preview.GAP + (k // columns) * (size + preview.LABEL_HEIGHT + preview.GAP)
    return sheet[y:y + size, x:x + size]


def test_one_image_over_epochs_shows_each_epochs_augmentation(tmp_path, capsys):
    out = tmp_path / "one.png"
    options = ["--data", "synthetic", "--image-size", "32", "--seed", "3", "--crop-augmentation", "1",
               "--photometric-augmentation", "0.5"]
    assert preview.main([str(out), "--image", "7", "--count", "6", "--columns", "3", "--epoch", "2"] + options) == 0
    assert "identity and epoch under each; augmentations: crop 1.0, photometric 0.5" in capsys.readouterr().err
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (2 * (32 + preview.LABEL_HEIGHT + preview.GAP) + preview.GAP,
                           3 * (32 + preview.GAP) + preview.GAP, 3)
    dataset, _ = build_train_dataset("synthetic", image_size=32, seed=3, augment=Augmentation(crop=1, photometric=0.5))
    for k in range(6):
        expected = dataset[(7, 2 + k)][0].numpy().transpose(1, 2, 0)
        assert np.array_equal(tile(sheet, k, 3, 32), expected), k
    assert len({tile(sheet, k, 3, 32).tobytes() for k in range(6)}) == 6  # every epoch its own crop


def test_consecutive_images_of_a_folder_and_random_ones(tmp_path):
    data = make_face_folder(str(tmp_path / "faces"), identities=3, images=4)
    dataset, _ = build_train_dataset(data, image_size=IMAGE_SIZE)
    out = tmp_path / "first.png"
    assert preview.main([str(out), "--data", data, "--image-size", str(IMAGE_SIZE), "--first", "10", "--count", "5"]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    columns = 2  # a square grid: ceil(sqrt(2)) for the 2 images left from index 10 of 12
    assert sheet.shape[1] == columns * (IMAGE_SIZE + preview.GAP) + preview.GAP
    for k, index in enumerate((10, 11)):
        assert np.array_equal(tile(sheet, k, columns, IMAGE_SIZE), dataset[(index, 0)][0].numpy().transpose(1, 2, 0))
    out = tmp_path / "random.png"
    assert preview.main([str(out), "--data", data, "--image-size", str(IMAGE_SIZE), "--count", "100"]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    tiles = {tile(sheet, k, 4, IMAGE_SIZE).tobytes() for k in range(12)}  # all 12, none twice
    assert tiles == {dataset[(i, 0)][0].numpy().transpose(1, 2, 0).tobytes() for i in range(12)}
    assert preview.main([str(tmp_path / "one.jpg"), "--data", data, "--image-size", str(IMAGE_SIZE), "--count", "1"]) == 0
    assert Image.open(tmp_path / "one.jpg").format == "JPEG"


def test_options_come_from_a_trainer_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: synthetic\nimage-size: 16\nlow_res_augmentation_prob: 1\nseed: 5\n")
    out = tmp_path / "run.png"
    assert preview.main([str(out), "--config", str(config), "--image", "0", "--count", "1"]) == 0
    dataset, _ = build_train_dataset("synthetic", image_size=16, seed=5, augment=Augmentation(low_res=1))
    assert np.array_equal(tile(np.asarray(Image.open(out).convert("RGB")), 0, 1, 16),
                          dataset[(0, 0)][0].numpy().transpose(1, 2, 0))


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"mine")
    assert preview.main([str(out), "--data", "synthetic"]) == 1
    assert "x.png exists: pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert preview.main([str(tmp_path / "y.png"), "--data", "synthetic", "--image", "16000"]) == 1
    assert "--image 16000: the set has images 0 to 15999" in capsys.readouterr().err
    assert preview.main([str(tmp_path / "y.png"), "--data", str(tmp_path / "none")]) == 1
    assert "expected 'synthetic', a folder with train.rec + train.idx, or an image folder" in capsys.readouterr().err
    for argv, message in [(["y.gif"], "name a .png, .jpg or .webp file"), (["y.png", "--count", "0"], "--count must be"),
                          (["y.png", "--epoch", "-1"], "--epoch must be at least 0")]:
        with pytest.raises(SystemExit):
            preview.main([str(tmp_path / argv[0])] + argv[1:])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--crop-augmentation is a probability"):
        preview.main([str(tmp_path / "y.png"), "--crop-augmentation", "2"])
    assert not (tmp_path / "y.png").exists()
