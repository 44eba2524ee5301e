"""benchmarks/make_synthetic_eval_sets.py: the trees it writes are read by train.rfw, train.ijb and
train.tinyface (the loose crops align back to the faces drawn), the same seed writes the same files, a
folder that holds anything is refused unless --overwrite is given, which replaces only the trees the script
wrote, and a stopped run leaves each tree whole or as it was."""

import os
import pathlib
import signal
import warnings

import numpy as np
import pytest

from train import ijb, rfw, tinyface
from train.data.synthetic import render_face, verification_identity_base

from conftest import load_benchmark

make_sets = load_benchmark("make_synthetic_eval_sets")


@pytest.fixture
def small(monkeypatch):
    """Fewer people and images, so that a tree takes a fraction of a second."""
    for name, value in (("RFW_IDENTITIES", 2), ("RFW_IMAGES", 2), ("RFW_PAIRS_PER_FOLD", 1), ("IJB_IDENTITIES", 2),
                        ("TINY_PROBES", 2), ("TINY_MATCHES", 1), ("TINY_DISTRACTORS", 2)):
        monkeypatch.setattr(make_sets, name, value)


def assert_aligned(crop, face):
    """``crop`` (3, H, W) is ``face`` up to JPEG and resampling: nearer to it than to it moved by 2 pixels."""
    def error(other):
        return float(np.abs(crop.numpy().transpose(1, 2, 0).astype(np.float32) - other).mean())

    face = face.astype(np.float32)
    moved = [error(np.roll(face, step, axis)) for step in (-2, 2) for axis in (0, 1)]
    assert error(face) < min(moved), (error(face), moved)


def test_the_trees_are_read_by_the_tools(small, tmp_path):
    written = make_sets.write_sets(str(tmp_path / "sets"), seed=3)
    assert sorted(os.listdir(tmp_path / "sets")) == ["IJB_release", "RFW", "tinyface"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (landmarks that fit the template poorly would warn)
        release = rfw.find_release(written["rfw"])
        assert all(release.landmarks[race] for race in rfw.RACES)
        sets = {race: rfw.load_race(release, race, image_size=112) for race in rfw.RACES}
    assert [vset.name for vset in sets.values()] == [f"RFW/{race}" for race in rfw.RACES]
    assert all(vset.issame.tolist() == [True, False] * 10 for vset in sets.values())  # 10 folds of 1 and 1
    # The first pair's first image, aligned from its landmarks, is the face drawn.
    who, n = pathlib.Path(release.pairs["Asian"]).read_text().split()[:2]
    face = render_face(3, verification_identity_base("RFW/Asian") + int(who[-3:]), int(n), 112)
    assert_aligned(sets["Asian"].images[0], face)

    protocol = ijb.read_protocol(written["ijbc"], "IJBC", ("1:1", "1:N"))
    assert len(protocol.image_names) == 12 and protocol.issame.sum() == 2 and len(protocol.issame) == 6
    assert sorted(protocol.identification.galleries) == ["G1", "G2"]
    crops = ijb.LooseCrops(protocol.image_folder, protocol.image_names, protocol.landmarks, 112, check_bounds=True)
    crop, why = crops[0]
    assert why == ""
    assert_aligned(crop, render_face(3, verification_identity_base("IJBC"), 0, 112))

    testing_set = tinyface.TinyFaceProtocol(written["tinyface"])
    assert testing_set.probe_labels.tolist() == [1, 2] and testing_set.match_labels.tolist() == [1, 2]
    assert len(testing_set.names["Gallery_Distractor"]) == 2


def test_the_seed_decides_the_files(small, tmp_path):
    def contents(folder):
        return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert make_sets.main([str(tmp_path / folder), "--seed", str(seed), "--sets", "tinyface"]) == 0
    first = contents(tmp_path / "a")
    assert len(first) == 7 and first == contents(tmp_path / "b")  # 6 images and SYNTHETIC.txt
    other = contents(tmp_path / "c")
    assert other.keys() == first.keys() and all(other[name] != first[name] for name in first)


def test_a_folder_that_holds_anything_is_refused_unless_overwrite(small, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert make_sets.main([str(tmp_path), "--sets", "tinyface"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path} is not empty" in err and "--overwrite" in err
    assert os.listdir(tmp_path) == ["notes.txt"]

    stale = tmp_path / "tinyface" / "old.jpg"  # in a tree an earlier run wrote
    stale.parent.mkdir()
    stale.write_text("")
    (stale.parent / make_sets.MARK).write_text("")
    assert make_sets.main([str(tmp_path), "--sets", "tinyface", "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "tinyface"] and not stale.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        make_sets.main([str(tmp_path), "--sets", "lfw"])


def test_overwrite_never_replaces_what_the_script_did_not_write(small, tmp_path, capsys):
    release = tmp_path / "RFW" / "images" / "test" / "txts"  # a real release beside the synthetic ones
    release.mkdir(parents=True)
    (tmp_path / "tinyface").write_text("a file of the user's")
    for sets in ("rfw", "tinyface"):
        assert make_sets.main([str(tmp_path), "--sets", sets, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / make_sets.FOLDERS[sets]} was not written by this script" in err
    assert sorted(os.listdir(tmp_path)) == ["RFW", "tinyface"] and release.is_dir()
    assert (tmp_path / "tinyface").read_text() == "a file of the user's"


def test_a_stop_leaves_each_tree_whole_or_as_it_was(small, tmp_path, monkeypatch, capsys):
    assert make_sets.main([str(tmp_path), "--sets", "ijbc"]) == 0
    def tree(folder):
        return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    before = tree(tmp_path / "IJB_release")
    write_ijbc = make_sets.WRITERS["ijbc"]

    def stopped_midway(root, seed):  # a SIGTERM once the new IJB-C tree is half written
        os.makedirs(os.path.join(root, "IJBC", "meta"))
        os.kill(os.getpid(), signal.SIGTERM)
        write_ijbc(root, seed)

    monkeypatch.setitem(make_sets.WRITERS, "ijbc", stopped_midway)
    capsys.readouterr()
    assert make_sets.main([str(tmp_path), "--sets", "rfw,ijbc", "--overwrite"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.strip() == (f"make_synthetic_eval_sets.py: stopped by SIGTERM: {tmp_path / 'RFW'} written whole, "
                           "the others not")
    assert sorted(os.listdir(tmp_path)) == ["IJB_release", "RFW"]  # (no hidden half-written tree)
    rfw.find_release(str(tmp_path / "RFW"))
    assert tree(tmp_path / "IJB_release") == before  # the tree of before, untouched

    fresh = tmp_path / "fresh"  # a new folder a stop came into before any tree was whole: not left behind
    assert make_sets.main([str(fresh / "sets"), "--sets", "ijbc"]) == 128 + signal.SIGTERM
    assert "nothing written" in capsys.readouterr().err and not fresh.exists()


def test_a_folder_that_cannot_be_made_is_one_line(small, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert make_sets.main([str(tmp_path / "a_file" / "sets")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot make the folder {tmp_path / 'a_file' / 'sets'}" in err
    with pytest.raises(SystemExit):
        make_sets.main([str(tmp_path / "sets"), "--seed", "-1"])
    assert "--seed: expected a whole number 0 or more" in capsys.readouterr().err
