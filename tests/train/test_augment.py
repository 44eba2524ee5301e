"""The trainer's augmentations (`train.data.augment`: AdaFace's, and the blur, hue and grayscale): what
each does to an image, how often, that a sample is a function of (seed, epoch, index) whichever process
loads it, that they are off unless asked for, and that an augmented run resumes bit for bit."""

import argparse
import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import arcface_ext
from train import checkpoint
from train.config import parse_args
from train.data import Augmentation, SyntheticFaces, build_train_dataset, build_train_loader
from train.data.augment import (CROP_ASPECT, ORDER, Draws, crop_box, crop_in_place, gaussian_blur, jitter_colours,
                                resampling_weights, resize, shift_hue, through_low_resolution, to_grayscale)
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


@pytest.mark.parametrize("flag", ["--crop-augmentation", "--low-res-augmentation", "--photometric-augmentation",
                                  "--blur-augmentation", "--hue-augmentation", "--grayscale-augmentation"])
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


@pytest.mark.slow  # (four short training runs: 2.3-4.8 s alone, 4-8 s in the quick run's drift report)
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


# The blur, hue and grayscale (torchvision's GaussianBlur, ColorJitter(hue=h) and RandomGrayscale).

def hsv(image):
    return np.asarray(Image.fromarray(image).convert("HSV")).astype(int)


def adaface_as_before(augment, image, seed, epoch, index):
    """AdaFace's three as they were applied before the blur, hue and grayscale came (e186e8c..2a4c4e7)."""
    draws = Draws(seed, epoch, index, 0x41444146)
    crop, low_res, photometric = draws.uniform(size=3) < (augment.crop, augment.low_res, augment.photometric)
    if crop:
        image = crop_in_place(image, draws)
    if low_res:
        image = through_low_resolution(image, draws)
    if photometric:
        image = jitter_colours(image, draws)
    return image


def test_adafaces_augmentations_are_what_they_were():
    # The blur, hue and grayscale draw from a stream of their own: a run of AdaFace's three sees the images it saw
    # (checked once against 2a4c4e7's output, 540 images, equal), and so does a sample none of the others touch.
    image = noise(size=40)
    adaface = Augmentation(crop=0.5, low_res=0.5, photometric=0.5)
    untouched = 0
    for index in range(40):
        before = adaface_as_before(adaface, image, 3, index % 2, index)
        assert np.array_equal(adaface(image, 3, index % 2, index), before), index
        out = Augmentation(crop=0.5, low_res=0.5, photometric=0.5, blur=0.5, hue=0.5, grayscale=0.5)(
            image, 3, index % 2, index)
        blur, hue, grey = Draws(3, index % 2, index, 0x42484753).uniform(size=3) < 0.5
        if not (blur or hue or grey):
            assert np.array_equal(out, before), index
            untouched += 1
    assert untouched > 0


