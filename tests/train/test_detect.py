"""`python -m train.tools.detect` on a stand-in for insightface's SCRFD: an ONNX graph with SCRFD's
outputs that finds red squares, each a "face" whose box and landmarks are known offsets from the
square's place, so that the whole path (letterbox, decoding, suppression, scaling back, the file
align reads) has an answer to check."""

import contextlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detector_fixtures import KEYPOINTS, PHOTO_H, PHOTO_W, RedSquares, export, photo
from train.tools import align, detect
from trainer_fixtures import fail_if_called

from conftest import HeldFile

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return export(RedSquares(), tmp_path_factory.mktemp("detector") / "det.onnx")


def expected_landmarks(x, y, scale=0.5):
    """The landmarks in the photo of the red square at (x, y): its place's anchor in the canvas
    plus the keypoint offsets, mapped back through pixel centres."""
    canvas = np.array([x, y]) * scale + KEYPOINTS * 8
    return (canvas + 0.5) / scale - 0.5


def test_the_faces_landmarks_are_found_where_the_graph_puts_them(detector):
    found = detect.FaceDetector(detector)
    assert (found.width, found.height, found.anchors, found.strides) == (640, 640, 2, (8, 16, 32))
    boxes, scores, points = found.detect(photo([(320, 160), (640, 480)]))
    # Each square fires its place's two anchors (the same box): suppression keeps one a face.
    assert len(scores) == 2 and np.all(scores > 0.99)
    order = np.argsort(points[:, 0, 0])
    np.testing.assert_allclose(points[order[0]], expected_landmarks(320, 160), atol=1e-3)
    np.testing.assert_allclose(points[order[1]], expected_landmarks(640, 480), atol=1e-3)
    np.testing.assert_allclose(boxes[order[0]], (np.array([160, 80, 160 + 28, 80 + 28]) + 0.5) / 0.5 - 0.5, atol=1e-3)
    # The main face is insightface's pick: the boxes are alike, so the one nearer the centre.
    assert detect.main_face(boxes, PHOTO_W, PHOTO_H) == order[1]
    # No red: no face.
    assert len(found.detect(photo([]))[1]) == 0


@pytest.mark.parametrize("variant", ["five_strides", "batch_dim", "fixed", "by_stride"])
def test_other_scrfd_layouts(tmp_path, variant):
    """5 strides of 1 anchor (insightface's 15-output models), outputs with a batch dimension, a
    graph of fixed input size, and outputs listed stride by stride give the same faces."""
    module = RedSquares(strides=(8, 16, 32, 64, 128), anchors=1) if variant == "five_strides" else \
        RedSquares(batch_dim=variant == "batch_dim", by_stride=variant == "by_stride")
    graph = export(module, tmp_path / "det.onnx", fixed=640 if variant == "fixed" else None)
    found = detect.FaceDetector(graph)
    assert found.anchors == (1 if variant == "five_strides" else 2)
    boxes, scores, points = found.detect(photo([(320, 160)]))
    assert len(scores) == 1
    np.testing.assert_allclose(points[0], expected_landmarks(320, 160), atol=1e-3)


def test_non_maximum_suppression_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 4]], dtype=np.float64)
    # IoU of the first two (areas of 10 x 10 pixels, counted + 1): 81 / 119 = 0.68; of the first and
    # the last: 50 / 100 = 0.5.
    assert detect.non_maximum_suppression(boxes, 0.4).tolist() == [0, 2]
    assert detect.non_maximum_suppression(boxes, 0.6).tolist() == [0, 2, 3]
    assert detect.non_maximum_suppression(boxes, 0.7).tolist() == [0, 1, 2, 3]


