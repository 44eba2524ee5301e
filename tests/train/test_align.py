"""`python -m train.tools.align`: photos with 5 landmarks -> an ImageFolder of ArcFace crops, on
synthetic faces pasted into larger photos by known similarities (so the crop to expect is known)."""

import math
import os
import signal

import numpy as np
import pytest
from PIL import Image

from train import ijb
from train.data.imagefolder import scan_image_folder
from train.data.synthetic import render_face
from train.tools import align

from conftest import HeldFile

SIZE = 112  # the crop, and the rendered faces
PHOTO = 200  # the photos the faces are pasted into
IDENTITIES, IMAGES = 3, 2


def similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def paste(face: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """``face`` (an aligned crop) placed into a PHOTO x PHOTO photo by a random similarity, and its
    landmarks there: the template's points mapped the same way."""
    matrix = similarity(rng.uniform(-0.5, 0.5), rng.uniform(1.1, 1.4), 0, 0)
    centre = np.full(2, SIZE / 2 - 0.5)
    matrix[:, 2] = np.full(2, PHOTO / 2 - 0.5) - matrix[:, :2] @ centre + rng.uniform(-10, 10, 2)
    photo = ijb.warp_affine(Image.fromarray(face), matrix, PHOTO)
    return photo, ijb.ARCFACE_TEMPLATE @ matrix[:, :2].T + matrix[:, 2]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """raw/person<k>/<j>.png (lossless, so only the two warps stand between crop and face), the
    faces as rendered, and their landmarks, in name order."""
    root = tmp_path_factory.mktemp("align") / "raw"
    rng = np.random.default_rng(0)
    names, faces, landmarks = [], [], []
    for who in range(IDENTITIES):
        os.makedirs(root / f"person{who}")
        for j in range(IMAGES):
            face = render_face(0, 30_000 + who, j, SIZE)
            photo, points = paste(face, rng)
            name = f"person{who}/{j}.png"
            Image.fromarray(photo).save(root / name)
            names.append(name)
            faces.append(face)
            landmarks.append(points)
    return str(root), names, np.stack(faces), np.stack(landmarks)


def lines(names, landmarks, *, sep=" ", strip_extension=False, extra=""):
    out = []
    for name, points in zip(names, landmarks):
        shown = os.path.splitext(name)[0] if strip_extension else name
        out.append(sep.join([shown, *(f"{v:.4f}" for v in points.reshape(-1))]) + extra + "\n")
    return out


def write(path, content):
    with open(path, "w") as f:
        f.writelines(content)
    return str(path)


def crop_error(image: np.ndarray, face: np.ndarray) -> float:
    inner = slice(4, -4)  # the rim of the pasted face meets black when it is turned
    return float(np.abs(image.astype(np.float64) - face)[inner, inner].mean())


def read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_crops_are_the_faces_in_an_image_folder(photos, tmp_path, capsys):
    root, names, faces, landmarks = photos
    listing = write(tmp_path / "lm.txt", lines(names, landmarks, extra=" 0.99"))  # insightface's: a score
    out = tmp_path / "aligned"
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--format", "png",
                       "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {len(names)} crop(s)" in err and "\r" not in err  # no progress bar redrawn into a log
    identities, samples = scan_image_folder(str(out))
    as_read = align.read_face_landmarks(listing)[1]  # to 4 decimals
    assert identities == [f"person{k}" for k in range(IDENTITIES)]
    assert [os.path.relpath(p, out) for p, _ in samples] == names
    for i, (path, _) in enumerate(samples):
        crop = read(path)
        assert crop.shape == (SIZE, SIZE, 3)
        # Two bilinear warps blur the sensor noise, so not pixel for pixel: a few grey levels, and
        # far closer to its own face than to another identity's.
        assert crop_error(crop, faces[i]) < 6
        assert crop_error(crop, faces[i]) < crop_error(crop, faces[(i + IMAGES) % len(faces)]) / 3
        # The same warp as train.ijb's alignment of IJB's loose crops.
        with Image.open(os.path.join(root, names[i])) as photo:
            assert np.array_equal(crop, ijb.align_face(photo, as_read[i], SIZE))

    # Another size frames the face as the trainer shows a model of that size its 112 faces: the 112
    # crop resized (not insightface's template for that size, whose margins differ).
    small = tmp_path / "small"
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(small), "--format", "png",
                       "--workers", "0", "--image-size", "64"]) == 0
    for i, name in enumerate(names):
        resized = Image.fromarray(read(out / name)).resize((64, 64), Image.Resampling.BILINEAR)
        assert np.array_equal(read(small / name), np.asarray(resized))


