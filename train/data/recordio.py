"""insightface's RecordIO training data (`train.rec` + `train.idx`, the MS1MV2 /
Glint360K layout) read and written without mxnet.

Framing (dmlc-core `recordio.h`): every frame is `uint32 kMagic`, `uint32 lrec`
(upper 3 bits: continuation flag, lower 29 bits: length), the data, zero padding
to 4 bytes. A record whose data holds kMagic at a 4-byte-aligned position is
split there into frames flagged 1 (first), 2 (middle), 3 (last); the magic word
itself is not stored and the reader puts it back between the parts. All integers
are little-endian.

Record payload (mxnet `recordio.pack`): an `IfQQ` header (flag, label, id, id2);
when flag > 0 the label is instead `flag` float32 values after the header. The
rest is the encoded image. insightface's record 0 has flag > 0 and label
`[first identity record, end]`: images are records 1 .. label[0] - 1.
"""

from __future__ import annotations

import math
import os
import warnings
import struct
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .transforms import DataError, FaceImageDataset, decode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME_HEADER = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1

# Continuation flags of a frame.
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3


# Past this many records, counting the classes without a property file (a pass over the whole .rec) gets a note.
SCAN_NOTE_RECORDS = 100_000

class RecordIOError(DataError):
    """A .rec/.idx file is not what it should be; the message names the file and record."""


class IRHeader(NamedTuple):
    """mxnet's image record header; `label` is a float, or a float32 array when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def _aligned(n: int) -> int:
    return (n + 3) & ~3


def pack_payload(label: float | Sequence[float], image: bytes, *, id: int = 0, id2: int = 0) -> bytes:
    """Build a record payload the way mxnet's `recordio.pack` does: a scalar label
    goes in the header (flag 0), a sequence goes after it (flag = its length)."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR_HEADER.pack(0, float(label), id, id2) + image
    values = np.asarray(label, dtype="<f4").ravel()
    return _IR_HEADER.pack(values.size, 0.0, id, id2) + values.tobytes() + image


