"""``python -m train.tools.search``: hand-made embedding tables whose right answers are known (the
ranked people, the decision at the threshold, template against per-image scores, the identification
rates); the blocked search against the whole matrix; a gallery of synthetic people enrolled with a small
trained model, saved and read back, and probes of them and of others; and what it refuses, leaves out
and stops on."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint
from train.data.synthetic import render_face
from train.embed import main as embed_main, write_table
from train.tools import search
from train.tools.similarity import best_people
from trainer_fixtures import IMAGE_SIZE, fail_if_called, save_faces, search_collections, trained_backbone



def run_search(*argv) -> int:
    return search.main([*map(str, argv), "--workers", "0"])


def read_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:5] == ["probe", "rank", "person", "cosine", "decision"]
    return rows[1:]


def unit(*rows) -> np.ndarray:
    x = np.array(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


E = np.eye(6, dtype=np.float32)


@pytest.fixture
def tables(tmp_path):
    """A gallery of three people (alice: two images, e0 and e1; bob: one, 0.8·e0 + 0.6·e2; carol: e3)
    and four probes: e0 (alice's best image, bob's template), e3 + a little (carol), e4 (dave, not
    enrolled), e1 (alice), with a labels file."""
    gallery = tmp_path / "gallery.npy"
    write_table(str(gallery), ["alice/1.jpg", "alice/2.jpg", "bob/1.jpg", "carol/1.jpg"],
                unit(E[0], E[1], 0.8 * E[0] + 0.6 * E[2], E[3]))
    probes = tmp_path / "probes.csv"
    write_table(str(probes), ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"], unit(E[0], E[3] + 0.1 * E[5], E[4], E[1]))
    labels = tmp_path / "labels.csv"
    labels.write_text("probe,person\np0.jpg,alice\np1.jpg,carol\np2.jpg,dave\np3.jpg,alice\n")
    return gallery, probes, labels


def test_the_ranked_people_and_decisions_of_hand_made_tables(tables, tmp_path, capsys):
    gallery, probes, labels = tables
    out = tmp_path / "r.csv"
    assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.75, "--output", out,
                      "--probe-labels", labels, "--top-k", 2) == 0
    rows = read_rows(out)
    # Templates: alice (e0 + e1)/√2 scores 0.7071 for e0, below bob's 0.8; carol 0.995 for p1; dave matches no one
    # (each person scores 0); alice 0.7071 for e1, below the threshold: unknown.
    assert [r[:5] for r in rows] == [
        ["p0.jpg", "1", "bob", "0.800000", "bob"], ["p0.jpg", "2", "alice", "0.707107", "bob"],
        ["p1.jpg", "1", "carol", "0.995037", "carol"], ["p1.jpg", "2", "alice", "0.000000", "carol"],
        ["p2.jpg", "1", "alice", "0.000000", "unknown"], ["p2.jpg", "2", "bob", "0.000000", "unknown"],
        ["p3.jpg", "1", "alice", "0.707107", "unknown"], ["p3.jpg", "2", "bob", "0.000000", "unknown"]]
    assert [r[5] for r in rows[::2]] == ["alice", "carol", "dave", "alice"]
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["scoring"] == "template" and summary["people"] == 3 and summary["gallery_images"] == 4
    assert (summary["matched"], summary["unknown"], summary["threshold_from"]) == (2, 2, "--threshold")
    # Mated: p0 (alice ranks 2nd; bob, another person, is accepted), p1 (carol, accepted), p3 (alice 1st,
    # below the threshold). Non-mated: p2 (dave), unknown.
    assert summary["identification"] == {"mated_searches": 3, "non_mated_searches": 1, "rank_1": 2 / 3,
                                         "rank_5": 1.0, "dir": 1 / 3, "fpir": 0.0, "misidentified": 1 / 3}
    assert "rank-1 66.67%, rank-5 100.00%, DIR 33.33%" in capsys.readouterr().err

    # --per-image: alice scores her best image, 1.0 for e0 and e1: both found; the rank-1 rate is then 1.
    assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.75, "--output", out,
                      "--probe-labels", labels, "--per-image", "--overwrite") == 0
    rows = read_rows(out)
    assert [r[:5] for r in rows[:2]] == [["p0.jpg", "1", "alice", "1.000000", "alice"],
                                         ["p0.jpg", "2", "bob", "0.800000", "alice"]]
    assert len(rows) == 4 * 3  # --top-k 5 of 3 people: each person once
    assert [r[4] for r in rows[::3]] == ["alice", "carol", "unknown", "alice"]
    identification = json.loads((tmp_path / "r.json").read_text())["identification"]
    assert (identification["rank_1"], identification["dir"], identification["fpir"]) == (1.0, 1.0, 0.0)
    # -1: closed-set, every probe its best person (dave too: a false positive).
    assert run_search("--gallery", gallery, "--probes", probes, "--threshold", -1, "--output", out,
                      "--probe-labels", labels, "--overwrite") == 0
    assert json.loads((tmp_path / "r.json").read_text())["identification"]["fpir"] == 1.0


def test_probe_labels_that_name_no_one_enrolled_are_noted(tables, tmp_path, capsys):
    # probes/<session>/<person>/...: with --probe-labels folder each probe's person is its session, and every
    # search would be scored as a stranger's without a word.
    gallery, _, _ = tables
    probes = tmp_path / "sessions.csv"
    write_table(str(probes), ["monday/alice/1.jpg", "monday/carol/1.jpg"], unit(E[0], E[3]))
    assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.5, "--output", tmp_path / "r.csv",
                      "--probe-labels", "folder") == 0
    err = capsys.readouterr().err
    assert ("--probe-labels folder names none of the gallery's people (as 'monday' for monday/alice/1.jpg): every "
            "search is scored as of someone not enrolled (a probe's first folder under --probes is its person)") in err
    # Probes of the gallery's people and of others: no such note.
    assert run_search("--gallery", gallery, "--probes", tables[1], "--threshold", 0.5, "--output", tmp_path / "s.csv",
                      "--probe-labels", tables[2]) == 0
    assert "names none of the gallery's people" not in capsys.readouterr().err


def test_a_gallery_whose_model_is_gone_is_noted_once_the_run_goes_ahead(tables, tmp_path, capsys):
    # The note on the threshold (the gallery's model not there any more) came before a refusal, here the results
    # there already, as the default threshold's did (8905cbd); before --model's refusal it says why.
    _, probes, _ = tables
    gallery = tmp_path / "moved.npy"
    write_table(str(gallery), ["alice/1.jpg", "bob/1.jpg"], unit(E[0], E[2]),
                about={"model": str(tmp_path / "gone.pt")})
    out = tmp_path / "r.csv"
    out.write_text("kept")
    assert run_search("--gallery", gallery, "--probes", probes, "--output", out) == 2
    assert capsys.readouterr().err == f"search: error: {out} exists: pass --overwrite to replace it\n"
    assert run_search("--gallery", gallery, "--probes", probes, "--output", out, "--overwrite") == 0
    err = capsys.readouterr().err
    assert (f"search: note: {tmp_path / 'gone.pt'}, the model the gallery was made with, is not there any more: its "
            "threshold is not known\nsearch: note: no model gives the threshold: cosine 0.3 is taken") in err, err
    photos = tmp_path / "photos"
    os.makedirs(photos)
    Image.new("RGB", (32, 32)).save(photos / "p0.png")
    assert run_search("--gallery", gallery, "--probes", photos, "--output", tmp_path / "s.csv") == 2
    assert capsys.readouterr().err == (f"search: note: {tmp_path / 'gone.pt'}, the model the gallery was made with, "
                                       "is not there any more\nsearch: error: --model is needed: it embeds the "
                                       f"faces of --probes {photos}\n")


def test_an_output_that_cannot_be_written_is_refused_before_the_search(tables, tmp_path, capsys):
    # What every tool's check_outputs says, here through search: an --output that is a folder, or whose folder
    # is a file or cannot be made under one, is one line naming it, before any file is touched.
    gallery, probes, _ = tables
    (tmp_path / "notes").write_text("kept")
    os.makedirs(tmp_path / "r.csv")
    # A link to nothing is said to be one, and where it points (it was called a file).
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    broken = f"{tmp_path / 'gone'} is a broken symbolic link to {tmp_path / 'unmounted'}"
    for out, said in [(tmp_path / "r.csv", f"{tmp_path / 'r.csv'} is a folder: name a file to write"),
                      (tmp_path / "notes" / "r.csv", f"{tmp_path / 'notes'} is a file, not a folder to write r.csv in"),
                      (tmp_path / "notes" / "run" / "r.csv",
                       f"cannot make the folder {tmp_path / 'notes' / 'run'} to write r.csv in: {tmp_path / 'notes'} "
                       "is a file"),
                      (tmp_path / "gone" / "r.csv", f"{broken}, not a folder to write r.csv in"),
                      (tmp_path / "gone" / "run" / "r.csv",
                       f"cannot make the folder {tmp_path / 'gone' / 'run'} to write r.csv in: {broken}")]:
        assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.5, "--output", out) == 2
        assert capsys.readouterr().err == f"search: error: {said}\n"
    assert (tmp_path / "notes").read_text() == "kept" and os.listdir(tmp_path / "r.csv") == []
    assert not os.path.lexists(tmp_path / "unmounted")


def test_a_probe_labels_file_that_cannot_be_read_is_one_line_naming_it(tables, tmp_path, capsys):
    # A list saved by a spreadsheet in Latin-1, a line of three fields, a probe listed twice, a folder: each
    # is one line naming --probe-labels and the file (the Latin-1 one was the codec's words alone), and the
    # output is not written.
    gallery, probes, _ = tables
    out = tmp_path / "r.csv"
    cases = [("latin1.csv", "probe,person\np0.jpg,alice\np1.jpg,zoé\n".encode("latin-1"),
              "line 3: not UTF-8 text (invalid continuation byte); save the list as UTF-8"),
             ("three.csv", b"p0.jpg,alice\np1.jpg,carol,extra\n", "line 2: expected probe,person"),
             ("twice.csv", b"p0.jpg,alice\np0.jpg,bob\n", "line 2: p0.jpg is listed again")]
    for name, content, said in cases:
        (tmp_path / name).write_bytes(content)
        assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.5, "--output", out,
                          "--probe-labels", tmp_path / name) == 2
        err = capsys.readouterr().err
        assert err == f"search: error: --probe-labels {tmp_path / name}: {said}\n", err
    os.makedirs(tmp_path / "labels")
    assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.5, "--output", out,
                      "--probe-labels", tmp_path / "labels") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"search: error: --probe-labels {tmp_path / 'labels'}: a folder, not a file (or 'folder'") \
        and err.count("\n") == 1, err
    assert not out.exists()


def test_a_probe_image_or_labels_file_that_is_a_broken_symbolic_link_is_said_to_be_one(tables, tmp_path, capsys):
    # A link to a disk not mounted: "no such image" or "no such file" alone sent the user looking for the link,
    # which is there (3a1e680's checkpoint.dangling).
    gallery, probes, _ = tables
    out = tmp_path / "r.csv"
    for name in ("gone.jpg", "gone.csv"):
        (tmp_path / name).symlink_to(tmp_path / "unmounted" / name)
    gone = {name: f"{tmp_path / name}: no such {what} (a broken symbolic link to {tmp_path / 'unmounted' / name})"
            for name, what in (("gone.jpg", "image"), ("gone.csv", "file"))}
    assert run_search("--gallery", gallery, "--probes", tmp_path / "gone.jpg", "--threshold", 0.5, "--output", out) == 2
    assert capsys.readouterr().err == f"search: error: --probes {gone['gone.jpg']}\n"
    assert run_search("--gallery", gallery, "--probes", probes, "--threshold", 0.5, "--output", out,
                      "--probe-labels", tmp_path / "gone.csv") == 2
    assert capsys.readouterr().err == (f"search: error: --probe-labels {gone['gone.csv']} (or 'folder': each probe's "
                                       "first folder is its person)\n")
    assert not out.exists() and not os.path.lexists(tmp_path / "unmounted")


def test_identification_rates_count_ties_against_the_mate():
    # Ranks: 1, 1, 2 (a tie at the top counts against the mate), 6, none (non-mated) x 2.
    ranks = np.array([1, 1, 2, 6, 0, 0])
    best = np.array([0.9, 0.4, 0.7, 0.8, 0.6, 0.2])
    rates = search.identification_rates(ranks, best, ranks > 0, 0.5)
    assert rates == {"mated_searches": 4, "non_mated_searches": 2, "rank_1": 0.5, "rank_5": 0.75, "dir": 0.25,
                     "fpir": 0.5, "misidentified": 0.5}
    assert search.identification_rates(ranks[:1], best[:1], np.array([True]), 0.5)["fpir"] is None
    found, values, mate_ranks = best_people(torch.tensor(unit(E[0])), torch.tensor(unit(E[0], E[0], E[1])),
                                            torch.tensor([0, 1, 2]), 3, 2, device="cpu", mates=torch.tensor([1]))
    assert mate_ranks.tolist() == [2] and values[0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("probes, gallery, people, k, cosines", [(37, 50, 11, 5, 64), (10, 7, 7, 3, 1),
                                                                  (64, 200, 200, 4, 1000), (5, 30, 2, 5, 10 ** 6)])
def test_blocked_search_matches_the_whole_matrix(probes, gallery, people, k, cosines):
    generator = torch.Generator().manual_seed(probes + gallery)
    p = torch.nn.functional.normalize(torch.randn(probes, 4, generator=generator), dim=1)
    g = torch.nn.functional.normalize(torch.randn(gallery, 4, generator=generator), dim=1)
    person = torch.cat([torch.arange(people), torch.randint(people, (gallery - people,), generator=generator)])
    mates = torch.randint(-1, people, (probes,), generator=generator)
    found, values, ranks = best_people(p, g, person, people, k, device="cpu", mates=mates, cosines=cosines)
    full = (p @ g.T).numpy()
    best = np.stack([full[:, person.numpy() == q].max(axis=1) for q in range(people)], axis=1)  # (P, people)
    k = min(k, people)
    np.testing.assert_allclose(values, -np.sort(-best, axis=1)[:, :k], atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(best, found, axis=1), values, atol=1e-6)
    for row, mate in enumerate(mates.tolist()):
        expected = 0 if mate < 0 else int((best[row] >= best[row, mate]).sum())
        assert ranks[row] == expected, (row, ranks[row], expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on 8 synthetic identities (its checkpoint, and backbone.pt beside a backbone.json
    recording a verification threshold), a gallery of 4 of them (3 faces each, never trained on) and
    probes: 2 other faces of each, and 2 of 2 people not enrolled, in folders named for their person
    (trainer_fixtures.search_collections)."""
    root = tmp_path_factory.mktemp("search")
    ckpt, backbone = trained_backbone(root)
    gallery, probes = search_collections()
    return ckpt, backbone, save_faces(root / "gallery", gallery), save_faces(root / "probes", probes)


