"""``python -m train.tools.cluster``: the people of a small synthetic collection found with a model
trained on them; a chain of links that joins two groups into one component, cut by Chinese whispers;
the blocked neighbour search against the whole matrix; the table and the ImageFolder tree it writes,
read back as the trainer reads a folder; and what it refuses, stops on and leaves out."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint
from train.data.imagefolder import scan_image_folder
from train.data.synthetic import render_face
from train.embed import main as embed_main, write_table
from train.tools import cluster
from train.tools.similarity import (connected_components, nearest_neighbours, nearest_neighbours_among,
                                    nearest_neighbours_and_duplicates)
from trainer_fixtures import (CLUSTER_PEOPLE as PEOPLE, IMAGE_SIZE, TWO_PEOPLE, cluster_collection, save_faces,
                              trained_backbone)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on 8 synthetic identities (its checkpoint and backbone.pt beside a backbone.json
    recording a verification threshold), and a nested folder of other faces of 5 of them (3 to 7
    each, never trained on: trainer_fixtures.cluster_collection)."""
    root = tmp_path_factory.mktemp("cluster")
    ckpt, backbone = trained_backbone(root)
    return ckpt, backbone, save_faces(root / "photos", cluster_collection())


def run_cluster(*argv) -> int:
    return cluster.main([*map(str, argv), "--workers", "0"])


def read_rows(path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "cluster"]
    return [(name, int(c)) for name, c in rows[1:]]


def person(name: str) -> str:
    return os.path.dirname(name)  # 2025/event0/03.png -> 2025/event0


@pytest.mark.slow
def test_the_people_of_a_collection_are_found(trained, tmp_path, capsys):
    ckpt, backbone, photos = trained
    out = tmp_path / "clusters.csv"
    assert run_cluster("--model", backbone, "--images", photos, "--output", out, "--tree", tmp_path / "people") == 0
    sidecar = os.path.join(os.path.dirname(backbone), "backbone.json")  # (an export: its run's verification)
    assert f"threshold 0.5500 ({backbone}'s last verification (recorded in {sidecar}))" in capsys.readouterr().err
    rows = read_rows(out)
    assert len(rows) == sum(3 + who for who in range(PEOPLE))
    # Each person is one cluster, and each cluster one person; numbered by size, the largest first.
    found = {}
    for name, c in rows:
        found.setdefault(c, set()).add(person(name))
    assert sorted(found) == list(range(PEOPLE)) and all(len(people) == 1 for people in found.values())
    assert [len([r for r in rows if r[1] == c]) for c in range(PEOPLE)] == [7, 6, 5, 4, 3]
    summary = json.loads((tmp_path / "clusters.json").read_text())
    assert summary["clusters"] == PEOPLE and summary["noise"] == 0 and summary["sizes"] == [7, 6, 5, 4, 3]
    assert summary["threshold"] == 0.55 and summary["model"] == os.path.abspath(backbone)

    # The tree is an ImageFolder as the trainer reads it: a label a cluster, its faces hard links.
    identities, samples = scan_image_folder(str(tmp_path / "people"))
    assert identities == [f"cluster_{c:04d}" for c in range(PEOPLE)]
    by_name = dict(rows)
    for path, label in samples:
        name = os.path.basename(path).replace("__", "/")
        assert by_name[name] == label
        assert os.path.samefile(path, os.path.join(photos, name))
    assert len(samples) == len(rows)
    # --copy copies. A checkpoint that verified nothing gives no threshold: the default, said (here given).
    assert run_cluster("--model", ckpt, "--images", photos, "--output", out, "--tree", tmp_path / "people",
                       "--copy", "--overwrite") == 0
    assert f"cluster: note: {ckpt} records no verification that gives the threshold: cosine 0.3 is taken" in \
        capsys.readouterr().err
    assert run_cluster("--model", ckpt, "--images", photos, "--output", out, "--tree", tmp_path / "people",
                       "--copy", "--overwrite", "--threshold", "0.6") == 0
    assert "threshold 0.6000 (--threshold)" in capsys.readouterr().err
    assert read_rows(out) == rows
    _, copied = scan_image_folder(str(tmp_path / "people"))
    assert [label for _, label in copied] == [label for _, label in samples]
    path = copied[0][0]
    original = os.path.join(photos, os.path.basename(path).replace("__", "/"))
    assert not os.path.samefile(path, original) and open(path, "rb").read() == open(original, "rb").read()
    summary = json.loads((tmp_path / "clusters.json").read_text())
    assert summary["threshold"] == 0.6
    assert summary["tree_files"] == {"hard links": 0, "copies": 25, "names shortened": 0, "duplicates left out": 0}


@pytest.mark.slow
def test_a_table_of_train_embed_clusters_as_its_folder(trained, tmp_path, capsys):
    ckpt, backbone, photos = trained
    table = tmp_path / "emb.npy"
    assert embed_main(["--model", backbone, "--images", photos, "--output", str(table), "--workers", "0"]) == 0
    assert run_cluster("--model", backbone, "--images", photos, "--output", tmp_path / "a.csv") == 0
    # The table's provenance names the model (its threshold) and the images (for --tree).
    assert run_cluster("--embeddings", table, "--output", tmp_path / "b.csv", "--tree", tmp_path / "tree") == 0
    assert f"({backbone}'s last verification (recorded in " in capsys.readouterr().err
    assert read_rows(tmp_path / "a.csv") == read_rows(tmp_path / "b.csv")
    assert len(scan_image_folder(str(tmp_path / "tree"))[1]) == 25
    # The run's checkpoint is the model of its export's table (their weights are one); other weights are not.
    assert run_cluster("--embeddings", table, "--model", ckpt, "--threshold", 0.5, "--output", tmp_path / "b.csv",
                       "--overwrite") == 0
    assert "made with" not in capsys.readouterr().err
    weights = torch.load(backbone)
    weights["conv1.weight"] += 0.01
    os.makedirs(tmp_path / "other")
    torch.save(weights, tmp_path / "other" / "backbone.pt")
    (tmp_path / "other" / "backbone.json").write_text(open(checkpoint.settings_path(backbone)).read())
    assert run_cluster("--embeddings", table, "--model", tmp_path / "other" / "backbone.pt", "--output",
                       tmp_path / "b.csv", "--overwrite") == 0
    assert f"--embeddings {table} was made with another model than {tmp_path / 'other' / 'backbone.pt'} ({backbone} " \
           "as it was then; its .json records the SHA-256 of that model's weights): the threshold is" \
           in capsys.readouterr().err

    # Without provenance: the default threshold with a note, and no tree (where are the images?).
    names = [line.strip() for line in open(tmp_path / "emb.txt")]
    write_table(str(tmp_path / "bare.npy"), names, np.load(table))
    assert run_cluster("--embeddings", tmp_path / "bare.npy", "--output", tmp_path / "c.csv") == 0
    assert "no model gives the threshold: cosine 0.3 is taken" in capsys.readouterr().err
    assert run_cluster("--embeddings", tmp_path / "bare.npy", "--output", tmp_path / "d.csv", "--tree",
                       tmp_path / "t2") == 2
    assert "--tree: " in capsys.readouterr().err and not os.path.exists(tmp_path / "d.csv")
    # A .json that names the images but not what the rows are, as train.ijb's and train.tinyface's --save-features
    # tables (it said "are faces None").
    write_table(str(tmp_path / "unsaid.npy"), names, np.load(table), about={"images": str(tmp_path)})
    assert run_cluster("--embeddings", tmp_path / "unsaid.npy", "--output", tmp_path / "d.csv", "--tree",
                       tmp_path / "t2") == 2
    err = capsys.readouterr().err
    assert err == (f"cluster: error: --tree: {tmp_path / 'unsaid.npy'}'s .json does not say what its rows are "
                   "(its \"faces\", which train.embed writes and train.ijb's and train.tinyface's tables lack): "
                   "cluster the folder of images with --images instead\n"), err
    assert not os.path.exists(tmp_path / "d.csv") and not os.path.exists(tmp_path / "t2")
    # A model of another embedding size than the table's.
    write_table(str(tmp_path / "narrow.npy"), names, np.load(table)[:, :8])
    assert run_cluster("--embeddings", tmp_path / "narrow.npy", "--model", backbone, "--output",
                       tmp_path / "e.csv") == 2
    assert "gives 64-D embeddings" in capsys.readouterr().err