def unpack_payload(payload: bytes, *, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and the bytes after it (the image)."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"{where}: {len(payload)} bytes is shorter than the {_IR_HEADER.size}-byte IRHeader")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload)
    body = payload[_IR_HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"{where}: IRHeader says {flag} float32 labels follow, only {len(body)} bytes do")
        label = np.frombuffer(body, dtype="<f4", count=flag).astype(np.float32)
        body = body[4 * flag:]
    return IRHeader(flag, label, id_, id2), body


def encode_frames(record: bytes) -> bytes:
    """The dmlc frames of one record, split at every aligned occurrence of kMagic."""
    if len(record) > _MAX_LENGTH:
        raise RecordIOError(f"a RecordIO record holds at most {_MAX_LENGTH} bytes, got {len(record)}")
    lower = len(record) & ~3
    words = np.frombuffer(record, dtype="<u4", count=lower // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    frames = []
    start = 0
    for cut in cuts:
        frames.append(_FRAME_HEADER.pack(MAGIC, ((FIRST if start == 0 else MIDDLE) << _LENGTH_BITS) | (cut - start)))
        frames.append(record[start:cut])  # aligned, so no padding
        start = cut + 4
    tail = len(record) - start
    frames.append(_FRAME_HEADER.pack(MAGIC, ((LAST if cuts else WHOLE) << _LENGTH_BITS) | tail))
    frames.append(record[start:])
    frames.append(b"\0" * (_aligned(tail) - tail))
    return b"".join(frames)


def read_frames(f, offset: int, *, where: str) -> bytes:
    """Read the record starting at `offset` of the open binary file `f`,
    reassembling multi-part records; raises RecordIOError naming `where`."""
    parts = []
    pos = offset
    while True:
        f.seek(pos)
        head = f.read(_FRAME_HEADER.size)
        if len(head) < _FRAME_HEADER.size:
            raise RecordIOError(f"{where}: truncated: the file ends inside the frame header at byte {pos}")
        magic, lrec = _FRAME_HEADER.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{where}: bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH
        expected = (WHOLE, FIRST) if not parts else (MIDDLE, LAST)
        if cflag not in expected:
            raise RecordIOError(
                f"{where}: frame at byte {pos} has continuation flag {cflag}, expected one of {expected}"
            )
        data = f.read(_aligned(length))
        if len(data) < length:
            raise RecordIOError(
                f"{where}: truncated: the frame at byte {pos} announces {length} bytes, the file holds {len(data)}"
            )
        parts.append(data[:length])
        if cflag in (WHOLE, LAST):
            return _MAGIC_BYTES.join(parts)
        pos += _FRAME_HEADER.size + _aligned(length)


def read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an `.idx` file (lines `key<TAB>offset`) into (keys, offsets) int64 arrays, in file order.

    mxnet writes it as ``"%d\\t%d\\n"`` a record; a file in that form is parsed by numpy in one pass
    (WebFace42M's index has 42M lines: seconds, against a minute line by line in Python, and a
    third of the memory). Any other (blank lines, spaces, an error to name) is read line by line."""
    with open(idx_path, "rb") as f:
        data = f.read()
    parsed = _parse_mxnet_index(data)
    del data
    return parsed if parsed is not None else _read_index_by_line(idx_path)


def _parse_mxnet_index(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, offsets) of an index of lines ``<digits><TAB><digits><LF>``, at most 18 digits each (no
    sign, no other whitespace, nothing numpy's parse would read otherwise than int() or saturate at
    int64's bounds); None for anything else."""
    text = np.frombuffer(data, dtype=np.uint8)
    counts = np.bincount(text, minlength=256)
    if not data.endswith(b"\n") or counts[ord("0"):ord("9") + 1].sum() + counts[9] + counts[10] != text.size:
        return None
    tabs, newlines = np.flatnonzero(text == 9), np.flatnonzero(text == 10)
    if tabs.size != newlines.size:
        return None
    starts = np.concatenate([[0], newlines[:-1] + 1])
    key_digits, offset_digits = tabs - starts, newlines - tabs - 1  # negative where a line has no tab
    if not (((key_digits >= 1) & (key_digits <= 18) & (offset_digits >= 1) & (offset_digits <= 18)).all()):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy < 2 warns, and stops, where the text is not a number
            values = np.fromstring(data, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        return None
    if values.size != 2 * newlines.size:
        return None
    pairs = values.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _read_index_by_line(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    keys, offsets = [], []
    with open(idx_path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = (int(x) for x in fields)
                if not all(-(1 << 63) <= v < (1 << 63) for v in (key, offset)):
                    raise ValueError
            except ValueError:
                raise RecordIOError(
                    f"{idx_path}: line {line_no}: expected 'key<TAB>offset', got {line[:80]!r}"
                ) from None
            keys.append(key)
            offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class RecordIOWriter:
    """Writes `.rec` records and their `.idx` lines, as mxnet's MXIndexedRecordIO('w') does."""

    def __init__(self, rec_path: str, idx_path: str):
        self.rec_path, self.idx_path = rec_path, idx_path
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write(self, key: int, record: bytes) -> None:
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        self._rec.write(encode_frames(record))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IndexedRecordIO:
    """Random access to the records of a `.rec` through its `.idx`.

    The file is opened lazily, once per process, so an instance can be pickled
    into DataLoader workers (forked or spawned) without sharing a file position.
    """

    def __init__(self, rec_path: str, idx_path: str):
        self.rec_path, self.idx_path = rec_path, idx_path
        self.keys, offsets = read_index(idx_path)
        # Keys are 0..N in every insightface file; a dense table keeps 5.8M of them cheap.
        if self.keys.size and self.keys.min() >= 0 and self.keys.max() < 2 * self.keys.size + 1024:
            self._offsets = np.full(int(self.keys.max()) + 1, -1, dtype=np.int64)
            self._offsets[self.keys] = offsets
        else:
            self._offsets = dict(zip(self.keys.tolist(), offsets.tolist()))
        self._file = None
        self._pid = None

    def offsets(self, keys: np.ndarray) -> np.ndarray:
        """Where the records of `keys` start (int64; -1 for a key the .idx lacks)."""
        if isinstance(self._offsets, dict):
            return np.fromiter((self._offsets.get(int(k), -1) for k in keys), np.int64, len(keys))
        keys = np.asarray(keys, dtype=np.int64)
        inside = (keys >= 0) & (keys < self._offsets.size)
        return np.where(inside, self._offsets[np.where(inside, keys, 0)], -1)

    def offset(self, key: int) -> int:
        key = int(key)
        if isinstance(self._offsets, dict):
            offset = self._offsets.get(key, -1)
        else:
            offset = int(self._offsets[key]) if 0 <= key < self._offsets.size else -1
        if offset < 0:
            raise RecordIOError(f"{self.idx_path}: no record with key {key}")
        return offset

    def __contains__(self, key: int) -> bool:
        try:
            self.offset(key)
        except RecordIOError:
            return False
        return True

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._file

    def read(self, key: int) -> bytes:
        """The payload of record `key`."""
        offset = self.offset(key)
        return read_frames(self._handle(), offset, where=f"{self.rec_path}: record {key} (offset {offset})")

    def read_header(self, key: int) -> tuple[IRHeader, bytes]:
        offset = self.offset(key)
        return unpack_payload(self.read(key), where=f"{self.rec_path}: record {key} (offset {offset})")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state


def _class_index(label: float | np.ndarray, where: str, num_classes: int | None = None) -> int:
    """The class of an image record: its label, or the first of its labels (as insightface reads it)."""
    value = float(label) if np.isscalar(label) else float(label[0])
    if not (math.isfinite(value) and value.is_integer() and value >= 0
            and (num_classes is None or value < num_classes)):
        bound = "" if num_classes is None else f" in [0, {num_classes})"
        raise RecordIOError(f"{where}: label {value} is not a class index{bound}")
    return int(value)


class RecordIODataset(FaceImageDataset):
    """Training images of an insightface RecordIO folder (`train.rec` + `train.idx`).

    Images are records 1 .. label[0] - 1 when record 0's header has flag > 0
    (identity range), otherwise every key in the `.idx`, as insightface's
    MXFaceDataset reads them. The number of classes comes from the `property`
    file (`num_classes,H,W`) when present, else from record 0's identity range,
    else from the largest label.
    """

    def __init__(self, root: str, *, image_size: int = 112, seed: int = 0, flip: bool = True):
        super().__init__(image_size=image_size, seed=seed, flip=flip)
        self.root = root
        rec_path, idx_path = os.path.join(root, "train.rec"), os.path.join(root, "train.idx")
        for path in (rec_path, idx_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"RecordIO folder {root!r} has no {os.path.basename(path)}")
        self.records = IndexedRecordIO(rec_path, idx_path)
        if self.records.keys.size == 0:
            raise RecordIOError(f"{idx_path}: no records")
        header0, _ = self.records.read_header(0 if 0 in self.records else self.records.keys[0])
        self.identity_range = None
        if header0.flag > 0:
            if header0.flag < 2:
                raise RecordIOError(f"{rec_path}: record 0 carries {header0.flag} label(s), expected [start, end]")
            start, end = int(header0.label[0]), int(header0.label[1])
            if start <= 1:
                raise RecordIOError(f"{rec_path}: record 0's identity range [{start}, {end}) leaves no image records")
            for key in (1, start - 1):
                if key not in self.records:
                    raise RecordIOError(
                        f"{rec_path}: record 0 says images are records 1..{start - 1}, but the .idx has no key {key}"
                    )
            self.identity_range = (start, end)
            self.image_keys = np.arange(1, start, dtype=np.int64)
        else:
            self.image_keys = self.records.keys.copy()
        self.records.close()
        self.num_classes = self._count_classes()

    def _count_classes(self) -> int:
        prop = os.path.join(self.root, "property")
        self.stored_size = None  # (H, W) of the images, when the property file says
        self.stored_size_source = "its property file"
        if os.path.isfile(prop):
            with open(prop) as f:
                fields = [field.strip() for field in f.read().split(",")]
            try:
                num_classes = int(fields[0])
            except ValueError:
                raise RecordIOError(f"{prop}: expected 'num_classes,height,width', got {fields[0]!r}") from None
            if len(fields) >= 3 and fields[1].isdigit() and fields[2].isdigit():
                self.stored_size = (int(fields[1]), int(fields[2]))
            return num_classes
        if self.identity_range is not None and self.identity_range[1] > self.identity_range[0]:
            return self.identity_range[1] - self.identity_range[0]
        # No metadata: read every header once (reads the whole file).
        if len(self.image_keys) > SCAN_NOTE_RECORDS and os.environ.get("RANK", "0") == "0":  # once, under torchrun
            print(f"note: {self.root} has no property file: reading the label of every one of its "
                  f"{len(self.image_keys)} records to count the classes (a file 'property' holding "
                  "'num_classes,height,width', as insightface ships and pack_rec writes, skips this)", file=sys.stderr)
        where = f"{self.records.rec_path}: record"
        top = max(_class_index(self.records.read_header(k)[0].label, f"{where} {k}") for k in self.image_keys)
        self.records.close()
        return top + 1

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def _index_parts(self) -> list[bytes]:
        # Where each image record starts: another packing moves them (record 0's range and the
        # .rec's size catch the rest).
        rec_size = os.path.getsize(self.records.rec_path)
        return [self.records.offsets(self.image_keys).tobytes(), str((self.identity_range, rec_size)).encode()]

    def load(self, index: int) -> tuple[np.ndarray, int]:
        key = int(self.image_keys[index])
        where = f"{self.records.rec_path}: record {key} (offset {self.records.offset(key)})"
        header, image_bytes = unpack_payload(self.records.read(key), where=where)
        label = _class_index(header.label, where, self.num_classes)
        try:
            image = decode_image(image_bytes, self.image_size, source=where)
        except ValueError as exc:
            raise RecordIOError(str(exc)) from exc
        return image, label
