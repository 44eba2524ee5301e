"""Training-data readers against files written here in the real formats: dmlc RecordIO
framing (multi-part and corrupted records), insightface's record layout, ImageFolder,
the pack_rec tool, the synthetic faces, and the resumable loader."""

import io
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HeldFile, load_benchmark, settle, spawn_ranks
from trainer_fixtures import REPO

from train.data import (
    Augmentation,
    ImageFolderDataset,
    ImageListDataset,
    RecordIODataset,
    RecordIOError,
    ResumableBatchSampler,
    SyntheticFaces,
    _epoch_seed,
    build_train_dataset,
    build_train_loader,
    check_every_rank_reads_the_same,
    stop_loader_workers,
)
from train.data import recordio
from train.data.imagefolder import scan_image_folder
from train.data.recordio import (
    MAGIC,
    IndexedRecordIO,
    RecordIOWriter,
    encode_frames,
    pack_payload,
    read_frames,
    read_index,
    unpack_payload,
)
from train.data.synthetic import render_face, synthetic_pairs, verification_identity_base
from train.data.transforms import decode_image, flip_decision, to_model_input
from train.tools.pack_rec import main as pack_rec_main
from train.tools.pack_rec import pack_image_folder

MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_HEADER_SIZE = 24


def frames_of(data: bytes) -> list[tuple[int, int]]:
    """(cflag, length) of every frame in a .rec byte string."""
    out, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC, f"no magic at byte {pos}"
        length = lrec & ((1 << 29) - 1)
        out.append((lrec >> 29, length))
        pos += 8 + (length + 3) // 4 * 4
    return out


def face_image(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    img[size // 4: size // 2, size // 4: 3 * size // 4] = rng.integers(0, 256, 3)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")
    return out.getvalue()


def jpeg_with_magic(img: np.ndarray) -> bytes:
    """A valid JPEG whose comment segment puts kMagic at record offsets 32 and 36
    (the record being the 24-byte IRHeader followed by this JPEG)."""
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=95)
    jpeg = out.getvalue()
    # SOI (2 bytes), then COM marker + 2-byte length: its data starts at record offset 24 + 6 = 30.
    comment = b"\0\0" + MAGIC_BYTES + MAGIC_BYTES + b"tail"
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return jpeg[:2] + segment + jpeg[2:]


# ---------------------------------------------------------------------------------------------
# dmlc framing


def test_plain_record_frame_is_magic_length_data_padding():
    assert encode_frames(b"hello") == MAGIC_BYTES + struct.pack("<I", 5) + b"hello\0\0\0"
    assert encode_frames(b"") == MAGIC_BYTES + struct.pack("<I", 0)


def test_magic_at_aligned_offset_splits_the_record_like_dmlc():
    # dmlc WriteRecord: a cut at 0 gives an empty first part; the magic word is dropped.
    assert encode_frames(MAGIC_BYTES + b"xyz") == (
        MAGIC_BYTES + struct.pack("<I", (1 << 29) | 0) + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 3) + b"xyz\0"
    )
    payload = b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"efgh" + MAGIC_BYTES
    assert frames_of(encode_frames(payload)) == [(1, 4), (2, 0), (2, 4), (3, 0)]


def test_magic_at_unaligned_offset_is_not_split():
    payload = b"ab" + MAGIC_BYTES + b"cd"
    assert frames_of(encode_frames(payload)) == [(0, 8)]


@pytest.mark.parametrize("payload", [
    b"",
    b"x",
    MAGIC_BYTES,
    MAGIC_BYTES * 3,
    b"abcd" + MAGIC_BYTES + b"ef",
    b"abcdefgh" + MAGIC_BYTES,
    b"a" + MAGIC_BYTES + b"b" + MAGIC_BYTES + b"cc" + MAGIC_BYTES + b"d",
    bytes(range(256)) * 3 + MAGIC_BYTES + b"\x01\x02\x03",
])
def test_frames_round_trip(tmp_path, payload):
    path = tmp_path / "one.rec"
    path.write_bytes(b"JUNK" + encode_frames(payload) + encode_frames(b"next"))
    with open(path, "rb") as f:
        assert read_frames(f, 4, where="test") == payload


def test_ir_header_pack_unpack():
    header, body = unpack_payload(pack_payload(7.0, b"img", id=3))
    assert (header.flag, header.label, header.id, header.id2, body) == (0, 7.0, 3, 0, b"img")
    header, body = unpack_payload(pack_payload([11, 15], b""))
    assert header.flag == 2 and header.label.tolist() == [11.0, 15.0] and body == b""
    # The layout is mxnet's 'IfQQ', little-endian.
    raw = pack_payload(2.0, b"")
    assert raw == struct.pack("<IfQQ", 0, 2.0, 0, 0)


# ---------------------------------------------------------------------------------------------
# RecordIO datasets


def write_rec(folder, images_labels, *, identity_header=True, corrupt=None):
    """An insightface-layout train.rec/.idx in `folder`; returns the .idx offsets."""
    folder.mkdir(exist_ok=True)
    n = len(images_labels)
    num_ids = len({label for _, label in images_labels})
    with RecordIOWriter(str(folder / "train.rec"), str(folder / "train.idx")) as w:
        if identity_header:
            w.write(0, pack_payload([n + 1, n + 1 + num_ids], b""))
        for key, (data, label) in enumerate(images_labels, 1 if identity_header else 0):
            w.write(key, pack_payload(float(label), data, id=key))
        if identity_header:
            for label in range(num_ids):
                keys = [k for k, (_, lab) in enumerate(images_labels, 1) if lab == label]
                w.write(n + 1 + label, pack_payload([keys[0], keys[-1] + 1], b""))
    return {int(k): int(o)
            for k, o in (line.split("\t") for line in (folder / "train.idx").read_text().split("\n") if line)}


@pytest.fixture
def rec_images():
    images = [face_image(i) for i in range(5)]
    labels = [0, 0, 1, 1, 2]
    encoded = [png_bytes(img) for img in images]
    encoded[3] = jpeg_with_magic(images[3])  # record 4 is multi-part
    return images, labels, encoded


def test_recordio_dataset_reads_insightface_layout(tmp_path, rec_images):
    images, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    frames = frames_of((tmp_path / "rec" / "train.rec").read_bytes())
    assert any(flag == 1 for flag, _ in frames), "the fixture must contain a multi-part record"

    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32, flip=False)
    assert ds.identity_range == (6, 9)
    assert ds.num_classes == 3 and len(ds) == 5
    assert ds.image_keys.tolist() == [1, 2, 3, 4, 5]
    for i in range(5):
        image, label = ds.load(i)
        assert label == labels[i]
        if i == 3:  # JPEG: lossy, but it must be the same picture
            assert np.abs(image.astype(int) - images[i]).mean() < 3
        else:
            np.testing.assert_array_equal(image, images[i])
    x, label = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and label == 0
    assert torch.equal(x, torch.from_numpy(images[0]).permute(2, 0, 1))


def test_recordio_without_identity_header_uses_every_key(tmp_path, rec_images):
    _, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)), identity_header=False)
    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    assert ds.identity_range is None
    assert ds.image_keys.tolist() == [0, 1, 2, 3, 4]
    assert ds.num_classes == 3  # from the largest label
    assert [ds.load(i)[1] for i in range(5)] == labels


def test_recordio_property_file_gives_num_classes(tmp_path, rec_images):
    _, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    (tmp_path / "rec" / "property").write_text("10,32,32\n")
    dataset = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    assert dataset.num_classes == 10 and dataset.stored_size == (32, 32)
    (tmp_path / "rec" / "property").write_text("10\n")  # the size is optional
    dataset = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    assert dataset.num_classes == 10 and dataset.stored_size is None


def test_recordio_without_a_property_file_counts_its_classes_with_a_note_when_large(tmp_path, rec_images, capsys,
                                                                                    monkeypatch):
    from train.data import recordio

    _, labels, encoded = rec_images
    for folder in ("small", "large"):
        write_rec(tmp_path / folder, list(zip(encoded, labels)), identity_header=False)
    assert RecordIODataset(str(tmp_path / "small"), image_size=32).num_classes == max(labels) + 1
    assert "note:" not in capsys.readouterr().err
    monkeypatch.setattr(recordio, "SCAN_NOTE_RECORDS", len(labels) - 1)  # a set past the note's size
    assert RecordIODataset(str(tmp_path / "large"), image_size=32).num_classes == max(labels) + 1
    assert f"has no property file: reading the label of every one of its {len(labels)} records" in \
        capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # under torchrun, the first process alone says it
    assert RecordIODataset(str(tmp_path / "large"), image_size=32).num_classes == max(labels) + 1
    assert "note:" not in capsys.readouterr().err


def test_recordio_label_array_per_image(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    with RecordIOWriter(str(folder / "train.rec"), str(folder / "train.idx")) as w:
        w.write(0, pack_payload([3, 5], b""))
        w.write(1, pack_payload([0, 5.0], png_bytes(face_image(1))))
        w.write(2, pack_payload([1, 7.0], png_bytes(face_image(2))))
    ds = RecordIODataset(str(folder), image_size=32)
    assert [ds.load(i)[1] for i in range(2)] == [0, 1]


def corrupt_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic_names_record_offset_and_file(tmp_path, rec_images):
    _, labels, encoded = rec_images
    offsets = write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    rec = tmp_path / "rec" / "train.rec"
    corrupt_at(rec, offsets[2], b"\xde\xad\xbe\xef")
    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    with pytest.raises(RecordIOError, match=rf"train\.rec: record 2 \(offset {offsets[2]}\).*bad magic 0xefbeadde"):
        ds[1]
    assert isinstance(RecordIOError("x"), ValueError)
    # Other records are unaffected.
    assert ds.load(0)[1] == 0 and ds.load(2)[1] == 1


def test_undecodable_image_names_record(tmp_path, rec_images):
    _, labels, encoded = rec_images
    encoded = list(encoded)
    encoded[1] = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    with pytest.raises(RecordIOError, match=r"record 2 .*: cannot read the image: .* \(\d+ bytes\)$"):
        ds[1]


def test_truncated_file_and_bad_continuation(tmp_path, rec_images):
    _, labels, encoded = rec_images
    offsets = write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    rec = tmp_path / "rec" / "train.rec"
    data = rec.read_bytes()
    # The multi-part record 4: make its second frame claim to start a new record.
    second = offsets[4] + 8 + frames_of(data[offsets[4]:])[0][1]
    corrupt_at(rec, second + 4, struct.pack("<I", (1 << 29) | 0))
    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    with pytest.raises(RecordIOError, match=r"record 4 .*continuation flag 1"):
        ds[3]
    # Cut the file inside record 5.
    rec.write_bytes(data[: offsets[5] + 20])
    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32)
    with pytest.raises(RecordIOError, match=r"record 5 .*truncated"):
        ds[4]
    rec.write_bytes(data[: offsets[5] + 5])
    with pytest.raises(RecordIOError, match=r"record 5 .*truncated"):
        ds[4]