@pytest.mark.slow
def test_a_gallery_enrolled_saved_and_searched(trained, tmp_path, capsys):
    ckpt, backbone, gallery, probes = trained
    out, saved = tmp_path / "r.csv", tmp_path / "g.npy"
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", probes, "--output", out,
                      "--save-gallery", saved) == 0
    err = capsys.readouterr().err
    assert "--probe-labels folder would score the search" in err and "threshold 0.5500" in err
    rows = read_rows(out)
    decisions = {r[0]: r[4] for r in rows}
    # Each enrolled person's probes are found; the others' are unknown.
    assert decisions == {f"person{who}/{s:02d}.png": f"person{who}" if who < 4 else "unknown"
                         for who in range(6) for s in (3, 4)}
    assert len(rows) == 12 * 4 and [r[1] for r in rows[:4]] == ["1", "2", "3", "4"]
    assert json.loads((tmp_path / "r.json").read_text())["threshold"] == 0.55
    about = json.loads((tmp_path / "g.npy.json").read_text())
    assert about["made_by"] == "train.tools.search" and about["rows"] == 12 and len(about["model_sha256"]) == 64

    # The saved gallery, and the table train.embed --images makes of the folder, give the same results
    # without embedding the gallery again; its model is the one the table names.
    assert run_search("--gallery", saved, "--probes", probes, "--output", tmp_path / "a.csv",
                      "--probe-labels", "folder") == 0
    assert read_rows(tmp_path / "a.csv") == [r + [r[0].split("/")[0]] for r in rows]
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["identification"] == {"mated_searches": 8, "non_mated_searches": 4, "rank_1": 1.0,
                                         "rank_5": 1.0, "dir": 1.0, "fpir": 0.0, "misidentified": 0.0}
    assert summary["model"] == backbone and summary["threshold"] == 0.55
    table = tmp_path / "e.npy"
    assert embed_main(["--model", backbone, "--images", gallery, "--output", str(table), "--workers", "0"]) == 0
    assert run_search("--model", backbone, "--gallery", table, "--probes", probes, "--output", tmp_path / "b.csv") == 0
    assert [r[:4] for r in read_rows(tmp_path / "b.csv")] == [r[:4] for r in rows]
    # A single image; --per-image.
    assert run_search("--model", backbone, "--gallery", saved, "--probes", os.path.join(probes, "person2", "03.png"),
                      "--output", tmp_path / "c.csv", "--per-image", "--top-k", 1) == 0
    assert [r[2:5:2] for r in read_rows(tmp_path / "c.csv")] == [["person2", "person2"]]

    # Of another embedding size: refused (another model's weights: test_a_checkpoint_and_its_export_are_one_model).
    capsys.readouterr()
    names = [line.strip() for line in open(tmp_path / "g.txt")]
    write_table(str(tmp_path / "narrow.npy"), names, np.load(saved)[:, :8])
    assert run_search("--model", backbone, "--gallery", tmp_path / "narrow.npy", "--probes", probes, "--output",
                      tmp_path / "d.csv") == 2
    assert "holds 8-D embeddings, --model" in capsys.readouterr().err and not os.path.exists(tmp_path / "d.csv")
    # A table of older versions (no digest) made with another file: taken, with a note.
    about = json.loads((tmp_path / "g.npy.json").read_text())
    del about["model_sha256"], about["model_weights_sha256"]
    (tmp_path / "g.npy.json").write_text(json.dumps(about))
    assert run_search("--model", ckpt, "--gallery", saved, "--probes", probes, "--output", tmp_path / "d.csv") == 0
    assert f"was made with {backbone} (its .json records no digest to check)" in capsys.readouterr().err