def test_celeba_and_vggface2_lists_are_read_as_they_are(photos, tmp_path):
    root, names, _, landmarks = photos
    # CelebA: a count, a header, then whitespace-separated fields (integers in the real file).
    celeba = write(tmp_path / "celeba.txt", [f"{len(names)}\n", "lefteye_x lefteye_y righteye_x righteye_y nose_x "
                                             "nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n",
                                             *lines(names, landmarks, sep="   ")])
    # VGGFace2: a CSV header, names without an extension.
    vgg = write(tmp_path / "vgg.csv", ['"NAME_ID","P1X","P1Y","P2X","P2Y","P3X","P3Y","P4X","P4Y","P5X","P5Y"\n',
                                       *lines([f'"{os.path.splitext(n)[0]}"' for n in names], landmarks, sep=",")])
    for listing, extension, skipped in ((celeba, None, 2), (vgg, ".png", 1)):
        read_names, read_points, line_nos, header = align.read_face_landmarks(listing, extension=extension)
        assert read_names == names and len(header) == skipped
        np.testing.assert_allclose(read_points, landmarks, atol=1e-4)
        assert line_nos[0] == skipped + 1
    out = tmp_path / "vgg-aligned"
    assert align.main(["--images", root, "--landmarks", vgg, "--extension", ".png", "--output", str(out),
                       "--workers", "0"]) == 0
    assert sorted(os.path.relpath(p, out) for p, _ in scan_image_folder(str(out))[1]) == \
        sorted(os.path.splitext(n)[0] + ".jpg" for n in names)