def test_bad_index_and_missing_records(tmp_path, rec_images):
    _, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    idx = tmp_path / "rec" / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:2] + ["3\tnot-a-number"] + lines[3:]) + "\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: line 3"):
        RecordIODataset(str(tmp_path / "rec"))
    idx.write_text("\n".join(lines[:5]) + "\n")  # keys 0..4, record 0 says images are 1..5
    with pytest.raises(RecordIOError, match="no key 5"):
        RecordIODataset(str(tmp_path / "rec"))


@pytest.mark.parametrize("text, expected", [
    (b"0\t0\n7\t123456789012\n-1\t5\n", ([0, 7, -1], [0, 123456789012, 5])),  # mxnet's form: numpy's parse
    (b"1\t2\n\n 3 4\r\n5\t6", ([1, 3, 5], [2, 4, 6])),  # blank lines, spaces, CRLF, no last newline
    (b"", ([], [])),
    (b"1\t2\t3\n4\n", "line 1"),  # two numbers in all, but not two a line
    (b"1\t2\n3\tx\n", "line 2"), (b"1\t2.5\n", "line 1"), (b"\t5\n7\t8\n", "line 1"),
    (b"1\t99999999999999999999\n", "line 1"), (b"2\t-\n", "line 1"),  # past int64; a sign alone
    (b"\t5\n7\x0b8\t9\n", "line 1"),  # a vertical tab, whitespace to numpy, hiding an empty key
])
def test_read_index(tmp_path, text, expected):
    path = tmp_path / "train.idx"
    path.write_bytes(text)
    if isinstance(expected, str):
        with pytest.raises(RecordIOError, match=f"train.idx: {expected}: expected 'key<TAB>offset'"):
            read_index(str(path))
        return
    keys, offsets = read_index(str(path))
    assert keys.dtype == offsets.dtype == np.int64 and (keys.tolist(), offsets.tolist()) == expected


@pytest.mark.slow
def test_read_index_fast_path_never_reads_otherwise_than_line_by_line(tmp_path):
    rng = np.random.default_rng(1)
    alphabet = list(b"0123456789\t\n") * 3 + list(b" -+_\x0b\x0c\r.x")
    path = tmp_path / "fuzz.idx"
    fast_taken = 0
    for _ in range(3000):
        data = bytes(rng.choice(alphabet, size=int(rng.integers(1, 40))).tolist())
        if rng.random() < 0.5:  # mostly well-formed lines, with the odd long number
            def number():
                return bytes(rng.choice(list(b"0123456789"), size=int(rng.integers(1, 21))).tolist())
            data = b"".join(number() + b"\t" + number() + b"\n" for _ in range(int(rng.integers(1, 4))))
        path.write_bytes(data)
        try:
            slow = recordio._read_index_by_line(str(path))
        except RecordIOError:
            slow = None
        fast = recordio._parse_mxnet_index(data)
        if fast is not None:
            fast_taken += 1
            assert slow is not None and all(np.array_equal(a, b) for a, b in zip(fast, slow)), data
    assert fast_taken > 500


def test_read_index_of_many_records_is_the_line_by_line_parse(tmp_path):
    rng = np.random.default_rng(0)
    keys, offsets = rng.permutation(200_000), np.cumsum(rng.integers(1, 10_000, 200_000))
    path = tmp_path / "train.idx"
    path.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist())))
    fast, slow = read_index(str(path)), recordio._read_index_by_line(str(path))
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow)) and np.array_equal(fast[0], keys)


def test_recordio_dataset_pickles_without_its_file(tmp_path, rec_images):
    _, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    ds = RecordIODataset(str(tmp_path / "rec"), image_size=32, flip=False)
    first = ds[0][0]
    assert ds.records._file is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.records._file is None
    assert torch.equal(clone[0][0], first)


def test_indexed_recordio_missing_key(tmp_path, rec_images):
    _, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    records = IndexedRecordIO(str(tmp_path / "rec" / "train.rec"), str(tmp_path / "rec" / "train.idx"))
    assert 3 in records and 42 not in records
    with pytest.raises(RecordIOError, match="no record with key 42"):
        records.read(42)


# ---------------------------------------------------------------------------------------------
# ImageFolder and pack_rec


@pytest.fixture
def image_folder(tmp_path):
    """bob: 2 PNG, alice: JPEG (magic in it) + BMP at 40 px, carol: empty, dave: an image in a sub-folder
    only, plus a stray file."""
    root = tmp_path / "faces"
    for name in ("bob", "alice", "carol"):
        (root / name).mkdir(parents=True)
    Image.fromarray(face_image(1)).save(root / "bob" / "b1.png")
    Image.fromarray(face_image(2)).save(root / "bob" / "a0.PNG")
    (root / "alice" / "x.jpg").write_bytes(jpeg_with_magic(face_image(3)))
    Image.fromarray(face_image(4, 40)).save(root / "alice" / "y.bmp")
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(b"")
    (root / "dave" / "session1").mkdir(parents=True)  # nested: not searched
    Image.fromarray(face_image(5)).save(root / "dave" / "session1" / "z.png")
    return root


def test_image_folder_paths_are_two_arrays_the_workers_share(image_folder):
    """42M path strings would be copied into every DataLoader worker as it reads them (their reference
    counts are written); the paths live in numpy arrays instead, and read back as the scan listed
    them. The fingerprint's bytes are those of the list they replace (checkpoints keep theirs)."""
    with pytest.warns(UserWarning):
        ds = ImageFolderDataset(str(image_folder), image_size=32)
        identities, samples = scan_image_folder(str(image_folder))
    listed = [path for path, _ in samples]
    assert list(ds.paths) == listed and ds.paths[-1] == listed[-1] and ds.paths[1:3] == listed[1:3]
    assert {type(v) for v in vars(ds.paths).values()} == {str, np.ndarray}
    prefix = len(os.path.join(str(image_folder), ""))
    assert ds._index_parts()[0] == "\n".join(p[prefix:] for p in listed).encode("utf-8", "surrogateescape")
    assert ds.paths.name(-1) == listed[-1][prefix:] and ds.paths[np.int64(0)] == listed[0]
    with pytest.raises(IndexError, match=f"image -{len(listed) + 1} out of range for {len(listed)} images"):
        ds.paths[-len(listed) - 1]
    for index in (1.5, "1"):
        with pytest.raises(TypeError):
            ds.paths[index]
    clone = pickle.loads(pickle.dumps(ds))  # as a spawned worker receives it
    assert list(clone.paths) == listed and clone.fingerprint() == ds.fingerprint()