def test_a_probes_folder_is_listed_once(trained, tmp_path, monkeypatch):
    # It was walked three times with --fpir (twice without): to say at once when it holds no images, to count
    # the searches --fpir needs, and to embed them; a folder of many probes on a network file system takes a while
    # each time. The results are those of the folder's images.
    ckpt, backbone, gallery, probes = trained
    walked, real_walk = [], os.walk

    def walk(top, *args, **kwargs):
        walked.append(os.fspath(top))
        return real_walk(top, *args, **kwargs)

    monkeypatch.setattr(os, "walk", walk)
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", probes, "--probe-labels", "folder",
                      "--fpir", 0.3, "--output", tmp_path / "r.csv") == 0
    assert walked.count(probes) == 1
    assert json.loads((tmp_path / "r.json").read_text())["searches"] == 12


def test_a_landmarks_file_is_read_before_the_gallery_folder_is_embedded(trained, tmp_path, capsys, monkeypatch):
    # A --landmarks file not there (without --fpir, which read it early), a malformed line, a photo it lists that is
    # not under --probes: each was said once every image of the gallery folder had been embedded (minutes for a
    # large one).
    ckpt, backbone, gallery, probes = trained

    fail_if_called(monkeypatch, search, "embed_files", "the gallery folder was embedded before --landmarks was read")
    listed = tmp_path / "listed.txt"
    face = " ".join(["38.3", "51.7", "73.5", "51.5", "56.0", "71.7", "41.5", "92.4", "70.7", "92.2"])
    for text, said in ((None, f"landmarks file {listed}: no such file"),
                       ("person0/03.png 1 2 3\n", f"{listed}: line 1: expected 'image x1 y1 ... x5 y5'"),
                       (f"person0/03.png {face}\nperson0/nobody.png {face}\n",
                        f"{listed}: line 2: {os.path.join(probes, 'person0', 'nobody.png')}: no such file")):
        if text is not None:
            listed.write_text(text)
        assert run_search("--model", backbone, "--gallery", gallery, "--probes", probes, "--landmarks", listed,
                          "--output", tmp_path / "r.csv") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"search: error: {said}") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "r.csv")