def chain(per_group: int = 6) -> torch.Tensor:
    """Two tight groups of faces (around e0 and e1) and, between them, faces on the arc from one to
    the other: each alike enough to its neighbours to be linked at cosine 0.8, the two groups not."""
    rng = np.random.default_rng(0)
    groups = [np.eye(8)[g] + 0.05 * rng.standard_normal((per_group, 8)) for g in (0, 1)]
    bridge = np.array([[np.cos(a), np.sin(a)] + [0] * 6 for a in np.linspace(0.55, 1.02, 3)])
    return torch.nn.functional.normalize(torch.tensor(np.concatenate([groups[0], bridge, groups[1]])), dim=1)


def test_chinese_whispers_cuts_a_chain_that_joins_two_groups():
    unit = chain()
    links = (unit @ unit.T).numpy()
    assert links[0, -1] < 0.2 and links[6, 5] > 0.8 and links[8, 9] > 0.8  # the groups are apart; the chain links
    components, _ = cluster.cluster_embeddings(unit, 0.8, neighbours=5, method="components", min_size=2)
    assert components.tolist() == [0] * 15  # one false link after another: all one
    whispers, _ = cluster.cluster_embeddings(unit, 0.8, neighbours=5, min_size=2)
    assert len(set(whispers[:6])) == 1 and len(set(whispers[-6:])) == 1 and whispers[0] != whispers[-1]
    assert whispers.max() == 1  # the chain's faces join one group or the other
    # --min-size: clusters of fewer are noise.
    assert (cluster.cluster_embeddings(unit, 0.8, neighbours=5, min_size=10)[0] == -1).all()


def test_chinese_whispers_and_numbering():
    # Two triangles and a lone pair, by edges; weights decide a node torn between two labels.
    a, b = np.array([0, 0, 1, 3, 3, 4, 6, 2]), np.array([1, 2, 2, 4, 5, 5, 7, 3])
    weight = np.array([1, 1, 1, 1, 1, 1, 1, 0.1])
    label = cluster.chinese_whispers(9, a, b, weight)
    assert label[0] == label[1] == label[2] and label[3] == label[4] == label[5] and label[6] == label[7]
    assert len({label[0], label[3], label[6], label[8]}) == 4
    numbered = cluster.numbered_clusters(label, 2)
    assert numbered.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, -1]
    assert cluster.chinese_whispers(3, np.array([], dtype=int), np.array([], dtype=int), np.array([])).tolist() \
        == [0, 1, 2]


# Blocks with few cosines at the threshold give them as a list, those with many are searched whole
# (more than 4·k·(rows + columns): the last two cases' blocks off the diagonal).
@pytest.mark.parametrize("n, k, threshold, rows, columns", [(37, 3, 0.2, 5, 7), (50, 5, -1.0, 8, 8),
                                                            (10, 20, 0.5, 3, 4), (64, 4, 0.4, 64, 64),
                                                            (80, 1, -1.0, 16, 16), (70, 2, -0.5, 20, 30)])
def test_blocked_neighbour_search_matches_the_whole_matrix(n, k, threshold, rows, columns):
    unit = torch.nn.functional.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(n)), dim=1)
    index, cosine = nearest_neighbours(unit, k, threshold, device="cpu", rows=rows, columns=columns)
    full = (unit @ unit.T).numpy()
    np.fill_diagonal(full, -np.inf)
    full[full < threshold] = -np.inf
    expected = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(cosine[:, :expected.shape[1]], expected, atol=1e-6)
    found = index >= 0
    assert (found == np.isfinite(cosine)).all()
    np.testing.assert_allclose(full[np.nonzero(found)[0], index[found]], cosine[found], atol=1e-6)
    assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in index)  # no neighbour twice
    assert connected_components(6, np.array([4, 1, 0]), np.array([5, 4, 2])).tolist() == [0, 1, 0, 3, 1, 1]


