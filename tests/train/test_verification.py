"""Verification: the restricted .bin reader (real-format files accepted, code refused),
pairs lists, embeddings with flips, and the k-fold accuracy against hand-computed cases."""

import io
import math
import os
import pickle
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import build_verification_sets, find_target
from train.data.synthetic import render_face
from train.tools.make_bin import encode_pairs, image_folder_pairs, write_bin
from train.tools.make_bin import main as make_bin_main
from train.verification import (
    THRESHOLDS,
    VerificationSet,
    _fold_slices,
    compute_embeddings,
    evaluate,
    load_bin,
    load_pairs_list,
    read_pairs_list,
    verification_accuracy,
)


def picture(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")
    return out.getvalue()


def unit_pairs(distances):
    """Pairs of 2-D unit vectors whose squared L2 distances are `distances`."""
    e1 = np.tile([1.0, 0.0], (len(distances), 1))
    cos = 1 - np.asarray(distances) / 2
    e2 = np.stack([cos, np.sqrt(1 - cos ** 2)], axis=1)
    return e1, e2


# ---------------------------------------------------------------------------------------------
# Accuracy maths


def test_accuracy_hand_computed_two_folds():
    # Fold 0 = pairs 0, 1 is judged at the threshold learnt on pairs 2, 3: any t in (1.005, 3.005]
    # separates them, the first on the grid is 1.01; it gets pairs 0 (0.505 < 1.01, same) and
    # 1 (1.505 >= 1.01, different) right: 1.0. Fold 1 = pairs 2, 3 at the threshold of pairs 0, 1:
    # t in (0.505, 1.505], first 0.51; pair 2 (1.005, same) is called different: 0.5.
    e1, e2 = unit_pairs([0.505, 1.505, 1.005, 3.005])
    result = verification_accuracy(e1, e2, [True, False, True, False], nfolds=2)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["accuracy_std"] == pytest.approx(0.25)
    assert result["threshold"] == pytest.approx((1.01 + 0.51) / 2)


def test_accuracy_single_fold_trains_on_itself():
    e1, e2 = unit_pairs([0.2, 0.3, 1.9, 2.5])
    result = verification_accuracy(e1, e2, [True, True, False, False], nfolds=1)
    assert result == pytest.approx({"accuracy": 1.0, "accuracy_std": 0.0, "threshold": 0.31})


def test_accuracy_ten_folds_of_separable_and_random_pairs():
    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    distances = np.where(issame, rng.uniform(0.1, 0.9, 200), rng.uniform(1.1, 3.9, 200))
    result = verification_accuracy(*unit_pairs(distances), issame)
    # A fold errs only on a same pair farther apart than every same pair of the other nine folds.
    assert result["accuracy"] >= 0.98
    assert 0.8 < result["threshold"] <= 1.1
    coin = verification_accuracy(*unit_pairs(rng.uniform(0, 4, 200)), issame)
    assert 0.3 < coin["accuracy"] < 0.7


def reference_accuracy(dist, issame, nfolds):
    """insightface's calculate_roc, written out with loops: the vectorised code must agree."""
    n = len(dist)
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    starts = np.cumsum([0] + sizes)
    accuracies, chosen = [], []
    for k in range(nfolds):
        test = list(range(starts[k], starts[k + 1]))
        train = [i for i in range(n) if i not in test]
        best_t, best_acc = None, -1.0
        for t in np.arange(0, 4, 0.01):
            acc = sum((dist[i] < t) == issame[i] for i in train) / len(train)
            if acc > best_acc:
                best_t, best_acc = t, acc
        accuracies.append(sum((dist[i] < best_t) == issame[i] for i in test) / len(test))
        chosen.append(best_t)
    return np.mean(accuracies), np.std(accuracies), np.mean(chosen)


@pytest.mark.parametrize("nfolds", [3, 10])
def test_accuracy_matches_a_literal_reference(nfolds):
    rng = np.random.default_rng(nfolds)
    e1 = rng.normal(size=(47, 8))
    e2 = e1 + rng.normal(scale=0.7, size=(47, 8))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    issame = rng.random(47) < 0.5
    e2[~issame] = np.roll(e2, 7, axis=0)[~issame]
    dist = np.sum((e1 - e2) ** 2, axis=1)
    result = verification_accuracy(e1, e2, issame, nfolds=nfolds)
    expected = reference_accuracy(dist, issame, nfolds)
    assert (result["accuracy"], result["accuracy_std"], result["threshold"]) == pytest.approx(expected)


def test_folds_are_contiguous_like_kfold():
    folds = _fold_slices(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3] + [2] * 7
    assert np.array_equal(np.concatenate(folds), np.arange(23))
    assert THRESHOLDS[0] == 0 and THRESHOLDS[-1] == pytest.approx(3.99) and len(THRESHOLDS) == 400


def test_accuracy_argument_checks():
    e1, e2 = unit_pairs([0.5, 1.5])
    with pytest.raises(ValueError, match="nfolds"):
        verification_accuracy(e1, e2, [True, False], nfolds=3)
    with pytest.raises(ValueError, match="embedding arrays"):
        verification_accuracy(e1, e2[:1], [True, False])


# ---------------------------------------------------------------------------------------------
# Embeddings


class ChannelMeans(torch.nn.Module):
    """A backbone whose embedding is (mean of each channel, mean of the left half of channel 0)."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled(), x.shape[0], float(x.min()), float(x.max())))
        half = x.shape[3] // 2
        return torch.cat([x.mean(dim=(2, 3)), x[:, :1, :, :half].mean(dim=(2, 3))], dim=1) + 2.0


def test_embeddings_add_the_mirror_then_normalise():
    images = torch.from_numpy(np.stack([picture(i, 8).transpose(2, 0, 1) for i in range(6)]))
    vset = VerificationSet("toy", images, [True, False, True])
    net = ChannelMeans().train()
    net.bn.eval()  # a frozen sub-module stays frozen
    emb, xnorm = compute_embeddings(net, vset, device="cpu", batch_size=4, return_xnorm=True)

    x = (images.float() - 127.5) / 127.5
    raw, raw_flip = net.forward(x), net.forward(x.flip(3))
    expected = torch.nn.functional.normalize(raw + raw_flip, dim=1).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    assert emb.dtype == np.float32 and emb.shape == (6, 4)
    assert xnorm == pytest.approx(float(torch.cat([raw, raw_flip]).norm(dim=1).mean()), rel=1e-5)
    # eval mode and no grad inside, both image and mirror in one batch, inputs in [-1, 1]
    calls = net.calls[:2]
    assert [c[:3] for c in calls] == [(False, False, 8), (False, False, 4)]
    assert all(-1 <= c[3] and c[4] <= 1 for c in calls)
    assert net.training and not net.bn.training
    assert np.array_equal(compute_embeddings(net, vset, device="cpu", batch_size=64), emb)


def test_evaluate_identical_pairs_are_all_same():
    images = torch.from_numpy(np.stack([picture(i // 2 if i % 4 < 2 else i, 12).transpose(2, 0, 1)
                                        for i in range(40)]))
    vset = VerificationSet("twins", images, np.arange(20) % 2 == 0)
    flatten = torch.nn.Flatten()
    result = evaluate(flatten, vset, device="cpu", batch_size=7)
    assert set(result) == {"accuracy", "accuracy_std", "threshold", "xnorm"}
    assert result["accuracy"] == 1.0
    assert result["xnorm"] == pytest.approx(float(((images.float() - 127.5) / 127.5).flatten(1).norm(dim=1).mean()),
                                            rel=1e-4)


class Colours(torch.nn.Module):
    """The image's red and green values, 0-255: embeddings chosen exactly by the pictures' colours."""

    def forward(self, x):
        return x[:, :2].mean(dim=(2, 3)) * 127.5 + 127.5


def test_evaluate_chooses_insightfaces_threshold_at_a_tie():
    # Same pairs at a squared distance that is a point of the grid, (1, 0) against (0.8, 0.6): 0.4 in
    # float64, as insightface computes it (0.39999999999999997, accepted from 0.40 on), 0.40000002 had the
    # unit vectors been rounded to float32 (accepted from 0.41 on). Different pairs at distance 2.
    colours = [((255, 0), (204, 153)) if k % 2 == 0 else ((255, 0), (0, 255)) for k in range(10)]
    images = torch.zeros((20, 3, 2, 2), dtype=torch.uint8)
    for k, pair in enumerate(colours):
        for j, (red, green) in enumerate(pair):
            images[2 * k + j, 0], images[2 * k + j, 1] = red, green
    vset = VerificationSet("ties", images, np.arange(10) % 2 == 0)
    e1, e2 = np.array([[1.0, 0.0]]), np.array([[204.0, 153.0]]) / np.hypot(204.0, 153.0)
    expected = THRESHOLDS[np.argmax(THRESHOLDS > np.sum((e1 - e2) ** 2))]
    assert expected == THRESHOLDS[40]  # (each fold chooses it: their mean, up to rounding)
    result = evaluate(Colours(), vset, device="cpu", batch_size=3)
    assert result["accuracy"] == 1.0 and result["threshold"] == pytest.approx(expected, abs=1e-12)


def test_verification_set_checks_shapes():
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        VerificationSet("bad", torch.zeros(3, 3, 4, 4, dtype=torch.uint8), [True, False])
    with pytest.raises(ValueError, match="uint8"):
        VerificationSet("bad", torch.zeros(4, 3, 4, 4), [True, False])


# ---------------------------------------------------------------------------------------------
# .bin files


@pytest.fixture
def pairs_images():
    return [picture(i) for i in range(6)], [True, False, True]


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("numpy_issame", [False, True])
def test_load_bin_reads_real_format(tmp_path, pairs_images, protocol, numpy_issame):
    images, issame = pairs_images
    flags = np.array(issame) if numpy_issame else issame
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump(([png(img) for img in images], flags), f, protocol=protocol)
    vset = load_bin(str(path), image_size=20)
    assert vset.name == "lfw" and vset.num_pairs == 3
    assert vset.issame.tolist() == issame
    assert vset.images.dtype == torch.uint8 and vset.images.shape == (6, 3, 20, 20)
    for i, img in enumerate(images):
        assert np.array_equal(vset.images[i].permute(1, 2, 0).numpy(), img)
    assert load_bin(str(path), image_size=12).images.shape == (6, 3, 12, 12)  # resized


def test_sets_warn_of_images_that_are_not_square(tmp_path, pairs_images):
    # A photo among aligned crops is stretched to the model's square input: a warning naming the set, not a
    # silent change of its face's shape. Square images of another size are resized without one.
    images, issame = pairs_images
    encoded = [png(img) for img in images]
    encoded[3] = png(np.zeros((20, 30, 3), dtype=np.uint8))
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((encoded, issame)))
    with pytest.warns(UserWarning, match=r"lfw\.bin: 1 of 6 images are not square \(image 3 is 30x20, width x "
                      r"height\): each is stretched to 12x12"):
        assert load_bin(str(path), image_size=12).images.shape == (6, 3, 12, 12)
    write_pairs_folder(tmp_path, images)
    Image.fromarray(np.zeros((25, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "5.png")
    with pytest.warns(UserWarning, match=r"pairs\.txt: 1 of 6 images are not square \(.*5\.png is 20x25"):
        load_pairs_list(str(tmp_path / "pairs.txt"), image_size=20)
    path.write_bytes(pickle.dumps(([png(img) for img in images], issame)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_bin(str(path), image_size=12)


def test_load_bin_reads_python2_pickles(tmp_path, pairs_images):
    images, _ = pairs_images
    first, second = png(images[0]), png(images[1])
    # What Python 2's cPickle (protocol 2) writes for ([str, str], [True]): BINSTRING, not BINBYTES.
    data = (b"\x80\x02]q\x00(T" + len(first).to_bytes(4, "little") + first
            + b"T" + len(second).to_bytes(4, "little") + second + b"e]q\x01\x88a\x86q\x02.")
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    vset = load_bin(str(path), image_size=20)
    assert vset.issame.tolist() == [True]
    assert np.array_equal(vset.images[1].permute(1, 2, 0).numpy(), images[1])


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalExploit:
    def __reduce__(self):
        return (eval, ("open('should-not-exist', 'w')",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_load_bin_refuses_code(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    exploit = {
        "system": Exploit(f"touch {marker}"),
        "eval": EvalExploit(),
        "nested": ([png(picture(0)), Exploit(f"touch {marker}")], [True]),
    }[payload]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(exploit, protocol=2))
    with pytest.raises(pickle.UnpicklingError,
                       match=r"evil\.bin: refusing to load global (posix|os|nt|builtins|__builtin__)\."):
        load_bin(str(path))
    assert not marker.exists() and not (tmp_path / "should-not-exist").exists()


def test_load_bin_rejects_malformed_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(pickle.UnpicklingError, match=r"garbage\.bin: not a readable"):
        load_bin(str(garbage))
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps(([png(picture(0))], [True])))
    with pytest.raises(ValueError, match="1 pairs need 2 images"):
        load_bin(str(wrong))
    broken = tmp_path / "broken.bin"
    broken.write_bytes(pickle.dumps(([png(picture(0)), b"\xff\xd8nope"], [False])))
    with pytest.raises(ValueError, match=r"broken\.bin: image 1: cannot read the image: .* \(6 bytes\)$"):
        load_bin(str(broken))


def test_make_bin_writes_what_load_bin_reads(tmp_path, pairs_images):
    images, issame = pairs_images
    path = tmp_path / "made.bin"
    stacked = np.stack([img.transpose(2, 0, 1) for img in images])
    write_bin(str(path), encode_pairs(stacked, fmt="png"), issame)
    vset = load_bin(str(path), image_size=20)
    assert torch.equal(vset.images, torch.from_numpy(stacked)) and vset.issame.tolist() == issame

    assert make_bin_main([str(tmp_path / "agedb_30.bin"), "--synthetic", "--pairs", "10", "--image-size", "24"]) == 0
    synthetic = load_bin(str(tmp_path / "agedb_30.bin"), image_size=24)
    assert synthetic.num_pairs == 10 and synthetic.issame.tolist() == [True, False] * 5


def test_make_bin_from_image_folder(tmp_path):
    for person in ("ann", "ben", "cat"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(picture(hash((person, k)) % 1000)).save(tmp_path / "faces" / person / f"{k}.png")
    pairs, issame = image_folder_pairs(str(tmp_path / "faces"), 10, seed=3)
    for (a, b), same in zip(pairs, issame):
        assert (os.path.dirname(a) == os.path.dirname(b)) == same and a != b
    out = tmp_path / "folder.bin"
    assert make_bin_main([str(out), "--image-folder", str(tmp_path / "faces"), "--pairs", "10"]) == 0
    assert load_bin(str(out), image_size=20).num_pairs == 10


def test_make_bin_draws_distinct_pairs_and_refuses_what_no_reader_takes(tmp_path, capsys):
    # 10 identities of 6 images: 150 same pairs and 1,650 different ones exist. A trial's 1,000 pairs held
    # 569 distinct ones (one 8 times); a set of fewer than 10 pairs, or options that only shape
    # synthetic images, were written or ignored without a word.
    for person in range(10):
        (tmp_path / "faces" / f"p{person}").mkdir(parents=True)
        for k in range(6):
            Image.fromarray(picture(person * 10 + k)).save(tmp_path / "faces" / f"p{person}" / f"{k}.png")
    faces = str(tmp_path / "faces")
    for count in (20, 300):  # drawn (a small share), taken from the list of all (150 same pairs of 150)
        pairs, issame = image_folder_pairs(faces, count, seed=1)
        assert len({tuple(sorted(p)) for p in pairs}) == count and issame.tolist() == [True, False] * (count // 2)
        for (a, b), same in zip(pairs, issame):
            assert (os.path.dirname(a) == os.path.dirname(b)) == same and a != b
    with pytest.raises(ValueError, match=r"has 150 distinct pairs of same identities: --pairs 302 needs 151"):
        image_folder_pairs(faces, 302)
    assert make_bin_main([str(tmp_path / "big.bin"), "--image-folder", faces, "--pairs", "1000"]) == 2
    assert "has 150 distinct pairs of same identities" in capsys.readouterr().err
    for argv, message in (
            (["--image-folder", faces, "--pairs", "7"], "--pairs must be at least 10"),
            (["--synthetic", "--pairs", "0"], "--pairs must be at least 10"),
            (["--image-folder", faces, "--image-size", "64"], "--image-size shapes synthetic images"),
            (["--image-folder", faces, "--format", "png", "--quality", "90"], "--format, --quality shape synthetic"),
            (["--pairs-list", "p.txt", "--pairs", "10"], "--pairs-list gives its own pairs"),
            # (these were written, or numpy's and the OS's words naming no option)
            (["--synthetic", "--quality", "500"], "--quality must be 1 to 100, got 500"),
            (["--synthetic", "--format", "png", "--quality", "50"], "--quality is JPEG's: --format png is lossless"),
            (["--synthetic", "--seed", "-1"], "--seed must be at least 0, got -1"),
            (["--pairs-list", "absent.txt"], "--pairs-list absent.txt: no such file"),
            (["--pairs-list", faces], f"--pairs-list {faces}: a folder, not a pairs list")):
        with pytest.raises(SystemExit):
            make_bin_main([str(tmp_path / "x.bin"), *argv])
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        make_bin_main([str(tmp_path / "heldout"), "--synthetic"])
    assert "name the output NAME.bin" in capsys.readouterr().err
    (tmp_path / "few.txt").write_text("".join(f"faces/p{k}/0.png faces/p{k}/1.png 1\n" for k in range(7)))
    assert make_bin_main([str(tmp_path / "few.bin"), "--pairs-list", str(tmp_path / "few.txt")]) == 2
    assert "lists 7 pairs: a set needs at least 10" in capsys.readouterr().err
    assert not any(name.endswith(".bin") for name in os.listdir(tmp_path))


def test_make_bin_says_a_pairs_list_that_is_a_broken_symbolic_link_is_one(tmp_path, capsys):
    # A link to a disk not mounted: "no such file" alone sent the user looking for the link, which is there
    # (3a1e680's checkpoint.dangling).
    gone = tmp_path / "pairs.txt"
    gone.symlink_to(tmp_path / "unmounted" / "pairs.txt")
    with pytest.raises(SystemExit) as stop:
        make_bin_main([str(tmp_path / "x.bin"), "--pairs-list", str(gone)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"make_bin: error: --pairs-list {gone}: "
                                                        "no such file (a broken symbolic link to "
                                                        f"{tmp_path / 'unmounted' / 'pairs.txt'})")
    assert os.listdir(tmp_path) == ["pairs.txt"]


def test_make_bin_keeps_an_existing_file_unless_told(tmp_path, capsys):
    # The output's stem names the synthetic set: `make_bin data/lfw.bin --synthetic` must not
    # replace a real lfw.bin.
    real = tmp_path / "lfw.bin"
    real.write_bytes(b"the real lfw.bin")
    assert make_bin_main([str(real), "--synthetic", "--pairs", "10", "--image-size", "8"]) == 2
    assert f"{real} exists: pass --overwrite to replace it" in capsys.readouterr().err
    assert real.read_bytes() == b"the real lfw.bin"
    assert make_bin_main([str(real), "--synthetic", "--pairs", "10", "--image-size", "8", "--overwrite"]) == 0
    assert load_bin(str(real), image_size=8).num_pairs == 10
    assert sorted(os.listdir(tmp_path)) == ["lfw.bin"]


def test_make_bin_checks_every_image_decodes(tmp_path, pairs_images, capsys):
    images, _ = pairs_images
    write_pairs_folder(tmp_path, images)
    (tmp_path / "imgs" / "3.png").write_bytes(b"\x89PNG not really")
    with open(tmp_path / "pairs.txt", "a") as f:  # ten pairs, the least a set holds
        f.write("imgs/0.png imgs/2.png 0\n" * 7)
    out = tmp_path / "pairs.bin"
    assert make_bin_main([str(out), "--pairs-list", str(tmp_path / "pairs.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_bin: error: ") and "3.png: cannot read the image: " in err and err.count("\n") == 1
    assert not out.exists()
    # The list itself is not an output, --overwrite or not (named as it is, or by a .bin link to it).
    listed = (tmp_path / "pairs.txt").read_text()
    with pytest.raises(SystemExit):
        make_bin_main([str(tmp_path / "pairs.txt"), "--pairs-list", str(tmp_path / "pairs.txt"), "--overwrite"])
    assert "name the output NAME.bin" in capsys.readouterr().err
    os.symlink(tmp_path / "pairs.txt", tmp_path / "link.bin")
    assert make_bin_main([str(tmp_path / "link.bin"), "--pairs-list", str(tmp_path / "pairs.txt"), "--overwrite"]) == 2
    assert "is one of the files this run reads" in capsys.readouterr().err
    assert (tmp_path / "pairs.txt").read_text() == listed


def test_make_bin_checks_the_image_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_bin_main([str(tmp_path / "x.bin"), "--synthetic", "--image-size", "0"])
    assert exit_info.value.code == 2 and "--image-size must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()


# ---------------------------------------------------------------------------------------------
# Pairs lists and building the sets


def write_pairs_folder(root, images):
    (root / "imgs").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / "imgs" / f"{i}.png")
    (root / "pairs.txt").write_text(
        "# image1 image2 same\n"
        "imgs/0.png imgs/1.png 1\n"
        "\n"
        "imgs/2.png\timgs/3.png\t0\n"
        f"{root / 'imgs' / '4.png'} imgs/5.png 1\n"
    )


def test_pairs_list(tmp_path, pairs_images):
    images, issame = pairs_images
    write_pairs_folder(tmp_path, images)
    vset = load_pairs_list(str(tmp_path / "pairs.txt"), image_size=20)
    assert vset.name == "pairs" and vset.issame.tolist() == issame
    for i, img in enumerate(images):
        assert np.array_equal(vset.images[i].permute(1, 2, 0).numpy(), img)
    (tmp_path / "bad.txt").write_text("imgs/0.png imgs/1.png 1\nimgs/0.png imgs/1.png maybe\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 2"):
        load_pairs_list(str(tmp_path / "bad.txt"))
    # Names with spaces: tab-separated, or in double quotes (as align's landmarks files quote them).
    shutil.copy(tmp_path / "imgs" / "0.png", tmp_path / "imgs" / "my face.png")
    (tmp_path / "spaces.txt").write_text('"imgs/my face.png" imgs/1.png 1\nimgs/1.png\timgs/my face.png\t0\n')
    spaced = load_pairs_list(str(tmp_path / "spaces.txt"), image_size=20)
    assert spaced.issame.tolist() == [True, False]
    assert torch.equal(spaced.images[0], vset.images[0]) and torch.equal(spaced.images[3], vset.images[0])
    (tmp_path / "missing.txt").write_text("imgs/0.png imgs/nope.png 0\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_pairs_list(str(tmp_path / "missing.txt"))
    # An image given as the pairs file: a one-line error naming it (was the decoder's message alone); a
    # byte-order mark, as Windows tools write, is not part of the first image's name.
    with pytest.raises(ValueError, match=r"imgs/0\.png: line 1: not UTF-8 text \(invalid start byte, byte 0x89\)"):
        load_pairs_list(str(tmp_path / "imgs" / "0.png"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "pairs.txt").read_bytes())
    assert load_pairs_list(str(tmp_path / "bom.txt"), image_size=20).issame.tolist() == issame


def test_an_image_a_pairs_list_lacks_is_named_by_its_line(tmp_path, pairs_images, capsys):
    # Its line, not its pair's number (which is no line's past a comment or a blank line), the name as listed
    # and the folder it was looked for in; for the trainer's --val-targets and make_bin --pairs-list alike
    # (make_bin said "[Errno 2] No such file or directory: '<path>'").
    images, _ = pairs_images
    write_pairs_folder(tmp_path, images)
    (tmp_path / "gaps.txt").write_text("# mine\n\nimgs/0.png imgs/1.png 1\nimgs/2.png imgs/absent 0\n")
    said = f"{tmp_path / 'gaps.txt'}: line 4: no image imgs/absent in {tmp_path}"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(said) + "$"):
        load_pairs_list(str(tmp_path / "gaps.txt"), image_size=20)
    assert make_bin_main([str(tmp_path / "out.bin"), "--pairs-list", str(tmp_path / "gaps.txt")]) == 2
    assert capsys.readouterr().err == f"make_bin: error: {said}\n"
    assert not (tmp_path / "out.bin").exists()
    # An absolute name is said as it is, not as looked for in the list's folder (it was "... in <that folder>").
    (tmp_path / "gaps.txt").write_text(f"imgs/0.png {tmp_path / 'nowhere' / 'absent.png'} 1\n")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"{tmp_path / 'gaps.txt'}: line 1: no image {tmp_path / 'nowhere' / 'absent.png'}") + "$"):
        load_pairs_list(str(tmp_path / "gaps.txt"), image_size=20)


# LFW's pairs.txt (a header 'sets n', then per set n lines 'name n1 n2' and n lines 'name1 n1 name2 n2') over
# <folder>/<name>/<name>_<NNNN>.jpg, and CALFW's / CPLFW's pair files (two lines 'image label' a pair; 0 on both
# lines of a mismatched pair, one positive number on both of a matched one) over a flat folder.
PEOPLE = {"Ann_Lee": 3, "Bo_Chen": 2, "Cy_Diaz": 1, "Di_Eze": 2}


def write_lfw_folder(root, people=PEOPLE, ext=".jpg"):
    for who, (name, count) in enumerate(people.items()):
        (root / name).mkdir(parents=True)
        for n in range(1, count + 1):
            Image.fromarray(render_face(0, who, n, 20)).save(root / name / f"{name}_{n:04d}{ext}")


def lfw_sets(sets):
    """Set k's matched and mismatched line of a 'sets 1' pairs.txt, as (name, n1, n2), (name1, n1, name2, n2)."""
    matched = [("Ann_Lee", 1, 2), ("Bo_Chen", 1, 2), ("Ann_Lee", 2, 3), ("Di_Eze", 2, 1)]
    mismatched = [("Ann_Lee", 1, "Cy_Diaz", 1), ("Bo_Chen", 2, "Di_Eze", 1), ("Cy_Diaz", 1, "Di_Eze", 2)]
    return [(matched[k % 4], mismatched[k % 3]) for k in range(sets)]


def own_list(path, rows):
    """The same pairs as this project's pairs list: (image1, image2, same) relative to the list's folder."""
    path.write_text("".join(f"{a} {b} {int(same)}\n" for a, b, same in rows))
    return load_pairs_list(str(path), image_size=20)


def lfw_image(name, n):
    return f"{name}/{name}_{n:04d}.jpg"


def test_lfw_pairs_txt_is_read_in_lfws_own_folds(tmp_path):
    write_lfw_folder(tmp_path)
    sets = lfw_sets(10)
    (tmp_path / "pairs.txt").write_text("10\t1\n" + "".join(
        "\t".join(map(str, m)) + "\n" + "\t".join(map(str, d)) + "\n" for m, d in sets))
    vset = load_pairs_list(str(tmp_path / "pairs.txt"), image_size=20)
    rows = [r for (name, n1, n2), (a, i, b, j) in sets
            for r in ((lfw_image(name, n1), lfw_image(name, n2), True), (lfw_image(a, i), lfw_image(b, j), False))]
    same = own_list(tmp_path / "mine.txt", rows)
    assert vset.name == "pairs" and vset.num_pairs == 20
    assert np.array_equal(vset.issame, same.issame) and torch.equal(vset.images, same.images)
    # The 10 contiguous folds of the accuracy over the pairs in file order are LFW's 10 sets.
    pairs, _ = read_pairs_list(str(tmp_path / "pairs.txt"))
    for k, fold in enumerate(_fold_slices(vset.num_pairs, 10)):
        (name, n1, n2), (a, i, b, j) = sets[k]
        assert [pairs[p] for p in fold] == [(str(tmp_path / lfw_image(name, n1)), str(tmp_path / lfw_image(name, n2))),
                                            (str(tmp_path / lfw_image(a, i)), str(tmp_path / lfw_image(b, j)))]
        assert vset.issame[fold].tolist() == [True, False]
    # make_bin --pairs-list writes the same pairs, in that order, as insightface's lfw.bin.
    assert make_bin_main([str(tmp_path / "lfw.bin"), "--pairs-list", str(tmp_path / "pairs.txt")]) == 0
    packed = load_bin(str(tmp_path / "lfw.bin"), image_size=20)
    assert np.array_equal(packed.issame, vset.issame) and torch.equal(packed.images, vset.images)


def test_lfw_view1_and_calfw_cplfw_pairs_take_a_tenth_of_each_half_a_fold(tmp_path):
    # pairsDevTest.txt ('n', n matched then n mismatched), pairs_CALFW.txt (matched labelled with their fold
    # 1..10, mismatched 0) and pairs_CPLFW.txt (matched 1): fold k is the k-th matched and the k-th mismatched
    # pair here, the k-th 300 of each half in the real files (FaceX-Zoo's folds).
    write_lfw_folder(tmp_path)
    sets = lfw_sets(10)
    (tmp_path / "dev.txt").write_text("10\n" + "".join(" ".join(map(str, m)) + "\n" for m, _ in sets)
                                      + "".join(" ".join(map(str, d)) + "\n" for _, d in sets))
    rows = [r for (name, n1, n2), (a, i, b, j) in sets
            for r in ((lfw_image(name, n1), lfw_image(name, n2), True), (lfw_image(a, i), lfw_image(b, j), False))]
    dev = load_pairs_list(str(tmp_path / "dev.txt"), image_size=20)
    same = own_list(tmp_path / "mine.txt", rows)
    assert np.array_equal(dev.issame, same.issame) and torch.equal(dev.images, same.images)

    flat = tmp_path / "flat"
    flat.mkdir()
    for row in rows:
        for image in row[:2]:
            shutil.copy(tmp_path / image, flat / os.path.basename(image))
    files = [(os.path.basename(a), os.path.basename(b)) for a, b, _ in rows]
    for name, label in (("pairs_CALFW.txt", lambda k: k + 1), ("pairs_CPLFW.txt", lambda k: 1)):
        (flat / name).write_text("".join(f"{a} {label(k)}\n{b} {label(k)}\n" for k, (a, b) in enumerate(files[0::2]))
                                 + "".join(f"{a} 0\n{b} 0\n" for a, b in files[1::2]))
        vset = load_pairs_list(str(flat / name), image_size=20)
        assert np.array_equal(vset.issame, same.issame) and torch.equal(vset.images, same.images), name
    # Another order is kept as it is.
    (flat / "mixed.txt").write_text("".join(f"{a} {int(s)}\n{b} {int(s)}\n" for (a, b), (_, _, s) in zip(files, rows)
                                            if not s) + "".join(f"{a} 1\n{b} 1\n" for (a, b), (_, _, s) in
                                                                zip(files, rows) if s))
    assert load_pairs_list(str(flat / "mixed.txt"), image_size=20).issame.tolist() == [False] * 10 + [True] * 10


def test_official_pair_files_are_told_by_content_and_refused_by_line(tmp_path):
    write_lfw_folder(tmp_path, {"Ann_Lee": 3, "Cy_Diaz": 1})
    write_lfw_folder(tmp_path, {"Bo_Chen": 2}, ext=".png")  # crops saved as .png: found as well
    good = "1\t2\nAnn_Lee\t1\t2\nBo_Chen\t1\t2\nAnn_Lee\t1\tCy_Diaz\t1\nBo_Chen\t2\tAnn_Lee\t3\n"
    (tmp_path / "view2.txt").write_text(good)  # the header tells LFW's format, not the name
    pairs, issame = read_pairs_list(str(tmp_path / "view2.txt"))
    assert issame.tolist() == [True, False, True, False]  # one set: a matched and a mismatched pair a fold
    assert pairs[2] == (str(tmp_path / "Bo_Chen" / "Bo_Chen_0001.png"), str(tmp_path / "Bo_Chen" / "Bo_Chen_0002.png"))
    # A file kept elsewhere, linked into the image folder: its images are the link's folder's.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pairs.txt").write_text(good)
    os.symlink(tmp_path / "elsewhere" / "pairs.txt", tmp_path / "linked.txt")
    assert read_pairs_list(str(tmp_path / "linked.txt"))[0] == pairs
    for text, message in (
            ("1 2\nAnn_Lee 1 2\nBo_Chen 1 2\nAnn_Lee 1 Cy_Diaz 1\n",
             r"the header \('1 2', line 1\) gives 1 set\(s\) of 2 matched and 2 mismatched pairs, 4 lines; 3 follow"),
            ("1 2\nAnn_Lee 1 2\nAnn_Lee 1 Cy_Diaz 1\nBo_Chen 1 2\nBo_Chen 2 Ann_Lee 3\n",
             r"line 3: expected a matched pair name n1 n2 \(each set is 2 matched pairs, then 2 mismatched\)"),
            ("5 1\n" + "Ann_Lee 1 2\nAnn_Lee 1 Cy_Diaz 1\n" * 5, r"line 1: LFW's header 'sets pairs' of 5 sets of 1"),
            ("Ann_Lee_0001.jpg 1\nAnn_Lee_0002.jpg 1\nCy_Diaz_0001.jpg 0\n",
             r"3 lines of 'image label': .* the last \(line 3\) has no second"),
            ("a.jpg 1\nb.jpg 0\n", r"lines 1-2: a pair's two lines carry one label \(0: mismatched\), got 1 and 0"),
            ("a.jpg 1\nb.jpg x\n", r"line 2: expected 'image label'")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=r"bad\.txt: " + message):
            read_pairs_list(str(tmp_path / "bad.txt"))
    (tmp_path / "missing.txt").write_text(good.replace("Bo_Chen\t2\tAnn_Lee\t3", "Bo_Chen\t2\tAnn_Lee\t7"))
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"{tmp_path / 'missing.txt'}: line 5: no image Ann_Lee_0007.jpg (nor Ann_Lee_0007 as .jpeg, .png, .bmp) "
            f"in {tmp_path / 'Ann_Lee'} (LFW's pairs name <its folder>/<name>/<name>_<NNNN>.jpg)") + "$"):
        load_pairs_list(str(tmp_path / "missing.txt"))
    shutil.copy(tmp_path / "Ann_Lee" / "Ann_Lee_0001.jpg", tmp_path)
    (tmp_path / "missing_calfw.txt").write_text("Ann_Lee_0001.jpg 3\nAnn_Lee_0009.jpg 3\n")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"{tmp_path / 'missing_calfw.txt'}: line 2: no image Ann_Lee_0009.jpg (nor Ann_Lee_0009 as .jpeg, .png, "
            f".bmp) in {tmp_path}") + "$"):
        load_pairs_list(str(tmp_path / "missing_calfw.txt"))