def test_grayscale_gives_equal_channels_of_the_luma():
    image = noise(size=16, low=0)
    out = to_grayscale(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    luma = image.astype(float) @ [0.299, 0.587, 0.114]  # ITU-R 601, Pillow's "L"
    assert np.abs(out[..., 0] - luma).max() <= 1
    always = Augmentation(grayscale=1)(image, 0, 0, 0)
    assert np.array_equal(always, out)


def test_blur_lowers_high_frequency_energy_and_is_torchvisions():
    image = noise(size=40, low=0)
    spectrum = np.abs(np.fft.fft2(image.astype(float), axes=(0, 1))) ** 2
    high = np.zeros((40, 40), dtype=bool)
    high[10:31, :] = high[:, 10:31] = True  # the upper half of the frequencies on either axis
    energies = [(np.abs(np.fft.fft2(gaussian_blur(image, 5, sigma).astype(float), axes=(0, 1))) ** 2)[high].sum()
                for sigma in (0.5, 1.0, 2.0)]
    assert energies[0] < 0.7 * spectrum[high].sum() and energies[2] < energies[1] < energies[0], energies
    flat = np.full((9, 9, 3), (90, 140, 200), dtype=np.uint8)
    assert np.array_equal(gaussian_blur(flat, 7, 1.5), flat)
    # torchvision's gaussian_blur: a 2-D Gaussian kernel of float32 taps, torch's reflect padding, rounded.
    for size, kernel, sigma in [(40, 5, 1.3), (17, 9, 2.0), (12, 3, 0.4)]:
        picture = image[:size, :size]
        x = torch.linspace(-(kernel // 2), kernel // 2, kernel)
        taps = torch.exp(-0.5 * (x / sigma) ** 2)
        taps = taps / taps.sum()
        padded = torch.nn.functional.pad(torch.from_numpy(picture).permute(2, 0, 1)[None].float(), [kernel // 2] * 4,
                                         mode="reflect")
        theirs = torch.nn.functional.conv2d(padded, (taps[:, None] * taps[None, :]).expand(3, 1, kernel, kernel),
                                            groups=3)[0].round().permute(1, 2, 0).numpy()
        worst = np.abs(gaussian_blur(picture, kernel, sigma) - theirs).max()
        assert worst <= 1, f"{size} px, kernel {kernel}, sigma {sigma}: {worst} grey levels apart"
    # A kernel wider than the image reflects off both edges; one pixel stays itself.
    assert gaussian_blur(noise(size=2), 9, 2.0).shape == (2, 2, 3)
    assert np.array_equal(gaussian_blur(noise(size=1), 5, 1.0), noise(size=1))


def test_a_vanishing_or_a_huge_blur_sigma_is_its_limit_without_a_warning():
    # --blur-sigma takes any sigma > 0. One that float32 rounds to 0 made NaN taps: every blurred image black.
    image = noise(size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (numpy's overflow warnings, said once by each worker)
        for sigma in (1e-50, 1e-30):
            assert np.array_equal(gaussian_blur(image, 5, sigma), image), sigma
        assert np.array_equal(Augmentation(blur=1, blur_sigma=(1e-50, 1e-50))(image, 0, 0, 0), image)
        # One past float32's range: equal taps, as the largest sigmas within it give.
        assert np.array_equal(gaussian_blur(image, 3, 1e300), gaussian_blur(image, 3, 1e30))


def test_hue_rotates_hue_and_keeps_saturation_and_value():
    image = noise(size=24, low=0)
    saturated = hsv(image)[..., 1] > 100  # (the hue of a nearly grey pixel is a rounding's)
    for shift in (1 / 3, -0.2, 0.05, 0.5):
        out = shift_hue(image, shift)
        assert np.array_equal(hsv(out)[..., 2], hsv(image)[..., 2])  # value: the largest channel, kept
        assert np.abs(hsv(out)[..., 1] - hsv(image)[..., 1])[saturated].max() <= 3
        turned = (hsv(out)[..., 0] - hsv(image)[..., 0] - int(shift * 255)) % 256
        assert np.minimum(turned, 256 - turned)[saturated].max() <= 3, shift
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 200
    assert shift_hue(red, 1 / 3)[0, 0].tolist() == [0, 200, 0]  # a third of the circle: red to green
    assert np.array_equal(shift_hue(np.full((3, 3, 3), 77, np.uint8), 0.3), np.full((3, 3, 3), 77))  # grey stays


def test_the_blur_hue_and_grayscale_are_functions_of_seed_epoch_and_index():
    augment = Augmentation(blur=0.6, hue=0.6, grayscale=0.4, blur_sigma=(0.5, 3.0), hue_shift=0.5)
    dataset = SyntheticFaces(4, 5, image_size=32, seed=3)
    dataset.augment = augment
    first = dataset[(7, 2)][0]
    assert torch.equal(dataset[(7, 2)][0], first)
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[(7, 2)][0], first)  # as a worker loads it
    image = dataset.load(7)[0]
    outputs = {augment(image, seed, epoch, 7).tobytes() for seed in (4, 5) for epoch in range(4)}
    assert len(outputs) > 4  # other seeds and epochs, other draws
    for index in range(20):
        assert np.array_equal(augment(image, 9, 1, index), augment(image.copy(), 9, 1, index))


def test_probability_0_leaves_an_image_untouched():
    image = noise(size=20)
    strengths = dict(blur_kernel=9, blur_sigma=(1.0, 3.0), hue_shift=0.5)
    off = Augmentation(blur=0, hue=0, grayscale=0, **strengths)
    assert not off and off.describe() == "none"
    assert all(off(image, 0, 0, index) is image for index in range(20))
    crop = Augmentation(crop=0.5)
    assert all(np.array_equal(Augmentation(crop=0.5, **strengths)(image, 1, 2, index), crop(image, 1, 2, index))
               for index in range(20))


@pytest.mark.parametrize("name,p", [("blur", 0.3), ("hue", 0.25), ("grayscale", 0.4)])
def test_the_blur_hue_and_grayscale_apply_with_their_probabilities(name, p):
    image = noise(size=12)
    augment = Augmentation(**{name: p}, hue_shift=0.5)
    n = 2000
    applied = sum(not np.array_equal(augment(image, 0, 0, index), image) for index in range(n))
    assert abs(applied / n - p) < 4 * math.sqrt(0.25 / n), applied


def test_the_order_and_the_description():
    augment = Augmentation(crop=0.2, low_res=0.2, photometric=0.2, blur=0.1, hue=0.1, grayscale=0.05)
    assert augment.describe() == ("crop 0.2, low-res 0.2, blur 0.1 (kernel 5, sigma 0.1-2), photometric 0.2, "
                                  "hue 0.1 (±0.05), grayscale 0.05")
    assert Augmentation(blur=0.5, blur_sigma=(1.5, 1.5)).describe() == "blur 0.5 (kernel 5, sigma 1.5)"  # not 1.5-1.5
    # The grayscale comes last: after it the hue would have no colour to turn.
    image = noise(size=16)
    both = Augmentation(hue=1, grayscale=1, hue_shift=0.3)(image, 0, 0, 0)
    assert np.array_equal(both, to_grayscale(shift_hue(image, 0.3 * (2 * Draws(0, 0, 0, 0x42484753).uniform(
        size=5)[4] - 1))))
    assert ORDER == ("crop", "low_res", "blur", "photometric", "hue", "grayscale")


def test_the_options_make_the_augmentation_and_their_defaults_are_its():
    from train import config
    from train.trainer import augmentation

    args = parse_args(["--blur-augmentation", "0.1", "--blur-kernel", "7", "--blur-sigma", "0.5,1.5",
                       "--hue-augmentation", "0.2", "--hue-shift", "0.1", "--grayscale-augmentation", "0.3",
                       "--crop-augmentation", "0.4"])
    assert augmentation(args) == Augmentation(crop=0.4, blur=0.1, hue=0.2, grayscale=0.3, blur_kernel=7,
                                              blur_sigma=(0.5, 1.5), hue_shift=0.1)
    assert parse_args(["--blur-sigma", "1.5"]).blur_sigma == [1.5, 1.5]  # one value: that sigma always
    defaults = Augmentation()
    assert (config.BLUR_KERNEL, config.BLUR_SIGMA, config.HUE_SHIFT) == (
        defaults.blur_kernel, defaults.blur_sigma, defaults.hue_shift)
    assert [flag[2:].removesuffix("-augmentation").replace("-", "_") for flag in config.AUGMENTATION_FLAGS] == list(
        ORDER)
    # An earlier run's options, without these: the defaults (off).
    old = vars(parse_args(["--crop-augmentation", "0.4"]))
    for key in ("blur_augmentation", "blur_kernel", "blur_sigma", "hue_augmentation", "hue_shift",
                "grayscale_augmentation"):
        del old[key]
    assert augmentation(argparse.Namespace(**old)) == Augmentation(crop=0.4)


@pytest.mark.parametrize("argv,message", [
    (["--blur-kernel", "4"], "--blur-kernel must be an odd number of pixels, at least 3, got 4"),
    (["--blur-kernel", "1"], "--blur-kernel must be an odd number of pixels, at least 3, got 1"),
    # (was accepted: 99999 cost ~90 MB and ~1 s an image, its taps going round the mirrored image again)
    (["--blur-kernel", "99999", "--data", "x"], r"--blur-kernel must be at most 2 x --image-size - 1 = 223 "
                                                r"pixels \(the blur mirrors the image once past each edge, as "
                                                r"torchvision's\), got 99999"),
    (["--image-size", "32", "--blur-kernel", "65"], r"--blur-kernel must be at most .* = 63 pixels .*, got 65"),
    (["--blur-sigma", "2,1"], r"--blur-sigma is LOW,HIGH in pixels with 0 < LOW <= HIGH \(or one value\), got 2,1"),
    (["--blur-sigma", "0,1"], r"--blur-sigma is LOW,HIGH .*, got 0,1"),
    (["--blur-sigma", "1,2,3"], r"--blur-sigma is LOW,HIGH .*, got 1,2,3"),
    (["--blur-sigma", "nan"], r"--blur-sigma is LOW,HIGH .*, got nan"),
    (["--hue-shift", "0"], r"--hue-shift is a fraction of the colour circle: it must be in \(0, 0.5\], got 0.0"),
    (["--hue-shift", "0.6"], r"--hue-shift is a fraction of the colour circle: it must be in \(0, 0.5\], got 0.6"),
    # (was accepted: Pillow's byte hue turned by int(shift * 255), 0 for every shift drawn)
    (["--hue-shift", "0.003"], r"--hue-shift must be above 1/255 = 0.0039, got 0.003: each shift is cut toward 0 to "
                               r"whole 255ths of the colour circle \(Pillow's hue is a byte, as torchvision's on a PIL "
                               r"image\), and this one turns no hue$"),
    (["--hue-shift", str(1 / 255)], r"--hue-shift must be above 1/255 = 0.0039, got 0.00392157: "),
])
def test_the_strengths_are_checked(argv, message):
    with pytest.raises(SystemExit, match=message) as stop:
        parse_args(argv)
    assert "\n" not in str(stop.value)


def test_a_hue_shift_of_a_255th_or_less_turns_nothing():
    # Why --hue-shift must be above 1/255: every shift drawn from -H to H is cut toward 0 to whole 255ths, and
    # the image only goes through Pillow's HSV and back (which rounds some pixels: not the image itself).
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    unturned = shift_hue(image, 0.0)
    least = Augmentation(hue=1, hue_shift=1 / 255)
    assert all(np.array_equal(least(image, 0, 0, index), unturned) for index in range(20))
    assert not all(np.array_equal(Augmentation(hue=1, hue_shift=2 / 255)(image, 0, 0, index), unturned)
                   for index in range(20))


def test_the_widest_blur_kernel_reads_each_pixel_once_mirrored():
    # 2 x side - 1: the half-kernel one below the side, the most torchvision's reflect padding takes.
    assert parse_args(["--image-size", "32", "--blur-kernel", "63"]).blur_kernel == 63
    assert parse_args(["--blur-kernel", "223", "--data", "x"]).blur_kernel == 223
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    assert gaussian_blur(image, 63, 1e3).shape == image.shape
    # The default kernel (5) bounds no image where no blur runs (--image-size 2 was refused, naming --blur-kernel).
    assert parse_args(["--image-size", "2", "--data", "x"]).image_size == 2
    with pytest.raises(SystemExit, match=r"--blur-kernel must be at most 2 x --image-size - 1 = 3 pixels .*, got 5"):
        parse_args(["--image-size", "2", "--data", "x", "--blur-augmentation", "0.5"])


@pytest.mark.parametrize("fields,message", [
    (dict(blur=-0.1), "blur augmentation probability must be a number in"),
    (dict(hue=float("nan")), "hue augmentation probability must be a number in"),
    (dict(grayscale=2), "grayscale augmentation probability must be a number in"),
    (dict(blur_kernel=6), "blur_kernel must be an odd number of pixels, at least 3, got 6"),
    (dict(blur_kernel=5.0), "blur_kernel must be an odd number of pixels, at least 3, got 5.0"),
    (dict(blur_sigma=(2.0, 1.0)), r"blur_sigma must be \(low, high\) with 0 < low <= high"),
    (dict(blur_sigma=(1.0,)), r"blur_sigma must be \(low, high\) with 0 < low <= high"),
    (dict(hue_shift=0.0), r"hue_shift must be a number in \(0, 0.5\], got 0.0"),
])
def test_an_augmentation_checks_its_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**fields)


def test_strengths_without_their_augmentation_and_random_data_get_notes():
    from train.config import unused_options

    notes = unused_options(parse_args(["--blur-kernel", "7", "--blur-sigma", "1,3", "--hue-shift", "0.2"]))
    assert notes == ["--blur-kernel 7 and --blur-sigma 1.0,3.0 are not used without --blur-augmentation",
                     "--hue-shift 0.2 is not used without --hue-augmentation"]
    assert unused_options(parse_args(["--blur-augmentation", "0.2", "--blur-kernel", "7"])) == []
    # One --blur-sigma (a fixed sigma, kept as [v, v]) is said as given, as the 'augmented (...)' line says it.
    assert unused_options(parse_args(["--blur-sigma", "1.5"])) == [
        "--blur-sigma 1.5 is not used without --blur-augmentation"]
    notes = unused_options(parse_args(["--data", "random", "--num-classes", "10", "--grayscale-augmentation", "0.2",
                                       "--hue-augmentation", "0.1"]))
    assert notes == ["--hue-augmentation 0.1 and --grayscale-augmentation 0.2 are not used: --data random has no "
                     "loader and its noise is not augmented"]


def test_a_resume_keeps_the_blur_hue_and_grayscale():
    from train.trainer import options_changed_on_resume

    saved = vars(parse_args(["--blur-augmentation", "0.2", "--hue-augmentation", "0.1"]))
    assert options_changed_on_resume(saved, parse_args(["--blur-augmentation", "0.2", "--hue-augmentation",
                                                        "0.1"])) == []
    changed = options_changed_on_resume(saved, parse_args(["--blur-augmentation", "0.2", "--blur-sigma", "0.5,1",
                                                           "--hue-augmentation", "0.1", "--hue-shift", "0.1"]))
    assert changed == ["--blur-sigma 0.1,2.0 in the checkpoint, 0.5,1.0 requested",
                       "--hue-shift 0.05 in the checkpoint, 0.1 requested"]
    fixed = vars(parse_args(["--blur-augmentation", "0.2", "--blur-sigma", "1"]))
    assert options_changed_on_resume(fixed, parse_args(["--blur-augmentation", "0.2", "--blur-sigma", "1.5"])) == [
        "--blur-sigma 1.0 in the checkpoint, 1.5 requested"]  # (one value each, as given: not 1.0,1.0 and 1.5,1.5)
    # A checkpoint older than the options trained without them.
    older = {key: value for key, value in saved.items() if key not in ("blur_augmentation", "grayscale_augmentation")}
    assert options_changed_on_resume(older, parse_args(["--grayscale-augmentation", "0.3"])) == [
        "--hue-augmentation 0.1 in the checkpoint, 0.0 requested",
        "--grayscale-augmentation 0.0 (the default: the checkpoint is older than the option), 0.3 requested"]