def people_photos(people: int, photos: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(people x photos unit 32-D embeddings, each one's person): a person's photos at cosine 0.65 or
    more to each other, different people's below 0.5."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(people, 32, generator=generator), dim=1)
    person = np.repeat(np.arange(people), photos)
    noise = 0.08 * torch.randn(len(person), 32, generator=generator)
    return torch.nn.functional.normalize(centres[person] + noise, dim=1), person


def with_duplicates(unit: torch.Tensor, copies: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Each row ``copies[i]`` times, in a shuffled order, every other copy moved a little (cosine
    0.9999 or so, a re-encoding) and the rest exact: (the rows, each one's row of ``unit``)."""
    generator = torch.Generator().manual_seed(seed)
    photo = np.repeat(np.arange(len(unit)), copies)
    photo = photo[np.random.default_rng(seed).permutation(len(photo))]
    moved = 0.002 * torch.randn(len(photo), unit.shape[1], generator=generator)
    moved *= (torch.arange(len(photo)) % 2)[:, None]
    return torch.nn.functional.normalize(unit[photo] + moved, dim=1), photo


def test_duplicate_photos_cluster_with_their_person_not_by_copy():
    """Every photo there 12 times: each face's 10 nearest were its own copies, so the graph had no link
    out of a photo's copies and each photo was a cluster (24 for 4 people)."""
    photos, person = people_photos(4, 6)
    assert (cluster.cluster_embeddings(photos, 0.5)[0] == person).all()
    faces, photo = with_duplicates(photos, np.full(len(photos), 12))
    for method in cluster.METHODS:
        found, _ = cluster.cluster_embeddings(faces, 0.5, method=method)
        assert found.max() == 3 and len(set(zip(found.tolist(), person[photo].tolist()))) == 4, found
    # Each face's first duplicate, as the summary counts them.
    _, first = cluster.cluster_embeddings(faces, 0.5)
    assert (first == np.array([np.flatnonzero(photo == p)[0] for p in photo])).all()
    # At a --duplicate-cosine above the re-encodings' cosines, only the exact copies are duplicates.
    _, first = cluster.cluster_embeddings(faces, 0.5, duplicate_cosine=0.999999)
    assert len(np.unique(first)) == len(photos) * 7  # per photo: the 6 exact copies as one, the 6 moved apart


@pytest.mark.parametrize("rows, columns", [(2048, 16384), (7, 11)])
def test_the_graph_of_duplicated_photos_is_that_of_the_photos_alone(rows, columns):
    # Some photos with duplicates (1 to 4 copies), most without: each photo's neighbours are those
    # nearest_neighbours finds among the photos alone, and the duplicates' groups the pairs' components.
    photos, _ = people_photos(6, 8, seed=1)
    copies = np.random.default_rng(1).choice([1, 1, 1, 2, 4], len(photos))
    faces, photo = with_duplicates(photos, copies, seed=1)
    index, cosine, first = nearest_neighbours_and_duplicates(faces, 5, 0.5, 0.99, device="cpu", rows=rows,
                                                             columns=columns)
    assert (photo[first] == photo).all() and len(np.unique(first)) == len(photos)
    np.testing.assert_array_equal(index, nearest_neighbours(faces, 5, 0.5, device="cpu", rows=rows, columns=columns)[0])
    found, found_index, found_cosine = cluster.photo_neighbours(faces, index, cosine, first, 5, 0.5)
    expected_index, expected_cosine = nearest_neighbours(faces[found], 5, 0.5, device="cpu")
    np.testing.assert_array_equal(found_index, expected_index)
    np.testing.assert_allclose(found_cosine, expected_cosine, atol=1e-6)
    # The search of a few rows against all (the faces that must be searched again).
    queries = np.array([0, 3, len(faces) - 1])
    again_index, again_cosine = nearest_neighbours_among(faces, queries, 5, 0.5, device="cpu", rows=2,
                                                         columns=columns)
    whole_index, whole_cosine = nearest_neighbours(faces, 5, 0.5, device="cpu")
    np.testing.assert_allclose(again_cosine, whole_cosine[queries], atol=1e-6)
    assert (again_index >= 0).sum() == (whole_index[queries] >= 0).sum()


def test_a_full_disk_as_the_summary_is_written_leaves_the_earlier_outputs(tmp_path, capsys, monkeypatch):
    # The table was renamed into place before its summary was written: a full disk there left the new clusters
    # beside the summary (sizes, threshold) of the run before.
    faces, _ = people_photos(3, 4)
    table, out = tmp_path / "faces.npy", tmp_path / "c.csv"
    write_table(str(table), [f"{i:03d}.jpg" for i in range(len(faces))], faces.numpy())
    assert run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("c.csv", "c.json")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert run_cluster("--embeddings", table, "--threshold", "0.99", "--output", out, "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith(("c.", "."))} \
        == before  # (no temporary left either)


def test_duplicates_are_counted_and_said(tmp_path, capsys):
    photos, person = people_photos(3, 4)
    faces, photo = with_duplicates(photos, np.arange(len(photos)) % 3 + 1)  # 1, 2 or 3 copies
    table, out = tmp_path / "faces.npy", tmp_path / "c.csv"
    write_table(str(table), [f"{i:03d}.jpg" for i in range(len(faces))], faces.numpy())
    assert run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out) == 0
    summary = json.loads((tmp_path / "c.json").read_text())
    assert (summary["duplicates"], summary["duplicated_faces"], summary["duplicate_cosine"]) == (12, 8, 0.99)
    assert summary["sizes"] == [9, 8, 7] and summary["faces"] == 24  # (1+2+3+1, 2+3+1+2, 3+1+2+3)
    assert "; 12 duplicates of 8 faces (cosine 0.99 or more), each in its face's cluster;" in capsys.readouterr().err
    # Without --threshold (no model gives one: the default, with a note), a refusal comes alone, here c.csv there
    # already: the default's note was printed before it.
    assert run_cluster("--embeddings", table, "--output", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("cluster: error: ") and err.count("\n") == 1 and "exists: pass --overwrite" in err, err
    assert run_cluster("--embeddings", table, "--output", tmp_path / "d.csv") == 0  # (a run that goes ahead: said)
    assert "cluster: note: no model gives the threshold: cosine 0.3 is taken" in capsys.readouterr().err
    rows = read_rows(out)
    assert len({(c, person[photo[i]]) for i, (_, c) in enumerate(rows)}) == 3
    for argv, said in [(["--duplicate-cosine", "1"], "--duplicate-cosine is a cosine similarity above 0 and below 1"),
                       (["--duplicate-cosine", "0"], "--duplicate-cosine is a cosine similarity above 0 and below 1")]:
        with pytest.raises(SystemExit):
            run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out, "--overwrite", *argv)
        assert said in capsys.readouterr().err
    assert run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out, "--overwrite",
                       "--duplicate-cosine", "0.4") == 2
    assert capsys.readouterr().err == "cluster: error: --duplicate-cosine 0.4 is below the threshold 0.5000 " \
        "(--threshold): duplicates are faces more alike than linked ones; give one above it\n"


@pytest.mark.slow
def test_the_tree_holds_each_photo_once_unless_all_duplicates(trained, tmp_path, capsys):
    """A photo there 4 times more (copies in its folder and another) is one image of its cluster's folder in
    the tree, the first of its group, which the others duplicate; the table lists every face, and
    --all-duplicates lays out every copy."""
    ckpt, backbone, photos = trained
    collection = tmp_path / "photos"
    shutil.copytree(photos, collection)
    first = collection / "2025" / "event0" / "00.png"
    copies = [collection / "2025" / "event0" / "copy1.png", collection / "2025" / "event0" / "copy2.png",
              collection / "zz" / "a.png", collection / "zz" / "b.png"]
    os.makedirs(collection / "zz")
    for copy in copies:
        shutil.copy(first, copy)
    out, tree = tmp_path / "clusters.csv", tmp_path / "people"
    assert run_cluster("--model", backbone, "--images", collection, "--output", out, "--tree", tree) == 0
    assert "; 4 duplicates left out, each group there once as its first face (--all-duplicates keeps them))" \
        in capsys.readouterr().err
    rows = dict(read_rows(out))
    assert len(rows) == 29 and {rows[str(c.relative_to(collection))] for c in copies} == {rows["2025/event0/00.png"]}
    laid_out = [os.path.basename(path) for path, _ in scan_image_folder(str(tree))[1]]
    assert "2025__event0__00.png" in laid_out and len(laid_out) == 25
    assert not {"2025__event0__copy1.png", "2025__event0__copy2.png", "zz__a.png", "zz__b.png"} & set(laid_out)
    summary = json.loads((tmp_path / "clusters.json").read_text())
    assert summary["tree_files"]["duplicates left out"] == 4 and summary["duplicates"] == 4
    assert summary["sizes"][rows["2025/event0/00.png"]] == 7  # (a cluster's size counts every duplicate)

    assert run_cluster("--model", backbone, "--images", collection, "--output", out, "--tree", tree, "--overwrite",
                       "--all-duplicates") == 0
    assert "left out" not in capsys.readouterr().err
    assert len(scan_image_folder(str(tree))[1]) == 29
    assert json.loads((tmp_path / "clusters.json").read_text())["tree_files"]["duplicates left out"] == 0
    with pytest.raises(SystemExit):
        run_cluster("--model", backbone, "--images", collection, "--all-duplicates")
    assert "--all-duplicates goes with --tree" in capsys.readouterr().err


@pytest.mark.slow
def test_outputs_are_kept_refused_or_replaced_whole(trained, tmp_path, capsys, monkeypatch):
    ckpt, backbone, photos = trained
    out, tree = tmp_path / "c.csv", tmp_path / "tree"
    assert run_cluster("--model", backbone, "--images", photos, "--output", out, "--tree", tree) == 0
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    before = out.read_bytes(), (tmp_path / "c.json").read_bytes(), sorted(os.listdir(tree))
    capsys.readouterr()
    for argv, said in [
        (["--output", out], f"{out} exists: pass --overwrite"),
        (["--output", tmp_path / "x.csv", "--tree", tree], f"--tree {tree} exists: pass --overwrite"),
        (["--output", tmp_path / "x.csv", "--tree", photos], "overlap"),
        (["--output", tmp_path / "x.csv", "--tree", os.path.join(photos, "people")], "overlap"),
        (["--output", tree / "c.csv", "--tree", tree, "--overwrite"], "lies in --tree"),
        (["--output", tmp_path / "x.csv", "--tree", tmp_path / "mine", "--overwrite"],
         "which this tool does not write"),  # --overwrite does not remove a folder of the user's
    ]:
        assert run_cluster("--model", backbone, "--images", photos, *argv) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and err.startswith("cluster: error: "), err
    assert (out.read_bytes(), (tmp_path / "c.json").read_bytes(), sorted(os.listdir(tree))) == before
    assert not os.path.exists(tmp_path / "x.csv") and (tmp_path / "mine" / "notes.txt").read_text() == "mine"

    # A Ctrl-C while the tree is laid out: nothing written, no hidden folder left.
    link = os.link

    def link_then_stop(source, target):
        if len(os.listdir(os.path.dirname(target))) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        link(source, target)

    monkeypatch.setattr(cluster.os, "link", link_then_stop)
    try:
        assert run_cluster("--model", backbone, "--images", photos, "--output", out, "--tree", tree,
                           "--overwrite", "--min-size", "5") == 130
    finally:  # the first stop leaves the signals ignored, for a process about to exit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "cluster: stopped by SIGINT: nothing written" in capsys.readouterr().err
    assert (out.read_bytes(), (tmp_path / "c.json").read_bytes(), sorted(os.listdir(tree))) == before
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "c.json", "mine", "tree"]
    # A SIGTERM as the outputs take their places waits for all of them.
    monkeypatch.undo()
    replace = os.replace

    def replace_then_signal(source, target):
        os.kill(os.getpid(), signal.SIGTERM)
        replace(source, target)

    monkeypatch.setattr(cluster.os, "replace", replace_then_signal)
    try:
        assert run_cluster("--model", backbone, "--images", photos, "--output", out, "--tree", tree,
                           "--overwrite", "--min-size", "5") == 143
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "stopped by SIGTERM as the outputs were written: they are whole" in capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text())["min_size"] == 5
    assert sorted(os.listdir(tree)) == ["cluster_0000", "cluster_0001", "cluster_0002"]  # 7, 6 and 5 faces
    assert {c for _, c in read_rows(out)} == {-1, 0, 1, 2}
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "c.json", "mine", "tree"]