def test_probe_labels_are_checked_before_any_face_is_embedded(trained, tmp_path, capsys, monkeypatch):
    # A --probe-labels file with a malformed line or that does not list a probe, or --probe-labels folder with a
    # probe in no folder: each was said once the gallery folder and the probes had been embedded (minutes).
    ckpt, backbone, gallery, probes = trained

    fail_if_called(monkeypatch, search, "embed_files", "faces were embedded before --probe-labels was checked")
    loose = tmp_path / "loose"
    os.makedirs(loose / "person0")
    face = open(os.path.join(probes, "person0", "03.png"), "rb").read()
    for name in ("person0/03.png", "03.png"):
        (loose / name).write_bytes(face)
    three, partial = tmp_path / "three.csv", tmp_path / "partial.csv"
    three.write_text("person0/03.png,person0,extra\n")
    partial.write_text("person0/03.png,person0\n")
    for folder, labels, said in ((probes, three, f"--probe-labels {three}: line 1: expected probe,person"),
                                 (probes, partial, f"--probe-labels {partial} does not list the probe person0/04.png "
                                  "(11 probes are not listed)"),
                                 (loose, "folder", "--probe-labels folder: the probe 03.png is in no folder")):
        assert run_search("--model", backbone, "--gallery", gallery, "--probes", folder, "--probe-labels", labels,
                          "--output", tmp_path / "r.csv") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"search: error: {said}") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "r.csv")


def another_runs_weights(backbone: str, folder) -> str:
    """backbone.pt (and its backbone.json) of other weights, as another run's export: ``backbone``'s, its first
    weight changed a little."""
    weights = torch.load(backbone)
    first = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[first] = weights[first] + 0.01
    os.makedirs(folder)
    torch.save(weights, folder / "backbone.pt")
    (folder / "backbone.json").write_text(open(checkpoint.settings_path(backbone)).read())
    return str(folder / "backbone.pt")


