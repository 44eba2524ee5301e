"""AdaFace's augmentations (`train.data.augment`): what each does to an image, how often, that a
sample is a function of (seed, epoch, index) whichever process loads it, that they are off unless
asked for, and that an augmented run resumes bit for bit."""

import math
import os
import pickle

import numpy as np
import pytest
import torch

import arcface_ext
from train import checkpoint
from train.config import parse_args
from train.data import Augmentation, SyntheticFaces, build_train_dataset, build_train_loader
from train.data.augment import (CROP_ASPECT, Draws, crop_box, crop_in_place, jitter_colours, resampling_weights, resize,
                                through_low_resolution)
from train.trainer import Trainer, main

from make_opencv_resize_cases import CASES, KERNELS, PATH, case_image
from trainer_fixtures import base_argv, make_face_folder, one_thread, read_jsonl  # noqa: F401

ALL = Augmentation(crop=1.0, low_res=1.0, photometric=1.0)
EXPECTED_UNIFORMS = [0.6014845214281602, 0.5486316869276056, 0.8307327466820285]  # Draws(0, 1, 2, 3)
EXPECTED_INTEGER = 4  # Draws(5).integer(0, 5)


def noise(size=48, seed=0, low=1):
    """A uint8 (size, size, 3) image of random pixels, none of them 0 (so a crop's black shows)."""
    return np.random.default_rng(seed).integers(low, 256, (size, size, 3), dtype=np.uint8)


def test_off_leaves_every_sample_as_it_was():
    plain = SyntheticFaces(4, 5, image_size=32, seed=3)
    for augment in (None, Augmentation()):
        dataset = SyntheticFaces(4, 5, image_size=32, seed=3)
        dataset.augment = augment
        for key in [(0, 0), (7, 1), (19, 5)]:
            assert torch.equal(dataset[key][0], plain[key][0])
    assert not Augmentation() and Augmentation(low_res=0.1) and Augmentation().describe() == "none"


def test_a_sample_is_a_function_of_seed_epoch_and_index():
    dataset = SyntheticFaces(4, 5, image_size=32, seed=3)
    dataset.augment = ALL
    first = dataset[(7, 2)][0]
    assert torch.equal(dataset[(7, 2)][0], first)
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[(7, 2)][0], first)  # as a worker loads it
    assert not torch.equal(dataset[(7, 3)][0], first)  # another epoch, other draws
    other = SyntheticFaces(4, 5, image_size=32, seed=4)
    other.augment = ALL
    image = ALL(dataset.load(7)[0], 4, 2, 7)
    assert not np.array_equal(image, ALL(dataset.load(7)[0], 3, 2, 7))  # another seed, other draws
    # A negative --seed or index works as the flip's hash takes them (modulo 2^64).
    assert ALL(image, -1, 0, 0).shape == image.shape


def test_workers_load_what_the_main_process_would(tmp_path):
    dataset, _ = build_train_dataset("synthetic", image_size=32, seed=1, augment=Augmentation(0.5, 0.5, 0.5),
                                     synthetic_identities=4, synthetic_images_per_identity=8)
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader(dataset, batch_size=8, num_workers=workers, seed=1)
        batches[workers] = [images for (images, _), _ in zip(loader, range(5))]  # past one epoch of 4 steps
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a, b)


def test_crop_keeps_a_box_in_place_and_blackens_the_rest():
    image = noise()
    draws = Draws(0)
    areas, tops = [], set()
    for _ in range(300):
        out = crop_in_place(image, draws)
        kept = (out != 0).all(axis=2)
        rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert kept[top:bottom, left:right].all() and kept.sum() == (bottom - top) * (right - left)
        assert np.array_equal(out[top:bottom, left:right], image[top:bottom, left:right])  # not moved, not resized
        h, w = bottom - top, right - left
        areas.append(h * w / image.shape[0] / image.shape[1])
        assert CROP_ASPECT[0] - 0.1 <= w / h <= CROP_ASPECT[1] + 0.1  # within a pixel's rounding
        tops.add(top)
    assert 0.2 - 0.03 <= min(areas) < 0.25 and max(areas) > 0.9 and len(tops) > 10


def test_a_box_that_cannot_fit_falls_back_to_the_centre():
    # Too wide for any box of 20% of the area at an aspect of 4:3 or less: the widest allowed, centred.
    assert crop_box(10, 100, Draws(0)) == (0, 43, 10, 13)
    assert crop_box(100, 10, Draws(0)) == (43, 0, 13, 10)


def high_frequency(image):
    return np.abs(np.diff(image.astype(np.int32), axis=1)).mean()