@pytest.mark.slow  # (4.5-5 s: a clustering run killed in a subprocess; named by the quick run's drift report)
def test_a_refused_link_is_a_copy_and_a_killed_runs_folder_is_removed(trained, tmp_path, monkeypatch):
    ckpt, backbone, photos = trained
    # The hidden folder of a run that was killed as it laid the tree out (its process gone), and one of
    # a run still going (this process): the first is removed, the second left.
    killed = tmp_path / f".tree.{checkpoint._HOST}-{2 ** 22 + 1}-0123abcd.partial"
    going = tmp_path / f".tree.{checkpoint._HOST}-{os.getpid()}-0123abcd.partial"
    for folder in (killed, going):
        os.makedirs(folder / "cluster_0000")

    def refused(source, target):  # as a file system refuses a link to another device
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(cluster.os, "link", refused)
    assert run_cluster("--model", backbone, "--images", photos, "--output", tmp_path / "c.csv", "--tree",
                       tmp_path / "tree") == 0
    assert json.loads((tmp_path / "c.json").read_text())["tree_files"] == {"hard links": 0, "copies": 25,
                                                                           "names shortened": 0,
                                                                           "duplicates left out": 0}
    _, samples = scan_image_folder(str(tmp_path / "tree"))
    assert len(samples) == 25
    for path, _ in samples:
        original = os.path.join(photos, os.path.basename(path).replace("__", "/"))
        assert not os.path.samefile(path, original) and open(path, "rb").read() == open(original, "rb").read()
    assert not killed.exists() and going.exists()


