"""`--data a,b`: several training sets as one, each set's identities labelled after the sets before it;
verification sets found in any set's folder; a resume needs the same sets in the same order."""

import os

import numpy as np
import pytest

from train.config import parse_args
from train.data import CombinedFaces, build_train_dataset, build_verification_sets
from train.tools import pack_rec
from train.trainer import Trainer

from trainer_fixtures import IMAGE_SIZE, base_argv, make_face_folder, make_pairs_list, read_jsonl, train_one_thread


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """An image folder of 3 identities x 4 images, and a RecordIO of 5 x 5 packed from another folder,
    with a pairs list in its folder."""
    root = tmp_path_factory.mktemp("combined")
    folder = make_face_folder(str(root / "folder"), identities=3, images=4)
    source = make_face_folder(str(root / "source"), identities=5, images=5)
    rec = str(root / "rec")
    assert pack_rec.main([source, rec]) == 0
    make_pairs_list(rec)
    return folder, rec


def test_two_sets_are_one_with_the_second_sets_labels_after_the_firsts(sets):
    folder, rec = sets
    combined, classes = build_train_dataset(f"{folder},{rec}", image_size=IMAGE_SIZE, flip=False)
    first, first_classes = build_train_dataset(folder, image_size=IMAGE_SIZE, flip=False)
    second, second_classes = build_train_dataset(rec, image_size=IMAGE_SIZE, flip=False)
    assert isinstance(combined, CombinedFaces)
    assert classes == first_classes + second_classes == 3 + 5
    assert len(combined) == len(first) + len(second) == 12 + 25
    for index in (0, 11, 12, 36):
        image, label = combined[index]
        part, offset, labels = (first, 0, 0) if index < 12 else (second, 12, 3)
        part_image, part_label = part[index - offset]
        assert np.array_equal(image.numpy(), part_image.numpy()) and label == part_label + labels
    assert sorted({label for _, label in (combined.load(i) for i in range(len(combined)))}) == list(range(8))
    assert combined.describe() == [f"{folder}: 12 images, labels 0 to 2 (3 identities)",
                                   f"{rec}: 25 images, labels 3 to 7 (5 identities)"]
    # The order is part of the set: labels mean other identities the other way round.
    swapped, _ = build_train_dataset(f"{rec},{folder}", image_size=IMAGE_SIZE)
    assert swapped.fingerprint() != combined.fingerprint()
    assert combined.classes_digest() is None  # a RecordIO names no identities
    two_folders, _ = build_train_dataset(f"{folder},{folder}/../source", image_size=IMAGE_SIZE)
    assert two_folders.classes_digest() is not None


def test_flips_and_augmentations_are_the_combined_sets_own(sets):
    folder, rec = sets
    combined, _ = build_train_dataset(f"{folder},{rec}", image_size=IMAGE_SIZE, seed=3, flip=True)
    as_stored = [part[i][0].numpy() for _, part in combined.parts for i in range(len(part))]  # (their own flip off)
    flipped = [index for index in range(len(combined))
               if not np.array_equal(combined[index][0].numpy(), as_stored[index])]
    assert 0 < len(flipped) < len(combined)  # a half of them, drawn from (seed, epoch, combined index)


@pytest.mark.parametrize("spec, message", [
    ("{folder},,{rec}", r"an empty name between commas"),
    ("{folder},{rec},{folder}/", r"is named twice \(as .*\): its images would be read twice"),
    ("{folder},{rec}/missing", r"--data '.*missing': no such folder"),
    ("synthetic,{rec}", r"synthetic, the demo's drawn faces, is a set of its own"),
])
def test_mistakes_in_the_list_of_sets_are_one_line_errors(sets, spec, message):
    folder, rec = sets
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_train_dataset(spec.format(folder=folder, rec=rec), image_size=IMAGE_SIZE)