def test_low_resolution_loses_detail_and_keeps_flat_colour():
    draws = Draws(0)
    checkers = np.kron((np.indices((24, 24)).sum(0) % 2) * 255, np.ones((2, 2)))[..., None].repeat(3, 2)
    checkers = checkers.astype(np.uint8)  # 2x2 black and white squares
    flat = np.full((48, 48, 3), (90, 140, 200), dtype=np.uint8)
    details = []
    for _ in range(100):
        out = through_low_resolution(checkers, draws)
        assert out.shape == checkers.shape and out.dtype == np.uint8
        details.append(high_frequency(out))
        assert np.abs(through_low_resolution(flat, draws).astype(int) - flat).max() <= 1
    assert np.mean(details) < 0.6 * high_frequency(checkers), np.mean(details)
    # Shrinking to 1 pixel at the smallest: an image of a few pixels survives it.
    assert through_low_resolution(noise(size=3), draws).shape == (3, 3, 3)


def test_resize_is_opencvs():
    # AdaFace's low-resolution augmentation resizes with cv2.resize; what OpenCV 4.12 made of these
    # cases (noise and fine stripes, which show every difference in sampling) is stored, as written by
    # make_opencv_resize_cases.py. OpenCV rounds its 8-bit weights to 11 bits: a grey level apart.
    stored = np.load(PATH)
    for k, (height, width, h, w) in enumerate(CASES):
        image = case_image(height, width, k)
        for kernel in KERNELS:
            ours = resize(image, h, w, kernel).astype(int)
            theirs = stored[f"{k}_{kernel}"].astype(int)
            assert ours.shape == theirs.shape
            worst = np.abs(ours - theirs).max()
            assert worst <= 1, f"case {k} ({height}x{width} -> {h}x{w}) {kernel}: {worst} grey levels apart"
    with pytest.raises(ValueError, match="unknown interpolation 'bilinear'"):
        resampling_weights(4, 2, "bilinear")


def test_draws_do_not_depend_on_numpys_generator_methods():
    # PCG64's stream from a SeedSequence is fixed across numpy versions; these are its first draws.
    draws = Draws(0, 1, 2, 3)
    assert draws.uniform(size=3).tolist() == EXPECTED_UNIFORMS
    assert Draws(5).integer(0, 5) == EXPECTED_INTEGER
    assert sorted(Draws(7).permutation(3).tolist()) == [0, 1, 2]


def test_photometric_jitter_scales_brightness_contrast_and_saturation():
    draws = Draws(0)
    grey = np.full((16, 16, 3), 100, dtype=np.uint8)
    levels = []
    for _ in range(200):
        out = jitter_colours(grey, draws)
        # A flat grey image has no contrast or colour to scale: only its brightness moves, by 0.5-1.5.
        assert (out == out[0, 0, 0]).all()
        levels.append(int(out[0, 0, 0]))
    assert 50 <= min(levels) < 60 and 140 < max(levels) <= 150
    colour = noise(size=16)
    spreads = [np.ptp(jitter_colours(colour, draws).astype(int), axis=2).mean() for _ in range(200)]
    base = np.ptp(colour.astype(int), axis=2).mean()
    assert min(spreads) < 0.7 * base and max(spreads) > 1.15 * base  # saturation and contrast both ways


def test_each_augmentation_applies_with_its_own_probability():
    image = noise(size=24)
    counts = {"crop": 0, "low_res": 0, "both": 0}
    augment = Augmentation(crop=0.2, low_res=0.3)
    n = 3000
    for index in range(n):
        out = augment(image, 0, 0, index)
        cropped = bool((out == 0).all(axis=2).any())
        low = cropped and not np.array_equal(out[(out != 0).all(axis=2)], image[(out != 0).all(axis=2)])
        low = low or (not cropped and not np.array_equal(out, image))
        counts["crop"] += cropped
        counts["low_res"] += low
        counts["both"] += cropped and low
    tolerance = 4 * math.sqrt(0.25 / n)
    assert abs(counts["crop"] / n - 0.2) < tolerance, counts
    assert abs(counts["low_res"] / n - 0.3) < tolerance, counts
    assert abs(counts["both"] / n - 0.06) < tolerance, counts  # independent coins
    assert augment(image, 0, 0, 0) is image or augment(image, 0, 0, 1) is image  # untouched samples are not copied