def test_a_name_too_long_for_the_file_system_is_shortened(trained, tmp_path, capsys):
    """A face whose path, its folders joined by '__', passed the file system's 255 bytes failed the run
    (File name too long), nothing written: such names are cut, keeping their start and extension."""
    ckpt, backbone, _ = trained
    photos = tmp_path / "photos"
    party = photos / ("ü" * 100 + "_party")  # 206 bytes
    os.makedirs(party)
    os.makedirs(photos / "short")
    for who, sample in TWO_PEOPLE:  # their first 3 faces each, names that differ only at their end
        folder = party if who == 0 else photos / "short"
        Image.fromarray(render_face(0, who, sample, IMAGE_SIZE)).save(folder / f"frame_{'0' * 50}{sample - 500}.png")
    tree = tmp_path / "people"
    assert run_cluster("--model", backbone, "--images", photos, "--output", tmp_path / "c.csv", "--tree", tree) == 0
    assert "3 names too long for the file system shortened" in capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text())["tree_files"]["names shortened"] == 3
    _, samples = scan_image_folder(str(tree))
    assert len(samples) == 6 and len({os.path.basename(path) for path, _ in samples}) == 6
    originals = {os.stat(path).st_ino: path for path in map(str, photos.rglob("*.png"))}
    for path, _ in samples:
        name = os.path.basename(path)
        assert len(os.fsencode(name)) <= 255 and name.endswith(".png")
        original = originals[os.stat(path).st_ino]  # (a hard link: the image itself)
        if "ü" in original:
            assert name.startswith("ü" * 100 + "_party__frame_000") and "~" in name
        else:
            assert name == "short__" + os.path.basename(original)
    # The same names the next time.
    first = sorted(os.path.basename(path) for path, _ in samples)
    assert run_cluster("--model", backbone, "--images", photos, "--output", tmp_path / "c.csv", "--tree", tree,
                       "--overwrite", "--copy") == 0
    assert sorted(os.path.basename(path) for path, _ in scan_image_folder(str(tree))[1]) == first


def test_a_shortened_name_another_image_has_already_is_told_apart(tmp_path):
    """A long name whose shortened form another image of its cluster already had (named so by its user)
    looped for ever: the ~2 that tells them apart was cut off again with the long name's end."""
    photos = tmp_path / "photos"
    long_name = "d" * 200 + "/" + "e" * 100 + ".png"
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    short = cluster._shortened(long_name.replace("/", "__"), long_name, longest)
    os.makedirs(photos / ("d" * 200))
    for name in (short, long_name):
        (photos / name).write_bytes(name.encode())

    def too_long(signum, frame):
        raise TimeoutError("_build_tree did not end")
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(10)
    try:
        staging, links, copies, shortened = cluster._build_tree(str(tmp_path / "tree"), str(photos),
                                                                [short, long_name], np.array([0, 0]), 1, False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    folder = os.path.join(staging, "cluster_0000")
    told_apart = short[:-len(".png")] + "~2.png"
    assert sorted(os.listdir(folder)) == sorted([short, told_apart]) and (links, copies, shortened) == (2, 0, 1)
    assert len(os.fsencode(told_apart)) <= longest
    assert open(os.path.join(folder, told_apart), "rb").read() == long_name.encode()


def test_a_stop_as_the_replaced_tree_is_removed_waits_for_it(trained, tmp_path, capsys, monkeypatch):
    """A Ctrl-C after the outputs moved, while the tree they replaced was being removed, left that tree
    whole in a hidden folder (named '..<random>.old' for a --tree given as 'tree/'), for good."""
    ckpt, backbone, photos = trained
    out, tree = tmp_path / "c.csv", os.path.join(tmp_path, "tree", "")
    assert run_cluster("--model", backbone, "--images", photos, "--output", out, "--tree", tree) == 0
    # What a run killed as it removed the tree it replaced (its process gone) leaves: removed by the next.
    killed = tmp_path / f".tree.{checkpoint._HOST}-{2 ** 22 + 1}-0123abcd.old"
    os.makedirs(killed / "cluster_0000")
    rmtree = cluster.shutil.rmtree

    def stop_then_rmtree(path, **kwargs):
        if path.endswith(".old") and f"-{os.getpid()}-" in path:  # this run's, not the killed run's
            os.kill(os.getpid(), signal.SIGINT)
        rmtree(path, **kwargs)

    monkeypatch.setattr(cluster.shutil, "rmtree", stop_then_rmtree)
    capsys.readouterr()
    try:
        assert run_cluster("--model", backbone, "--images", photos, "--output", out, "--tree", tree,
                           "--overwrite", "--min-size", "5") == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "stopped by SIGINT as the outputs were written: they are whole" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "c.json", "tree"]
    assert sorted(os.listdir(tree)) == ["cluster_0000", "cluster_0001", "cluster_0002"]


@pytest.mark.slow
def test_bad_arguments_and_unreadable_images(trained, tmp_path, capsys):
    ckpt, backbone, photos = trained
    for argv in (["--images", photos], ["--images", photos, "--model", backbone, "--threshold", "1.5"],
                 ["--images", photos, "--model", backbone, "--threshold", "0"],
                 ["--images", photos, "--model", backbone, "--neighbours", "0"],
                 ["--images", photos, "--model", backbone, "--min-size", "0"],
                 ["--images", photos, "--model", backbone, "--output", "c.txt"],
                 ["--images", photos, "--model", backbone, "--copy"],
                 ["--embeddings", "e.npy", "--images", photos, "--model", backbone]):
        with pytest.raises(SystemExit):
            run_cluster(*argv)
    capsys.readouterr()
    out = tmp_path / "c.csv"
    for argv, said in [(["--images", tmp_path / "none", "--model", backbone], "--images"),
                       (["--images", tmp_path, "--model", backbone],
                        f"cluster: error: --images {tmp_path}: no images (.jpg, .jpeg, .png, .bmp) under it\n"),
                       (["--embeddings", tmp_path / "none.npy"], "none.npy"),
                       (["--embeddings", tmp_path], f"cluster: error: {tmp_path} is a folder, not a table: a .npy "
                        "(with the .txt beside it) or a .csv, as --save-features and train.embed write them\n"),
                       (["--images", photos, "--model", tmp_path / "none.pt"], "none.pt")]:
        assert run_cluster(*argv, "--output", out) == 2
        err = capsys.readouterr().err
        assert said in err and err.startswith("cluster: error: ") and err.count("\n") == 1, err
    assert not os.path.exists(out)
    # A table of no faces is refused (it was clustered into empty outputs); one of a single face is one face.
    write_table(str(tmp_path / "empty.npy"), [], np.zeros((0, 64), dtype=np.float32))
    assert run_cluster("--embeddings", tmp_path / "empty.npy", "--threshold", "0.5", "--output", out) == 2
    assert capsys.readouterr().err == f"cluster: error: --embeddings {tmp_path / 'empty.npy'}: the table holds no " \
        "faces\n" and not os.path.exists(out)
    write_table(str(tmp_path / "one.npy"), ["a.png"], np.ones((1, 64), dtype=np.float32))
    assert run_cluster("--embeddings", tmp_path / "one.npy", "--threshold", "0.5", "--output", out) == 0
    assert "cluster: 1 face: 0 clusters of 2 or more, 1 noise;" in capsys.readouterr().err
    assert read_rows(out) == [("a.png", -1)]
    for written in (out, tmp_path / "c.json"):
        os.remove(written)

    # An image that does not decode is left out, said, and makes the exit status 1.
    broken = tmp_path / "photos"
    os.makedirs(broken / "x")
    for k in range(3):
        Image.fromarray(render_face(0, 1, 600 + k, IMAGE_SIZE)).save(broken / "x" / f"{k}.png")
    (broken / "x" / "bad.png").write_bytes(b"not an image")
    os.symlink(tmp_path / "moved.png", broken / "x" / "gone.png")  # (a link to a photo moved away)
    assert run_cluster("--images", broken, "--model", backbone, "--output", out, "--threshold", "0.3") == 1
    err = capsys.readouterr().err
    # Each tool words these as train.embed does: the file, "cannot read the image", why.
    assert f"warning: {broken / 'x' / 'bad.png'}: cannot read the image: not an image format Pillow reads " \
           "(12 bytes)\n" in err
    assert f"warning: {broken / 'x' / 'gone.png'}: cannot read the image: No such file or directory\n" in err
    # (the summary said nothing of them: only the warnings, above the summary, told why the exit status was 1)
    assert "0 noise; 2 images left out (the warnings above say why); threshold" in err
    assert read_rows(out) == [("x/0.png", 0), ("x/1.png", 0), ("x/2.png", 0)]
    assert json.loads((tmp_path / "c.json").read_text())["left_out"] == 2


