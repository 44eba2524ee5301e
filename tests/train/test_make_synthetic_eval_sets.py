"""benchmarks/make_synthetic_eval_sets.py: the trees it writes are read by train.rfw, train.ijb and
train.tinyface (the loose crops align back to the faces drawn), the same seed writes the same files, and a
folder that holds anything is refused unless --overwrite is given."""

import os
import pathlib
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
    assert len(first) == 6 and first == contents(tmp_path / "b")
    other = contents(tmp_path / "c")
    assert other.keys() == first.keys() and all(other[name] != first[name] for name in first)


def test_a_folder_that_holds_anything_is_refused_unless_overwrite(small, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert make_sets.main([str(tmp_path), "--sets", "tinyface"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path} is not empty" in err and "--overwrite" in err
    assert os.listdir(tmp_path) == ["notes.txt"]

    stale = tmp_path / "tinyface" / "old.jpg"
    stale.parent.mkdir()
    stale.write_text("")
    assert make_sets.main([str(tmp_path), "--sets", "tinyface", "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "tinyface"] and not stale.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        make_sets.main([str(tmp_path), "--sets", "lfw"])