def test_detect_writes_the_landmarks_align_reads(detector, tmp_path, capsys):
    """One line a photo (its main face), names with spaces or a leading # as align reads them, a
    photo turned by its EXIF orientation found upright, photos without a face or that do not
    decode listed (exit status 1); then align makes the crops."""
    images = tmp_path / "raw"
    (images / "person a").mkdir(parents=True)
    photo([(320, 160), (640, 480)]).save(images / "person a" / "two faces.png")
    photo([(320, 160)]).save(images / "#1.png")
    # Stored on its side with EXIF orientation 6 (turn 90 degrees clockwise to view): upright, it is
    # the photo above.
    exif = Image.Exif()
    exif[0x0112] = 6
    photo([(320, 160)]).transpose(Image.Transpose.ROTATE_90).save(images / "turned.jpg", exif=exif, quality=100)
    photo([]).save(images / "empty.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "landmarks.txt"
    assert detect.main(["--detector", detector, "--images", str(images), "--output", str(out), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "empty.png: no face scores 0.5 or more" in err and "broken.jpg: cannot read the image" in err, err
    assert not os.path.exists(str(out) + ".partial")
    text = out.read_text()
    assert "# no face: empty.png\n" in text and "# unreadable: broken.jpg\n" in text
    names, points, _, skipped = align.read_face_landmarks(str(out))
    assert names == ["#1.png", "person a/two faces.png", "turned.jpg"] and not skipped
    assert text.count('\n"#1.png" ') == 1  # quoted, not a comment
    np.testing.assert_allclose(points[0], expected_landmarks(320, 160), atol=0.01)
    np.testing.assert_allclose(points[1], expected_landmarks(640, 480), atol=0.01)
    np.testing.assert_allclose(points[2], expected_landmarks(320, 160), atol=0.6)  # through JPEG
    crops = tmp_path / "aligned"
    assert align.main(["--images", str(images), "--landmarks", str(out), "--output", str(crops), "--workers", "0"]) == 0
    assert sorted(os.listdir(crops)) == ["#1.jpg", "person a", "turned.jpg"]
    assert os.listdir(crops / "person a") == ["two faces.jpg"]
    # A second run does not replace the file unasked.
    assert detect.main(["--detector", detector, "--images", str(images), "--output", str(out)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err


def test_all_faces_and_resume(detector, tmp_path, capsys):
    images = tmp_path / "raw"
    images.mkdir()
    for k in range(4):
        photo([(320, 160), (640, 480)] if k == 1 else [(160 * k, 160)]).save(images / f"{k}.png")
    whole = tmp_path / "whole.txt"
    args = ["--detector", detector, "--images", str(images), "--workers", "0", "--all-faces"]
    assert detect.main(args + ["--output", str(whole)]) == 0
    lines = whole.read_text().splitlines(keepends=True)
    faces = [line for line in lines if not line.startswith("#")]
    assert [line.split()[0] for line in faces] == ["0.png", "1.png", "1.png", "2.png", "3.png"]

    # A run stopped after two photos, its last line cut short: --resume finishes it as one run.
    out = tmp_path / "landmarks.txt"
    cut = lines[:lines.index(faces[3])] + [faces[3][:15]]
    (tmp_path / "landmarks.txt.partial").write_text("".join(cut))
    capsys.readouterr()
    assert detect.main(args + ["--output", str(out)]) == 2
    assert "landmarks.txt.partial is left from a stopped run: pass --resume" in capsys.readouterr().err
    assert detect.main(args + ["--output", str(out), "--resume"]) == 0
    assert "2 photo(s) of" in capsys.readouterr().err
    assert out.read_text() == whole.read_text()
    # --resume once the run has finished: nothing to finish, said as such.
    assert detect.main(args + ["--output", str(out), "--resume"]) == 2
    assert "landmarks.txt is the output of a run that finished" in capsys.readouterr().err
    assert out.read_text() == whole.read_text()
    crops = tmp_path / "aligned"
    assert align.main(["--images", str(images), "--landmarks", str(out), "--output", str(crops), "--workers", "0",
                       "--all-faces"]) == 0
    assert sorted(os.listdir(crops)) == ["0_1.jpg", "1_1.jpg", "1_2.jpg", "2_1.jpg", "3_1.jpg"]
    # A partial file of other settings (a folder of other photos too) is not mixed in.
    other = tmp_path / "other"
    other.mkdir()
    (other / "0.png").write_bytes((images / "0.png").read_bytes())
    for changed in (args[:-1], [*args[:3], str(other), *args[4:]]):
        (tmp_path / "landmarks.txt.partial").write_text("".join(cut))
        out.unlink(missing_ok=True)
        assert detect.main(changed + ["--output", str(out), "--resume"]) == 2
        assert "was written with other settings" in capsys.readouterr().err
    # A damaged line (not the last) is dropped on resume, and its photo detected again.
    damaged = lines[:lines.index(faces[1])] + [faces[1][:12] + "\n"] + lines[lines.index(faces[1]) + 1:]
    (tmp_path / "landmarks.txt.partial").write_text("".join(damaged))
    assert detect.main(args + ["--output", str(out), "--resume"]) == 0
    assert sorted(out.read_text().splitlines()) == sorted(whole.read_text().splitlines())  # its lines last


def test_models_that_are_no_face_detector_with_keypoints_are_named(detector, tmp_path, capsys):
    images = tmp_path / "raw"
    images.mkdir()
    photo([]).save(images / "a.png")

    class Embedding(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    cases = [
        (export(RedSquares(keypoints=False), tmp_path / "boxes.onnx"), [], "finds boxes only (6 outputs)"),
        (export(Embedding(), tmp_path / "embedding.onnx"), [], "1 output(s): not an SCRFD face detector"),
        (str(broken), [], "onnxruntime cannot load it"),
        (str(tmp_path / "missing.onnx"), [], "no model at"),
        (str(tmp_path), [], "is a folder, not a model file"),
        (detector, ["--size", "600"], "--size must be a positive multiple of 32"),
        (export(RedSquares(), tmp_path / "fixed.onnx", fixed=320), ["--size", "640"], "takes 320x320 images only"),
    ]
    for graph, extra, message in cases:
        out = tmp_path / "x.txt"
        assert detect.main(["--detector", graph, "--images", str(images), "--output", str(out)] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists(), (message, err)


@pytest.mark.slow
def test_a_signal_to_the_process_group_stops_the_run_and_resume_finishes_it(detector, tmp_path):
    """SIGTERM to every process (a scheduler's), the loader's workers included: the run ends with
    143 and no traceback, its partial file holds whole lines, and --resume finishes the file."""
    import signal
    import subprocess
    import sys
    import time

    images = tmp_path / "raw"
    images.mkdir()
    for k in range(200):
        if k != 15:
            photo([(8 * (k % 60), 160)], size=(640, 480), side=8).save(images / f"{k:03d}.png")
    # Photo 15 is held back until the signal has gone: the run cannot end before it, and the photos
    # before it are done (their lines written) while a worker waits at it.
    held_photo = io.BytesIO()
    photo([(8 * 15, 160)], size=(640, 480), side=8).save(held_photo, format="png")
    held = HeldFile(images / "015.png", held_photo.getvalue())
    out = tmp_path / "landmarks.txt"
    partial = tmp_path / "landmarks.txt.partial"
    command = [sys.executable, "-m", "train.tools.detect", "--detector", detector, "--images", str(images),
               "--output", str(out), "--workers", "2"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.Popen(command, cwd=repo, stderr=subprocess.PIPE, text=True, start_new_session=True)
    with held:
        held.wait_for_reader(run)
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.read_text().count("\n") >= 12):
            assert run.poll() is None and time.monotonic() < deadline, f"{partial} has under 12 lines"
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err, err
    done = partial.read_text()
    assert done.endswith("\n") and not out.exists()
    finish = subprocess.run([*command, "--resume"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr
    names, points, _, _ = align.read_face_landmarks(str(out))
    assert names == [f"{k:03d}.png" for k in range(200)]
    np.testing.assert_allclose(points, [expected_landmarks(8 * (k % 60), 160, scale=1) for k in range(200)],
                               atol=0.01)


@pytest.mark.slow
def test_embed_with_a_detector_embeds_what_the_landmarks_file_gives(detector, tmp_path, capsys):
    """`train.embed --detector` (in one step) gives the rows of `detect` then `embed --landmarks`, with
    --all-faces too; photos without a face are left out with a warning (exit 1); `--compare` takes
    each photo's main face."""
    import json

    from train import checkpoint, embed
    from train.models import get_model

    images = tmp_path / "raw"
    (images / "b").mkdir(parents=True)
    photo([(320, 160), (640, 480)]).save(images / "b" / "two.png")
    photo([(480, 320)]).save(images / "one.png")
    photo([]).save(images / "none.png")
    torch.manual_seed(0)
    backbone = str(tmp_path / "backbone.pt")
    checkpoint.save_atomic(get_model("small", embedding_size=16, image_size=112).state_dict(), backbone)
    (tmp_path / "backbone.json").write_text(json.dumps({"network": "small", "embedding_size": 16,
                                                        "image_size": 112}))
    common = ["--model", backbone, "--workers", "0", "--images", str(images)]
    for extra in ([], ["--all-faces"]):
        listing = tmp_path / f"landmarks{len(extra)}.txt"
        assert detect.main(["--detector", detector, "--images", str(images), "--output", str(listing),
                            "--workers", "0", *extra]) == 1
        listed, detected = tmp_path / f"listed{len(extra)}.npy", tmp_path / f"detected{len(extra)}.npy"
        assert embed.main([*common, "--landmarks", str(listing), "--output", str(listed), *extra]) == 0
        capsys.readouterr()
        assert embed.main([*common, "--detector", detector, "--output", str(detected), *extra]) == 1
        captured = capsys.readouterr()
        assert f"warning: {images / 'none.png'}: no face scores 0.5 or more" in captured.err
        assert "1 photo left out (the warnings above say why)" in captured.out
        rows = (tmp_path / f"detected{len(extra)}.txt").read_text().split()
        assert rows == (tmp_path / f"listed{len(extra)}.txt").read_text().split()
        assert rows == (["b/two.png#1", "b/two.png#2", "one.png#1"] if extra else ["b/two.png", "one.png"])
        # The file holds the landmarks to 0.01 pixel; the red squares' sharp edges make that show.
        np.testing.assert_allclose(np.load(detected), np.load(listed), atol=5e-3)

    vectors = dict(zip((tmp_path / "detected0.txt").read_text().split(), np.load(tmp_path / "detected0.npy")))
    assert embed.main(["--model", backbone, "--detector", detector, "--compare", str(images / "b" / "two.png"),
                       str(images / "one.png"), "--threshold", "0.5"]) == 0
    similarity = float(np.dot(vectors["b/two.png"], vectors["one.png"]))
    assert f"cosine similarity {similarity:.4f}" in capsys.readouterr().out
    assert embed.main(["--model", backbone, "--detector", detector, "--compare", str(images / "one.png"),
                       str(images / "none.png")]) == 2
    err = capsys.readouterr().err
    assert f"{images / 'none.png'}: no face scores 0.5 or more (--detector {detector})" in err and \
        err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        embed.main([*common, "--detector", detector, "--landmarks", str(tmp_path / "landmarks0.txt")])
    assert "--detector and --landmarks are two ways" in capsys.readouterr().err


def test_bad_arguments_and_partial_files_are_one_line_errors(detector, tmp_path, capsys):
    # Each refused before a photo is read, in one line naming the option or file (exit 2), nothing written.
    images, empty, out = tmp_path / "raw", tmp_path / "empty", tmp_path / "landmarks.txt"
    images.mkdir()
    empty.mkdir()
    photo([(320, 160)]).save(images / "a.png")
    common = ["--detector", detector, "--workers", "0", "--output", str(out)]
    for extra, said in [(["--threshold", "1.5"], "--threshold must lie between 0 and 1, got 1.5"),
                        (["--workers", "-1"], "--workers must be at least 0, got -1")]:
        with pytest.raises(SystemExit) as stop:
            detect.main([*common, "--images", str(images), *extra])
        assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"detect: error: {said}"
    for images_given, said in [(images / "a.png", f"--images {images / 'a.png'} is not a folder"),
                               (empty, f"--images {empty}: no images (.jpg, .jpeg, .png, .bmp) under it")]:
        assert detect.main([*common, "--images", str(images_given)]) == 2
        assert capsys.readouterr().err == f"detect: error: {said}\n"
    partial = tmp_path / "landmarks.txt.partial"
    partial.mkdir()
    assert detect.main([*common, "--images", str(images), "--resume"]) == 2
    assert capsys.readouterr().err == f"detect: error: {partial}, where detect keeps a run's lines, is a folder\n"
    partial.rmdir()
    partial.write_bytes(b"# detect \xe9\n")  # another program's file in Latin-1, say
    assert detect.main([*common, "--images", str(images), "--resume"]) == 2
    assert capsys.readouterr().err == (f"detect: error: {partial} is not a file detect writes (not UTF-8 text): pass "
                                       "--overwrite to start again\n")
    assert partial.read_bytes() == b"# detect \xe9\n" and not out.exists()


def test_a_detector_that_does_not_load_leaves_no_folder_made_for_the_output(tmp_path, capsys):
    # check_outputs made n1/n2 for a new --output n1/n2/landmarks.txt before the detector was found not to load,
    # and they were left; there/ was there and stays.
    images = tmp_path / "raw"
    images.mkdir()
    photo([(320, 160)]).save(images / "a.png")
    (tmp_path / "det.onnx").write_text("not a graph")
    (tmp_path / "there").mkdir()
    for output in ("n1/n2/landmarks.txt", "there/n2/landmarks.txt"):
        assert detect.main(["--detector", str(tmp_path / "det.onnx"), "--images", str(images), "--workers", "0",
                            "--output", str(tmp_path / output)]) == 2
        assert capsys.readouterr().err.startswith(f"detect: error: {tmp_path / 'det.onnx'}: onnxruntime cannot load")
    assert sorted(os.listdir(tmp_path)) == ["det.onnx", "raw", "there"] and os.listdir(tmp_path / "there") == []


def test_names_and_outputs_that_need_care(detector, tmp_path, capsys):
    """A name that is not UTF-8 is listed as a failure while the others are done; a tab inside a name
    survives the file; --output must not be a photo nor empty; a partial file that another run holds
    is refused."""
    images = tmp_path / "raw"
    images.mkdir()
    photo([(320, 160)]).save(images / "tab\tname.png")
    photo([(320, 160)]).save(images / "plain.png")
    latin = os.path.join(os.fsencode(images), b"caf\xe9.png")
    photo([(320, 160)]).save(open(latin, "wb"), format="PNG")
    out = tmp_path / "landmarks.txt"
    common = ["--detector", detector, "--images", str(images), "--workers", "0"]
    assert detect.main([*common, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "its name is not UTF-8 text without line breaks" in err and "Traceback" not in err, err
    names, _, _, _ = align.read_face_landmarks(str(out))
    assert names == ["plain.png", "tab\tname.png"]

    assert detect.main([*common, "--output", str(images / "plain.png"), "--overwrite"]) == 2
    assert "plain.png is an image's name in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        detect.main([*common, "--output", ""])
    assert "--output is empty" in capsys.readouterr().err

    copy = tmp_path / "det.onnx"
    copy.write_bytes(open(detector, "rb").read())
    assert detect.main(["--detector", str(copy), "--images", str(images), "--output", str(copy), "--overwrite"]) == 2
    assert "is --detector" in capsys.readouterr().err and copy.read_bytes() == open(detector, "rb").read()

    # A run that was replacing an output, stopped, resumes without --overwrite.
    partial = tmp_path / "landmarks.txt.partial"
    lines = out.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:2]))
    out.write_text("an older file\n")
    assert detect.main([*common, "--output", str(out), "--resume"]) == 1
    assert align.read_face_landmarks(str(out))[0] == ["plain.png", "tab\tname.png"]
    assert not partial.exists() and not (tmp_path / "landmarks.txt.lock").exists()

    # A second run on an output that a run is writing is refused before it touches anything.
    fcntl = pytest.importorskip("fcntl")
    held = tmp_path / "held.txt.partial"
    held.write_text("x\n")
    with open(tmp_path / "held.txt.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        assert detect.main([*common, "--output", str(tmp_path / "held.txt"), "--overwrite"]) == 2
        assert "another detect run is writing" in capsys.readouterr().err
    assert held.read_text() == "x\n"


def test_linked_folders_are_listed_once(tmp_path):
    """The photo listing (detect's, embed's) goes into linked folders, and round a link cycle once."""
    from train.embed import list_images

    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    photo([]).save(target / "a.png")
    photo([]).save(target / "sub" / "b.png")
    os.symlink(target, target / "sub" / "up")  # a cycle
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(target, root / "linked")
    assert list_images(str(root)) == [str(root / "linked" / "a.png"), str(root / "linked" / "sub" / "b.png")]


def test_align_with_a_detector_makes_the_crops_of_detect_then_align(detector, tmp_path, capsys):
    images = tmp_path / "raw"
    (images / "b").mkdir(parents=True)
    photo([(320, 160), (640, 480)]).save(images / "a.png")
    photo([(320, 320)]).save(images / "b" / "c.png")
    photo([]).save(images / "empty.png")
    landmarks = tmp_path / "landmarks.txt"
    assert detect.main(["--detector", detector, "--images", str(images), "--output", str(landmarks),
                        "--workers", "0"]) == 1
    two_step, one_step = tmp_path / "two", tmp_path / "one"
    assert align.main(["--images", str(images), "--landmarks", str(landmarks), "--output", str(two_step),
                       "--workers", "0"]) == 0
    capsys.readouterr()
    assert align.main(["--images", str(images), "--detector", detector, "--output", str(one_step),
                       "--workers", "0"]) == 1  # the photo without a face
    assert "empty.png: no face scores 0.5 or more" in capsys.readouterr().err
    for name in ("a.jpg", "b/c.jpg"):
        ours = np.asarray(Image.open(one_step / name), dtype=float)
        theirs = np.asarray(Image.open(two_step / name), dtype=float)
        assert np.abs(ours - theirs).mean() < 1.0, name  # the file holds the landmarks to 0.01 px
    assert sorted(os.listdir(one_step)) == ["a.jpg", "b"]
    # Every face of a group photo; a rerun with --skip-existing detects again only the photo that has no
    # crop (the one without a face).
    assert align.main(["--images", str(images), "--detector", detector, "--output", str(tmp_path / "all"),
                       "--all-faces", "--workers", "0"]) == 1
    assert sorted(os.listdir(tmp_path / "all")) == ["a_1.jpg", "a_2.jpg", "b"]
    assert os.listdir(tmp_path / "all" / "b") == ["c_1.jpg"]
    capsys.readouterr()
    assert align.main(["--images", str(images), "--detector", detector, "--output", str(one_step),
                       "--skip-existing", "--workers", "0"]) == 1
    assert "align: 0 face(s) of the photos under" in capsys.readouterr().err
    # Crops inside the photos' folder would be taken for photos next time.
    assert align.main(["--images", str(images), "--detector", detector, "--output", str(images / "crops")]) == 2
    assert "is inside --images" in capsys.readouterr().err
    # A rerun that would mix crops of one face a photo with --all-faces' numbered ones, or of two sizes, is
    # refused before any detection, the crops there left as they are; so is a folder without photos.
    before = {folder: sorted(os.listdir(tmp_path / folder)) for folder in ("one", "all")}
    (tmp_path / "none").mkdir()
    for argv, said in [
        (["--output", str(one_step), "--all-faces", "--overwrite"],
         f"{one_step / 'a.jpg'} exists: crops of one face a photo (2) are where --all-faces writes <photo>_<k>"),
        (["--output", str(tmp_path / "all"), "--overwrite"],
         f"{tmp_path / 'all' / 'a_1.jpg'} exists: crops of --all-faces (of 2 photos) are where this run writes one "
         "face a photo"),
        (["--output", str(one_step), "--skip-existing", "--image-size", "96"],
         f"2 of the 2 existing crops are not --image-size 96 ({one_step / 'a.jpg'} is 112x112): --skip-existing "
         "would mix crop sizes"),
        (["--output", str(tmp_path / "out"), "--images", str(tmp_path / "none")],
         f"--images {tmp_path / 'none'}: no images (.jpg, .jpeg, .png, .bmp) under it"),  # (as detect and embed)
    ]:
        assert align.main(["--images", str(images), "--detector", detector, "--workers", "0", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"align: error: {said}") and err.count("\n") == 1, (said, err)
        if "no images" in said:
            assert err == f"align: error: {said}\n"
    assert {folder: sorted(os.listdir(tmp_path / folder)) for folder in ("one", "all")} == before


def test_align_with_a_detector_refuses_an_output_it_cannot_write_before_detecting(detector, tmp_path, capsys,
                                                                                 monkeypatch):
    """A file in the way of --output, or a folder it cannot write in, is one line before the detection (minutes
    for many photos), as the landmarks route and the other tools say it: it was said once every photo had been
    through the detector."""
    from train import embed

    images = tmp_path / "raw"
    images.mkdir()
    photo([(320, 160)]).save(images / "a.png")
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # (root, who may run the tests, writes in a folder of mode 555)
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))

    fail_if_called(monkeypatch, embed, "detect_faces",
                   "the photos went through the detector before --output was checked")
    for output, said in ((tmp_path / "file" / "out", f"cannot make the folder: {tmp_path / 'file'} is a file"),
                         (locked / "out", f"cannot write in {locked} (read-only, or not yours)")):
        assert align.main(["--images", str(images), "--detector", detector, "--output", str(output),
                           "--workers", "0"]) == 2
        assert capsys.readouterr().err == f"align: error: --output {output}: {said}\n"
    assert os.listdir(locked) == [] and (tmp_path / "file").read_text() == ""


@pytest.mark.slow
def test_sigterm_to_align_while_it_detects_ends_its_workers_too(detector, tmp_path):
    """SIGTERM to the main process alone (`kill PID`) during align --detector's detection: the loader's
    workers leave signals to the main process, which stops (143) and ends them; none is left behind."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    images = tmp_path / "raw"
    images.mkdir()
    for k in range(300):
        if k != 20:
            photo([(8 * (k % 60), 160)], size=(640, 480), side=8).save(images / f"{k:03d}.png")
    # Photo 20 is held back until the signal has gone: the detection cannot end before it.
    held_photo = io.BytesIO()
    photo([(8 * 20, 160)], size=(640, 480), side=8).save(held_photo, format="png")
    held = HeldFile(images / "020.png", held_photo.getvalue())
    import fcntl
    import pty
    import struct
    import termios

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Its stderr a terminal of 80 columns, where the detection draws its progress bar (not into a pipe).
    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    run = subprocess.Popen([sys.executable, "-m", "train.tools.align", "--detector", detector, "--images",
                            str(images), "--output", str(tmp_path / "out"), "--workers", "2"],
                           cwd=repo, stderr=stderr, start_new_session=True)
    os.close(stderr)
    # The signal goes once a loader worker opens photo 20: the workers are up, and the detection is under
    # way (a wait on /proc/PID/task/PID/children is not portable: the file needs a kernel option, and
    # without it the run finished before any signal went; nor was a wait for the progress bar to count
    # 10 photos enough: on a loaded machine the run could finish before the signal).
    printed = []

    def read_terminal():
        with contextlib.suppress(OSError):  # EIO once the run and its workers have closed the terminal
            while chunk := os.read(terminal, 4096):
                printed.append(chunk.decode(errors="replace"))

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        with held:
            held.wait_for_reader(run)
            run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
        reader.join(timeout=10)
        err = "".join(printed)
        assert "align: wrote" not in err, f"the run finished before the signal: {err}"
        assert run.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
        assert "Traceback" not in err, err
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(run.pid, 0)  # any process of the run's group still alive?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the loader's workers outlived the run")
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        reader.join(timeout=10)
        os.close(terminal)