@pytest.mark.slow
def test_photos_with_a_detector_cluster_as_their_aligned_faces(trained, tmp_path, capsys):
    """--detector: each photo's main face found and aligned (the stand-in detector of detector_fixtures, whose
    faces aligned are known crops) gives the table of those crops; a photo without a face is left out with a
    warning, and the exit status is 1, as train.embed --detector leaves it out; --tree holds the photos, from
    the folder or from train.embed --detector's table; a bad --detector is a one-line error."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from detector_fixtures import crops_and_photos, face_detector, photo_of_faces

    ckpt, backbone, _ = trained
    detector = face_detector(tmp_path / "det.onnx")
    crops, photos = tmp_path / "crops", tmp_path / "photos"
    crops_and_photos({name: render_face(0, who, sample, 112) for name, (who, sample) in cluster_collection().items()},
                     IMAGE_SIZE, crops, photos)
    photo_of_faces([], []).save(photos / "2025" / "nobody.png")
    assert run_cluster("--model", backbone, "--images", crops, "--output", tmp_path / "crops.csv") == 0
    capsys.readouterr()
    assert run_cluster("--model", backbone, "--images", photos, "--detector", detector, "--output",
                       tmp_path / "photos.csv", "--tree", tmp_path / "people") == 1
    err = capsys.readouterr().err
    assert f"warning: {photos / '2025' / 'nobody.png'}: no face scores 0.5 or more" in err and "25 faces" in err
    assert "; 1 photo left out (the warnings above say why); threshold" in err
    rows = read_rows(tmp_path / "photos.csv")
    assert rows == read_rows(tmp_path / "crops.csv") and len(rows) == 25
    summary = json.loads((tmp_path / "photos.json").read_text())
    assert summary["left_out"] == 1 and summary["detector"] == os.path.abspath(detector)
    for name, c in rows:
        if c >= 0:
            assert os.path.samefile(tmp_path / "people" / f"cluster_{c:04d}" / name.replace("/", "__"), photos / name)
    # train.embed --detector's table: its rows are photos too (each one's main face), which --tree lays out.
    table = tmp_path / "photos.npy"
    assert embed_main(["--model", backbone, "--images", str(photos), "--detector", detector, "--output", str(table),
                       "--workers", "0"]) == 1
    assert run_cluster("--embeddings", table, "--output", tmp_path / "table.csv", "--tree", tmp_path / "again") == 0
    assert read_rows(tmp_path / "table.csv") == rows
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(tmp_path / "people"))

    capsys.readouterr()
    (tmp_path / "not.onnx").write_text("not a graph\n")
    for bad, said in ((tmp_path / "missing.onnx", "no such file"), (tmp_path / "crops", "a folder, not"),
                      (tmp_path / "not.onnx", "onnxruntime cannot load it")):
        assert run_cluster("--model", backbone, "--images", photos, "--detector", bad, "--output",
                           tmp_path / "x.csv") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cluster: error: --detector {bad}: {said}") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "x.csv")
    with pytest.raises(SystemExit):
        run_cluster("--embeddings", table, "--detector", detector)
    assert "--detector goes with --images" in capsys.readouterr().err


def test_the_faces_of_one_photo_are_kept_apart():
    """Faces of one photo are never one cluster under Chinese whispers (a cannot-link: one person is in a photo
    once): a photo holding two faces of one person (a face and its portrait on the wall) gives one of them up,
    a cluster of its own (noise), while every other face keeps its person's cluster; components keep no such
    constraint. Group photos of different people cluster as their faces alone."""
    faces, person = people_photos(4, 6)
    photo_of = np.arange(len(faces))
    photo_of[[1, 7, 13, 19]] = 100  # a group photo of the 4 people
    photo_of[[2, 3]] = 101  # the same person twice in one photo
    assert (cluster.cluster_embeddings(faces, 0.5)[0] == person).all()
    found, _ = cluster.cluster_embeddings(faces, 0.5, photo_of=photo_of)
    assert sorted(found[[2, 3]].tolist()) == [-1, found[0]], found
    others = np.setdiff1d(np.arange(len(faces)), [2, 3])  # (person 0, 5 faces now, the smallest cluster: 3)
    assert (found[others] == np.array([3, 0, 1, 2])[person[others]]).all(), found
    assert (cluster.cluster_embeddings(faces, 0.5, method="components", photo_of=photo_of)[0] == person).all()
    # With their duplicates (every face 3 times, the copies of a photo one photo each): still apart.
    copies, photo = with_duplicates(faces, np.full(len(faces), 3))
    copy_of_photo = photo_of[photo] * 3 + np.argsort(np.argsort(photo, kind="stable"), kind="stable") % 3
    found, _ = cluster.cluster_embeddings(copies, 0.5, photo_of=copy_of_photo)
    for p in np.unique(copy_of_photo):
        clustered = found[(copy_of_photo == p) & (found >= 0)]
        assert len(set(clustered.tolist())) == len(clustered), (p, found)
    # Each cluster one person: the 4, and the face person 0's gave up, there 3 times, a cluster of its own.
    pairs = {(c, person[photo[i]]) for i, c in enumerate(found.tolist()) if c >= 0}
    assert len(pairs) == len({c for c, _ in pairs}) == 5 and (found >= 0).all(), found



@pytest.mark.parametrize("made_by", ["detector", "landmarks", "landmarks, an older table"])
def test_a_table_of_every_face_keeps_its_photos_faces_apart(tmp_path, capsys, made_by):
    """A table of every face of photos (rows <photo>#<k>, as train.embed --detector --all-faces or --landmarks
    --all-faces writes it): its faces of one photo are kept apart by Chinese whispers; components put them
    together, which the summary counts and a note says. (train.embed --landmarks --all-faces's table said only
    'aligned from the landmarks in ...', and its photos' faces were clustered as any faces; such a table written
    before is known by its rows' names, as a landmarks file names image files.)"""
    from train.embed import faces_described, faces_of_photos

    faces, person = people_photos(4, 6)
    names = [f"p{i:02d}.jpg#1" for i in range(len(faces))]
    names[3] = "p02.jpg#2"  # (p02.jpg: two faces of person 0)
    table, out = tmp_path / "faces.npy", tmp_path / "c.csv"
    landmarks = faces_described(str(tmp_path / "landmarks.txt"))
    about = faces_described(detector="/det.onnx", all_faces=True) if made_by == "detector" else \
        faces_described(str(tmp_path / "landmarks.txt"), all_faces=True) if made_by == "landmarks" else landmarks
    assert landmarks == f"aligned from the landmarks in {tmp_path}/landmarks.txt"
    # A landmarks table of one face an image, or of images as they are, named so: no photo's faces to keep apart.
    assert not faces_of_photos(landmarks, [name.replace("#", "_") for name in names])
    assert not faces_of_photos(faces_described(), names) and not faces_of_photos(None, names)
    write_table(str(table), names, faces.numpy(), about={"faces": about})
    assert run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out) == 0
    err = capsys.readouterr().err
    assert "cluster: 24 faces of 23 photos: 4 clusters of 2 or more (largest 6, median 6), 1 noise;" in err, err
    rows = dict(read_rows(out))
    assert sorted([rows["p02.jpg#1"], rows["p02.jpg#2"]])[0] == -1 and "share their cluster" not in err
    assert json.loads((tmp_path / "c.json").read_text())["faces_with_a_photo_mate_in_their_cluster"] == 0
    assert run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out, "--overwrite", "--method",
                       "components") == 0
    assert "cluster: note: 2 faces share their cluster with another face of their photo (--method components does " \
        "not keep them apart; chinese-whispers does, but for duplicates of each other, cosine 0.99 or more)" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text())["faces_with_a_photo_mate_in_their_cluster"] == 2