def test_image_folder_labels_sorted_and_resized(image_folder):
    (image_folder / "bob" / "older").mkdir()
    Image.fromarray(face_image(5)).save(image_folder / "bob" / "older" / "c.png")
    (image_folder / "alice" / ".ipynb_checkpoints").mkdir()  # no images: nothing left out, nothing said
    with pytest.warns(UserWarning) as said:
        ds = ImageFolderDataset(str(image_folder), image_size=32, flip=False)
    # What the layout leaves out is said, not dropped silently.
    assert [str(w.message).split(": ", 1)[1] for w in said] == [
        "1 image(s) directly in it, outside any identity folder, are left out",
        "1 folder(s) hold images only in sub-folders, which are not searched, and are left out (dave)",
        "1 identity folder(s) also hold sub-folders, which are not searched: their images are left out (bob)"]
    assert ds.identities == ["alice", "bob"]  # carol holds no image, dave none directly
    assert ds.num_classes == 2
    assert [os.path.basename(p) for p in ds.paths] == ["x.jpg", "y.bmp", "a0.PNG", "b1.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    image, label = ds.load(1)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 0
    np.testing.assert_array_equal(ds.load(2)[0], face_image(2))
    x, label = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and label == 1
    assert torch.equal(x, torch.from_numpy(ds.load(3)[0]).permute(2, 0, 1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="'.*a_file' is a file, not a folder"):  # (not "does not exist")
        ImageFolderDataset(str(tmp_path / "a_file"))
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="no identity sub-folder"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "broken" / "someone").mkdir(parents=True)
    (tmp_path / "broken" / "someone" / "a.jpg").write_bytes(b"\xff\xd8garbage")
    ds = ImageFolderDataset(str(tmp_path / "broken"))
    with pytest.raises(ValueError,
                       match=r"a\.jpg: cannot read the image: not an image format Pillow reads \(9 bytes\)$"):
        ds[0]


def test_pack_rec_round_trip(image_folder, tmp_path):
    out = tmp_path / "packed"
    summary = pack_image_folder(str(image_folder), str(out), log=None)
    assert summary["images"] == 4 and summary["identities"] == 2
    assert (out / "property").read_text().strip() == "2,32,32"

    data = (out / "train.rec").read_bytes()
    assert any(flag == 1 for flag, _ in frames_of(data)), "the JPEG with the magic must be split"
    # The pass-through JPEG comes back byte for byte.
    records = IndexedRecordIO(str(out / "train.rec"), str(out / "train.idx"))
    assert unpack_payload(records.read(1))[1] == (image_folder / "alice" / "x.jpg").read_bytes()
    # Identity records hold each identity's image range.
    header0, _ = unpack_payload(records.read(0))
    assert header0.label.tolist() == [5, 7]
    assert unpack_payload(records.read(5))[0].label.tolist() == [1, 3]
    assert unpack_payload(records.read(6))[0].label.tolist() == [3, 5]

    packed = RecordIODataset(str(out), image_size=32, flip=False)
    folder = ImageFolderDataset(str(image_folder), image_size=32, flip=False)
    assert packed.num_classes == folder.num_classes == 2 and len(packed) == len(folder) == 4
    for i in range(4):
        a, la = packed.load(i)
        b, lb = folder.load(i)
        assert la == lb
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 8  # PNG/BMP are re-encoded as JPEG


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_pack_rec_command_line(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "cli"
    argv = ["pack_rec", str(image_folder), str(out), "--resize", "24", "--quality", "90"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # what `python -m train.tools.pack_rec ...` runs
        runpy.run_module("train.tools.pack_rec", run_name="__main__")
    assert exit_info.value.code == 0
    assert (out / "property").read_text().strip() == "2,24,24"
    ds, num_classes = build_train_dataset(str(out), image_size=24)
    assert isinstance(ds, RecordIODataset) and num_classes == 2 and len(ds) == 4
    assert pack_rec_main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


def test_pack_rec_keeps_existing_files_unless_told(image_folder, tmp_path, capsys):
    out = tmp_path / "packed"
    out.mkdir()
    (out / "property").write_text("85742,112,112\n")  # another data set's
    assert pack_rec_main([str(image_folder), str(out)]) == 2
    assert f"{out / 'property'} exists: pass --overwrite to replace it" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["property"] and (out / "property").read_text() == "85742,112,112\n"
    assert pack_rec_main([str(image_folder), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.rec"]
    assert (out / "property").read_text() == "2,32,32\n"


def test_pack_rec_full_disk_as_the_property_is_written_leaves_the_pack_of_before(image_folder, tmp_path, capsys,
                                                                                 monkeypatch):
    # train.rec and train.idx were renamed into place before the property was written: a full disk there left the
    # new pack beside the property (identities, image size) of the one before.
    out = tmp_path / "packed"
    assert pack_rec_main([str(image_folder), str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    from train import checkpoint

    fdopen = os.fdopen

    def full_disk_at_the_property(fd, mode="r", *args, **kwargs):  # (the one text file of the run: the property)
        if mode == "w":
            os.close(fd)
            raise OSError(28, "No space left on device")
        return fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "fdopen", full_disk_at_the_property)
    assert pack_rec_main([str(image_folder), str(out), "--overwrite", "--resize", "24"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # (no temporary left either)


def test_pack_rec_failure_leaves_no_temporary_files(image_folder, tmp_path, capsys):
    (image_folder / "bob" / "c2.png").write_bytes(b"\x89PNG cut short")
    out = tmp_path / "packed"
    assert pack_rec_main([str(image_folder), str(out)]) == 2
    assert "c2.png: cannot read the image: " in capsys.readouterr().err
    assert not out.exists()  # nor the folder it made
    out.mkdir()  # one the user made stays
    assert pack_rec_main([str(image_folder), str(out)]) == 2
    assert os.listdir(out) == []
    # nor the folders it made above it (n1/n2 of a new n1/n2/packed were left)
    assert pack_rec_main([str(image_folder), str(tmp_path / "n1" / "n2" / "packed")]) == 2
    assert not (tmp_path / "n1").exists()


def test_pack_rec_workers_write_the_bytes_this_process_writes(image_folder, tmp_path, capsys, monkeypatch):
    # One process decoded, checked and re-encoded every image: days at WebFace42M's 42M. --workers N does that
    # in N processes while this one writes the records in their order; chunks of 3 images (32 in use) make
    # 12 images span workers, chunks finished out of order and a window refilled many times.
    monkeypatch.setattr("train.tools.pack_rec._CHUNK", 3)
    for k in range(8):
        Image.fromarray(face_image(10 + k)).save(image_folder / "alice" / f"p{k}.png")
        (image_folder / "bob" / f"j{k}.jpg").write_bytes(jpeg_with_magic(face_image(20 + k)))
    packs = {}
    for workers in ("0", "1", "2", "3"):
        out = tmp_path / f"workers{workers}"
        assert pack_rec_main([str(image_folder), str(out), "--resize", "32", "--workers", workers]) == 0
        packs[workers] = ({name: (out / name).read_bytes() for name in ("train.rec", "train.idx", "property")},
                          [line for line in capsys.readouterr().err.replace(str(out), "OUT").splitlines()
                           if line.startswith("pack_rec")])  # (the folder's warnings are said once a process)
    assert len(packs["0"][1]) == 2 and "11 of the 20 images were re-encoded" in packs["0"][1][1]
    for workers in ("1", "2", "3"):
        assert packs[workers][0] == packs["0"][0], f"--workers {workers}: not the bytes of --workers 0"
        assert packs[workers][1] == packs["0"][1], f"--workers {workers} said otherwise"
    with pytest.raises(SystemExit) as exit_info:
        pack_rec_main([str(image_folder), str(tmp_path / "packed"), "--workers", "-1"])
    assert exit_info.value.code == 2 and "--workers must be at least 0, got -1" in capsys.readouterr().err


def test_pack_rec_workers_name_the_first_unreadable_image_and_leave_nothing(image_folder, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr("train.tools.pack_rec._CHUNK", 2)
    for k in range(10):
        Image.fromarray(face_image(10 + k)).save(image_folder / "bob" / f"c{k}.png")
    (image_folder / "bob" / "c3.png").write_bytes(b"\x89PNG cut short")  # 2 chunks after the first, in a worker
    (image_folder / "bob" / "c8.png").write_bytes(b"\x89PNG cut short too")  # (a later one: not the one named)
    errors = []
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}"
        assert pack_rec_main([str(image_folder), str(out), "--workers", workers]) == 2
        errors.append(capsys.readouterr().err.replace(str(out), "OUT").splitlines())
        assert not out.exists()  # nor the folder it made
    assert errors[1][-1] == errors[0][-1] == (f"pack_rec: error: {image_folder / 'bob' / 'c3.png'}: cannot read the "
                                              "image: not an image format Pillow reads")


def test_pack_rec_workers_say_the_images_warnings_as_this_process_does(tmp_path, monkeypatch):
    # Pillow's warning of a palette image with transparency given in bytes: said once by this process, but once by
    # each worker (their own registries), and by workers reading ahead of an unreadable image that ends the run.
    monkeypatch.setattr("train.tools.pack_rec._CHUNK", 2)
    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 0, 255, 0, 0] * 128)
    for k in range(12):
        if k in (1, 4, 8, 10):
            palette.save(faces / "ann" / f"{k:02d}.png", transparency=b"\x00\x80")
        else:
            Image.fromarray(face_image(k)).save(faces / "ann" / f"{k:02d}.png")
    said = {}
    for unreadable in (False, True):
        if unreadable:  # (after the first palette image, before the others)
            (faces / "ann" / "06.png").write_bytes(b"\x89PNG cut short")
        for workers in ("0", "2"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                out = tmp_path / f"packed{workers}{unreadable}"
                status = pack_rec_main([str(faces), str(out), "--workers", workers])
            assert status == (2 if unreadable else 0)
            said[workers, unreadable] = [(str(w.message), w.category, w.filename, w.lineno) for w in caught]
    assert len(said["0", False]) == 1 and "Palette images with Transparency" in said["0", False][0][0]
    assert said["2", False] == said["0", False]
    assert said["2", True] == said["0", True] == said["0", False]


def test_pack_rec_workers_hold_at_most_their_budget_of_bytes(tmp_path, monkeypatch):
    # The images in flight (submitted to the workers, not yet written) were bounded in number only: 2 chunks of 32
    # a worker, 544 at 8 workers, 1.6-2.7 GB of photos of a few MB packed as they are (no --resize). Their bytes are
    # bounded now, and an image over the whole budget still goes, alone. (JPEGs kept as they are: the bytes the
    # workers send back are the files' bytes, which the bound counts until then.)
    from concurrent.futures import ProcessPoolExecutor

    from train.tools import pack_rec

    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    small = jpeg_with_magic(face_image(1))
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)).save(out, "JPEG", quality=95)
    budget = 8 * len(small)
    assert len(out.getvalue()) > budget
    paths = []
    for k in range(30):
        paths.append(str(faces / "ann" / f"{k:02d}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(out.getvalue() if k == 13 else small)
    size = {path: os.path.getsize(path) for path in paths}
    monkeypatch.setattr(pack_rec, "_BYTES_IN_FLIGHT", budget, raising=False)  # (chunks of 2 images at 2 workers)
    monkeypatch.setattr(pack_rec, "_CHUNK", 2)
    submitted, written, held = [], [0], []  # held: at each submission, the bytes of the chunks not yet written

    def submit(self, function, chunk, *args):
        submitted.append(chunk)
        images_before = 0
        in_flight = 0
        for each in submitted:
            images_before += len(each)
            in_flight += sum(size[path] for path in each) if images_before > written[0] else 0
        held.append((chunk, in_flight))
        return pool_submit(self, function, chunk, *args)

    pool_submit = ProcessPoolExecutor.submit
    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit)
    images = []
    for image in pack_rec._images_bytes(paths, resize=None, quality=95, workers=2):
        images.append(image)
        written[0] += 1  # (the writer has it when it asks for the next)
    assert images == list(pack_rec._images_bytes(paths, resize=None, quality=95, workers=0))
    over = [(chunk, in_flight) for chunk, in_flight in held if in_flight > budget]
    assert over == [([paths[13]], size[paths[13]])], f"over the budget of {budget} bytes: " + \
        ", ".join(f"{' '.join(os.path.basename(path) for path in chunk)}: {in_flight}" for chunk, in_flight in over)
    assert max(in_flight for chunk, in_flight in held if chunk != [paths[13]]) > 2 * len(small), \
        "one chunk at a time: the workers wait"


def test_pack_rec_workers_take_the_files_sizes_a_few_at_a_time(tmp_path, monkeypatch):
    # The budget's sizes were taken one stat at a time by this process: at a network file system's 0.1-1 ms a stat
    # (NFS, Lustre) that set the pace of the whole pack, where the workers read N images at a time. N threads take
    # them now, after the first chunk's, which this process takes before the workers are forked (at the first
    # submission, which must find no other thread running).
    import threading
    from concurrent.futures import ProcessPoolExecutor

    from train.tools import pack_rec

    (tmp_path / "ann").mkdir()
    paths = []
    for k in range(24):
        paths.append(str(tmp_path / "ann" / f"{k:02d}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(jpeg_with_magic(face_image(k)))
    monkeypatch.setattr(pack_rec, "_CHUNK", 2)
    getsize, lock, running, most = os.path.getsize, threading.Lock(), [0], [0]

    def slow_getsize(path):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return getsize(path)

    threads_at_submission, threads_before = [], threading.active_count()

    def submit(self, *args):
        threads_at_submission.append(threading.active_count())
        return pool_submit(self, *args)

    pool_submit = ProcessPoolExecutor.submit
    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit)
    monkeypatch.setattr(os.path, "getsize", slow_getsize)
    images = list(pack_rec._images_bytes(paths, resize=None, quality=95, workers=3))
    assert images == list(pack_rec._images_bytes(paths, resize=None, quality=95, workers=0))
    assert most[0] > 1, "the files' sizes were taken one at a time"
    assert threads_at_submission[0] == threads_before, "threads running when the workers were forked"


def test_the_tools_show_the_image_folders_warnings_as_one_line_each(image_folder, tmp_path, capsys):
    # Python's form, "/.../train/data/__init__.py:149: UserWarning: ..." and the line of source after it,
    # came out of the trainer, pack_rec and make_bin.
    assert pack_rec_main([str(image_folder), str(tmp_path / "packed")]) == 0
    err = capsys.readouterr().err
    assert f"warning: image folder {str(image_folder)!r}: 1 image(s) directly in it, outside any identity folder, " \
           "are left out\n" in err
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err


def test_pack_rec_says_what_it_changed_and_what_is_not_aligned(image_folder, tmp_path, capsys):
    # Unaligned photos of mixed sizes were packed without a word, the property file giving the first's
    # size (a trial's 321x315, wrong for 119 of 120 images); PNG crops were re-encoded as JPEG silently.
    assert pack_rec_main([str(image_folder), str(tmp_path / "mixed")]) == 0
    err = capsys.readouterr().err
    assert "note: 3 of the 4 images were re-encoded as JPEG (quality 95)" in err  # the JPEG is stored as it is
    assert "note: the images are not all 32x32 (width x height), the size the property file gives: 40x40 too" in err
    assert (tmp_path / "mixed" / "property").read_text() == "2,32,32\n"
    assert pack_rec_main([str(image_folder), str(tmp_path / "resized"), "--resize", "32"]) == 0
    err = capsys.readouterr().err
    assert "not all" not in err and "note: 3 of the 4 images were re-encoded as JPEG (quality 95; resized to 32x32 " \
                                    "where they were not)" in err
    wide = tmp_path / "wide"
    (wide / "ann").mkdir(parents=True)
    Image.fromarray(face_image(9)).resize((40, 30)).save(wide / "ann" / "1.png")
    assert pack_rec_main([str(wide), str(tmp_path / "wide_pack")]) == 0
    assert "note: the images are 40x30 (width x height), not square as aligned faces are" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_pack_rec_with_one_line_and_no_temporary_files(tmp_path):
    # SIGTERM ended it silently (status -15) and left train.rec.tmp / train.idx.tmp behind.
    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    Image.fromarray(face_image(1)).save(faces / "ann" / "0.png")
    for k in range(1, 4000):
        if k != 20:
            os.link(faces / "ann" / "0.png", faces / "ann" / f"{k}.png")
    # Image 20 (in name order, after 0, 1, 10, 100, ...) is held back until the signal has gone: the
    # signal goes as the packing reads it (train.rec.tmp open), and the run cannot end before it. (A
    # wait for train.rec.tmp alone let a loaded machine finish the run before the signal: exit 0.)
    held = HeldFile(faces / "ann" / "20.png", (faces / "ann" / "0.png").read_bytes())
    out = tmp_path / "packed"
    run = subprocess.Popen([sys.executable, "-m", "train.tools.pack_rec", str(faces), str(out)], cwd=REPO,
                           stderr=subprocess.PIPE, text=True)
    try:
        with held:
            held.wait_for_reader(run)
            run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 143 and err.strip() == "pack_rec: stopped by SIGTERM: nothing written (what the folder " \
                                                     "held is as it was)", err
    assert not out.exists()


def test_pack_rec_says_in_one_line_that_a_worker_was_killed(image_folder, tmp_path, capsys, monkeypatch):
    # (The kernel's out-of-memory killer: a multiprocessing.Pool would wait for the lost chunk forever.)
    import multiprocessing

    from train.tools import pack_rec

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the workers see the patched reader only when forked")
    image_bytes = pack_rec._image_bytes

    def killed_on_y(path, **kwargs):
        if path.endswith("y.bmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return image_bytes(path, **kwargs)

    monkeypatch.setattr(pack_rec, "_image_bytes", killed_on_y)
    out = tmp_path / "packed"
    assert pack_rec_main([str(image_folder), str(out), "--workers", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "pack_rec: error: a process reading the images ended without a word (out of memory?): ")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_of_pack_rec_and_its_workers_says_one_line_and_leaves_nothing(tmp_path, number):
    # A Ctrl-C at the terminal, or a scheduler's SIGTERM, goes to the whole process group: the workers too.
    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    Image.fromarray(face_image(1)).save(faces / "ann" / "0.png")
    for k in range(1, 4000):
        if k != 20:
            os.link(faces / "ann" / "0.png", faces / "ann" / f"{k}.png")
    held = HeldFile(faces / "ann" / "20.png", (faces / "ann" / "0.png").read_bytes())  # (read by a worker)
    out = tmp_path / "packed"
    run = subprocess.Popen([sys.executable, "-m", "train.tools.pack_rec", str(faces), str(out), "--workers", "2"],
                           cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        with held:
            held.wait_for_reader(run)
            os.killpg(run.pid, number)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    name = signal.Signals(number).name
    assert run.returncode == 128 + number, err
    assert err.strip() == f"pack_rec: stopped by {name}: nothing written (what the folder held is as it was)", err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="finds the workers in /proc")
def test_pack_rec_workers_end_with_a_killed_main_process(tmp_path):
    # SIGKILL (the out-of-memory killer's) ran no clean-up: the workers waited for work forever.
    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    Image.fromarray(face_image(1)).save(faces / "ann" / "0.png")
    for k in range(1, 199):
        os.link(faces / "ann" / "0.png", faces / "ann" / f"{k}.png")
    held = HeldFile(faces / "ann" / "199.png", (faces / "ann" / "0.png").read_bytes())
    run = subprocess.Popen([sys.executable, "-m", "train.tools.pack_rec", str(faces), str(tmp_path / "packed"),
                            "--workers", "2"], cwd=REPO, stderr=subprocess.DEVNULL)
    workers = []  # (id, start time): an id the system gives again is not taken for a worker
    try:
        with held:
            held.wait_for_reader(run)
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if (process_stat(pid) or {}).get("parent") == run.pid:
                    workers.append((int(pid), process_stat(pid)["start"]))
            run.kill()
            run.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(worker_alive(worker) for worker in workers):
            time.sleep(0.1)
        assert len(workers) == 2 and not [worker for worker in workers if worker_alive(worker)], workers
    finally:
        run.kill()
        for worker in workers:  # (this run's own workers, left by a failure)
            if worker_alive(worker):
                os.kill(worker[0], signal.SIGKILL)


def process_stat(pid):
    """A process's parent's id and start time (from /proc); None once it has ended (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else {"parent": int(fields[1]), "start": int(fields[19])}


def worker_alive(worker) -> bool:
    pid, start = worker
    return (process_stat(pid) or {}).get("start") == start


# A spawned worker (macOS's start method) imports the tool, torch with it, for seconds before its initializer
# runs; this sitecustomize.py holds it there, at its import of numpy, until the test releases the file read.
_HOLD_SPAWNED_WORKERS = '''
import os
if os.environ.get("HELD_WORKER_IMPORT"):  # a worker: its parent set it
    import sys

    class Hold:
        held = False

        def find_spec(self, name, path=None, target=None):
            if name == "numpy" and not self.held:
                self.held = True
                with open(os.environ["HELD_WORKER_IMPORT"], "rb") as f:
                    f.read()

    sys.meta_path.insert(0, Hold())
else:
    import multiprocessing
    multiprocessing.set_start_method("spawn")
    os.environ["HELD_WORKER_IMPORT"] = os.environ.pop("HOLD_WORKER_IMPORT")
'''


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="finds the worker in /proc")
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_pack_rec_stopped_while_a_spawned_worker_imports(tmp_path, number):
    # SIGINT (a Ctrl-C at the terminal, to the whole group): the worker's KeyboardInterrupt traceback came under
    # the one line. SIGKILL of the main process (the out-of-memory killer's): the worker, reparented before its
    # initializer ran, watched its new parent and waited for work forever.
    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(face_image(k)).save(faces / "ann" / f"{k}.png")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_HOLD_SPAWNED_WORKERS)
    held = HeldFile(tmp_path / "held", b"x")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), REPO]),
               HOLD_WORKER_IMPORT=str(tmp_path / "held"))
    out = tmp_path / "packed"
    run = subprocess.Popen([sys.executable, "-m", "train.tools.pack_rec", str(faces), str(out), "--workers", "1"],
                           cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = []
    try:
        with held:
            held.wait_for_reader(run)
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if (process_stat(pid) or {}).get("parent") == run.pid:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"spawn_main" in f.read():  # (not the resource tracker)
                            workers.append((int(pid), process_stat(pid)["start"]))
            assert len(workers) == 1, workers
            if number == signal.SIGINT:
                os.killpg(run.pid, number)
            else:
                run.kill()
                run.wait(timeout=60)
        if number == signal.SIGINT:
            _, err = run.communicate(timeout=60)
            assert run.returncode == 128 + number, err
            assert err.strip() == "pack_rec: stopped by SIGINT: nothing written (what the folder held is as it was)"
            assert not out.exists()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and worker_alive(workers[0]):
            time.sleep(0.1)
        assert not worker_alive(workers[0])
    finally:
        run.kill()
        for worker in workers:
            if worker_alive(worker):
                os.kill(worker[0], signal.SIGKILL)


def test_pack_rec_names_a_bad_resize(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pack_rec_main([str(image_folder), str(tmp_path / "packed"), "--resize", "0"])
    assert exit_info.value.code == 2 and "--resize must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # (was passed to Pillow as it was)
        pack_rec_main([str(image_folder), str(tmp_path / "packed"), "--quality", "500"])
    assert exit_info.value.code == 2 and "--quality must be 1 to 100, got 500" in capsys.readouterr().err


def test_pack_rec_names_an_output_folder_it_cannot_make(image_folder, tmp_path, capsys):
    # (was "pack_rec: error: [Errno 20] Not a directory: '<folder>'"; check_outputs, which every tool's
    # outputs pass, says what the folder is for)
    (tmp_path / "afile").write_text("mine")
    assert pack_rec_main([str(image_folder), str(tmp_path / "afile" / "packed")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"pack_rec: error: cannot make the folder "
                                                        f"{tmp_path / 'afile' / 'packed'} to write train.rec in: "
                                                        f"{tmp_path / 'afile'} is a file")


@pytest.mark.parametrize("end", ["refused", "status 2", "stopped", "status 0", "status 1"])
def test_a_tool_that_fails_or_stops_removes_the_folders_made_for_its_outputs(tmp_path, capsys, end):
    # What every tool under run_tool does (verify, embed, ijb, tinyface, roc, cluster, search, quality, make_bin,
    # pack_rec, preview, export): check_outputs made n1/n2 and n1/n3 for a new --output n1/n2/out.csv and its
    # --plot, and a refusal or a Ctrl-C after it left them. A folder that was there stays, and one written into
    # meanwhile (w1); a run that ends (0, or 1: done, with faces left out) keeps what it made.
    from train.signals import run_tool
    from train.tools import check_outputs

    (tmp_path / "there").mkdir()
    outputs = [tmp_path / "n1" / "n2" / "out.csv", tmp_path / "n1" / "n3" / "plot.png",
               tmp_path / "there" / "n4" / "x.csv", tmp_path / "w1" / "w2" / "y.csv"]

    def work() -> int:
        check_outputs(list(map(str, outputs)), False)
        (tmp_path / "w1" / "note").write_text("written meanwhile")
        if end == "refused":
            raise ValueError("refused after its outputs were checked")
        if end == "stopped":
            signal.raise_signal(signal.SIGINT)
        return int(end[-1])

    assert run_tool(work, tool="tool") == {"refused": 2, "stopped": 130, "status 2": 2, "status 0": 0,
                                           "status 1": 1}[end]
    left = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*"))
    if end in ("status 0", "status 1"):
        assert left == ["n1", "n1/n2", "n1/n3", "there", "there/n4", "w1", "w1/note", "w1/w2"]
    else:
        assert left == ["there", "w1", "w1/note"]  # (n1, there/n4 and w1/w2 were left)
    assert capsys.readouterr().err == {"refused": "tool: error: refused after its outputs were checked\n",
                                       "stopped": "\ntool: stopped by SIGINT: nothing written\n"}.get(end, "")


# ---------------------------------------------------------------------------------------------
# List files


def list_faces(root, identities=3, images=2) -> list[str]:
    """JPEG faces ``root/id<k>/<i>.jpg`` (JPEGs, so that a pack stores their bytes as they are); their
    paths below ``root``, identity by identity."""
    names = []
    for identity in range(identities):
        (root / f"id{identity}").mkdir(parents=True)
        for i in range(images):
            name = f"id{identity}/{i}.jpg"
            Image.fromarray(face_image(10 * identity + i)).save(root / name, quality=90)
            names.append(name)
    return names


# The list forms of the field: FaceX-Zoo's and the cleaned CASIA / VGGFace2 lists, insightface's face2rec2
# (its flag, or an index in its forks' lists, first; a box and landmarks may follow an aligned face's label)
# and mxnet's im2rec (labels written %f).
LIST_FORMS = {
    "path label": "{path} {label}",
    "path<TAB>label": "{path}\t{label}",
    "face2rec2": "1\t{path}\t{label}",
    "face2rec2 with an index": "{index}\t{path}\t{label}",
    "face2rec2 with a box and landmarks": "1\t{path}\t{label}\t" + "\t".join(["7"] * 14),
    "im2rec": "{index}\t{label}.000000\t{path}",
}


def test_image_lists_of_every_form_read_as_one_set(tmp_path):
    # Labels 25, 5, 15 (not 0..C-1, not in order): label k is the list's k-th smallest, compared as
    # numbers (as text, '15' < '25' < '5'); the images keep the list's order.
    names = list_faces(tmp_path)
    user_labels = [25, 25, 5, 5, 15, 15]
    fingerprints, digests = set(), set()
    for form, pattern in LIST_FORMS.items():
        lines = [pattern.format(path=name, label=label, index=index)
                 for index, (name, label) in enumerate(zip(names, user_labels))]
        path = tmp_path / f"{form}.lst"
        # A byte-order mark, Windows line ends, a comment and a blank line are read past.
        path.write_bytes(("\ufeff# " + form + "\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
        ds = ImageListDataset(str(path), image_size=32, flip=False)
        assert ds.identities == ["5", "15", "25"], form
        assert ds.labels.tolist() == [2, 2, 0, 0, 1, 1] and ds.num_classes == 3, form
        assert list(ds.paths) == [os.path.join(str(tmp_path), name) for name in names], form
        image, label = ds.load(4)
        np.testing.assert_array_equal(image, np.asarray(Image.open(tmp_path / names[4]).convert("RGB")))
        assert label == 1 and ds.stored_size == (32, 32)
        assert ds.labels_note == ("the list's 3 labels (5 to 25) are classes 0 to 2 in ascending order: class k is "
                                  "the list's k-th smallest label")
        fingerprints.add(ds.fingerprint())
        digests.add(ds.classes_digest())
    assert len(fingerprints) == len(digests) == 1  # the form is not the data
    (tmp_path / "plain.txt").write_text("".join(f"{name} {k // 2}\n" for k, name in enumerate(names)))
    assert ImageListDataset(str(tmp_path / "plain.txt")).labels_note is None  # 0..C-1 stay as they are


def test_image_list_paths_are_relative_to_the_list_or_absolute(tmp_path, monkeypatch):
    names = list_faces(tmp_path / "faces")
    (tmp_path / "lists").mkdir()
    with_spaces = tmp_path / "faces" / "id2" / "a face.jpg"  # a path may hold spaces (the label is the last field)
    shutil.copy(tmp_path / "faces" / names[-1], with_spaces)
    lines = [f"../faces/{names[0]} 0", f"{tmp_path / 'faces' / names[1]} 0", f"../faces/{names[2]} 1",
             "../faces/id2/a face.jpg 2"]
    (tmp_path / "lists" / "train.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path / "faces" / "id0")  # not where the paths are read from
    ds = ImageListDataset(str(tmp_path / "lists" / "train.txt"), image_size=32)
    assert list(ds.paths) == [os.path.join(str(tmp_path / "lists"), f"../faces/{names[0]}"),
                              str(tmp_path / "faces" / names[1]),
                              os.path.join(str(tmp_path / "lists"), f"../faces/{names[2]}"),
                              os.path.join(str(tmp_path / "lists"), "../faces/id2/a face.jpg")]
    assert all(ds.load(i)[0].shape == (32, 32, 3) for i in range(len(ds)))
    # Its record of the data holds the paths as the list gives them: the list and its images moved together
    # are the same data (an absolute path moves with neither).
    relative = [line for line in lines if not line.startswith("/")]
    (tmp_path / "lists" / "relative.txt").write_text("\n".join(relative) + "\n")
    before = ImageListDataset(str(tmp_path / "lists" / "relative.txt")).fingerprint()
    shutil.copytree(tmp_path / "lists", tmp_path / "moved" / "lists")
    shutil.copytree(tmp_path / "faces", tmp_path / "moved" / "faces")
    assert ImageListDataset(str(tmp_path / "moved" / "lists" / "relative.txt")).fingerprint() == before
    clone = pickle.loads(pickle.dumps(ds))  # as a spawned worker receives it
    assert list(clone.paths) == list(ds.paths) and clone.fingerprint() == ds.fingerprint()


@pytest.mark.parametrize("text, line, message", [
    ("id0/0.jpg\n", 1, "expected 'path label', the form of the list's first line, got 'id0/0.jpg'"),
    ("id0/0.jpg 0\nid0/1.jpg -1\n", 2, "label '-1' is not an identity: expected an integer >= 0"),
    ("id0/0.jpg 0\n\nid0/1.jpg 1.5\n", 3, "label '1.5' is not an identity"),
    ("id0/0.jpg 0\nid0/1.jpg nan\n", 2, "label 'nan' is not an identity"),
    ("id0/0.jpg 0\n1\tid0/1.jpg\t1\n", 2, "expected 'path label', the form of the list's first line, got "
                                          "'1\\tid0/1.jpg\\t1'"),
    ("1\tid0/0.jpg\t0\nid0/1.jpg 1\n", 2, "expected 'flag<TAB>path<TAB>label', the form of the list's first line"),
    ("1\tid0/0.jpg\t0\n1\tid0/1.jpg\t0\t5\n", 2, "expected 'flag<TAB>path<TAB>label'"),
    ("0\t0.000000\tid0/0.jpg\n1\tid0/1.jpg\t0\n", 2, "expected 'index<TAB>label<TAB>path'"),
    ("0\t0\t0.5\n", 1, "cannot tell the image path from the label: expected 'path label', 'flag<TAB>path<TAB>label' "
                       "(insightface's face2rec2) or 'index<TAB>label<TAB>path' (mxnet's im2rec)"),
    ("0\tid0/0.jpg\t0\t" + "\t".join(["7"] * 14) + "\n", 1,
     "flag 0 with a face box: a face face2rec2 would align from the box and landmarks; the trainer reads aligned "
     "faces (align them first: python -m train.tools.align)"),
], ids=["no label", "negative", "fraction", "nan", "another form", "space in a tab list", "four fields",
        "face2rec2 in im2rec", "no path", "not aligned"])
def test_image_list_lines_that_do_not_read_are_named(tmp_path, text, line, message):
    list_faces(tmp_path)
    (tmp_path / "train.lst").write_text(text)
    with pytest.raises(ValueError) as error:
        ImageListDataset(str(tmp_path / "train.lst"))
    assert str(error.value).startswith(f"{tmp_path / 'train.lst'}: line {line}: {message}"), str(error.value)


def test_image_list_in_utf16_and_with_large_labels_reads_as_written(tmp_path):
    # Windows PowerShell's `>` and Notepad's 'Unicode' write UTF-16 with a byte-order mark: read as UTF-8
    # its first label was '\x000\x00', 'not an identity'. Labels past 2**53 (ids, not 0..C-1) were read
    # through a float, and two of them became one identity.
    names = list_faces(tmp_path)
    text = "".join(f"{name} {k // 2}\r\n" for k, name in enumerate(names))
    for encoding in ("utf-16", "utf-16-be"):
        bom = "\ufeff" if encoding == "utf-16-be" else ""  # (utf-16 writes its own)
        (tmp_path / "train.txt").write_bytes((bom + text).encode(encoding))
        ds = ImageListDataset(str(tmp_path / "train.txt"))
        assert ds.identities == ["0", "1", "2"] and list(ds.paths) == [str(tmp_path / name) for name in names]
    big = 2**53
    (tmp_path / "ids.txt").write_text("".join(f"{name} {big + k // 2}\n" for k, name in enumerate(names)))
    assert ImageListDataset(str(tmp_path / "ids.txt")).identities == [str(big), str(big + 1), str(big + 2)]
    (tmp_path / "huge.txt").write_text(f"{names[0]} {2**63}\n")
    with pytest.raises(ValueError, match=f"huge.txt: line 1: label '{2**63}' is not an identity: expected an "
                                         "integer >= 0 and < 2\\*\\*63"):
        ImageListDataset(str(tmp_path / "huge.txt"))


def test_image_list_naming_an_image_twice_is_said(tmp_path, capsys):
    # A list that names an image under two labels trains one face as two people (label noise), silently before;
    # under one label twice, it is drawn twice as often. The trainer and pack_rec say so; once each is quiet.
    names = list_faces(tmp_path)
    lines = [f"{name} {10 + k // 2}" for k, name in enumerate(names)]
    (tmp_path / "once.txt").write_text("\n".join(lines) + "\n")
    assert ImageListDataset(str(tmp_path / "once.txt")).repeats_note is None
    (tmp_path / "twice.txt").write_text("\n".join(lines + [f"{names[0]} 10", f"{names[0]} 10"]) + "\n")
    assert ImageListDataset(str(tmp_path / "twice.txt")).repeats_note == (
        f"{tmp_path / names[0]} is listed 3 times, so drawn as often (label 10)")
    # Spelled otherwise, the same file (the list's folder joined to ./id1/0.jpg).
    (tmp_path / "spelled.txt").write_text("\n".join(lines + [f"./{names[2]} 11"]) + "\n")
    assert ImageListDataset(str(tmp_path / "spelled.txt")).repeats_note == (
        f"{tmp_path / names[2]} is listed 2 times, so drawn as often (label 11)")
    (tmp_path / "relabelled.txt").write_text("\n".join(lines + [f"{names[1]} 12"]) + "\n")
    assert ImageListDataset(str(tmp_path / "relabelled.txt")).repeats_note == (
        f"{tmp_path / names[1]} is listed 2 times, so drawn as often, under labels 10 and 12: one face taught as "
        "different people")
    (tmp_path / "two.txt").write_text("\n".join(lines + [f"{names[0]} 11", f"{names[3]} 12", f"{names[5]} 12"])
                                      + "\n")
    note = (f"3 images are listed more than once (6 lines), each drawn as often as it is listed; 2 of them under two "
            f"or more labels, one face taught as different people ({tmp_path / names[0]} as 10 and 11; "
            f"{tmp_path / names[3]} as 11 and 12)")
    assert ImageListDataset(str(tmp_path / "two.txt")).repeats_note == note
    from train.tools.pack_rec import pack_image_folder

    pack_image_folder(str(tmp_path / "two.txt"), str(tmp_path / "rec"), log=sys.stderr)
    assert f"pack_rec: warning: {note}\n" in capsys.readouterr().err


def test_image_list_images_missing_are_named_before_the_run(tmp_path):
    # Checked up front, by one listing a folder (a million stat calls cost more), rather than at whichever
    # step meets the first one hours into the run.
    names = list_faces(tmp_path)
    lines = [f"{name} {k // 2}" for k, name in enumerate(names)]
    lines[3] = "id1/gone.jpg 1"
    lines[5] = "id9/0.jpg 2"  # a folder that is not there
    (tmp_path / "train.txt").write_text("# faces\n" + "\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError) as error:
        ImageListDataset(str(tmp_path / "train.txt"))
    assert str(error.value) == (f"{tmp_path / 'train.txt'}: line 5: no image {tmp_path / 'id1' / 'gone.jpg'} (2 of "
                                "its 6 images are missing)")
    # None there: the paths were written relative to another folder than the list's.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "train.txt").write_text(f"{names[0]} 0\n")
    with pytest.raises(FileNotFoundError, match=f"line 1: no image .*: paths are read relative to the list's folder "
                                                f"\\({re.escape(str(tmp_path / 'elsewhere'))}\\); put the list \\(or a "
                                                "link to it\\) in the folder its paths start from, or write them "
                                                "absolute$"):
        ImageListDataset(str(tmp_path / "elsewhere" / "train.txt"))
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: lists no image \(lines 'path label', "):
        ImageListDataset(str(tmp_path / "empty.txt"))
    # One removed after the list was read is the image folder's mid-run error.
    (tmp_path / "train.txt").write_text("\n".join(f"{name} {k // 2}" for k, name in enumerate(names)))
    ds = ImageListDataset(str(tmp_path / "train.txt"))
    os.remove(tmp_path / names[2])
    with pytest.raises(ValueError,
                       match=f"{re.escape(str(tmp_path / names[2]))}: cannot read the image: "
                             "No such file or directory$"):
        ds[2]


def test_build_train_dataset_reads_list_files(tmp_path):
    names = list_faces(tmp_path)
    for name in ("train.lst", "train.TXT"):
        (tmp_path / name).write_text("".join(f"{path}\t{k // 2}\n" for k, path in enumerate(names)))
        ds, num_classes = build_train_dataset(str(tmp_path / name), image_size=24)
        assert isinstance(ds, ImageListDataset) and num_classes == 3 and len(ds) == 6
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(FileNotFoundError, match=r"'.*train\.csv': expected 'synthetic', a folder with train\.rec \+ "
                                                r"train\.idx, an image folder, or a list file \(\.lst, \.txt\)"):
        build_train_dataset(str(tmp_path / "train.csv"))
    with pytest.raises(FileNotFoundError, match=r"'.*other\.lst': no such file; expected"):
        build_train_dataset(str(tmp_path / "other.lst"))


def test_a_lists_verification_sets_are_in_its_folder(tmp_path):
    # --val-targets lfw: <data folder>/lfw.bin, the list's folder for a list (it was looked for under train.lst/).
    from train.data import build_verification_sets
    from train.tools.make_bin import write_bin

    names = list_faces(tmp_path)
    (tmp_path / "train.lst").write_text("".join(f"{path} {k // 2}\n" for k, path in enumerate(names)))
    write_bin(str(tmp_path / "lfw.bin"), [(tmp_path / name).read_bytes() for name in names[:4] * 5], [1, 0] * 5)
    sets = build_verification_sets(str(tmp_path / "train.lst"), ["lfw"], image_size=32)
    assert list(sets) == ["lfw"] and sets["lfw"].num_pairs == 10
    with pytest.warns(UserWarning, match=f"no agedb_30.bin in {re.escape(repr(str(tmp_path)))}; skipped"):
        assert build_verification_sets(str(tmp_path / "train.lst"), ["agedb_30"], image_size=32) == {}


def test_a_misspelt_verification_name_is_told_the_set_it_is_near(tmp_path):
    # --val-targets lwf (or LFW) beside lfw.bin was skipped with "no lwf.bin in ...; skipped" alone: a training
    # run went on unverified.
    from train.data import build_verification_sets
    from train.tools.make_bin import write_bin

    names = list_faces(tmp_path)
    write_bin(str(tmp_path / "lfw.bin"), [(tmp_path / name).read_bytes() for name in names[:4] * 5], [1, 0] * 5)
    for target in ("lwf", "LFW"):
        with pytest.warns(UserWarning, match="^" + re.escape(
                f"verification target {target!r}: no {target}.bin in {str(tmp_path)!r}; skipped; lfw.bin is there: "
                "is it the set meant?") + "$"):
            assert build_verification_sets(str(tmp_path), [target], image_size=32) == {}
    with pytest.warns(UserWarning, match=r"no agedb_30\.bin in '[^']*'; skipped$"):  # (nothing near it)
        assert build_verification_sets(str(tmp_path), ["agedb_30"], image_size=32) == {}


def test_one_of_insightfaces_sets_is_not_told_another_is_near(tmp_path):
    # lfw missing beside cplfw.bin said "cplfw.bin is there: is it the set meant?" (calfw: cplfw; cfp_fp: cfp_ff):
    # near as strings, other benchmarks. Another case of the same name still is (CPLFW: cplfw.bin).
    from train.data import build_verification_sets

    for name in ("cplfw", "cfp_ff"):
        (tmp_path / f"{name}.bin").write_bytes(b"")  # (not read: only the missing names are looked up)
    for target in ("lfw", "calfw", "cfp_fp"):
        with pytest.warns(UserWarning, match=rf"no {target}\.bin in '[^']*'; skipped$"):
            assert build_verification_sets(str(tmp_path), [target], image_size=32) == {}
    with pytest.warns(UserWarning, match=r"; skipped; cplfw\.bin is there: is it the set meant\?$"):
        assert build_verification_sets(str(tmp_path), ["CPLFW"], image_size=32) == {}


def test_pack_rec_packs_a_list_read_back_by_the_recordio_reader(tmp_path, capsys):
    # A record's identity is a range of records: the list's images come out by label (its k-th smallest
    # label as k), in the list's order within a label, each JPEG's bytes as they are.
    names = list_faces(tmp_path / "faces")
    order = [4, 0, 5, 2, 1, 3]
    user_labels = {0: 30, 1: 30, 2: 8, 3: 8, 4: 11, 5: 11}
    (tmp_path / "faces" / "train.lst").write_text(
        "".join(f"{k}\t{user_labels[i]}.000000\t{names[i]}\n" for k, i in enumerate(order)))
    assert pack_rec_main([str(tmp_path / "faces" / "train.lst"), str(tmp_path / "packed")]) == 0
    assert "pack_rec: note: the list's 3 labels (8 to 30) are classes 0 to 2 in ascending order: class k is the " \
           "list's k-th smallest label" in capsys.readouterr().err
    packed = RecordIODataset(str(tmp_path / "packed"), image_size=32, flip=False)
    listed = ImageListDataset(str(tmp_path / "faces" / "train.lst"), image_size=32, flip=False)
    assert packed.num_classes == listed.num_classes == 3 and len(packed) == 6
    expected = [2, 3, 4, 5, 0, 1]  # label 8's images (list lines 4, 6), 11's (lines 1, 3), 30's (lines 2, 5)
    assert [packed.load(k)[1] for k in range(6)] == [0, 0, 1, 1, 2, 2]
    for k, i in enumerate(expected):
        assert unpack_payload(packed.records.read(k + 1))[1] == (tmp_path / "faces" / names[i]).read_bytes()
        image, label = listed.load(order.index(i))
        np.testing.assert_array_equal(packed.load(k)[0], image)
        assert packed.load(k)[1] == label
    with pytest.raises(FileNotFoundError):  # the list's own errors, before anything is written
        pack_image_folder(str(tmp_path / "nothing.lst"), str(tmp_path / "none"), log=None)
    (tmp_path / "faces" / "bad.lst").write_text("x.jpg 0\n")
    assert pack_rec_main([str(tmp_path / "faces" / "bad.lst"), str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == f"pack_rec: error: {tmp_path / 'faces' / 'bad.lst'}: line 1: no image " \
                                      f"{tmp_path / 'faces' / 'x.jpg'}: paths are read relative to the list's " \
                                      f"folder ({tmp_path / 'faces'}); put the list (or a link to it) in the " \
                                      "folder its paths start from, or write them absolute\n"
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# Synthetic faces


def test_synthetic_images_are_deterministic_and_distinct():
    a = render_face(0, 5, 3, 48)
    assert a.dtype == np.uint8 and a.shape == (48, 48, 3)
    np.testing.assert_array_equal(a, render_face(0, 5, 3, 48))
    assert not np.array_equal(a, render_face(0, 5, 4, 48))  # another sample
    assert not np.array_equal(a, render_face(0, 6, 3, 48))  # another identity
    assert not np.array_equal(a, render_face(1, 5, 3, 48))  # another seed
    assert a.std() > 10  # a picture, not a flat colour
    for size in (56, 64, 112):
        assert render_face(0, 1, 1, size).shape == (size, size, 3)


def test_synthetic_dataset_items():
    ds = SyntheticFaces(7, 3, image_size=40, seed=2)
    assert len(ds) == 21 and ds.num_classes == 7
    x, label = ds[10]
    assert x.dtype == torch.uint8 and x.shape == (3, 40, 40) and label == 3
    assert torch.equal(ds[10][0], x) and torch.equal(ds[-11][0], x)
    with pytest.raises(IndexError):
        ds[21]
    raw, _ = ds.load(10)
    np.testing.assert_array_equal(raw, render_face(2, 3, 1, 40))


def test_synthetic_verification_identities_are_disjoint():
    base_lfw, base_cfp = verification_identity_base("lfw"), verification_identity_base("cfp_fp")
    assert min(base_lfw, base_cfp) >= 1 << 32 and abs(base_lfw - base_cfp) >= 1 << 32
    images, issame = synthetic_pairs("lfw", num_pairs=6, num_identities=4, image_size=32, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32)
    assert issame.tolist() == [True, False] * 3
    again, _ = synthetic_pairs("lfw", num_pairs=6, num_identities=4, image_size=32, seed=0)
    assert torch.equal(images, again)
    other, _ = synthetic_pairs("cfp_fp", num_pairs=6, num_identities=4, image_size=32, seed=0)
    assert not torch.equal(images, other)


# ---------------------------------------------------------------------------------------------
# Resumable loading


def test_sampler_epochs_are_permutations_and_resume_exactly():
    sampler = ResumableBatchSampler(10, 3, seed=4)
    assert sampler.steps_per_epoch == 3
    stream = iter(sampler)
    batches = [next(stream) for _ in range(9)]
    for epoch in range(3):
        keys = sum(batches[3 * epoch: 3 * epoch + 3], [])
        assert {e for _, e in keys} == {epoch}
        assert len({i for i, _ in keys}) == 9  # a permutation, last partial batch dropped
    assert [i for i, _ in sum(batches[:3], [])] != [i for i, _ in sum(batches[3:6], [])]
    for start in (0, 2, 3, 7):
        resumed = iter(ResumableBatchSampler(10, 3, seed=4, start_step=start))
        assert [next(resumed) for _ in range(9 - start)] == batches[start:]
    other_seed = iter(ResumableBatchSampler(10, 3, seed=5))
    assert [next(other_seed) for _ in range(3)] != batches[:3]


def test_an_epochs_order_is_the_same_under_every_numpy():
    """The epoch's seed, pinned: a run resumed under numpy 1.x visits what it visited under 2.x. numpy
    1.x casts ``np.uint64 >> 1`` to float64 and raised "ufunc 'right_shift' not supported" on every
    run (CI's torch 2.4.1 stage installs numpy 1.26)."""
    assert _epoch_seed(0, 0) == 7896617691693857887
    assert _epoch_seed(1234, 7) == 6572324068835722780
    order = ResumableBatchSampler(10, 3, seed=1234).epoch_indices(7)
    assert order.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(6572324068835722780)).tolist()


def test_sampler_keep_last_and_shards():
    sampler = ResumableBatchSampler(10, 4, seed=0, drop_last=False)
    stream = iter(sampler)
    assert [len(next(stream)) for _ in range(3)] == [4, 4, 2]
    shards = [ResumableBatchSampler(11, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    per_rank = [s.epoch_indices(0).tolist() for s in shards]
    assert all(len(p) == 4 for p in per_rank)  # 11 padded to 12
    assert set(sum(per_rank, [])) == set(range(11))
    assert len({s.steps_per_epoch for s in shards}) == 1
    with pytest.raises(ValueError):
        ResumableBatchSampler(3, 4, seed=0)


def test_flips_depend_on_seed_epoch_index_only():
    flips = [flip_decision(0, e, i) for e in range(4) for i in range(256)]
    assert 0.4 < np.mean(flips) < 0.6
    assert flips == [flip_decision(0, e, i) for e in range(4) for i in range(256)]
    assert flips[:256] != flips[256:512]
    ds = SyntheticFaces(2, 2, image_size=24)
    x0, _ = SyntheticFaces(2, 2, image_size=24, flip=False)[1]
    for epoch in range(6):
        x, _ = ds[(1, epoch)]
        assert torch.equal(x, x0.flip(2) if flip_decision(0, epoch, 1) else x0)


def test_model_input_scales_uint8_images_as_insightface():
    images = (torch.arange(2 * 3 * 8 * 8) % 256).to(torch.uint8).view(2, 3, 8, 8)  # every value
    x = to_model_input(images)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, (images.float() - 127.5) / 127.5)  # bit for bit: (x - 127.5) / 127.5
    assert x.min() == -1 and x.max() == 1
    last = to_model_input(images, memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, x)
    with pytest.raises(TypeError, match="expected uint8 images, got torch.float32"):
        to_model_input(x)  # already scaled: scaling it again would be silently wrong


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_reproduces_batches(num_workers):
    ds = SyntheticFaces(5, 3, image_size=16, seed=1)  # 15 images, 3 steps per epoch of 4
    full = build_train_loader(ds, batch_size=4, num_workers=num_workers, seed=7)
    stream = iter(full)
    reference = [next(stream) for _ in range(8)]
    resumed = iter(build_train_loader(ds, batch_size=4, num_workers=num_workers, seed=7, start_step=5))
    for step in range(5, 8):
        x, y = next(resumed)
        assert torch.equal(x, reference[step][0]) and torch.equal(y, reference[step][1])
    assert reference[0][0].shape == (4, 3, 16, 16) and reference[0][1].dtype == torch.int64
    del stream, resumed


def test_build_train_dataset_dispatch(tmp_path, image_folder):
    ds, num_classes = build_train_dataset("synthetic", image_size=24, synthetic_identities=4,
                                          synthetic_images_per_identity=2)
    assert isinstance(ds, SyntheticFaces) and num_classes == 4 and len(ds) == 8
    ds, num_classes = build_train_dataset(str(image_folder), image_size=24, flip=False)
    assert isinstance(ds, ImageFolderDataset) and num_classes == 2
    with pytest.raises(FileNotFoundError, match="expected 'synthetic'"):
        build_train_dataset(str(tmp_path / "nothing"))
    # A path that names nothing says so, and where a relative one was looked for (a user trial's
    # relative --data from another directory read as 'not an image folder').
    with pytest.raises(FileNotFoundError, match=r"'.*nothing': no such folder; expected 'synthetic'"):
        build_train_dataset(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=f"'nothing/faces': no such folder under {re.escape(os.getcwd())}; "):
        build_train_dataset(os.path.join("nothing", "faces"))
    (tmp_path / "rec_only").mkdir()
    (tmp_path / "rec_only" / "train.rec").write_bytes(b"")  # its index not copied along: not an image folder
    with pytest.raises(FileNotFoundError, match="holds train.rec but not its index train.idx"):
        build_train_dataset(str(tmp_path / "rec_only"))


def test_fingerprints_tell_copies_from_other_sets(tmp_path, rec_images):
    # The same files at another place give the same fingerprint; another packing, another folder
    # layout or other synthetic settings give another.
    _, labels, encoded = rec_images
    write_rec(tmp_path / "rec", list(zip(encoded, labels)))
    shutil.copytree(tmp_path / "rec", tmp_path / "copy")
    write_rec(tmp_path / "repacked", list(zip(encoded[:2] + [encoded[3], encoded[2], encoded[4]], labels)))
    rec = [RecordIODataset(str(tmp_path / name), image_size=32).fingerprint() for name in ("rec", "copy", "repacked")]
    assert rec[0] == rec[1] != rec[2]

    faces = make_face_folder_like(tmp_path / "faces")
    shutil.copytree(faces, tmp_path / "faces-copy")
    before = [ImageFolderDataset(str(root), image_size=32).fingerprint() for root in (faces, tmp_path / "faces-copy")]
    os.rename(faces / "id1" / "0.png", faces / "id1" / "renamed.png")
    after = ImageFolderDataset(str(faces), image_size=32).fingerprint()
    assert before[0] == before[1] != after

    synthetic = [SyntheticFaces(4, 2, seed=seed, first_identity=first).fingerprint() for seed, first in
                 ((0, 0), (0, 0), (1, 0), (0, 4))]
    assert synthetic[0] == synthetic[1] and len(set(synthetic)) == 3
    assert SyntheticFaces(4, 2).fingerprint() != SyntheticFaces(2, 4).fingerprint()  # same size, other classes


def make_face_folder_like(root, identities=3, images=2):
    for identity in range(identities):
        (root / f"id{identity}").mkdir(parents=True)
        for i in range(images):
            Image.fromarray(face_image(10 * identity + i)).save(root / f"id{identity}" / f"{i}.png")
    return root


def _data_check_worker(rank, world_size, init_file, roots, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset = ImageFolderDataset(roots[rank], image_size=32)
        try:
            check_every_rank_reads_the_same(dataset, "faces")
            outcome = "passed"
        except SystemExit as error:
            outcome = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
        settle()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.slow
def test_ranks_with_different_copies_of_the_data_all_stop(tmp_path):
    faces = make_face_folder_like(tmp_path / "faces")
    shutil.copytree(faces, tmp_path / "node1")
    shutil.copytree(faces, tmp_path / "node2")
    (tmp_path / "node2" / "id1" / "1.png").unlink()  # a partial copy on a third node
    runs = {"same": [faces, tmp_path / "node1", faces], "differ": [faces, tmp_path / "node1", tmp_path / "node2"]}
    for case, roots in runs.items():
        out = tmp_path / case
        out.mkdir()
        spawn_ranks(_data_check_worker, args=(3, str(tmp_path / f"store-{case}"), [str(r) for r in roots], str(out)),
                    nprocs=3)
        outcomes = [(out / f"rank{rank}.txt").read_text() for rank in range(3)]
        if case == "same":
            assert outcomes == ["passed"] * 3
        else:
            assert len(set(outcomes)) == 1, outcomes  # every rank stops, with the same message
            assert "--data faces: the processes read different training sets" in outcomes[0]
            assert "ranks 0, 1: 6 images of 3 identities" in outcomes[0]
            assert "rank 2: 5 images of 3 identities" in outcomes[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_loader_workers_leave_signals_to_the_main_process(signum):
    # As a scheduler's signal to the process group reaches them: from another process than their
    # parent, which torch's own SIGTERM handler dies of. The trainer's main process decides.
    loader = build_train_loader(SyntheticFaces(4, 4, image_size=16), batch_size=4, num_workers=1, seed=0)
    stream = iter(loader)
    first = next(stream)
    (worker,) = stream._workers
    subprocess.run(["kill", f"-{signum.name.removeprefix('SIG')}", str(worker.pid)], check=True)
    # More batches than the loader asks for ahead (2 a worker): the last were asked for after the signal,
    # so the worker has had it by then. (A 0.5 s sleep let a loaded machine check it before it had.)
    for _ in range(4):
        assert next(stream)[0].shape == first[0].shape
    assert worker.is_alive()
    del stream


@pytest.mark.parametrize("moment", [
    "before_asking",
    pytest.param("before_acknowledging", marks=pytest.mark.skipif(
        sys.version_info < (3, 14), reason="before Python 3.14 the sender waits for no acknowledgement on Linux")),
])
@pytest.mark.slow
def test_loader_workers_do_not_report_a_main_process_that_hangs_up_mid_transfer(tmp_path, moment):
    # A worker serves its batches' file descriptors from a thread; a Ctrl-C raised in the main process
    # while it fetches one hangs up mid-transfer, and that thread printed a traceback of the reset
    # connection under the tool's one-line stop message (CI, session 33: 4 of 10 trials here; Python
    # 3.14.10: 'did not receive acknowledgement of fd', in 1 of 3 suites). As a worker, the script hangs up
    # on its own handle-sharing thread; as a plain process it shows that the thread reports it.
    script = tmp_path / "script.py"
    script.write_text(
        "import os, socket, sys, threading\n"
        "from multiprocessing import resource_sharer\n"
        "from train.data import leave_signals_to_the_main_process\n"
        "if sys.argv[1] == 'worker':\n"
        "    leave_signals_to_the_main_process()(0)\n"
        "reported, hook = threading.Event(), sys.excepthook\n"
        "def told(*error):\n"
        "    try:\n"
        "        hook(*error)\n"
        "    finally:\n"
        "        reported.set()\n"
        "sys.excepthook = told  # the thread's report, quiet or not, is waited for\n"
        "read, write = os.pipe()\n"
        "shared = resource_sharer.DupFd(read)\n"
        "if sys.argv[2] == 'before_asking':\n"
        "    with socket.socket(socket.AF_UNIX) as hang_up:\n"
        "        hang_up.connect(shared._id[0])\n"
        "else:  # takes the descriptor, without acknowledging it\n"
        "    with resource_sharer._resource_sharer.get_connection(shared._id) as asked:\n"
        "        with socket.fromfd(asked.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as hang_up:\n"
        "            hang_up.recvmsg(1, socket.CMSG_SPACE(4))\n"
        "assert reported.wait(50)\n"
        "sys.excepthook(ValueError, ValueError('a real error'), None)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    for role in ("plain", "worker"):
        done = subprocess.run([sys.executable, str(script), role, moment], capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == 0, done.stderr
        assert ("Traceback" in done.stderr) == (role == "plain"), done.stderr
        if role == "plain" and moment == "before_acknowledging":
            assert "RuntimeError: did not receive acknowledgement of fd" in done.stderr
        assert "ValueError: a real error" in done.stderr  # other errors are still reported


@pytest.mark.slow
def test_loader_workers_end_with_a_script_that_never_stops_them(tmp_path):
    # The workers ignore a SIGTERM that is not their main process's decision; multiprocessing's exit
    # handler terminates live daemonic workers with SIGTERM and joins them. A script that leaves its
    # loader's iterator alive (as a global, or in a traceback) must still exit, normally and on error.
    # (Guarded by __main__: from Python 3.14 the workers start from a forkserver, which imports the script.)
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from train.data import SyntheticFaces, build_train_loader\n"
        "if __name__ == '__main__':\n"
        "    stream = iter(build_train_loader(SyntheticFaces(4, 4, image_size=16), batch_size=4, num_workers=2, "
        "seed=0))\n"
        "    print(next(stream)[0].shape, flush=True)\n"
        "    if sys.argv[1] == 'error':\n"
        "        raise RuntimeError('leaving on an error')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    for how, code in (("normally", 0), ("error", 1)):
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == code, done.stderr
        assert "torch.Size([4, 3, 16, 16])" in done.stdout
        assert ("leaving on an error" in done.stderr) == (how == "error")
        assert time.monotonic() - started < 30


class ParentProcessIds(torch.utils.data.Dataset):
    """Each item: the id of the parent of the process that loads it."""

    def __len__(self):
        return 4

    def __getitem__(self, key):
        return os.getppid()


def test_loader_workers_are_children_of_the_main_process():
    # Not a forkserver's (Python 3.14's default on Linux): a SIGTERM to the process group ends the
    # forkserver, torch's workers take their parent for dead, and one with a full queue hung at exit.
    loader = build_train_loader(ParentProcessIds(), batch_size=2, num_workers=2, seed=0)
    try:
        parents = next(iter(loader))
    finally:
        stop_loader_workers(loader)
    assert parents.tolist() == [os.getpid()] * 2


@pytest.mark.slow
def test_the_loaders_start_method_leaves_the_process_default_unset():
    # A caller may still choose its own start method after a loader was built (multiprocessing's
    # get_start_method() fixes the default on first use: set_start_method then raised).
    code = ("import multiprocessing\n"
            "from train.data import worker_start_method\n"
            "print(worker_start_method())\n"
            "multiprocessing.set_start_method('spawn')\n"
            "print(multiprocessing.get_start_method())\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == "spawn"


def test_decoded_images_follow_their_exif_orientation():
    # Stored on its side with orientation 6 ("rotate 90° clockwise to view"): decoded upright, as
    # OpenCV's imread decodes it.
    upright = Image.fromarray(face_image(3))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    turned = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(turned, format="PNG", exif=exif)
    size = upright.size[0]
    assert np.array_equal(decode_image(turned.getvalue(), size, source="turned"), np.asarray(upright.convert("RGB")))


class _Pillow9Image:
    """PIL.Image as Pillow 9.1 to 9.3 served it: its constants (BILINEAR, AFFINE, ...) warned that they
    would be removed in Pillow 10 (9.4 took the warning back); their enums (Image.Resampling, ...) did not."""
    DEPRECATED = {name: enum for enum in ("Resampling", "Transform", "Transpose", "Dither", "Palette", "Quantize")
                  for name in getattr(Image, enum).__members__}

    def __getattr__(self, name):
        if name in self.DEPRECATED:
            warnings.warn(f"{name} is deprecated and will be removed in Pillow 10 (2023-07-01). Use "
                          f"{self.DEPRECATED[name]}.{name} instead.", DeprecationWarning, stacklevel=2)
        return getattr(Image, name)


def test_images_are_resized_without_pillow_9s_deprecated_constants(tmp_path, monkeypatch):
    # On Pillow 9.1 to 9.3 (pyproject admits 9.2), Image.BILINEAR and Image.AFFINE warned at every
    # resize and warp: make_bin printed "warning: BILINEAR is deprecated ..." into its errors, and the
    # RFW and verification tests that take warnings as errors failed. The code takes the enums.
    from train import ijb
    from train.tools import detect, pack_rec

    for module in (sys.modules["train.data.transforms"], ijb, detect, pack_rec):
        monkeypatch.setattr(module, "Image", _Pillow9Image())
    face = Image.fromarray(face_image(3))
    path = tmp_path / "face.png"
    face.save(path)
    landmarks = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]) * face.size[0] / 112
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert decode_image(path.read_bytes(), 20, source="face").shape == (20, 20, 3)
        assert ijb.align_for_model(face, landmarks, 64).shape == (64, 64, 3)
        assert pack_rec._image_bytes(str(path), resize=24, quality=90)[1] == (24, 24)
        assert detect.letterbox(face, 40, 30)[0].shape == (30, 40, 3)


def test_loader_benchmark_runs_on_a_pack_of_its_own(tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    # Workers started from a forkserver (Python 3.14's default on Linux) unpickle its ScaledInWorkers by
    # name: loaded from its file, bench_loader must be importable as itself too.
    bench_loader = load_benchmark("bench_loader")
    monkeypatch.setitem(sys.modules, "bench_loader", bench_loader)
    monkeypatch.syspath_prepend(os.path.dirname(bench_loader.__file__))
    bench_loader.main(["--images", "48", "--image-size", "32", "--batch-size", "8", "--batches", "3", "--warmup", "1",
                       "--workers", "0,1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(row["workers"], row["scaled_on"]) for row in rows] == [(0, "device"), (0, "worker"), (1, "device"),
                                                                    (1, "worker")]
    assert all(row["images_per_s"] > 0 and row["images"] == 48 for row in rows)
    assert [row["mb_per_batch"] for row in rows[:2]] == [round(8 * 3 * 32 * 32 / 2 ** 20, 2),
                                                         round(4 * 8 * 3 * 32 * 32 / 2 ** 20, 2)]
    bench_loader.main(["--images", "48", "--image-size", "32", "--batch-size", "8", "--batches", "3", "--warmup", "1",
                       "--workers", "0", "--augment", "0,0.5", "--scaled-on", "device", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(row["augment"], row["scaled_on"]) for row in rows] == [(0, "device"), (0.5, "device")]
    assert {row["augmentations"] for row in rows} == {"crop,low_res,photometric"}  # (AdaFace's three, as before)


def test_loader_benchmark_times_the_augmentations_kinds_names(tmp_path, monkeypatch):
    # --kinds all: the blur, hue and grayscale too (--augment timed AdaFace's three alone), named in the rows.
    out = tmp_path / "rows.json"
    bench_loader = load_benchmark("bench_loader")
    monkeypatch.setitem(sys.modules, "bench_loader", bench_loader)
    augmented = []
    build_loader = bench_loader.build_train_loader
    monkeypatch.setattr(bench_loader, "build_train_loader",
                        lambda source, **kw: augmented.append(source.augment) or build_loader(source, **kw))
    small = ["--images", "8", "--image-size", "32", "--batch-size", "4", "--batches", "1", "--warmup", "0",
             "--workers", "0", "--scaled-on", "device"]
    bench_loader.main(small + ["--augment", "0.5", "--kinds", "all", "--out", str(out)])
    assert augmented == [Augmentation(crop=0.5, low_res=0.5, blur=0.5, photometric=0.5, hue=0.5, grayscale=0.5)]
    assert json.loads(out.read_text())[0]["augmentations"] == "crop,low_res,blur,photometric,hue,grayscale"
    augmented.clear()
    bench_loader.main(small + ["--augment", "1", "--kinds", "hue, blur"])
    assert augmented == [Augmentation(blur=1, hue=1)]
    with pytest.raises(SystemExit):
        bench_loader.main(["--kinds", "blur,sharpen"])

@pytest.mark.slow
def test_a_tests_thread_count_is_not_the_next_ones(tmp_path):
    # bench_loader's main() (above) sets torch to one thread, and the tests after it in a whole run that do
    # not set their own ran on one thread where alone they ran on every core (conftest's _torch_threads_as_before).
    (tmp_path / "test_threads.py").write_text(
        "import torch\n"
        "def test_one_sets_a_thread():\n"
        "    torch.set_num_threads(1)\n"
        "def test_the_next_has_the_threads_of_before():\n"
        "    assert torch.get_num_threads() == 2\n")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir",
                          str(tmp_path), str(tmp_path / "test_threads.py")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