def test_build_verification_sets_from_a_folder(tmp_path, pairs_images):
    images, issame = pairs_images
    images, issame = images * 4, issame * 4  # 12 pairs: at least one for each of the 10 folds
    write_pairs_folder(tmp_path, images)
    (tmp_path / "pairs.txt").write_text("".join(f"imgs/{2 * k}.png imgs/{2 * k + 1}.png {int(same)}\n"
                                                for k, same in enumerate(issame)))
    with open(tmp_path / "lfw.bin", "wb") as f:
        pickle.dump(([png(img) for img in images], issame), f)
    with pytest.warns(UserWarning, match="cfp_fp"):
        sets = build_verification_sets(str(tmp_path), ["lfw", "cfp_fp", str(tmp_path / "pairs.txt")], image_size=20)
    assert list(sets) == ["lfw", "pairs"]
    assert torch.equal(sets["lfw"].images, sets["pairs"].images)


def test_verification_sets_of_the_same_file_name_are_all_kept(tmp_path, pairs_images):
    # /a/lfw.bin and /b/lfw.bin: the second was dropped under the first's name.
    images, issame = pairs_images
    for folder, repeat in (("a", 4), ("b", 5)):
        (tmp_path / folder).mkdir()
        with open(tmp_path / folder / "lfw.bin", "wb") as f:
            pickle.dump(([png(img) for img in images * repeat], issame * repeat), f)
    sets = build_verification_sets(str(tmp_path / "a"), ["lfw", str(tmp_path / "a" / "lfw.bin"),
                                                         str(tmp_path / "b" / "lfw.bin")], image_size=20)
    # a/lfw.bin is the file "lfw" names: one set, read once.
    assert list(sets) == ["lfw", "b/lfw"]
    assert [v.num_pairs for v in sets.values()] == [12, 15] and sets["b/lfw"].name == "b/lfw"