def test_existing_crops_are_kept_skipped_or_replaced(photos, tmp_path, capsys):
    root, names, _, landmarks = photos
    listing = write(tmp_path / "lm.txt", lines(names, landmarks))
    out = tmp_path / "aligned"
    args = ["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0"]
    first = out / "person0" / "0.jpg"
    os.makedirs(first.parent)
    first.write_bytes(b"mine")
    assert align.main(args) == 2
    assert "1 of the crops exist already" in capsys.readouterr().err
    assert first.read_bytes() == b"mine" and len(os.listdir(out)) == 1
    assert align.main([*args, "--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert f"{len(names) - 1} face(s)" in err and "1 existing left as they are" in err
    assert first.read_bytes() == b"mine"
    assert align.main([*args, "--overwrite"]) == 0
    assert read(first).shape == (SIZE, SIZE, 3)
    assert not [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]


def test_faces_that_cannot_be_aligned_are_listed_and_the_rest_written(photos, tmp_path, capsys):
    root, names, _, landmarks = photos
    broken = tmp_path / "broken"
    os.makedirs(broken / "x")
    for name in names:
        os.makedirs(broken / os.path.dirname(name), exist_ok=True)
        os.link(os.path.join(root, name), broken / name)
    (broken / "x" / "bad.jpg").write_bytes(b"not a jpeg")
    points = list(landmarks) + [landmarks[0], landmarks[0], np.full((5, 2), 7.0)]
    listing = write(tmp_path / "lm.txt", lines([*names, "x/bad.jpg", "x/missing.jpg", "x/flat.jpg"], np.stack(points)))
    out = tmp_path / "aligned"
    assert align.main(["--images", str(broken), "--landmarks", listing, "--output", str(out), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    bad, missing, flat = len(names) + 1, len(names) + 2, len(names) + 3
    assert f"line {bad}: {broken / 'x' / 'bad.jpg'}: cannot read the image: not an image format Pillow reads" in err
    assert f"line {missing}: {broken / 'x' / 'missing.jpg'}: cannot read the image: no such file" in err
    assert f"line {flat}: {broken / 'x' / 'flat.jpg'}: its 5 landmarks coincide" in err
    assert f"wrote {len(names)} crop(s)" in err and "3 face(s) could not be aligned" in err
    assert sorted(os.listdir(out / "x") if os.path.isdir(out / "x") else []) == []
    # The wrong --images (none of the listed photos under it): one error before any work, no folder made.
    assert align.main(["--images", str(tmp_path), "--landmarks", listing, "--output", str(tmp_path / "none"),
                       "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align: error: none of the {len(names) + 3} photos {listing} lists is under --images "
                          f"{tmp_path} (line 1: {tmp_path / names[0]}): --images is the folder its paths are relative "
                          "to"), err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("content, message", [
    ("a.png 1 2 3 4 5 6 7 8 9 10\nb.png 1 2 3\n", "line 2: expected 'image x1 y1 ... x5 y5'"),
    ("a.png 1 2 3 4 5 6 7 8 9 10\na.png 1 2 3 4 5 6 7 8 9 10\n", "line 2: a.png is listed again (first on line 1)"),
    ("a 1 2 3 4 5 6 7 8 9 10\n", "a is not a .jpg/.jpeg/.png/.bmp file; its names have no extension? pass --extension"),
    ("a.webp 1 2 3 4 5 6 7 8 9 10\n", "a.webp is not a .jpg/.jpeg/.png/.bmp file\n"),
    ("a.png 1 2 3 4 5 6 7 8 9 nan\n", "line 1: expected 'image x1 y1 ... x5 y5'"),
    ("count\nmy photo.png 1 2 3 4 5 6 7 8 9 10\n", "line 2: expected 'image x1 y1 ... x5 y5'"),
    ("a.png 1 2 3 4 5 6 7 8 9 10\n\xeb\n", "line 2: not UTF-8 text"),
    ("header\n", "no line of the form"),
    ("../a.png 1 2 3 4 5 6 7 8 9 10\n", "../a.png is not inside --images"),
    ("a.png 1 2 3 4 5 6 7 8 9 10\na.jpg 1 2 3 4 5 6 7 8 9 10\n", "a.png and a.jpg would both be written to"),
    ("a.png 1 2 3 4 5 6 7 8 9 10\n./a.png 1 2 3 4 5 6 7 8 9 10\n", "line 2: ./a.png is listed again (first on line 1)"),
    # An empty CSV cell is refused, not skipped (which would shift every later column by one).
    ("a.png,,2,3,4,5,6,7,8,9,10\n", "line 1: expected 'image x1 y1 ... x5 y5'"),
    ("a.png,1,2,3,4,5,6,7,8,9,10\nb.png,1,2,3,4,5,6,7,8,9,\n", "; its column 11 is empty"),
    (",1,2,3,4,5,6,7,8,9,10\n", "line 1: the image path is empty"),
    # A first face that does not parse is not taken for a header, even with names without extensions.
    ('"id0/0",,2,3,4,5,6,7,8,9,10\n', "line 1: expected 'image x1 y1 ... x5 y5'"),
    ("a.png,1,2,3,4,5,6,7,8,9,10\nb.png\r,1,2,3,4,5,6,7,8,9,10\n", "line 2: new-line character"),
    # A header that names an image file is not taken for one silently; the message says what to do.
    ("image.jpg x1 y1 x2 y2 x3 y3 x4 y4 x5 y5\n", "if it is a header or a comment, delete it or start it with #"),
])
def test_bad_lists_are_one_line_errors_before_any_work(tmp_path, capsys, content, message):
    os.makedirs(tmp_path / "raw")
    with open(tmp_path / "lm.txt", "wb") as f:
        f.write(content.encode("latin-1"))
    listing = str(tmp_path / "lm.txt")
    out = tmp_path / "aligned"
    assert align.main(["--images", str(tmp_path / "raw"), "--landmarks", listing, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    # Options the landmarks run would ignore: each was taken without a word (a PNG has no quality, and only
    # the detector runs on --device).
    (["--format", "png", "--quality", "50"], "--quality is JPEG's: --format png is lossless"),
    (["--device", "cuda"], "--device goes with --detector: --landmarks aligns on the CPU"),
    # Out of range.
    (["--image-size", "4"], "--image-size must be at least 8, got 4"),
    (["--quality", "0"], "--quality must be 1 to 100, got 0"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
])
def test_options_out_of_range_or_ignored_are_refused(tmp_path, capsys, argv, message):
    os.makedirs(tmp_path / "raw")
    listing = write(tmp_path / "lm.txt", "a.png 1 2 3 4 5 6 7 8 9 10\n")
    with pytest.raises(SystemExit) as stop:
        align.main(["--images", str(tmp_path / "raw"), "--landmarks", listing, "--output", str(tmp_path / "out"),
                    *argv])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"align: error: {message}"
    assert not (tmp_path / "out").exists()


def test_images_and_output_of_the_wrong_kind_are_refused(tmp_path, capsys):
    os.makedirs(tmp_path / "raw")
    listing = write(tmp_path / "lm.txt", "a.png 1 2 3 4 5 6 7 8 9 10\n")
    a_file = write(tmp_path / "notes.txt", "kept\n")
    for images, out, said in [(a_file, tmp_path / "out", f"--images {a_file} is not a folder"),
                              (tmp_path / "raw", a_file, f"--output {a_file} is a file, not a folder"),
                              (tmp_path / "raw", tmp_path / "out", f"landmarks file {tmp_path / 'raw'}: a folder")]:
        given = tmp_path / "raw" if "landmarks" in said else listing
        assert align.main(["--images", str(images), "--landmarks", str(given), "--output", str(out)]) == 2
        assert capsys.readouterr().err == f"align: error: {said}\n"
    assert open(a_file).read() == "kept\n" and not (tmp_path / "out").exists()


def test_a_stop_before_any_crop_leaves_no_folder_made_for_the_output(photos, tmp_path, capsys, monkeypatch):
    # A Ctrl-C before the first crop left the new --output n1/n2/out that align had made (and written in) to check
    # it can be written; there/ was there and stays. (A crop written keeps the folder: rerun with --skip-existing.)
    root, names, _, landmarks = photos
    listing = write(tmp_path / "lm.txt", lines(names, landmarks))

    def stopped_before_the_first_crop(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(align, "align_folder", stopped_before_the_first_crop)
    (tmp_path / "there").mkdir()
    for output in ("n1/n2/out", "there/n2/out"):
        assert align.main(["--images", root, "--landmarks", listing, "--output", str(tmp_path / output),
                           "--workers", "0"]) == 130
        assert "align: stopped by SIGINT" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["lm.txt", "there"] and os.listdir(tmp_path / "there") == []


def test_a_wrong_column_order_is_warned_about(photos, tmp_path, capsys):
    root, names, _, landmarks = photos
    swapped = landmarks[:, [1, 0, 2, 4, 3]]  # the subject's left eye first
    listing = write(tmp_path / "lm.txt", lines(names, swapped))
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(tmp_path / "out"),
                       "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert ("fit the face template poorly" in err
            and f"{len(names)} of {len(names)} faces list the eye further right" in err)
    errors = align.fit_errors(landmarks)
    assert errors.max() < 1e-6  # the pasted faces' landmarks are the template's, exactly
    assert align.fit_errors(swapped).min() > align.POOR_FIT_PIXELS


def test_a_label_before_the_coordinates_is_read_as_rfws_landmark_files_hold_it(photos, tmp_path, capsys):
    # RFW's <Race>_lmk.txt: 'path label x1 ... y5'. Its label was read as x1 (and y5 dropped), with a
    # warning to check the column order.
    root, names, _, landmarks = photos
    labelled = [f"{name} {k // IMAGES} {' '.join(f'{v:.4f}' for v in points.reshape(-1))}\n"
                for k, (name, points) in enumerate(zip(names, landmarks))]
    listing = write(tmp_path / "lmk.txt", labelled)
    notes = []
    read_names, points, _, _ = align.read_face_landmarks(listing, notes=notes)
    assert read_names == names
    np.testing.assert_allclose(points, landmarks, atol=1e-4)
    assert len(notes) == 1 and "read as 'image label x1 y1 ... x5 y5' (RFW's <Race>_lmk.txt)" in notes[0]
    out = tmp_path / "out"
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--format", "png",
                       "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "align: note:" in err and "poorly" not in err
    with Image.open(os.path.join(root, names[0])) as photo:
        assert np.array_equal(read(out / names[0]), ijb.align_face(photo, points[0], SIZE))  # as read: 4 decimals
    # A score after the coordinates (insightface's lists) stays a score: the coordinates fit as written.
    notes = []
    scored = write(tmp_path / "scored.txt", lines(names, landmarks, extra=" 0.99"))
    np.testing.assert_allclose(align.read_face_landmarks(scored, notes=notes)[1], landmarks, atol=1e-4)
    assert notes == []


@pytest.mark.parametrize("model_size", [SIZE, 64])
@pytest.mark.slow
def test_embed_with_landmarks_embeds_the_aligned_crops(photos, tmp_path, capsys, model_size):
    """`train.embed --images raw --landmarks FILE` gives what embedding align's (lossless) crops gives,
    for a model of another input size too (both resize the 112 crop, as the trainer's readers do)."""
    import json

    import torch

    from train import checkpoint, embed
    from train.models import get_model

    root, names, _, landmarks = photos
    torch.manual_seed(0)
    model = get_model("small", embedding_size=16, image_size=model_size)
    backbone = str(tmp_path / "backbone.pt")
    checkpoint.save_atomic(model.state_dict(), backbone)
    with open(tmp_path / "backbone.json", "w") as f:
        json.dump({"network": "small", "embedding_size": 16, "image_size": model_size}, f)
    listing = write(tmp_path / "lm.csv", lines(names, landmarks, sep=",", strip_extension=True))
    crops = tmp_path / "aligned"
    assert align.main(["--images", root, "--landmarks", listing, "--extension", ".png", "--output", str(crops),
                       "--format", "png", "--workers", "0"]) == 0
    common = ["--model", backbone, "--workers", "0"]
    assert embed.main([*common, "--images", root, "--landmarks", listing, "--extension", ".png",
                       "--output", str(tmp_path / "raw.npy")]) == 0
    assert f"embedded {len(names)} faces" in capsys.readouterr().out
    assert embed.main([*common, "--images", str(crops), "--output", str(tmp_path / "crops.npy")]) == 0
    with open(tmp_path / "raw.txt") as f:
        assert f.read().split() == names
    np.testing.assert_allclose(np.load(tmp_path / "raw.npy"), np.load(tmp_path / "crops.npy"), atol=1e-6)

    # Coinciding landmarks are an error naming the line, before any embedding; --landmarks needs --images.
    flat = write(tmp_path / "flat.txt", lines(names[:1], np.full((1, 5, 2), 3.0)))
    assert embed.main([*common, "--images", root, "--landmarks", flat, "--output", str(tmp_path / "f.npy")]) == 2
    assert "line 1: the 5 landmarks of person0/0.png coincide" in capsys.readouterr().err
    # Landmarks off the photo (another image's, or another scale's) are an error naming the line,
    # not a black crop embedded; so is a missing photo.
    shifted = landmarks[:2].copy()
    shifted[1, :, 1] += 1000  # the second face's, far below its photo
    off = write(tmp_path / "off.txt", lines(names[:2], shifted))
    assert embed.main([*common, "--images", root, "--landmarks", off, "--output", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert f"{off}: line 2: {os.path.join(root, names[1])}: its landmarks lie outside the {PHOTO}x{PHOTO} image" in err
    missing = write(tmp_path / "missing.txt", lines(["person0/9.png"], landmarks[:1]))
    assert embed.main([*common, "--images", root, "--landmarks", missing, "--output", str(tmp_path / "m.npy")]) == 2
    assert f"{missing}: line 1: {os.path.join(root, 'person0/9.png')}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "m.npy").exists()
    with pytest.raises(SystemExit):
        embed.main([*common, "--compare", "a.png", "b.png", "--landmarks", flat])
    assert "--landmarks goes with --images" in capsys.readouterr().err


def test_sixteen_bit_photos_are_scaled_not_clipped(photos, tmp_path):
    """A 16-bit greyscale PNG opens as Pillow's mode I;16, which convert("RGB") clips at 255 (a white
    crop); the readers scale it to 8 bits."""
    from train.data.transforms import load_image_file

    root, names, _, landmarks = photos
    os.makedirs(tmp_path / "raw")
    with Image.open(os.path.join(root, names[0])) as photo:
        grey = np.asarray(photo.convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "raw" / "deep.png")
    Image.fromarray(grey).save(tmp_path / "raw" / "flat.png")
    with Image.open(tmp_path / "raw" / "deep.png") as check:
        assert check.mode.startswith("I")
    assert np.array_equal(load_image_file(str(tmp_path / "raw" / "deep.png"), PHOTO),
                          load_image_file(str(tmp_path / "raw" / "flat.png"), PHOTO))
    listing = write(tmp_path / "lm.txt", lines(["deep.png", "flat.png"], landmarks[[0, 0]]))
    out = tmp_path / "out"
    assert align.main(["--images", str(tmp_path / "raw"), "--landmarks", listing, "--output", str(out),
                       "--format", "png", "--workers", "0"]) == 0
    deep, flat = read(out / "deep.png"), read(out / "flat.png")
    assert np.array_equal(deep, flat) and 40 < deep.mean() < 200


def test_quoted_names_may_hold_spaces_and_commas(photos, tmp_path):
    root, names, _, landmarks = photos
    os.makedirs(tmp_path / "raw" / "Zoë Ünal")
    os.link(os.path.join(root, names[0]), tmp_path / "raw" / "Zoë Ünal" / "photo 1.png")
    os.link(os.path.join(root, names[1]), tmp_path / "raw" / "Zoë Ünal" / "a,b.png")
    os.link(os.path.join(root, names[2]), tmp_path / "raw" / "c,d.png")
    listing = write(tmp_path / "lm.txt", [
        "# faces of sample.jpg, as the detector found them\n",  # a comment, even one naming an image
        *lines(["c,d.png"], landmarks[2:3]),  # a comma in a name of a space-separated list, on its first line
        "\n", "   # x.jpg 1 2 3 4 5 6 7 8 9 10\n",
        *lines(['"Zoë Ünal/photo 1.png"'], landmarks[:1]),
        *lines(['"Zoë Ünal/a,b.png"'], landmarks[1:2], sep=",")])
    listed, points, line_nos, skipped = align.read_face_landmarks(listing)
    assert listed == ["c,d.png", "Zoë Ünal/photo 1.png", "Zoë Ünal/a,b.png"]
    assert line_nos.tolist() == [2, 5, 6] and skipped == []
    np.testing.assert_allclose(points, landmarks[[2, 0, 1]], atol=1e-4)
    out = tmp_path / "out"
    assert align.main(["--images", str(tmp_path / "raw"), "--landmarks", listing, "--output", str(out),
                       "--workers", "0"]) == 0
    assert sorted(os.listdir(out / "Zoë Ünal")) == ["a,b.jpg", "photo 1.jpg"]
    assert (out / "c,d.jpg").is_file()


def test_a_killed_worker_is_one_line_and_leaves_the_crops_written(photos, tmp_path, capsys, monkeypatch):
    # (The kernel's out-of-memory killer.) The Pool started another worker and waited forever for the faces the
    # killed one held.
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the workers see the patched writer only when forked")
    root, names, _, landmarks = photos
    listing = write(tmp_path / "lm.txt", lines(names, landmarks))
    out = tmp_path / "aligned"
    write_file_atomic = align.write_file_atomic

    def killed_at_the_third(path, data):
        if path.endswith(os.path.join("person1", "0.png")):
            os.kill(os.getpid(), signal.SIGKILL)
        write_file_atomic(path, data)

    monkeypatch.setattr(align, "write_file_atomic", killed_at_the_third)
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--format", "png",
                       "--workers", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "align: error: a process aligning the faces ended without a word (exit code -9; out of memory?): the crops "
        "written are whole; rerun with --skip-existing to align the rest")
    assert sorted(os.listdir(out / "person0")) == ["0.png", "1.png"]  # (one worker held all 6: a chunk is 32)
    assert not [name for _, _, files in os.walk(out) for name in files if name.endswith(".tmp")]


def test_temporaries_of_killed_workers_are_removed(tmp_path):
    (tmp_path / "a").mkdir()
    kept = [".hidden.jpg", "x.jpg", ".x.jpg.1234abcd.tmp.jpg", ".x.jpg.zz34abcd.tmp"]
    for name in [*kept, ".x.jpg.1234abcd.tmp", ".y z.png.00000000.tmp"]:
        (tmp_path / "a" / name).write_text("")
    assert align.remove_temporaries([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert sorted(os.listdir(tmp_path / "a")) == sorted(kept)


def test_inputs_that_are_broken_symbolic_links_are_said_to_be_and_where_they_point(photos, tmp_path, capsys):
    # A link to a folder or file on a disk not mounted: "is not a folder" or "no such file" alone sent the user
    # looking for the link, which is there. One wording (checkpoint.dangling) for every tool's inputs: --images
    # (check_images_folder), a landmarks file, a checkpoint or ONNX model, --detector, a tool's table.
    from train import checkpoint
    from train.embed import open_detector
    from train.onnx_backbone import open_session
    from train.tools import search

    root, names, _, landmarks = photos
    listing = write(tmp_path / "lm.txt", lines(names, landmarks))
    gone = tmp_path / "gone"
    gone.symlink_to(tmp_path / "unmounted")
    link = f"(a broken symbolic link to {tmp_path / 'unmounted'})"
    assert align.main(["--images", str(gone), "--landmarks", listing, "--output", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == f"align: error: --images {gone} is not a folder {link}\n"
    assert align.main(["--images", root, "--landmarks", str(gone), "--output", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == f"align: error: landmarks file {gone}: no such file {link}\n"
    for call, said in ((lambda: checkpoint.load(str(gone)), f"no checkpoint at {gone} {link}"),
                       (lambda: open_session(str(gone)), f"no model at {gone} {link}"),
                       (lambda: open_detector(str(gone)), f"--detector {gone}: no such file {link}: give an SCRFD")):
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert str(error.value).startswith(said), error.value
    assert search.main(["--gallery", str(gone), "--save-gallery", str(tmp_path / "g.npy")]) == 2
    assert capsys.readouterr().err == f"search: error: --gallery {gone}: no such folder or table {link}\n"
    # A path with nothing there is said as before.
    assert align.main(["--images", str(tmp_path / "none"), "--landmarks", listing,
                       "--output", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == f"align: error: --images {tmp_path / 'none'} is not a folder\n"
    assert not os.path.lexists(tmp_path / "unmounted") and not os.path.exists(tmp_path / "a")


def test_outputs_that_cannot_be_right_are_refused_before_any_work(photos, tmp_path, capsys, monkeypatch):
    root, names, _, landmarks = photos
    listing = write(tmp_path / "lm.txt", lines(names, landmarks))
    (tmp_path / "file").write_text("")
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    real_access = os.access  # (root, who may run the tests, writes in a folder of mode 555)
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == locked else real_access(path, mode))
    # (was "cannot be written: Not a directory")
    file_in_the_way = f"cannot make the folder: {tmp_path / 'file'} is a file"
    for output, message in ((root, f"--output {root} is --images: the crops would go among the photos; name another "
                                   "folder"),
                            (str(tmp_path / "file" / "out"),
                             f"--output {tmp_path / 'file' / 'out'}: {file_in_the_way}"),
                            (str(tmp_path / "file" / "a" / "out"),
                             f"--output {tmp_path / 'file' / 'a' / 'out'}: {file_in_the_way}"),
                            (os.path.join(locked, "out"),
                             f"--output {os.path.join(locked, 'out')}: cannot write in {locked} (read-only, or not "
                             "yours)"),
                            # a link to nothing, said to be one (it was called a file)
                            (str(tmp_path / "gone"), f"--output {tmp_path / 'gone'}: cannot make the folder: "
                             f"{tmp_path / 'gone'} is a broken symbolic link to {tmp_path / 'unmounted'}"),
                            (str(tmp_path / "gone" / "out"), f"--output {tmp_path / 'gone' / 'out'}: cannot make the "
                             f"folder: {tmp_path / 'gone'} is a broken symbolic link to {tmp_path / 'unmounted'}")):
        assert align.main(["--images", root, "--landmarks", listing, "--output", output, "--overwrite"]) == 2
        assert capsys.readouterr().err == f"align: error: {message}\n"
    assert os.listdir(locked) == [] and (tmp_path / "file").read_text() == ""
    assert not os.path.lexists(tmp_path / "unmounted")
    assert sorted(os.listdir(os.path.join(root, "person0"))) == ["0.png", "1.png"]
    with Image.open(os.path.join(root, names[0])) as photo:
        assert photo.size == (PHOTO, PHOTO)
    # --skip-existing over crops of another size would mix sizes.
    out = tmp_path / "out"
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0"]) == 0
    os.remove(out / "person2" / "1.jpg")
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0",
                       "--skip-existing", "--image-size", "128"]) == 2
    err = capsys.readouterr().err
    assert f"{len(names) - 1} of the {len(names) - 1} existing crops are not --image-size 128" in err
    assert "person0/0.jpg is 112x112, ..." in err
    assert not (out / "person2" / "1.jpg").exists()
    # An empty crop (a crash of the machine after the rename) is made again.
    (out / "person1" / "0.jpg").write_bytes(b"")
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0",
                       "--skip-existing"]) == 0
    assert "1 existing crop(s) are empty" in capsys.readouterr().err
    assert read(out / "person1" / "0.jpg").shape == (SIZE, SIZE, 3) and (out / "person2" / "1.jpg").exists()
    os.remove(out / "person2" / "1.jpg")
    # Crops of another --format beside: the folder would hold the faces twice.
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0",
                       "--skip-existing", "--format", "png"]) == 2
    assert f"{out / 'person0' / '0.jpg'} exists where 0.png goes ({len(names) - 1} such" in capsys.readouterr().err
    # Every existing crop is checked: one of another size among the last (an --overwrite at another
    # size that was stopped) is found.
    Image.new("RGB", (128, 128)).save(out / "person2" / "0.jpg")
    assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0",
                       "--skip-existing"]) == 2
    assert f"1 of the {len(names) - 1} existing crops are not --image-size 112" in capsys.readouterr().err
    assert not (out / "person2" / "1.jpg").exists()


def test_suspect_landmarks_are_named(photos, tmp_path, capsys):
    root, names, _, landmarks = photos
    mixed = landmarks.copy()
    mixed[1] = landmarks[1][[1, 0, 2, 4, 3]]  # one face in the other order
    outside = landmarks.copy()
    outside[2] += 1000  # off its photo
    fractions = landmarks / PHOTO  # not in pixels
    for points, message, status in (
            (mixed, "1 face(s) fit the face template poorly (RMS miss over 10 of 112 pixels), lines 2:", 0),
            (outside, f"line 3: {os.path.join(root, names[2])}: its landmarks lie outside the 200x200 image", 1),
            (fractions, "pixels apart (median): landmarks must be in pixels", 0)):
        listing = write(tmp_path / "lm.txt", lines(names, points))
        out = tmp_path / f"out{status}{len(message)}"
        assert align.main(["--images", root, "--landmarks", listing, "--output", str(out), "--workers", "0"]) == status
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("to_group", [False, True], ids=["SIGTERM to the main process", "Ctrl-C to the group"])
@pytest.mark.slow
def test_a_signal_stops_the_workers_and_a_rerun_finishes(photos, tmp_path, to_group):
    # A SIGTERM to the main process (a scheduler's), which ends the workers; and a Ctrl-C at the terminal,
    # a SIGINT to the whole process group, the workers (and Python 3.14's forkserver) included.
    import signal
    import subprocess
    import sys
    import time

    root, names, _, landmarks = photos
    many = tmp_path / "many"
    listed = []
    for k in range(400):
        os.makedirs(many / f"id{k // 10}", exist_ok=True)
        name = f"id{k // 10}/{k}.png"
        if k != 20:
            os.link(os.path.join(root, names[k % len(names)]), many / name)
        listed.append(name)
    # Photo 20 (in the first chunk of 32, one worker's) is held back until the signal has gone: the run
    # cannot end before it, while the other worker goes on aligning and writing the later chunks.
    with open(os.path.join(root, names[20 % len(names)]), "rb") as f:
        held = HeldFile(many / listed[20], f.read())
    listing = write(tmp_path / "lm.txt", lines(listed, landmarks[np.arange(400) % len(names)]))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "train.tools.align", "--images", str(many), "--landmarks", listing,
               "--output", str(out), "--workers", "2"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.Popen(command, cwd=repo, stderr=subprocess.PIPE, text=True, start_new_session=to_group)
    number = signal.SIGINT if to_group else signal.SIGTERM
    with held:
        held.wait_for_reader(run)
        if to_group:
            os.killpg(run.pid, number)
        else:
            run.send_signal(number)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + number, err
    assert f"stopped by {number.name}" in err and "Traceback" not in err, err
    time.sleep(0.5)
    settled = sorted(f for _, _, files in os.walk(out) for f in files)
    time.sleep(0.5)
    assert sorted(f for _, _, files in os.walk(out) for f in files) == settled  # no worker writes on
    assert not [f for f in settled if f.startswith(".")]  # nor leaves a temporary it was writing
    finish = subprocess.run([*command, "--skip-existing"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr
    crops = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if not f.startswith(".")]
    assert len(crops) == 400 and all(read(c).shape == (SIZE, SIZE, 3) for c in crops)


def test_a_person_folder_left_empty_by_a_stop_or_an_unwritten_crop_is_removed(photos, tmp_path):
    # The workers make a person's folder with its first crop, where align's parent did not note it: a crop that
    # could not be written (a name too long for its temporary, as a full disk) left grp/id1/ empty after the run,
    # and after a stop while the next photo was read. What was in --output before (an empty folder, a file) stays.
    import subprocess
    import sys

    root, names, _, landmarks = photos
    many, out = tmp_path / "many", tmp_path / "out"
    long_name = "x" * 250 + ".png"  # its crop's name fits, the temporary's (.<name>.<8 hex>.tmp) does not
    listed = ["id0/0.png", f"grp/id1/{long_name}", "id2/0.png"]
    for name in listed[:2]:
        os.makedirs(os.path.dirname(many / name), exist_ok=True)
        os.link(os.path.join(root, names[0]), many / name)
    os.makedirs(many / "id2")
    with open(os.path.join(root, names[0]), "rb") as f:
        held = HeldFile(many / listed[2], f.read())  # (read by the worker once id0's and id1's crops are done)
    listing = write(tmp_path / "lm.txt", lines(listed, landmarks[[0, 0, 0]]))
    os.makedirs(out / "mine")
    (out / "note.txt").write_text("kept")
    command = [sys.executable, "-m", "train.tools.align", "--images", str(many), "--landmarks", listing,
               "--output", str(out), "--workers", "2"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def tree():
        return sorted(os.path.relpath(os.path.join(d, e), out) for d, dirs, files in os.walk(out) for e in dirs + files)

    run = subprocess.Popen(command, cwd=repo, stderr=subprocess.PIPE, text=True)
    with held:  # released once the run has ended: its worker is stopped while it reads id2's photo
        held.wait_for_reader(run)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    assert run.returncode == 143 and "stopped by SIGTERM" in err, err
    assert tree() == ["id0", os.path.join("id0", "0.jpg"), "mine", "note.txt"], err
    finish = subprocess.run([*command, "--skip-existing"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert finish.returncode == 1 and "cannot write" in finish.stderr, finish.stderr
    assert tree() == ["id0", os.path.join("id0", "0.jpg"), "id2", os.path.join("id2", "0.jpg"), "mine", "note.txt"]


@pytest.mark.parametrize("stopped", [True, False], ids=["a stop", "an error"])
def test_a_stop_between_a_folder_made_and_its_first_crop_leaves_no_empty_folder(photos, tmp_path, capsys,
                                                                               monkeypatch, stopped):
    # A stop (or an error that ends the run) as the first crop of person1 is renamed into place: its folder (and
    # the nested one above it) had been made and were left empty. A folder that was there (person2/, empty) stays.
    root, names, _, landmarks = photos
    nested = tmp_path / "nested"
    listed = [os.path.join("team" if n.startswith("person1") else "", n) for n in names]
    for name, original in zip(listed, names):
        os.makedirs(os.path.dirname(nested / name), exist_ok=True)
        os.link(os.path.join(root, original), nested / name)
    listing = write(tmp_path / "lm.txt", lines(listed, landmarks))
    out = tmp_path / "out"
    os.makedirs(out / "person2")
    replace = os.replace

    def stopped_at_person1(source, target):
        if os.path.join("team", "person1") in str(target):
            if not stopped:
                raise RuntimeError("the run ends here")
            signal.raise_signal(signal.SIGINT)
        replace(source, target)

    monkeypatch.setattr(os, "replace", stopped_at_person1)
    argv = ["--images", str(nested), "--landmarks", listing, "--output", str(out), "--workers", "0"]
    if stopped:
        assert align.main(argv) == 130
        assert "align: stopped by SIGINT" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="the run ends here"):
            align.main(argv)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["person0", "person2"]
    assert sorted(os.listdir(out / "person0")) == ["0.jpg", "1.jpg"] and os.listdir(out / "person2") == []


def test_a_person_folder_taken_back_by_another_run_meanwhile_is_made_again(photos, tmp_path, capsys, monkeypatch):
    # Two runs aligning into one --output (shards of one landmarks list): a run that fails or is stopped takes
    # back the person folders it noted as missing while they are empty, which the other run may have just made
    # for its next crop. The crop's write made the folder again rather than failing ("cannot write", exit 1).
    root, names, _, landmarks = photos
    out = tmp_path / "out"
    makedirs, taken_back = os.makedirs, []

    def taken_back_once_made(folder, *args, **kwargs):
        makedirs(folder, *args, **kwargs)
        if os.path.basename(folder) == "person1" and not taken_back:
            os.rmdir(folder)  # the other run's take-back, between this makedirs and the temporary's open
            taken_back.append(folder)

    monkeypatch.setattr(os, "makedirs", taken_back_once_made)
    argv = ["--images", root, "--landmarks", write(tmp_path / "lm.txt", lines(names, landmarks)), "--output",
            str(out), "--workers", "0"]
    assert align.main(argv) == 0, capsys.readouterr().err
    monkeypatch.undo()
    assert taken_back and sorted(os.listdir(out / "person1")) == sorted(
        os.path.basename(name).replace(".png", ".jpg") for name in names if name.startswith("person1/"))


def test_several_faces_of_a_photo_with_all_faces(photos, tmp_path, capsys):
    """An image listed on several lines (a group photo's faces, as `detect --all-faces` writes them)
    is an error naming --all-faces; with it, align writes <name>_<k> for the k-th face listed of every
    image and embed names its rows <name>#<k>, each face the crop of its own landmarks."""
    import json

    import torch

    from train import checkpoint, embed
    from train.models import get_model

    root, names, faces, landmarks = photos
    # person0/0.png twice: its own face, then the points of person1/0.png's face (in the same frame).
    listing = write(tmp_path / "group_landmarks.txt", lines([names[0], names[1], names[0]], landmarks[[0, 1, 2]]))
    crops = tmp_path / "aligned"
    common = ["--images", root, "--landmarks", listing, "--output", str(crops), "--format", "png", "--workers", "0"]
    assert align.main(common) == 2
    err = capsys.readouterr().err
    assert "line 3: person0/0.png is listed again (first on line 1)" in err and "pass --all-faces" in err, err
    assert align.main(common + ["--all-faces"]) == 0
    assert sorted(os.listdir(crops / "person0")) == ["0_1.png", "0_2.png", "1_1.png"]
    single = tmp_path / "single"
    assert align.main(["--images", root, "--landmarks", write(tmp_path / "one.txt", lines(names[:3], landmarks[:3])),
                       "--output", str(single), "--format", "png", "--workers", "0"]) == 0
    # The second face of person0/0.png is what person1/0.png's landmarks cut from person0/0.png.
    assert np.array_equal(read(crops / "person0" / "0_1.png"), read(single / "person0" / "0.png"))
    assert np.array_equal(read(crops / "person0" / "1_1.png"), read(single / "person0" / "1.png"))
    assert not np.array_equal(read(crops / "person0" / "0_2.png"), read(crops / "person0" / "0_1.png"))

    torch.manual_seed(0)
    backbone = str(tmp_path / "backbone.pt")
    checkpoint.save_atomic(get_model("small", embedding_size=16, image_size=SIZE).state_dict(), backbone)
    with open(tmp_path / "backbone.json", "w") as f:
        json.dump({"network": "small", "embedding_size": 16, "image_size": SIZE}, f)
    out = tmp_path / "group.npy"
    assert embed.main(["--model", backbone, "--workers", "0", "--images", root, "--landmarks", listing,
                       "--output", str(out), "--all-faces"]) == 0
    assert (tmp_path / "group.txt").read_text().split() == ["person0/0.png#1", "person0/1.png#1", "person0/0.png#2"]
    assert embed.main(["--model", backbone, "--workers", "0", "--images", str(crops), "--output",
                       str(tmp_path / "crops.npy")]) == 0
    by_crop = dict(zip((tmp_path / "crops.txt").read_text().split(), np.load(tmp_path / "crops.npy")))
    np.testing.assert_allclose(np.load(out), np.stack([by_crop["person0/0_1.png"], by_crop["person0/1_1.png"],
                                                       by_crop["person0/0_2.png"]]), atol=1e-6)