def test_two_faces_of_one_photo_that_duplicate_each_other_share_a_cluster_and_the_note_says_why(tmp_path, capsys):
    """Two faces of one photo at the duplicate cosine or more (a face found twice, or its image in a mirror) are
    one node of the graph, so Chinese whispers, which keeps a photo's other faces apart, puts them in one cluster:
    the summary counts them and the note names the duplicates (it said '--method chinese-whispers does not keep
    them apart; chinese-whispers does')."""
    from train.embed import faces_described

    faces, _ = people_photos(4, 6)
    names = [f"p{i:02d}.jpg#1" for i in range(len(faces))] + ["p00.jpg#2"]
    faces = torch.cat([faces, faces[:1]])  # (p00.jpg's second face: its first again)
    table, out = tmp_path / "faces.npy", tmp_path / "c.csv"
    write_table(str(table), names, faces.numpy(), about={"faces": faces_described(detector="/det.onnx",
                                                                                  all_faces=True)})
    assert run_cluster("--embeddings", table, "--threshold", "0.5", "--output", out) == 0
    err = capsys.readouterr().err
    rows = dict(read_rows(out))
    assert rows["p00.jpg#1"] == rows["p00.jpg#2"] >= 0
    summary = json.loads((tmp_path / "c.json").read_text())
    assert (summary["duplicates"], summary["faces_with_a_photo_mate_in_their_cluster"]) == (1, 2)
    assert "cluster: note: 2 faces share their cluster with another face of their photo: duplicates of each other " \
        "(cosine 0.99 or more: one face found twice, or its image in a mirror), one node of the graph" in err, err
    assert "does not keep them apart" not in err


def group_photos(tmp_path, detector_fixtures, groups: dict) -> tuple[dict, dict]:
    """Photos of several synthetic people each (``groups``: name -> the people in it, left to right), a face a
    person and photo (a sample of its own); (the 112-pixel faces, "<name>:<i>" -> uint8 array; each face's
    person, by the same key)."""
    faces, who = {}, {}
    seen = {}
    for name, people in groups.items():
        shown = []
        for i, p in enumerate(people):
            seen[p] = seen.get(p, 0) + 1
            faces[f"{name}:{i}"] = render_face(0, p, seen[p] - 1, 112)
            who[f"{name}:{i}"] = p
            shown.append(faces[f"{name}:{i}"])
        path = tmp_path / name
        os.makedirs(path.parent, exist_ok=True)
        detector_fixtures.photo_of_faces(shown, [(8 * 25 * i, 8 * 20 * i) for i in range(len(people))]).save(path)
    return faces, who


def crop_person(path, faces: dict, who: dict) -> int:
    """The person of the known face nearest (mean absolute difference) to the crop at ``path``."""
    crop = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    nearest, second = sorted((np.abs(crop - face).mean(), key) for key, face in faces.items())[:2]
    assert nearest[0] < second[0] / 3, (path, nearest, second)  # (the face itself, JPEG-encoded)
    return who[nearest[1]]


# The group photos' faces are training images of their people (the model is small: other samples of them,
# aligned from photos, overlap across people, and which pairs cross the model's threshold of 0.55 moved with the
# torch version). At this threshold each person's faces are linked to each other and to no one else's on torch
# 2.4.1 and 2.13.0 (genuine cosines 0.62 or more, impostors 0.59 at most), so the clusters are the people's.
APART = ("--threshold", "0.6")
GROUPS = {"2024/g0.png": (0, 1, 2), "2024/g1.png": (1, 2, 3), "2025/g2.png": (3, 4, 0), "2025/g3.png": (4, 0, 1),
          "g4.png": (2, 3, 4)}