def test_build_verification_sets_refuses_missing_paths_and_too_few_pairs(tmp_path, pairs_images):
    # A name that the data folder lacks is skipped, as insightface does; a path is an error, and so
    # is a set with fewer pairs than folds (insightface's KFold fails on it at the first evaluation).
    images, issame = pairs_images
    with open(tmp_path / "lfw.bin", "wb") as f:
        pickle.dump(([png(img) for img in images], issame), f)
    with pytest.raises(ValueError, match=r"lfw\.bin: 3 pairs; verification needs at least 10"):
        build_verification_sets(str(tmp_path), ["lfw"], image_size=20)
    with open(tmp_path / "empty.bin", "wb") as f:  # an empty list pickles without a type: still no pairs, not floats
        pickle.dump(([], []), f)
    with pytest.raises(ValueError, match=r"empty\.bin: 0 pairs; verification needs at least 10"):
        build_verification_sets(str(tmp_path), [str(tmp_path / "empty.bin")], image_size=20)
    # A relative path is looked for in the data's folder too, which is said (it said the path alone).
    for target, where in ((str(tmp_path / "elsewhere" / "agedb_30.bin"), ""),
                          ("cfp_fp.bin", f", nor in {tmp_path} (the data's folder)"),
                          ("pairs.txt", f", nor in {tmp_path} (the data's folder)")):
        with pytest.raises(FileNotFoundError,
                           match=f"^--val-targets: no verification set at {re.escape(target + where)}$"):
            build_verification_sets(str(tmp_path), [target], image_size=20)
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"--val-targets: no verification set at pairs.txt, nor in {tmp_path} or {tmp_path / 'b'} (the data's "
            "folders)") + "$"):
        find_target([str(tmp_path), str(tmp_path / "b")], "pairs.txt")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(  # (--data a.txt,b.txt: one folder, said once)
            f"--val-targets: no verification set at pairs.txt, nor in {tmp_path} (the data's folder)") + "$"):
        find_target([str(tmp_path), str(tmp_path)], "pairs.txt")
    with pytest.warns(UserWarning, match="'cfp_fp': no cfp_fp.bin in"):
        assert build_verification_sets(str(tmp_path), ["cfp_fp"], image_size=20) == {}