def test_a_path_holding_a_comma_is_one_set(tmp_path):
    folder = make_face_folder(str(tmp_path / "faces, 2024"), identities=2, images=2)
    dataset, classes = build_train_dataset(folder, image_size=IMAGE_SIZE)
    assert not isinstance(dataset, CombinedFaces) and classes == 2
    # Among others it is split at its comma (as the README says), and a link without one takes it.
    other = make_face_folder(str(tmp_path / "other"), identities=3, images=2)
    with pytest.raises(FileNotFoundError, match=r"--data '.*faces': no such folder"):
        build_train_dataset(f"{folder},{other}", image_size=IMAGE_SIZE)
    os.symlink(folder, tmp_path / "faces_2024")
    dataset, classes = build_train_dataset(f"{tmp_path / 'faces_2024'},{other}", image_size=IMAGE_SIZE)
    assert isinstance(dataset, CombinedFaces) and classes == 5


def test_verification_sets_are_found_in_any_sets_folder(sets):
    folder, rec = sets
    found = build_verification_sets(f"{folder},{rec}", ["pairs.txt"], image_size=IMAGE_SIZE)
    assert list(found) == ["pairs"]
    with pytest.warns(UserWarning, match=r"no lfw\.bin in '.*folder' or '.*rec'; skipped"):
        assert build_verification_sets(f"{folder},{rec}", ["lfw"], image_size=IMAGE_SIZE) == {}


def test_training_on_two_sets_says_where_their_identities_went_and_resumes_only_with_them(sets, tmp_path, capsys):
    folder, rec = sets
    output = tmp_path / "run"
    argv = base_argv(f"{folder},{rec}", str(output), "pairs.txt", max_steps=2, eval_every=2, batch_size=8)
    assert train_one_thread(argv) == 0
    err = capsys.readouterr().err
    assert (f"note: --data is 2 sets, 37 images of 8 identities, an identity of one set never taken for one of "
            f"another: {folder}: 12 images, labels 0 to 2 (3 identities); {rec}: 25 images, labels 3 to 7") in err
    assert [r["target"] for r in read_jsonl(output / "verification.jsonl")] == ["pairs", "pairs"]
    assert train_one_thread(argv + ["--resume", "auto", "--max-steps", "3"]) == 0


def test_the_same_folders_in_another_order_are_refused_on_resume(sets, tmp_path):
    # Image folders name their identities: in another order each label would be another person's.
    folder, _ = sets
    other = os.path.join(os.path.dirname(folder), "source")
    output = str(tmp_path / "run")
    assert train_one_thread(base_argv(f"{folder},{other}", output, max_steps=1, batch_size=8)) == 0
    swapped = base_argv(f"{other},{folder}", output, max_steps=2, batch_size=8, resume="auto")
    with pytest.raises(SystemExit, match=r"is not the data that run trained on"):
        Trainer(parse_args(swapped))


def test_a_recordio_set_and_a_folder_in_another_order_are_refused_on_resume(sets, tmp_path, capsys):
    # A RecordIO set names no identities: swapped with a folder, the run went on with a note that each label
    # was taken for the person it was, when every label was another person's.
    folder, rec = sets
    output = str(tmp_path / "run")
    assert train_one_thread(base_argv(f"{folder},{rec}", output, max_steps=1, batch_size=8)) == 0
    swapped = base_argv(f"{rec},{folder}", output, max_steps=2, batch_size=8, resume="auto")
    with pytest.raises(SystemExit, match=rf"--data {rec},{folder} is not the data that run trained on: the same sets "
                                         rf"in another order, .* Resume with that run's order, --data {folder},{rec}$"):
        Trainer(parse_args(swapped))
    # Its class centres, given to a run on them in the other order, are not taken.
    capsys.readouterr()
    pretrained = base_argv(f"{rec},{folder}", str(tmp_path / "new"), max_steps=1, batch_size=8,
                           pretrained_model=os.path.join(output, "checkpoint.pt"))
    assert train_one_thread(pretrained) == 0
    err = capsys.readouterr().err
    assert f"class centres are of the sets of --data {rec},{folder} in another order (--data {folder},{rec}): " \
           "starting fresh ones" in err and "initialised the backbone from" in err