@pytest.mark.slow
def test_every_face_of_group_photos_is_clustered_with_its_person(trained, tmp_path, capsys):
    """--all-faces: every face of a photo is a row <photo>#<k>, clustered with its person's faces in the other
    photos; --tree holds each face's aligned crop (named as align --all-faces names it) in its person's cluster,
    a group photo's faces in as many clusters; --landmarks (detect --all-faces's file) clusters the same faces
    as --detector; --all-faces needs one of them, and --copy does not go with a tree of crops."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import detector_fixtures
    from train.tools import detect

    ckpt, backbone, _ = trained
    detector = detector_fixtures.face_detector(tmp_path / "det.onnx")
    photos = tmp_path / "photos"
    faces, who = group_photos(photos, detector_fixtures, GROUPS)
    out, tree = tmp_path / "c.csv", tmp_path / "people"
    assert run_cluster(*APART, "--model", backbone, "--images", photos, "--detector", detector, "--all-faces",
                       "--output", out, "--tree", tree) == 0
    err = capsys.readouterr().err
    assert "cluster: 15 faces of 5 photos: 5 clusters of 2 or more (largest 3, median 3), 0 noise;" in err, err
    assert "15 face crops)" in err and "share their cluster" not in err
    rows = read_rows(out)
    assert sorted(name for name, _ in rows) == sorted(f"{photo}#{k}" for photo in GROUPS for k in (1, 2, 3))
    # Each crop in the tree is its face, in its person's cluster: one person a cluster, each in 3 photos.
    person_of = {}
    for c in range(5):
        laid_out = sorted(os.listdir(tree / f"cluster_{c:04d}"))
        assert len(laid_out) == 3 and len({name.rsplit("_", 1)[0] for name in laid_out}) == 3, laid_out
        people = {crop_person(tree / f"cluster_{c:04d}" / name, faces, who) for name in laid_out}
        assert len(people) == 1, (c, laid_out, people)
        person_of[c] = people.pop()
    assert sorted(person_of.values()) == list(range(5))
    for name, c in rows:  # (the table's face k of a photo is its crop <photo>_<k>.jpg)
        photo, _, k = name.rpartition("#")
        crop = os.path.splitext(photo)[0].replace("/", "__") + f"_{k}.jpg"
        assert os.path.isfile(tree / f"cluster_{c:04d}" / crop)
    summary = json.loads((tmp_path / "c.json").read_text())
    assert (summary["all_faces"], summary["photos"]) == (True, 5)
    assert summary["faces_with_a_photo_mate_in_their_cluster"] == 0
    assert summary["tree_files"] == {"hard links": 0, "face crops": 15, "names shortened": 0, "duplicates left out": 0}
    assert len(scan_image_folder(str(tree))[1]) == 15  # (an ImageFolder for the trainer, clean and pack_rec)

    # The landmarks detect --all-faces writes, given to --landmarks: the same faces, the same clusters.
    landmarks = tmp_path / "landmarks.txt"
    assert detect.main(["--detector", detector, "--images", str(photos), "--output", str(landmarks), "--workers", "0",
                        "--all-faces"]) == 0
    assert run_cluster(*APART, "--model", backbone, "--images", photos, "--landmarks", landmarks, "--all-faces",
                       "--output", tmp_path / "l.csv", "--tree", tmp_path / "l") == 0
    assert sorted(read_rows(tmp_path / "l.csv")) == sorted(rows)
    assert {c: sorted(os.listdir(tmp_path / "l" / c)) for c in os.listdir(tmp_path / "l")} \
        == {c: sorted(os.listdir(tree / c)) for c in os.listdir(tree)}
    capsys.readouterr()

    for argv, said in [(["--images", photos, "--model", backbone, "--all-faces"],
                        "--all-faces goes with --landmarks or --detector"),
                       (["--images", photos, "--model", backbone, "--detector", detector, "--all-faces", "--tree",
                         tmp_path / "t", "--copy"], "--copy: with --all-faces or --landmarks the tree holds"),
                       (["--embeddings", tmp_path / "e.npy", "--landmarks", landmarks],
                        "--landmarks goes with --images")]:
        with pytest.raises(SystemExit) as stop:
            run_cluster(*argv, "--output", tmp_path / "x.csv")
        last = capsys.readouterr().err.splitlines()[-1]  # (argparse's usage, then the error: as search and quality)
        assert stop.value.code == 2 and last.startswith("cluster: error: ") and said in last, last
    assert not os.path.exists(tmp_path / "x.csv")


@pytest.mark.slow
def test_copies_of_a_group_photo_and_a_table_of_every_face(trained, tmp_path, capsys):
    """A group photo there twice more (copies in another folder): each copy's face k duplicates the photo's face k,
    in its cluster, and the tree holds each face's crop once (--all-duplicates: every copy's); a table of every
    face train.embed --detector --all-faces wrote clusters as the photos, its faces of one photo kept apart, and
    --tree refuses it (it keeps no landmarks to crop the faces)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import detector_fixtures

    ckpt, backbone, _ = trained
    detector = detector_fixtures.face_detector(tmp_path / "det.onnx")
    photos = tmp_path / "photos"
    group_photos(photos, detector_fixtures, GROUPS)
    os.makedirs(photos / "zz")
    for copy in ("a.png", "b.png"):
        shutil.copy(photos / "2024" / "g0.png", photos / "zz" / copy)
    out, tree = tmp_path / "c.csv", tmp_path / "people"
    assert run_cluster(*APART, "--model", backbone, "--images", photos, "--detector", detector, "--all-faces",
                       "--output", out, "--tree", tree) == 0
    err = capsys.readouterr().err
    assert "cluster: 21 faces of 7 photos: 5 clusters" in err and "; 6 duplicates of 3 faces" in err, err
    assert "15 face crops; 6 duplicates left out" in err
    rows = dict(read_rows(out))
    assert all(rows[f"zz/{copy}#{k}"] == rows[f"2024/g0.png#{k}"] for copy in ("a.png", "b.png") for k in (1, 2, 3))
    assert sorted(np.bincount(list(rows.values())).tolist()) == [3, 3, 5, 5, 5]
    laid_out = {os.path.basename(path) for path, _ in scan_image_folder(str(tree))[1]}
    assert len(laid_out) == 15 and {"2024__g0_1.jpg", "2024__g0_2.jpg", "2024__g0_3.jpg"} <= laid_out
    summary = json.loads((tmp_path / "c.json").read_text())
    assert (summary["duplicates"], summary["faces_with_a_photo_mate_in_their_cluster"]) == (6, 0)
    assert run_cluster(*APART, "--model", backbone, "--images", photos, "--detector", detector, "--all-faces",
                       "--output", out, "--tree", tree, "--overwrite", "--all-duplicates") == 0
    assert len(scan_image_folder(str(tree))[1]) == 21
    assert "zz__a_2.jpg" in os.listdir(tree / f"cluster_{rows['zz/a.png#2']:04d}")

    table = tmp_path / "faces.npy"
    assert embed_main(["--model", backbone, "--images", str(photos), "--detector", detector, "--all-faces",
                       "--output", str(table), "--workers", "0"]) == 0
    capsys.readouterr()
    assert run_cluster(*APART, "--embeddings", table, "--output", tmp_path / "t.csv") == 0
    assert "cluster: 21 faces of 7 photos: 5 clusters" in capsys.readouterr().err
    assert dict(read_rows(tmp_path / "t.csv")) == rows
    assert run_cluster(*APART, "--embeddings", table, "--output", tmp_path / "u.csv", "--tree", tmp_path / "t") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cluster: error: --tree: the rows of {table} are faces found and aligned by ") \
        and "the table keeps no landmarks to crop them" in err and err.count("\n") == 1, err
