"""`python -m train.tools.preview`: the grid holds exactly the images the trainer's dataset gives
for the options (augmented and flipped as in training), in the order the mode asks for."""

import numpy as np
import pytest
from PIL import Image

from train.data import Augmentation, build_train_dataset
from train.tools import preview

from trainer_fixtures import IMAGE_SIZE, make_face_folder


def tile(sheet: np.ndarray, k: int, columns: int, size: int) -> np.ndarray:
    """Tile k of a sheet of ``columns`` columns (a cell as wide as the sheet divides)."""
    cell = (sheet.shape[1] - preview.GAP) // columns
    x = preview.GAP + (k % columns) * cell
    y = preview.GAP + (k // columns) * (size + preview.LABEL_HEIGHT + preview.GAP)
    return sheet[y:y + size, x:x + size]


def test_one_image_over_epochs_shows_each_epochs_augmentation(tmp_path, capsys):
    out = tmp_path / "one.png"
    options = ["--data", "synthetic", "--image-size", "32", "--seed", "3", "--crop-augmentation", "1",
               "--photometric-augmentation", "0.5"]
    assert preview.main(["--output", str(out), "--image", "7", "--count", "6", "--columns", "3", "--epoch", "2"]
                        + options) == 0
    assert "wrote 6 tiles of synthetic (16000 images, 100 identities)" in capsys.readouterr().err
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[0] == 2 * (32 + preview.LABEL_HEIGHT + preview.GAP) + preview.GAP
    dataset, _ = build_train_dataset("synthetic", image_size=32, seed=3, augment=Augmentation(crop=1, photometric=0.5))
    for k in range(6):
        expected = dataset[(7, 2 + k)][0].numpy().transpose(1, 2, 0)
        assert np.array_equal(tile(sheet, k, 3, 32), expected), k
    assert len({tile(sheet, k, 3, 32).tobytes() for k in range(6)}) == 6  # every epoch its own crop


def test_a_folder_of_another_image_size_gets_the_trainers_note(tmp_path, capsys):
    # The note the trainer gives of its --data (train.data.resized_note); none of a folder of the size.
    data = make_face_folder(str(tmp_path / "faces"), identities=2, images=2, size=48)
    assert preview.main(["--output", str(tmp_path / "a.png"), "--data", data, "--image-size", str(IMAGE_SIZE),
                         "--count", "1"]) == 0
    assert (f"note: {data} holds 48x48 (width x height) images (its first image); they are resized to "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} (--image-size)\n") in capsys.readouterr().err
    assert preview.main(["--output", str(tmp_path / "b.png"), "--data", data, "--image-size", "48",
                         "--count", "1"]) == 0
    assert "resized" not in capsys.readouterr().err


def test_consecutive_images_of_a_folder_and_random_ones(tmp_path):
    data = make_face_folder(str(tmp_path / "faces"), identities=3, images=4)
    dataset, _ = build_train_dataset(data, image_size=IMAGE_SIZE)
    out = tmp_path / "first.png"
    assert preview.main(["--output", str(out), "--data", data, "--image-size", str(IMAGE_SIZE), "--first", "10",
                         "--count", "5"]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    columns = 2  # a square grid: ceil(sqrt(2)) for the 2 images left from index 10 of 12
    for k, index in enumerate((10, 11)):
        assert np.array_equal(tile(sheet, k, columns, IMAGE_SIZE), dataset[(index, 0)][0].numpy().transpose(1, 2, 0))
    out = tmp_path / "random.png"
    assert preview.main(["--output", str(out), "--data", data, "--image-size", str(IMAGE_SIZE), "--count", "100"]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    tiles = {tile(sheet, k, 4, IMAGE_SIZE).tobytes() for k in range(12)}  # all 12, none twice
    assert tiles == {dataset[(i, 0)][0].numpy().transpose(1, 2, 0).tobytes() for i in range(12)}
    assert preview.main(["--output", str(tmp_path / "one.jpg"), "--data", data, "--image-size", str(IMAGE_SIZE),
                         "--count", "1"]) == 0
    assert Image.open(tmp_path / "one.jpg").format == "JPEG"
    # Not among an identity's images (it would be one the next time), even through a link; the folder's
    # root holds no image that is read.
    common = ["--data", data, "--image-size", str(IMAGE_SIZE), "--count", "1"]
    assert preview.main(["--output", str(tmp_path / "faces" / "id_000" / "grid.png"), *common]) == 2
    (tmp_path / "faces" / "id_001" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    assert preview.main(["--output", str(tmp_path / "faces" / "id_001" / "link.png"), "--overwrite", *common]) == 2
    assert not (tmp_path / "elsewhere.png").exists()
    assert preview.main(["--output", str(tmp_path / "faces" / "grid.png"), *common]) == 0
    # Nor among the second set's of two (--data a,b).
    other = make_face_folder(str(tmp_path / "more"), identities=2, images=2)
    assert preview.main(["--output", str(tmp_path / "more" / "id_001" / "grid.png"), *common[2:], "--data",
                         f"{data},{other}"]) == 2
    assert not (tmp_path / "more" / "id_001" / "grid.png").exists()


def test_options_come_from_a_trainer_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: synthetic\nimage-size: 16\nlow_res_augmentation_prob: 1\nseed: 5\n")
    out = tmp_path / "run.png"
    assert preview.main(["--output", str(out), "--config", str(config), "--image", "0", "--count", "1"]) == 0
    dataset, _ = build_train_dataset("synthetic", image_size=16, seed=5, augment=Augmentation(low_res=1))
    assert np.array_equal(tile(np.asarray(Image.open(out).convert("RGB")), 0, 1, 16),
                          dataset[(0, 0)][0].numpy().transpose(1, 2, 0))


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"mine")
    # Exit status 2, a user's mistake, as argparse and the other tools end (was 1, which the tools keep for a run
    # that finished with some of its input left out).
    assert preview.main(["--output", str(out), "--data", "synthetic"]) == 2
    assert capsys.readouterr().err == f"preview: error: {out} exists: pass --overwrite to replace it\n"
    assert out.read_bytes() == b"mine"
    assert preview.main(["--output", str(tmp_path / "y.png"), "--data", "synthetic", "--image", "16000"]) == 2
    assert "--image 16000: the set has images 0 to 15999" in capsys.readouterr().err
    assert preview.main(["--output", str(tmp_path / "y.png"), "--data", str(tmp_path / "none")]) == 2
    assert ("expected 'synthetic', a folder with train.rec + train.idx, an image folder, or a list file"
            in capsys.readouterr().err)
    for argv, message in [(["y.gif"], "name a .png, .jpg or .webp file"),
                          (["y.png", "--count", "0"], "--count must be"),
                          (["y.png", "--epoch", "-1"], "--epoch must be at least 0")]:
        with pytest.raises(SystemExit):
            preview.main(["--output", str(tmp_path / argv[0])] + argv[1:])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # (the trainer's own check: its line, and exit status 1)
        preview.main(["--output", str(tmp_path / "y.png"), "--crop-augmentation", "2"])
    assert stop.value.code == "preview: error: --crop-augmentation is a probability: it must be in [0, 1], got 2.0"
    # (were "python -m train: error: ...", then "python -m train.tools.preview: error: ...")
    for argv, message in [(["--foo"], "unrecognized arguments: --foo"),
                          (["--lr", "x"], "argument --lr: invalid float value: 'x'"),
                          (["--config"], "argument --config: expected one argument")]:
        with pytest.raises(SystemExit) as stop:
            preview.main(["--output", str(tmp_path / "y.png"), *argv])
        err = capsys.readouterr().err.splitlines()
        assert stop.value.code == 2 and err[-1] == f"preview: error: {message}", err
        assert err[0].startswith("usage: python -m train.tools.preview "), err  # (the command to copy)
    assert not (tmp_path / "y.png").exists()
    # With an arcface_torch config, whose epochs follow --batch-size, the first parse of the options is
    # the one that counts them: its error line is preview's too (was "train: error: ...", the trainer's).
    config = tmp_path / "ms1mv2_r50.py"
    config.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.network = 'r50'\n"
                      "config.num_classes = 10\nconfig.num_image = 100\nconfig.num_epoch = 1\n")
    with pytest.raises(SystemExit) as stop:
        preview.main(["--output", str(tmp_path / "y.png"), "--config", str(config), "--lr", "x"])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and err[-1] == "preview: error: argument --lr: invalid float value: 'x'", err
    assert err[0].startswith("usage: python -m train.tools.preview "), err


def test_trainer_options_go_anywhere_and_are_checked_as_the_trainer_checks_them(tmp_path, capsys):
    out = tmp_path / "any.png"
    # Trainer options before and after the tool's own (the output was a positional argument, which
    # took "synthetic" for itself).
    assert preview.main(["--data", "synthetic", "--image-size", "16", "--output", str(out), "--seed", "2",
                         "--count", "3"]) == 0
    assert Image.open(out).size[1] == 2 * (16 + preview.LABEL_HEIGHT + preview.GAP) + preview.GAP  # 2 x 2 grid, 16 px
    assert preview.main(["--data", "synthetic", "--num-classes", "7", "--output", str(tmp_path / "n.png")]) == 2
    assert "--num-classes is 7, but synthetic holds 100 identities" in capsys.readouterr().err
    assert not (tmp_path / "n.png").exists()


def test_captions_are_never_cut_and_a_sheet_past_a_formats_limit_is_an_error(tmp_path, capsys):
    out = tmp_path / "small.png"
    assert preview.main(["--data", "synthetic", "--image-size", "4", "--first", "15990", "--count", "2",
                         "--output", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.width > 2 * (4 + preview.GAP) + preview.GAP  # cells as wide as "99 #15990"
    assert preview.main(["--data", "synthetic", "--image-size", "112", "--count", "150", "--columns", "150",
                         "--output", str(tmp_path / "wide.webp")]) == 2
    assert "cannot write the " in capsys.readouterr().err and not (tmp_path / "wide.webp").exists()