@pytest.mark.slow
def test_a_checkpoint_and_its_export_are_one_model(trained, tmp_path, capsys):
    """A table made with a run's checkpoint.pt is searched with its export's backbone.pt, and the other way
    round: their weights are one (the digest of the weights as loaded tells, not that of the file). Another
    run's weights are refused; so is the export by a table of older versions, which records the file's
    digest alone."""
    ckpt, backbone, gallery, probes = trained
    by_ckpt, by_export, out = tmp_path / "g.npy", tmp_path / "p.npy", tmp_path / "r.csv"
    assert run_search("--model", ckpt, "--gallery", gallery, "--save-gallery", by_ckpt) == 0
    assert embed_main(["--model", backbone, "--images", probes, "--output", str(by_export), "--workers", "0"]) == 0
    about, export_about = (json.loads(open(f"{table}.json").read()) for table in (by_ckpt, by_export))
    assert about["model_sha256"] != export_about["model_sha256"]
    assert about["model_weights_sha256"] == export_about["model_weights_sha256"]
    assert run_search("--model", ckpt, "--gallery", gallery, "--probes", probes, "--output", out) == 0
    expected = read_rows(out)
    for model, probe_table in ((backbone, probes), (ckpt, by_export), (None, by_export)):
        capsys.readouterr()
        assert run_search(*(["--model", model] if model else []), "--gallery", by_ckpt, "--probes", probe_table,
                          "--threshold", 0.3, "--output", out, "--overwrite") == 0, capsys.readouterr().err
        assert "another model" not in capsys.readouterr().err
        assert [r[1:] for r in read_rows(out)] == [r[1:] for r in expected]

    other = another_runs_weights(backbone, tmp_path / "other")
    assert run_search("--model", other, "--gallery", by_ckpt, "--probes", probes, "--output", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"--gallery {by_ckpt} was made with another model than {other} ({ckpt} as it was then; its .json records " \
           "the SHA-256 of that model's weights): embeddings of two models cannot be compared" in err
    assert err.count("\n") == 1
    other_table = tmp_path / "o.npy"
    assert embed_main(["--model", other, "--images", probes, "--output", str(other_table), "--workers", "0"]) == 0
    assert run_search("--gallery", by_ckpt, "--probes", other_table, "--threshold", 0.3, "--output", out,
                      "--overwrite") == 2
    assert "were made with two models" in capsys.readouterr().err

    # A table of older versions knows its model by the file: the export is another model to it, as it was.
    del about["model_weights_sha256"]
    open(f"{by_ckpt}.json", "w").write(json.dumps(about))
    assert run_search("--model", backbone, "--gallery", by_ckpt, "--probes", probes, "--output", out,
                      "--overwrite") == 2
    assert f"--gallery {by_ckpt} was made with another model than {backbone} ({ckpt} as it was then; its .json " \
           "records the SHA-256 of that model's file, as tables of older versions do, not of its weights)" \
           in capsys.readouterr().err
    assert run_search("--model", ckpt, "--gallery", by_ckpt, "--probes", probes, "--output", out, "--overwrite") == 0


def test_bad_arguments_left_out_people_and_outputs(trained, tables, tmp_path, capsys):
    ckpt, backbone, gallery, probes = trained
    table, probe_table, labels = tables
    for argv in (["--gallery", table], ["--gallery", table, "--probes", probe_table, "--top-k", "0"],
                 ["--gallery", table, "--probes", probe_table, "--threshold", "1.5"],
                 ["--gallery", table, "--probes", probe_table, "--output", "r.txt"],
                 ["--gallery", table, "--save-gallery", "g.npy", "--probe-labels", "folder"],
                 ["--gallery", table, "--probes", probe_table, "--all-faces"]):
        with pytest.raises(SystemExit):
            run_search(*argv)
    capsys.readouterr()
    out = tmp_path / "r.csv"
    empty = tmp_path / "empty"
    os.makedirs(empty / "nobody")
    write_table(str(tmp_path / "none.npy"), [], np.zeros((0, 6), dtype=np.float32))
    write_table(str(tmp_path / "loose.npy"), ["a.jpg"], unit(E[0]))
    write_table(str(tmp_path / "unknown.npy"), ["unknown/a.jpg"], unit(E[0]))
    write_table(str(tmp_path / "wide.npy"), ["a.jpg"], np.ones((1, 7), dtype=np.float32))
    write_table(str(tmp_path / "one.npy"), ["p.jpg"], unit(E[0]))
    for argv, said in [
        (["--gallery", tmp_path / "nowhere", "--probes", probe_table], "--gallery"),
        (["--gallery", empty, "--probes", probes, "--model", backbone], "holds no identity sub-folder"),
        (["--gallery", tmp_path / "none.npy", "--probes", probe_table], "the table holds no faces"),
        (["--gallery", tmp_path / "loose.npy", "--probes", probe_table], "row 1, a.jpg, is in no folder"),
        (["--gallery", tmp_path / "unknown.npy", "--probes", probe_table], "a person is named 'unknown'"),
        (["--gallery", table, "--probes", tmp_path / "wide.npy"], "holds 6-D embeddings, --probes"),
        (["--gallery", table, "--probes", probes], "--model is needed"),
        (["--gallery", table, "--probes", probe_table, "--probe-labels", "folder"], "p0.jpg is in no folder"),
        (["--gallery", table, "--probes", tmp_path / "one.npy", "--probe-labels", labels],
         f"--probe-labels {labels} does not list the probe p.jpg"),
        (["--gallery", table, "--probes", probe_table, "--probe-labels", tmp_path / "no.csv"], "no.csv: no such"),
        (["--gallery", table, "--save-gallery", tmp_path / "g.npy"], "the gallery is a table already"),
        (["--gallery", table, "--probes", probe_table, "--output", labels.with_suffix(".csv"),
          "--probe-labels", labels], "is one of the files this run reads"),
    ]:
        assert run_search(*argv, "--threshold", "0.5", *(["--output", out] if "--output" not in argv else [])) == 2
        err = capsys.readouterr().err
        assert said in err and err.startswith("search: error: ") and err.count("\n") == 1, (said, err)
    assert not os.path.exists(out) and labels.read_text().startswith("probe,person")
    # The note on the model's 1:1 threshold comes after what can go wrong with the faces: the error is the one line.
    assert run_search("--gallery", empty, "--probes", probes, "--model", backbone, "--output", out) == 2
    err = capsys.readouterr().err
    assert "holds no identity sub-folder" in err and err.count("\n") == 1 and "1:1 threshold" not in err
    # A --probes folder without images, as train.embed and the face tools say it, before the gallery folder is
    # embedded (it was said after).
    assert run_search("--gallery", gallery, "--probes", empty / "nobody", "--model", backbone, "--output", out) == 2
    assert capsys.readouterr().err == (f"search: error: --probes {empty / 'nobody'}: no images (.jpg, .jpeg, .png, "
                                       ".bmp) under it\n")

    # A person none of whose images decode is left out with a warning, and the exit status is 1.
    broken = tmp_path / "gallery"
    os.makedirs(broken / "zoe")
    (broken / "zoe" / "1.png").write_bytes(b"not an image")
    os.symlink(os.path.join(gallery, "person1"), broken / "person1")
    assert run_search("--model", backbone, "--gallery", broken, "--probes", probes, "--output", out) == 1
    err = capsys.readouterr().err
    assert (f"warning: {broken / 'zoe' / '1.png'}: cannot read the image: not an image format Pillow reads "
            "(12 bytes)\n") in err  # (as train.embed words it: it said "cannot decode image (12 bytes)")
    assert "warning: --gallery: none of the images of zoe can be read: zoe is left out" in err
    assert "; 1 person, 1 gallery image left out (the warnings above say why); wrote" in err
    assert {r[2] for r in read_rows(out)} == {"person1"}
    summary = json.loads((tmp_path / "r.json").read_text())
    # The summary counts the gallery's losses apart from the probes' (none here).
    assert summary["people"] == 1 and summary["left_out"] == 0
    assert summary["gallery_left_out"] == {"images": 1, "people": ["zoe"]}
    # So is a person whose folder holds no image (empty, or photos in another format): not silently.
    os.remove(broken / "zoe" / "1.png")
    os.makedirs(broken / "yan")
    (broken / "yan" / "1.heic").write_bytes(b"a photo in a format the reader does not take")
    assert run_search("--model", backbone, "--gallery", broken, "--probes", probes, "--output", out, "--overwrite") == 1
    assert "warning: --gallery: not enrolled, no .jpg/.jpeg/.png/.bmp image directly in the folder: yan, zoe" in \
        capsys.readouterr().err
    # Outputs are kept without --overwrite.
    before = out.read_bytes()
    assert run_search("--gallery", table, "--probes", probe_table, "--output", out, "--threshold", "0.5") == 2
    assert f"{out} exists: pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before


def test_a_stop_leaves_the_outputs_whole_or_as_they_were(tables, tmp_path, capsys, monkeypatch):
    gallery, probes, labels = tables
    out = tmp_path / "r.csv"
    # A Ctrl-C during the search: nothing written.
    search_people = search.best_people

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return search_people(*args, **kwargs)

    monkeypatch.setattr(search, "best_people", stopped)
    try:
        assert run_search("--gallery", gallery, "--probes", probes, "--output", out, "--threshold", 0.5) == 130
    finally:  # the first stop leaves the signals ignored, for a process about to exit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "search: stopped by SIGINT: nothing written" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "r.json")
    # A SIGTERM as the table is written waits for it and its summary.
    monkeypatch.undo()
    write = checkpoint.FilesTogether.write  # (the table and its summary, renamed together at the end)

    def write_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        write(*args, **kwargs)

    monkeypatch.setattr(search.checkpoint.FilesTogether, "write", write_then_signal)
    try:
        assert run_search("--gallery", gallery, "--probes", probes, "--output", out, "--threshold", 0.5) == 143
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "stopped by SIGTERM as the outputs were written: they are whole" in capsys.readouterr().err
    assert len(read_rows(out)) == 4 * 3 and json.loads((tmp_path / "r.json").read_text())["searches"] == 4


def test_a_full_disk_as_the_summary_is_written_leaves_the_earlier_outputs(tables, tmp_path, capsys, monkeypatch):
    # The table was renamed into place before its summary was written: a full disk there left the new table beside
    # the summary of the run before (its threshold, its counts).
    gallery, probes, labels = tables
    out = tmp_path / "r.csv"
    assert run_search("--gallery", gallery, "--probes", probes, "--output", out, "--threshold", 0.5) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("r.csv", "r.json")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert run_search("--gallery", gallery, "--probes", probes, "--output", out, "--threshold", 0.999,
                      "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith(("r.", "."))} \
        == before  # (no temporary left either)


def test_cosine_above_is_the_lowest_4_decimal_threshold_a_score_does_not_reach():
    assert search.cosine_above(float(np.float32(0.5))) == 0.5001  # a score on the grid: the next cosine
    assert search.cosine_above(float(np.float32(0.8))) == 0.8001  # float32 0.8 is a hair above 0.8
    assert search.cosine_above(float(np.float32(0.12344))) == 0.1235
    assert search.cosine_above(float(np.float32(0.1235))) == 0.1236  # float32 0.1235 is at or above 0.1235
    assert search.cosine_above(float("-inf")) == -1.0
    for score in np.random.default_rng(0).uniform(-1, 1, 1000).astype(np.float32):
        cosine = search.cosine_above(float(score))
        assert np.float32(cosine) > score and np.float32(round(cosine - 1e-4, 4)) <= score, (score, cosine)


def test_operating_points_of_a_hand_made_table_with_ties():
    # Non-mated: 10 searches, best cosines 0.9, 0.8, 0.8 (a tie), 0.7, ..., 0.1. Mated: 6, the last but two
    # ranks its mate 2nd (another person, 0.99, is first).
    non_mated = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    mated = [(1, 0.95), (1, 0.8001), (1, 0.80005), (2, 0.99), (1, 0.75), (1, 0.6)]
    ranks = np.array([0] * 10 + [r for r, _ in mated])
    best = np.array(non_mated + [c for _, c in mated], dtype=np.float32)
    points = search.operating_points(ranks, best, ranks > 0, [0.05, 0.1, 0.2, 0.3, 0.5])
    as_table = [(p["fpir"], p["threshold"], p["false_alarms"], p["fpir_reached"], p["dir"], p["misidentified"])
                for p in points]
    assert as_table == [
        (0.05, None, None, None, None, None),  # floor(0.05 x 10) = 0: 10 searches cannot measure it
        (0.1, 0.8001, 1, 0.1, 2 / 6, 1 / 6),  # 1 let in: above 0.8; 0.8001 itself is in, 0.80005 is not
        (0.2, 0.8001, 1, 0.1, 2 / 6, 1 / 6),  # 2 allowed, but the second and third tie: 1
        (0.3, 0.7001, 3, 0.3, 4 / 6, 1 / 6),
        (0.5, 0.5001, 5, 0.5, 5 / 6, 1 / 6)]
    # The threshold train.ijb's open_set_identification chooses for these FPIRs (scores strictly above it).
    from train.ijb import threshold_allowing
    assert threshold_allowing(np.sort(best[:10]), 0.2) == pytest.approx(0.8)
    assert search.operating_fpirs(10) == [0.01, 0.05, 0.1, 0.2]
    assert search.operating_fpirs(200) == [0.005, 0.01, 0.05, 0.1, 0.2]
    assert search.operating_fpirs(4) == [0.01, 0.05, 0.1, 0.2, 0.25]
    assert search.operating_fpirs(1) == [0.01, 0.05, 0.1, 0.2]  # (a 100% row at threshold -1 told nothing)


@pytest.fixture
def open_set(tmp_path):
    """A gallery of alice, bob, carol and dave (e0 to e3, one image each) and 15 labelled probes: 10 of
    people not enrolled at cosines 0.91234, 0.81234 twice (one vector: a tie), 0.71234, ..., 0.11234 to
    alice; alice at 0.95234, bob at 0.81245, carol at 0.81235, dave at 0.75, and alice at 0.1 (bob: 0.95)."""
    gallery = tmp_path / "gallery.npy"
    write_table(str(gallery), ["alice/1.jpg", "bob/1.jpg", "carol/1.jpg", "dave/1.jpg"], unit(*E[:4]))

    def at(cosine, person):
        return cosine * E[person] + np.sqrt(1 - cosine ** 2) * E[5]
    strangers = [0.91234, 0.81234, 0.81234, 0.71234, 0.61234, 0.51234, 0.41234, 0.31234, 0.21234, 0.11234]
    vectors = [at(c, 0) for c in strangers] + [at(0.95234, 0), at(0.81245, 1), at(0.81235, 2), at(0.75, 3),
                                               0.1 * E[0] + 0.95 * E[1] + np.sqrt(1 - 0.9125) * E[5]]
    names = [f"x{k}.jpg" for k in range(10)] + ["alice.jpg", "bob.jpg", "carol.jpg", "dave.jpg", "alice2.jpg"]
    probes = tmp_path / "probes.npy"
    write_table(str(probes), names, unit(*vectors))
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{name},{name[:-4].rstrip('2')}\n" for name in names))
    return gallery, probes, labels


def test_operating_points_fpir_and_the_threshold_recorded_in_the_gallery(open_set, tmp_path, capsys):
    gallery, probes, labels = open_set
    out = tmp_path / "r.csv"
    # Without a threshold: the default (no model: 0.3), with the note that a 1:1 threshold is too low.
    assert run_search("--gallery", gallery, "--probes", probes, "--probe-labels", labels, "--output", out) == 0
    err = capsys.readouterr().err
    assert "cosine 0.3000 is a 1:1 threshold" in err and "--fpir 0.01" in err and "train.tools.roc measures" in err
    assert "search: note: no model gives the threshold: cosine 0.3 is taken" in err
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["identification"]["fpir"] == 0.8  # 8 of the 10 strangers reach 0.3
    points = [(p["fpir"], p["threshold"], p["false_alarms"], p["dir"], p["misidentified"])
              for p in summary["operating_points"]]
    assert points == [(0.01, None, None, None, None), (0.05, None, None, None, None),
                      (0.1, 0.8124, 1, 0.4, 0.2), (0.2, 0.8124, 1, 0.4, 0.2)]  # 0.2: the tie at 0.81234
    assert "operating points on 10 non-mated and 5 mated searches" in err
    assert "      1%          -  needs 100 non-mated searches or more" in err
    assert "     20%     0.8124   40.00%       1 of 10          20.00%" in err
    # A refusal (the results there already) comes alone: the threshold's note was printed before it.
    assert run_search("--gallery", gallery, "--probes", probes, "--probe-labels", labels, "--output", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("search: error: ") and err.count("\n") == 1 and "exists: pass --overwrite" in err, err

    # --fpir 0.2 decides at 0.8124: one stranger in; alice and bob found, carol (0.81235) and dave unknown,
    # alice2 taken for bob. --save-gallery copies the table with the threshold.
    saved = tmp_path / "calibrated.npy"
    assert run_search("--gallery", gallery, "--probes", probes, "--probe-labels", labels, "--output", out,
                      "--overwrite", "--fpir", 0.2, "--save-gallery", saved) == 0
    err = capsys.readouterr().err
    assert "1:1 threshold" not in err and f"the threshold is recorded in {saved}.json" in err
    decisions = {r[0]: r[4] for r in read_rows(out) if r[1] == "1"}
    assert decisions == {**{f"x{k}.jpg": "alice" if k == 0 else "unknown" for k in range(10)}, "alice.jpg": "alice",
                         "bob.jpg": "bob", "carol.jpg": "unknown", "dave.jpg": "unknown", "alice2.jpg": "bob"}
    summary = json.loads((tmp_path / "r.json").read_text())
    assert (summary["threshold"], summary["fpir"]) == (0.8124, 0.2)
    assert summary["threshold_from"] == "--fpir 0.2: 1 of 10 non-mated searches at or above it"
    assert (summary["identification"]["dir"], summary["identification"]["fpir"]) == (0.4, 0.1)
    record = json.loads((tmp_path / "calibrated.npy.json").read_text())["search_threshold"]
    assert (record["cosine"], record["scoring"], record["false_alarms"], record["non_mated_searches"]) == \
        (0.8124, "template", 1, 10)
    assert np.array_equal(np.load(saved), np.load(gallery))

    # A later search of that gallery takes its threshold; --threshold overrides it; --per-image leaves it aside
    # (it was chosen for templates).
    assert run_search("--gallery", saved, "--probes", probes, "--output", out, "--overwrite") == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["threshold"] == 0.8124 and summary["threshold_from"].startswith(f"recorded in {saved}.json: --fpir")
    assert "1:1 threshold" not in err and summary["matched"] == 4
    assert run_search("--gallery", saved, "--probes", probes, "--output", out, "--overwrite",
                      "--threshold", 0.5) == 0
    assert json.loads((tmp_path / "r.json").read_text())["threshold"] == 0.5
    assert run_search("--gallery", saved, "--probes", probes, "--output", out, "--overwrite", "--per-image") == 0
    err = capsys.readouterr().err
    assert "was chosen for template scores, this search makes per-image ones: left aside" in err
    assert json.loads((tmp_path / "r.json").read_text())["threshold"] == 0.3

    # Refused, in one line naming --fpir: too few strangers for the rate, none at all, with --threshold, out of
    # range, without labels.
    for argv, said in [(["--fpir", "0.07"], "--fpir 0.07: 10 non-mated searches measure an FPIR of 0.1 at best "
                                            "(1 of them); 0.07 needs 15 or more"),
                       (["--fpir", "0.05"], f"--fpir 0.05 is measured on 20 non-mated searches or more (probes of "
                                            f"people not enrolled), and --probes {probes} holds 15 probes in all"),
                       (["--fpir", "0.2", "--probes", tmp_path / "mated.npy"], "--fpir 0.2: none of the 5 probes")]:
        write_table(str(tmp_path / "mated.npy"), [f"{p}.jpg" for p in ("alice", "bob", "carol", "dave", "alice2")],
                    np.load(probes)[10:])
        assert run_search("--gallery", gallery, "--probes", probes, "--probe-labels", labels, "--output",
                          tmp_path / "n.csv", *argv) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "n.csv")
    base = ["--gallery", gallery, "--probes", probes]
    for argv, said in [([*base, "--probe-labels", labels, "--fpir", "0.1", "--threshold", "0.5"],
                        "--fpir and --threshold both set the threshold"),
                       ([*base, "--probe-labels", labels, "--fpir", "0"], "--fpir is a share"),
                       ([*base, "--probe-labels", labels, "--fpir", "1"], "--fpir is a share"),
                       ([*base, "--probe-labels", labels, "--fpir", "nan"], "--fpir is a share"),
                       ([*base, "--fpir", "0.1"], "--fpir needs --probe-labels")]:
        with pytest.raises(SystemExit):
            run_search(*argv)
        assert said in capsys.readouterr().err


def test_fpir_recorded_in_a_gallery_enrolled_from_a_folder(trained, tmp_path, capsys, monkeypatch):
    _, backbone, gallery, probes = trained
    out, saved = tmp_path / "r.csv", tmp_path / "g.npy"
    # 4 non-mated searches (person4 and person5, 2 probes each): FPIR 0.25 lets one in at most.
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", probes, "--probe-labels", "folder",
                      "--fpir", 0.25, "--save-gallery", saved, "--output", out) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["identification"]["fpir"] <= 0.25 and summary["threshold_from"].startswith("--fpir 0.25: ")
    point = [p for p in summary["operating_points"] if p["fpir"] == 0.25]
    assert len(point) == 1 and point[0]["threshold"] == summary["threshold"]
    about = json.loads((tmp_path / "g.npy.json").read_text())
    assert about["search_threshold"]["cosine"] == summary["threshold"] and about["rows"] == 12
    capsys.readouterr()
    # The table reads back (its .json still describes it), and its threshold is the search's default.
    assert run_search("--gallery", saved, "--probes", probes, "--output", out, "--overwrite") == 0
    err = capsys.readouterr().err
    assert "left aside" not in err and "1:1 threshold" not in err
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["threshold"] == summary["threshold"] and again["threshold_from"].startswith("recorded in")
    assert again["matched"] == summary["matched"]
    # An --fpir the probes cannot measure once one of the strangers' images does not decode, after the gallery's
    # table was written: the error says it is there.
    for written in (saved, tmp_path / "g.txt", tmp_path / "g.npy.json"):
        os.remove(written)
    shutil.copytree(probes, tmp_path / "probes")
    (tmp_path / "probes" / "person5" / "04.png").write_bytes(b"not a png")
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", tmp_path / "probes", "--probe-labels",
                      "folder", "--fpir", 0.25, "--save-gallery", saved, "--output", tmp_path / "s.csv") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("search: error: --fpir 0.25: 3 non-mated searches measure an FPIR of 0.333 at best")
    assert err.endswith(f"(the gallery's table was written: {saved}, {tmp_path / 'g.txt'}, {saved}.json; --gallery "
                        f"{saved} searches it without embedding it again)")
    assert np.load(saved).shape == (12, 64) and not os.path.exists(tmp_path / "s.csv")
    # Strangers too few for the --fpir (4 probes of people without a folder in the gallery), or none (the probes of
    # the people enrolled alone): said before anything is embedded or written (it was after the gallery's table).
    for written in (saved, tmp_path / "g.txt", tmp_path / "g.npy.json"):
        os.remove(written)
    shutil.rmtree(tmp_path / "probes")
    shutil.copytree(probes, tmp_path / "probes", ignore=shutil.ignore_patterns("person4", "person5"))

    fail_if_called(monkeypatch, search, "embed_files", "faces were embedded before the --fpir was checked")
    for fpir, folder, said in ((0.1, probes, "4 non-mated searches measure an FPIR of 0.25 at best (1 of them); 0.1 "
                                             "needs 10 or more"),
                               (0.2, tmp_path / "probes", "none of the 8 probes is of a person not enrolled "
                                                          "(--probe-labels folder), and the FPIR is measured on "
                                                          "those")):
        assert run_search("--model", backbone, "--gallery", gallery, "--probes", folder, "--probe-labels", "folder",
                          "--fpir", fpir, "--save-gallery", saved, "--output", tmp_path / "s.csv") == 2
        assert capsys.readouterr().err == f"search: error: --fpir {fpir}: {said}\n"
        assert not os.path.exists(saved) and not os.path.exists(tmp_path / "s.csv")
    # Probes too few for the --fpir were they all strangers: said before the gallery is embedded and its table
    # written (it was after, as above).
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", probes, "--probe-labels", "folder",
                      "--fpir", 0.05, "--save-gallery", saved, "--output", tmp_path / "s.csv") == 2
    err = capsys.readouterr().err
    assert err == (f"search: error: --fpir 0.05 is measured on 20 non-mated searches or more (probes of people not "
                   f"enrolled), and --probes {probes} holds 12 probes in all\n")
    assert not os.path.exists(saved) and not os.path.exists(tmp_path / "s.csv")