def test_synthetic_data_reads_the_paths_among_its_targets(tmp_path, pairs_images):
    # With --data synthetic a name is a synthetic set, but a path is still the file it names.
    images, issame = pairs_images
    with open(tmp_path / "mine.bin", "wb") as f:
        pickle.dump(([png(img) for img in images * 4], issame * 4), f)
    sets = build_verification_sets("synthetic", ["synthetic", str(tmp_path / "mine.bin")], image_size=20,
                                   synthetic_pairs_per_target=10)
    assert list(sets) == ["synthetic", "mine"] and sets["mine"].num_pairs == 12
    assert torch.equal(sets["mine"].images, load_bin(str(tmp_path / "mine.bin"), image_size=20).images)
    for target in ("/nonexistent/lfw.bin", "lfw.bin", "elsewhere/pairs.txt"):
        with pytest.raises(FileNotFoundError, match=f"^--val-targets: no verification set at {re.escape(target)}$"):
            build_verification_sets("synthetic", [target], image_size=20)
    (tmp_path / "garbage.bin").write_text("garbage\n")
    with pytest.raises(pickle.UnpicklingError, match=r"garbage\.bin: not a readable verification \.bin"):
        build_verification_sets("synthetic", [str(tmp_path / "garbage.bin")], image_size=20)


def test_build_verification_sets_synthetic():
    sets = build_verification_sets("synthetic", ["lfw", "cfp_fp"], image_size=24, seed=0,
                                   synthetic_pairs_per_target=10)
    assert list(sets) == ["lfw", "cfp_fp"]
    for name, vset in sets.items():
        assert vset.name == name and vset.num_pairs == 10 and vset.images.shape == (20, 3, 24, 24)
        assert math.isclose(vset.issame.mean(), 0.5)
    assert not torch.equal(sets["lfw"].images, sets["cfp_fp"].images)