@pytest.mark.parametrize("flag", ["--crop-augmentation", "--low-res-augmentation", "--photometric-augmentation"])
@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_probabilities_are_checked(flag, value):
    with pytest.raises(SystemExit, match=f"{flag} is a probability: it must be in \\[0, 1\\], got {value}"):
        parse_args([flag, value])
    with pytest.raises(ValueError, match="crop augmentation probability must be a number in"):
        Augmentation(crop=float(value))
    assert Augmentation(crop=np.float32(0.5)).crop == 0.5 and str(Augmentation(crop=-0.0).crop) == "0.0"


def test_a_negative_value_in_a_config_file_reaches_its_check(tmp_path):
    # A file's value is handed over as one token (--flag=value): "-inf" was taken for a flag, and the
    # error was argparse's "expected one argument", naming neither the file nor the range.
    config = tmp_path / "run.yaml"
    config.write_text("crop-augmentation: -.inf\n")
    with pytest.raises(SystemExit, match=r"--crop-augmentation is a probability: it must be in \[0, 1\], got -inf"):
        parse_args(["--config", str(config)])
    config.write_text("crop-augmentation: -0.0\nlr: 0.05\n")
    args = parse_args(["--config", str(config)])
    assert str(args.crop_augmentation) == "0.0" and args.lr == 0.05  # -0.0 kept as 0.0 in args.json


def test_a_mirrored_one_pixel_or_read_only_image_becomes_a_tensor():
    from train.data.transforms import to_chw

    pixel = np.array([[[1, 2, 3]]], dtype=np.uint8)
    assert to_chw(pixel, flip=True).flatten().tolist() == [1, 2, 3]  # numpy calls the mirrored view contiguous
    frozen = noise(size=4)
    frozen.flags.writeable = False
    assert torch.equal(to_chw(frozen), torch.from_numpy(frozen.copy()).permute(2, 0, 1))


def test_adaface_flag_names():
    args = parse_args(["--crop_augmentation_prob", "0.2", "--low_res_augmentation_prob", "0.2",
                       "--photometric_augmentation_prob", "0.2"])
    assert (args.crop_augmentation, args.low_res_augmentation, args.photometric_augmentation) == (0.2, 0.2, 0.2)
    defaults = parse_args([])
    assert (defaults.crop_augmentation, defaults.low_res_augmentation, defaults.photometric_augmentation) == (0, 0, 0)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return make_face_folder(str(tmp_path_factory.mktemp("faces") / "train"))


def run_argv(faces, output, **overrides):
    return base_argv(faces, str(output), **{"loss_impl": "fused" if arcface_ext.extension_available() else "reference",
                                           **overrides})


def losses(output):
    return [r["loss"] for r in read_jsonl(os.path.join(output, "metrics.jsonl"))]


def test_an_augmented_run_resumes_exactly(faces, tmp_path, capsys, monkeypatch):
    options = dict(max_steps=6, save_every=3, crop_augmentation=0.5, low_res_augmentation=0.5,
                   photometric_augmentation=0.5)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main(run_argv(faces, full, **options)) == 0
    assert "augmented (crop 0.5, low-res 0.5, photometric 0.5)" in capsys.readouterr().err
    original_step = Trainer.train_step

    def killed_at_step_4(self, images, labels):
        if self.step == 4:
            raise RuntimeError("simulated kill")
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(run_argv(faces, stopped, **options))
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert main(run_argv(faces, stopped, resume="auto", **options)) == 0
    assert losses(stopped) == losses(full)
    assert main(run_argv(faces, tmp_path / "plain", max_steps=6, save_every=3)) == 0
    assert losses(tmp_path / "plain")[1:] != losses(full)[1:]  # the images the network saw differ
    # The probabilities are the run's: another on resume is refused, as any option that changes the data.
    with pytest.raises(SystemExit, match=r"--crop-augmentation 0\.5 in the checkpoint, 0\.2 requested"):
        Trainer(parse_args(run_argv(faces, full, resume="auto", **{**options, "crop_augmentation": 0.2})))
    # A checkpoint older than the options trained without augmentations.
    path = str(tmp_path / "plain" / "checkpoint.pt")
    state = checkpoint.load(path)
    for key in ("crop_augmentation", "low_res_augmentation", "photometric_augmentation"):
        del state["args"][key]
    torch.save(state, path)
    assert Trainer(parse_args(run_argv(faces, tmp_path / "plain", max_steps=8, resume="auto"))).step == 6
    with pytest.raises(SystemExit, match=r"--low-res-augmentation 0\.0 \(the default: the checkpoint is older"):
        Trainer(parse_args(run_argv(faces, tmp_path / "plain", max_steps=8, resume="auto", low_res_augmentation=0.2)))