def test_a_save_gallery_that_is_a_folder_is_refused(open_set, tmp_path, capsys):
    # --save-gallery gallery/ wrote the table as gallery/.npy, gallery/.npy.txt and gallery/.npy.json, hidden in
    # the folder, and --save-gallery gallery as gallery.npy beside it, without a word (train.embed --output refuses
    # a folder).
    gallery, probes, labels = open_set
    folder = tmp_path / "enrolled"
    folder.mkdir()
    before = sorted(os.listdir(tmp_path))
    for named in (folder, f"{folder}{os.sep}"):
        assert run_search("--gallery", gallery, "--probes", probes, "--probe-labels", labels, "--fpir", 0.1,
                          "--save-gallery", named, "--output", tmp_path / "r.csv") == 2
        said = f"search: error: --save-gallery {named} is a folder: name a .npy or .csv file\n"
        assert capsys.readouterr().err == said
        assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == before


def test_a_tables_unit_rows_are_taken_as_they_are(tmp_path):
    # Normalised again, unit rows changed in their last bits (torch 2.4's normalize: a gallery saved with
    # --save-gallery scored -0.091611 where its folder had scored -0.091612); rows of another length are normalised.
    rows = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[:3] *= np.float32(1 + 5e-7)  # unit length give or take float32 rounding
    rows[3:] *= 3
    write_table(str(tmp_path / "t.npy"), [f"p/{k}.png" for k in range(6)], rows)
    faces = search._read_faces("--gallery", str(tmp_path / "t.npy"))
    assert np.array_equal(faces.embeddings[:3], rows[:3])
    assert np.allclose(np.linalg.norm(faces.embeddings[3:], axis=1), 1, atol=1e-6)


@pytest.mark.slow
def test_probe_photos_with_a_detector_are_searched_as_their_aligned_faces(trained, tmp_path, capsys):
    """--detector (train.embed's shared code): probe photos, each one's main face found and aligned by the
    stand-in detector of detector_fixtures, get the results of those faces' crops; a photo without a face is
    left out with a warning (exit status 1); a bad --detector is one line, before any embedding."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from detector_fixtures import crops_and_photos, face_detector, photo_of_faces

    ckpt, backbone, gallery, _ = trained
    detector = face_detector(tmp_path / "det.onnx")
    crops, photos = tmp_path / "crops", tmp_path / "photos"
    crops_and_photos({f"person{who}/{sample}.png": render_face(0, who, 600 + sample, 112) for who in range(6)
                      for sample in range(2)}, IMAGE_SIZE, crops, photos)
    photo_of_faces([], []).save(photos / "nobody.png")
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", crops, "--output",
                      tmp_path / "crops.csv") == 0
    capsys.readouterr()
    # (--detector finds a --gallery folder's faces too: the gallery of aligned faces is searched as its table)
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", photos, "--detector", detector,
                      "--output", tmp_path / "photos.csv") == 2
    assert "a gallery of aligned faces: enrol it without --detector, with --save-gallery" in capsys.readouterr().err
    table = tmp_path / "gallery.npy"
    assert run_search("--model", backbone, "--gallery", gallery, "--save-gallery", table) == 0
    capsys.readouterr()
    assert run_search("--model", backbone, "--gallery", table, "--probes", photos, "--detector", detector,
                      "--output", tmp_path / "photos.csv") == 1
    assert f"warning: {photos / 'nobody.png'}: no face scores 0.5 or more" in capsys.readouterr().err
    assert read_rows(tmp_path / "photos.csv") == read_rows(tmp_path / "crops.csv")
    assert json.loads((tmp_path / "photos.json").read_text())["left_out"] == 1
    assert run_search("--model", backbone, "--gallery", gallery, "--probes", photos, "--detector",
                      tmp_path / "none.onnx", "--output", tmp_path / "x.csv") == 2
    err = capsys.readouterr().err
    assert err == f"search: error: --detector {tmp_path / 'none.onnx'}: no such file: give an SCRFD face detector's " \
                  "ONNX file (insightface's det_10g.onnx)\n"


@pytest.mark.slow
def test_a_gallery_of_photos_with_a_detector_is_enrolled_as_their_aligned_faces(trained, tmp_path, capsys):
    """--detector finds the main face of each photo of a --gallery folder too, as it does the probes' (it
    embedded the photos whole, without a word): a gallery of photos and probe photos give the results of
    the faces' crops; a gallery photo without a face is left out with a warning, and so is a person with
    no face found (exit status 1, counted in the summary); --save-gallery alone enrols the photos."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from detector_fixtures import crops_and_photos, face_detector, photo_of_faces

    ckpt, backbone, _, _ = trained
    detector = face_detector(tmp_path / "det.onnx")
    gallery_crops, gallery_photos = tmp_path / "gallery_crops", tmp_path / "gallery_photos"
    probe_crops, probe_photos = tmp_path / "probe_crops", tmp_path / "probe_photos"
    crops_and_photos({f"person{who}/{sample}.png": render_face(0, who, 700 + sample, 112) for who in range(4)
                      for sample in range(3)}, IMAGE_SIZE, gallery_crops, gallery_photos)
    crops_and_photos({f"person{who}/{sample}.png": render_face(0, who, 800 + sample, 112) for who in range(6)
                      for sample in range(2)}, IMAGE_SIZE, probe_crops, probe_photos)
    photo_of_faces([], []).save(gallery_photos / "person0" / "nobody.png")
    os.makedirs(gallery_photos / "person9")
    photo_of_faces([], []).save(gallery_photos / "person9" / "nobody.png")
    assert run_search("--model", backbone, "--gallery", gallery_crops, "--probes", probe_crops, "--output",
                      tmp_path / "crops.csv", "--probe-labels", "folder") == 0
    capsys.readouterr()
    assert run_search("--model", backbone, "--gallery", gallery_photos, "--probes", probe_photos, "--detector",
                      detector, "--output", tmp_path / "photos.csv", "--probe-labels", "folder") == 1
    err = capsys.readouterr().err
    assert f"warning: {gallery_photos / 'person0' / 'nobody.png'}: no face scores 0.5 or more" in err
    assert "warning: --gallery: no face is found in the photos of person9: person9 is left out" in err
    assert "not square" not in err
    assert read_rows(tmp_path / "photos.csv") == read_rows(tmp_path / "crops.csv")
    summary = json.loads((tmp_path / "photos.json").read_text())
    assert summary["gallery_left_out"] == {"images": 2, "people": ["person9"]} and summary["left_out"] == 0
    assert summary["identification"] == json.loads((tmp_path / "crops.json").read_text())["identification"]

    # Enrolled alone (--save-gallery, no --probes), then searched with crops as probes.
    saved = tmp_path / "g.npy"
    assert run_search("--model", backbone, "--gallery", gallery_photos, "--detector", detector,
                      "--save-gallery", saved) == 1
    about = json.loads((tmp_path / "g.npy.json").read_text())
    assert about["faces"] == f"found and aligned by {detector}"
    assert run_search("--gallery", saved, "--probes", probe_crops, "--output", tmp_path / "saved.csv",
                      "--probe-labels", "folder") == 0
    assert read_rows(tmp_path / "saved.csv") == read_rows(tmp_path / "crops.csv")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # (a landmarks file is of the probe photos)
        run_search("--model", backbone, "--gallery", gallery_photos, "--landmarks", tmp_path / "l.txt",
                   "--save-gallery", tmp_path / "x.npy")
    assert "--landmarks goes with --probes" in capsys.readouterr().err


def test_amp_of_an_onnx_model_is_refused_before_the_probes_are_read(tmp_path, capsys):
    # As train.embed, train.verify, train.ijb and train.tinyface: the probes folder was walked, and --landmarks read
    # (each photo it lists looked for), before the refusal; a folder without images or a file not there said first.
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"\x08\x07")  # (an ONNX file by its name: refused before it is read)
    gallery, probes = tmp_path / "gallery", tmp_path / "probes"
    gallery.mkdir()
    probes.mkdir()
    for given in (["--probes", probes], ["--probes", tmp_path / "none"],
                  ["--probes", probes, "--landmarks", tmp_path / "none.txt"]):
        capsys.readouterr()
        assert run_search("--model", graph, "--gallery", gallery, *given, "--amp", "bf16", "--output",
                          tmp_path / "s.csv") == 2, given
        assert capsys.readouterr().err.splitlines() == [
            f"search: error: --amp bf16: {graph} is an ONNX model, run as its graph is"], given
    assert not (tmp_path / "s.csv").exists()
