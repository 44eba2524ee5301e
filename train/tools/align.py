"""Align face photos to the ArcFace crop from their 5 landmarks, into a folder the trainer,
``pack_rec``, ``make_bin`` and ``train.embed`` read.

    python -m train.tools.align --images RAW_ROOT --landmarks landmarks.txt --output ALIGNED_ROOT
                                [--image-size 112] [--format jpeg|png] [--extension .jpg]
                                [--workers N] [--overwrite | --skip-existing] [--all-faces]

The landmarks file has one face per line: the image's path (relative to --images) and then ten
numbers, x1 y1 ... x5 y5 in the image's pixels (pixel centres at integers, the image turned upright
by its EXIF orientation, as OpenCV's imread gives it to a detector): the left eye, the right eye,
the nose tip, the left and the right mouth corner, left and right as seen in the image. Fields are
separated by spaces and tabs or by commas (a path with spaces in double quotes); further numbers on a
line (a detector score) are ignored; lines before the first face that do not parse (a count, a
column header) are skipped, as are blank lines and lines starting with # anywhere. This reads
insightface's ``*_name_5pts_score.txt``, CelebA's ``list_landmarks_celeba.txt`` and VGGFace2's
``loose_landmark_*.csv`` (with ``--extension .jpg``: its names have none) as they are, RFW's
``<Race>_lmk.txt`` (a label before the coordinates, told by which numbers fit a face), and what
``python -m train.tools.detect`` writes. With ``--detector FILE`` instead of ``--landmarks``, the
faces are found in every photo under --images as that tool finds them, in the same run.

Each face is warped as ``train.ijb`` warps IJB's loose crops (least-squares similarity onto the
ArcFace template, bilinear, black beyond the image; at another --image-size than 112, the 112 crop
resized, as the trainer resizes its faces) and written to the same relative path under
--output with the format's extension, so an ImageFolder (one folder per identity) stays one (with
--all-faces, where an image may be listed on several lines, a group photo's faces, the k-th face
listed of ``a.jpg`` goes to ``a_k.jpg``, k from 1, for every image). Files
appear whole or not at all. Faces that cannot be aligned (a missing or undecodable image, landmarks
that coincide) are listed at the end and the others are written; the exit status is then 1.
"""

from __future__ import annotations

import contextlib
import csv
import math
import multiprocessing
import os
import re
import secrets
import sys
import tempfile
import time

from train.signals import (Stopped, readers_may_leave, stop_on_signals,  # (the standard library only)
                           stop_while_importing, stop_with_the_main_process)

with stop_while_importing(__name__, "align: "):
    import numpy as np
    from PIL import Image, ImageOps

    from train.checkpoint import check_output_folder, dangling
    from train.data.transforms import IMAGE_EXTENSIONS, encode_image, unreadable_image
    from train.ijb import ARCFACE_TEMPLATE, align_for_model, estimate_similarity, landmarks_off_image
    from train.tools import (ArgumentParser, check_images_folder, count_of, folders_missing, made_for_outputs, path_arg,
                             remove_folders_made, taking_back_folders, usable_cpus)

FORMAT_EXTENSIONS = {"jpeg": ".jpg", "png": ".png"}
# A field of a space- or tab-separated line: in double quotes (which may hold spaces, tabs and
# doubled quotes), or a run of anything but white space.
_QUOTED_OR_PLAIN = re.compile(r'"((?:[^"]|"")*)"|(\S+)')

# A face whose landmarks, mapped onto the 112-pixel template by their best similarity, miss it by
# more than this RMS distance (in template pixels; the eyes are 35 apart) is unlike a face in the
# expected order. The template is a mean face, so a real face misses it by a few pixels (its own
# proportions, its pose); the same points with the eyes and mouth corners listed the other way round
# (the subject's left first) miss by about 20 or more.
POOR_FIT_PIXELS = 10.0
_SHOWN_FAILURES = 20


def read_face_landmarks(path: str, *, extension: str | None = None, several: bool = False,
                        notes: list[str] | None = None
                        ) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """(image names, (N, 5, 2) float64 landmarks, (N,) line numbers, the (line number, text) of the
    lines skipped before the first face) of a landmarks file (see the module's doc). ``extension``
    is appended to every name; ``several``: a name may be listed again (another face of the image).
    A file whose every line has a number between the name and the ten coordinates (RFW's
    ``<Race>_lmk.txt``: ``name label x1 ... y5``) is read so where the fields after the name miss the
    face template and those after that number fit it, with a note appended to ``notes``.
    Raises ValueError naming the line for a malformed line after the first face (or one before it
    that names an image), a name listed twice (unless ``several``), a name that is not an
    image file, text that is not UTF-8, or a file listing no face; FileNotFoundError when ``path``
    is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"landmarks file {path}: " + ("a folder" if os.path.isdir(path) else
                                                              f"no such file{dangling(path)}"))
    names, values, line_nos, seen, skipped = [], [], [], {}, []
    later = []  # each face's fields 3 to 12 as coordinates, where they are numbers (else None)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:  # line by line, so that a wrong encoding names its line
                # -sig: a byte-order mark, as Windows tools write, is not part of the first name.
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {line_no}: not UTF-8 text ({error.reason}); save the list as "
                                 "UTF-8") from None
            try:
                fields = _fields(line)
            except csv.Error as error:  # a carriage return inside a line, say
                raise ValueError(f"{path}: line {line_no}: {error}") from None
            if not fields or line.lstrip().startswith("#"):
                continue  # a blank line, a comment (a name starting with # is quoted)
            numbers = _numbers(fields[1:11])
            if len(fields) < 11 or numbers is None or not all(math.isfinite(v) for v in numbers):
                # A count or a column header before the faces (no image name, no coordinate after
                # its first field); but not a face that does not parse.
                if not names and not any(field.lower().endswith(IMAGE_EXTENSIONS) for field in fields) \
                        and not any(_numbers([field]) for field in fields[1:]):
                    skipped.append((line_no, line.strip()))
                    continue
                if "" in fields[:11]:
                    header = f"; its column {fields.index('') + 1} is empty"
                else:
                    header = "; if it is a header or a comment, delete it or start it with #" if not names else ""
                raise ValueError(f"{path}: line {line_no}: expected 'image x1 y1 ... x5 y5' (a path and 10 finite "
                                 f"coordinates; a path with spaces in quotes), got {line.strip()[:120]!r}{header}")
            if not fields[0]:
                raise ValueError(f"{path}: line {line_no}: the image path is empty")
            name = fields[0] + (extension or "")
            key = os.path.normpath(name)  # ./a.jpg is a.jpg
            if key in seen and not several:
                raise ValueError(f"{path}: line {line_no}: {name} is listed again (first on line {seen[key]}): "
                                 "one face an image is read; keep one of its lines, or pass --all-faces to take "
                                 "each line as a face (a group photo's)")
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                hint = "; its names have no extension? pass --extension .jpg" \
                    if not extension and not os.path.splitext(name)[1] else ""
                raise ValueError(f"{path}: line {line_no}: {name} is not a {'/'.join(IMAGE_EXTENSIONS)} file{hint}")
            seen.setdefault(key, line_no)
            names.append(name)
            values.append(numbers)
            line_nos.append(line_no)
            shifted = _numbers(fields[2:12]) if len(fields) >= 12 else None
            later.append(shifted if shifted is not None and all(math.isfinite(v) for v in shifted) else None)
    if not names:
        raise ValueError(f"{path}: no line of the form 'image x1 y1 ... x5 y5'")
    landmarks = np.array(values, dtype=np.float64).reshape(-1, 5, 2)
    if all(v is not None for v in later):
        # A label before the coordinates, not a score after them (insightface's lists): a file-wide
        # choice, by which reading fits faces (read as coordinates, a label pairs with x1, and y5 is lost).
        shifted = np.array(later, dtype=np.float64).reshape(-1, 5, 2)
        as_written, after_label = (_median_fit(points) for points in (landmarks, shifted))
        if as_written > POOR_FIT_PIXELS >= after_label:
            landmarks = shifted
            if notes is not None:
                notes.append(f"{path}: its lines read as 'image label x1 y1 ... x5 y5' (RFW's <Race>_lmk.txt): the "
                             f"ten numbers after each name miss the face template (median RMS {as_written:.1f} of 112 "
                             f"pixels), the ten after the next fit it ({after_label:.1f})")
    return names, landmarks, np.array(line_nos), skipped


def _median_fit(landmarks: np.ndarray) -> float:
    errors = fit_errors(landmarks)
    usable = np.isfinite(errors)
    return float(np.median(errors[usable])) if usable.any() else math.inf


def _fields(line: str) -> list[str]:
    """A line's fields: separated by commas when it has the 11 fields of a face that way (a CSV,
    whose names may be quoted, as VGGFace2 quotes them; an empty field stays, to be refused, rather
    than shift the columns), else by spaces and tabs (a name with spaces or commas in double
    quotes, or with commas as it is)."""
    line = line.strip()
    if "," in line:
        row = [field.strip() for field in next(csv.reader([line], skipinitialspace=True))]
        if len(row) >= 11:
            return row if any(row) else []
    if '"' in line:
        return [m[1].replace('""', '"') if m[1] is not None else m[2] for m in _QUOTED_OR_PLAIN.finditer(line)]
    return line.split()


def _numbers(fields: list[str]) -> list[float] | None:
    try:
        return [float(x) for x in fields]
    except ValueError:
        return None


def face_numbers(names: list[str]) -> list[int]:
    """Each face's number among its image's faces (1 for the first listed, 2 for the next, ...)."""
    counts: dict[str, int] = {}
    numbers = []
    for name in names:
        key = os.path.normpath(name)
        counts[key] = counts.get(key, 0) + 1
        numbers.append(counts[key])
    return numbers


def output_paths(names: list[str], images: str, output: str, fmt: str, *, several: bool = False) -> list[str]:
    """Where each image's crop goes: its path relative to ``images``, under ``output``, with the
    format's extension (``several``: with ``_<k>`` after the name for its image's k-th face).
    ValueError for a name outside ``images``, for two names that would write one file (``a.png``
    and ``a.jpg``), and for a crop that would replace its own photo."""
    root, suffix, paths, taken = os.path.abspath(images), FORMAT_EXTENSIONS[fmt], [], {}
    numbers = face_numbers(names) if several else [None] * len(names)
    for name, number in zip(names, numbers):
        source = os.path.abspath(os.path.join(root, name))
        relative = os.path.relpath(source, root)
        if relative == os.curdir or relative.split(os.sep)[0] == os.pardir:
            raise ValueError(f"{name} is not inside --images {images}")
        target = os.path.join(output, os.path.splitext(relative)[0] + ("" if number is None else f"_{number}") + suffix)
        if target in taken:
            raise ValueError(f"{taken[target]} and {name} would both be written to {target}")
        if os.path.realpath(target) == os.path.realpath(source):
            raise ValueError(f"the crop of {name} would replace the photo itself ({target}): name another --output")
        taken[target] = name
        paths.append(target)
    return paths


def fit_errors(landmarks: np.ndarray) -> np.ndarray:
    """(N,) RMS distance, in 112-pixel template pixels, between each face's (N, 5, 2) landmarks
    mapped by their best similarity (``estimate_similarity``'s closed form, for all faces at once)
    and the template; inf where the points coincide."""
    z = landmarks[..., 0] + 1j * landmarks[..., 1]
    w = ARCFACE_TEMPLATE[:, 0] + 1j * ARCFACE_TEMPLATE[:, 1]
    z_c, w_c = z - z.mean(axis=1, keepdims=True), w - w.mean()
    spread = np.sum(np.abs(z_c) ** 2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.sum(np.conj(z_c) * w_c, axis=1) / spread
        errors = np.sqrt(np.mean(np.abs(a[:, None] * z_c - w_c) ** 2, axis=1))
    return np.where(spread > 0, errors, math.inf)


def landmark_notes(landmarks: np.ndarray, line_nos: np.ndarray) -> list[str]:
    """Warnings about landmarks that make poor crops: a file whose faces mostly miss the template
    (a wrong column order), single faces that miss it, eyes too close for pixel coordinates."""
    errors = fit_errors(landmarks)
    usable = np.isfinite(errors)
    if not usable.any():
        return []
    notes = []
    median = float(np.median(errors[usable]))
    if median > POOR_FIT_PIXELS:
        swapped = int(np.sum(landmarks[:, 0, 0] > landmarks[:, 1, 0]))
        notes.append(f"the landmarks fit the face template poorly (median RMS miss {median:.1f} of 112 pixels; faces "
                     "in the expected order miss by a few): check the column order, which must be left eye, right "
                     "eye, nose, left mouth, right mouth, x before y"
                     + (f"; {swapped} of {len(landmarks)} faces list the eye further right first"
                        if swapped > len(landmarks) // 2 else ""))
    else:
        poor = np.flatnonzero(usable & (errors > POOR_FIT_PIXELS))
        if poor.size:
            shown = ", ".join(str(n) for n in line_nos[poor[:8]]) + (", ..." if poor.size > 8 else "")
            notes.append(f"{poor.size} face(s) fit the face template poorly (RMS miss over {POOR_FIT_PIXELS:g} of 112 "
                         f"pixels), lines {shown}: a strong profile does, and so do landmarks in another order; "
                         "their crops are made all the same")
    eyes = np.linalg.norm(landmarks[usable, 1] - landmarks[usable, 0], axis=1)
    if float(np.median(eyes)) < 4:
        notes.append(f"the eyes lie {float(np.median(eyes)):.2g} pixels apart (median): landmarks must be in pixels, "
                     "not fractions of the image")
    return notes


def write_file_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` under a temporary name, then renamed: a killed run leaves whole crops
    (and at most a hidden temporary a worker, which ``remove_temporaries`` removes). Not synced to
    the disk, unlike checkpoints: a dataset is millions of small files, and a crash of the machine
    itself, which may leave an empty crop behind a rename, is rare enough to be handled by hand
    (remove the empty files, rerun with --skip-existing)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    for attempt in range(3):
        try:
            os.makedirs(folder, exist_ok=True)
            f = open(tmp, "wb")
            break
        except FileNotFoundError:
            # Another align into this --output took the folder back, empty as this one had just made it (its
            # run failed or was stopped: ``remove_folders_made``): made again.
            if attempt == 2:
                raise
    try:
        with f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def remove_temporaries(folders) -> int:
    """Removes the temporaries of ``write_file_atomic`` that a stopped or killed worker left in
    ``folders`` (a worker's SIGTERM ends it mid-write); returns how many."""
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
                    removed += 1
    return removed


# What the worker processes align (set before they start, inherited or passed to their initializer).
_job: dict = {}


def _start(job: dict, worker: bool = True) -> None:
    _job.update(job)
    if worker:  # (the main process ends the workers with a SIGTERM each, on a Ctrl-C too)
        stop_with_the_main_process()


def _align_one(index: int) -> tuple[int, str]:
    """Aligns and writes face ``index`` of ``_job``; returns (index, "" or why it failed)."""
    source = os.path.join(_job["images"], _job["names"][index])
    try:
        estimate_similarity(_job["landmarks"][index], ARCFACE_TEMPLATE)
    except ValueError:
        return index, f"{source}: its 5 landmarks coincide"
    try:
        with Image.open(source) as image:
            upright = ImageOps.exif_transpose(image)
            off = landmarks_off_image(_job["landmarks"][index], upright.width, upright.height)
            if off:
                return index, f"{source}: {off}"
            crop = align_for_model(upright, _job["landmarks"][index], _job["image_size"])
    except FileNotFoundError:
        return index, unreadable_image(source, "no such file")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return index, unreadable_image(source, error)
    data = encode_image(crop, fmt=_job["format"], quality=_job["quality"])
    try:
        write_file_atomic(_job["outputs"][index], data)
    except OSError as error:
        return index, f"{_job['outputs'][index]}: cannot write: {error}"
    return index, ""


def _align_faces(indices: range) -> list[tuple[int, str]]:
    """`_align_one` of each of `indices`: a worker's task."""
    return [_align_one(index) for index in indices]


def align_folder(images: str, names: list[str], landmarks: np.ndarray, outputs: list[str], *, image_size: int = 112,
                 fmt: str = "jpeg", quality: int = 95, workers: int = 0,
                 progress: bool = True) -> list[tuple[int, str]]:
    """Aligns face i of ``names``/``landmarks`` into ``outputs[i]`` for every i; returns the
    (index, reason) of the faces that could not be aligned, in index order."""
    job = {"images": images, "names": names, "landmarks": landmarks, "outputs": outputs,
           "image_size": int(image_size), "format": fmt, "quality": int(quality)}
    failures = []
    bar = _progress(len(names), progress)
    if workers == 0 or len(names) < 2:
        _start(job, worker=False)
        results = map(_align_one, range(len(names)))
        failures = _collect(results, bar)
    else:
        before = set(multiprocessing.active_children())
        with multiprocessing.get_context().Pool(workers, initializer=_start, initargs=(job,)) as pool:
            started = set(multiprocessing.active_children()) - before  # (a Pool starts its workers at once)
            chunks = pool.imap_unordered(_align_faces, (range(start, min(start + 32, len(names)))
                                                        for start in range(0, len(names), 32)))
            failures = _collect(_while_the_workers_live(chunks, started), bar)
    if bar is not None:
        bar.close()
    return sorted(failures)


def _progress(total: int, enabled: bool):
    from train.progress import progress_bar

    return progress_bar(total, "align", "face") if enabled else None


class WorkerEnded(OSError):
    """A worker process of align_folder's pool ended in the middle of the run."""


def _while_the_workers_live(chunks, workers):
    """The results of a Pool's ``chunks`` (its imap_unordered, a list each) as they come; WorkerEnded once one of
    its ``workers`` has ended (killed by the kernel's out-of-memory killer, say): the Pool starts another but
    waits forever for the faces the killed one held."""
    while True:
        try:
            yield from chunks.next(timeout=1)
        except StopIteration:
            return
        except multiprocessing.TimeoutError:
            ended = [worker.exitcode for worker in workers if worker.exitcode is not None]
            if ended:
                raise WorkerEnded(f"a process aligning the faces ended without a word (exit code {ended[0]}; "
                                  "out of memory?)") from None


def _collect(results, bar) -> list[tuple[int, str]]:
    failures = []
    for index, reason in results:
        if reason:
            failures.append((index, reason))
        if bar is not None:
            bar.update(1)
    return failures


def main(argv: list[str] | None = None) -> int:
    with readers_may_leave():  # (its reader gone, 2>&1 | head: its first line raised, and no face was aligned)
        return taking_back_folders(lambda: _main(argv))  # (a stop before any crop: no new --output is left)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m train.tools.align", name="align",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=path_arg, required=True,
                        help="the folder the landmarks file's image paths are relative to (with --detector: the "
                             "photos, every image under it)")
    faces = parser.add_mutually_exclusive_group(required=True)
    faces.add_argument("--landmarks", type=path_arg,
                       help="one face a line: image path, then x1 y1 ... x5 y5 (left eye, right eye, nose tip, "
                            "left and right mouth corner, in image pixels)")
    faces.add_argument("--detector", type=path_arg, metavar="FILE",
                       help="find the faces with this SCRFD detector (an ONNX file with keypoints: insightface's "
                            "det_10g.onnx; needs onnxruntime) as python -m train.tools.detect finds them with its "
                            "defaults, instead of reading --landmarks: each photo's main face (with --all-faces, "
                            "every face)")
    parser.add_argument("--device", default="cpu",
                        help="with --detector: where it runs: cpu, or cuda[:N] with onnxruntime-gpu (default: cpu)")
    parser.add_argument("--output", type=path_arg, required=True, help="the folder the aligned crops are written to")
    parser.add_argument("--image-size", type=int, default=112,
                        help="side of the square crop (default 112). Another size is the 112 crop resized (bilinear), "
                             "the face framed as the trainer shows a model of that size its 112 faces, and as "
                             "train.embed --landmarks and train.ijb frame it")
    parser.add_argument("--format", choices=tuple(FORMAT_EXTENSIONS), default="jpeg",
                        help="the crops' encoding (default jpeg)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--extension", default=None,
                        help="appended to every image path of the landmarks file (VGGFace2's lists: .jpg)")
    parser.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                        help="processes decoding, warping and encoding (0: in this process; default: one a core "
                             "this process may use, up to 8)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace crops that exist")
    existing.add_argument("--skip-existing", action="store_true",
                          help="leave crops that exist as they are and align the others (to finish a stopped run)")
    parser.add_argument("--all-faces", action="store_true",
                        help="an image listed on several lines is several faces (a group photo's, as detect "
                             "--all-faces lists them): the k-th listed of a.jpg goes to a_k.jpg, for every image")
    args = parser.parse_args(argv)
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8, got {args.image_size}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be 1 to 100, got {args.quality}")
    if args.format == "png" and args.quality != parser.get_default("quality"):  # (was taken without a word)
        parser.error("--quality is JPEG's: --format png is lossless")
    if args.device != parser.get_default("device") and not args.detector:
        parser.error("--device goes with --detector: --landmarks aligns on the CPU")
    if args.detector:
        from train.tools.detect import detector_device_error

        if detector_device_error(args.device):  # (a device name that is none was torch's traceback)
            parser.error(detector_device_error(args.device))
    if args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")
    if args.extension and args.detector:
        parser.error("--extension goes with --landmarks (the detector lists the photos' own names)")
    started = time.monotonic()

    try:
        check_images_folder(args.images)
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise ValueError(f"--output {args.output} is a file, not a folder")
        if os.path.realpath(args.output) == os.path.realpath(args.images):
            raise ValueError(f"--output {args.output} is --images: the crops would go among the photos; name another "
                             "folder")
        # A file in the way or a folder it cannot write in: said before the detection (minutes for many photos;
        # it came after) and the reading of the landmarks. (Made, and written in, once the faces are known.)
        check_output_folder(args.output, f"--output {args.output}")  # (was "...cannot be written: Not a directory")
        if args.detector:
            names, landmarks, failed = _detected_faces(args)
            line_nos, skipped = np.zeros(len(names), dtype=np.int64), []
            where = [name + (f"#{number}" if args.all_faces else "")
                     for name, number in zip(names, face_numbers(names))]
        else:
            read_notes = []
            names, landmarks, line_nos, skipped = read_face_landmarks(args.landmarks, extension=args.extension,
                                                                      several=args.all_faces, notes=read_notes)
            for note in read_notes:
                print(f"align: note: {note}", file=sys.stderr)
            failed, where = [], [f"line {n}" for n in line_nos]
        outputs = output_paths(names, args.images, args.output, args.format, several=args.all_faces)
        if not args.detector and names and not any(os.path.isfile(os.path.join(args.images, n)) for n in names):
            # Not a few missing photos (listed at the end) but the wrong folder: said before any work.
            raise ValueError(f"none of the {len(set(names))} photos {args.landmarks} lists is under --images "
                             f"{args.images} (line {line_nos[0]}: {os.path.join(args.images, names[0])}): --images "
                             "is the folder its paths are relative to"
                             + ("" if args.extension else " (--extension adds a suffix its names lack)"))
        _check_writable(args.output)
    except (OSError, ValueError) as error:
        print(f"align: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:  # during the detection: nothing is written before it ends
        print(f"\nalign: stopped by {stop.name} during the detection; no crop was written", file=sys.stderr)
        return 128 + stop.number
    if skipped:
        print(f"align: skipped {len(skipped)} line(s) before the first face of {args.landmarks} (a count or a "
              f"header): {', '.join(repr(text[:40]) for _, text in skipped[:2])}{', ...' if len(skipped) > 2 else ''}",
              file=sys.stderr)

    twins = [(path, twin) for path in outputs for twin in _other_format_paths(path) if os.path.lexists(twin)]
    if twins:
        print(f"align: error: {twins[0][1]} exists where {os.path.basename(twins[0][0])} goes ({len(twins)} such "
              "crops of another --format): the folder would hold those faces twice; keep --format as it was, or name "
              "another --output", file=sys.stderr)
        return 2
    present = [i for i, path in enumerate(outputs) if os.path.lexists(path)]
    if present and not (args.overwrite or args.skip_existing):
        print(f"align: error: {len(present)} of the crops exist already ({outputs[present[0]]}, ...): pass "
              "--skip-existing to align the others, or --overwrite to replace them", file=sys.stderr)
        return 2
    if present and args.skip_existing:
        if len(present) > 20000:  # about 50 us each from a warm cache
            print(f"align: checking the size of the {len(present)} existing crops", file=sys.stderr)
        others, empty, foreign = _check_existing([outputs[i] for i in present], args.image_size)
        if others:
            path, width, height = others[0]
            print(f"align: error: {len(others)} of the {len(present)} existing crops are not --image-size "
                  f"{args.image_size} ({path} is {width}x{height}{', ...' if len(others) > 1 else ''}): "
                  "--skip-existing would mix crop sizes; name another --output, or pass --overwrite", file=sys.stderr)
            return 2
        if empty:  # what a crash of the machine may leave behind a rename (see write_file_atomic)
            print(f"align: {len(empty)} existing crop(s) are empty ({outputs[present[empty[0]]]}"
                  f"{', ...' if len(empty) > 1 else ''}): aligned again", file=sys.stderr)
        if foreign:  # not written here: left to whoever wrote them, as --skip-existing promises
            print(f"align: warning: {len(foreign)} file(s) where crops go are not images "
                  f"({outputs[present[foreign[0]]]}{', ...' if len(foreign) > 1 else ''}): left as they are",
                  file=sys.stderr)
        again = set(empty)
        present = [i for k, i in enumerate(present) if k not in again]
    todo = np.setdiff1d(np.arange(len(names)), present) if args.skip_existing else np.arange(len(names))
    folders = sorted({os.path.dirname(path) for path in outputs})
    remove_temporaries(folders)  # what an earlier run's killed workers left half-written
    for note in landmark_notes(landmarks[todo], line_nos[todo]) if len(todo) and not args.detector else []:
        print(f"align: warning: {note}", file=sys.stderr)

    source = args.landmarks or f"the photos under {args.images}"
    print(f"align: {len(todo)} face(s) of {source} to {args.output} at {args.image_size}px"
          + (f" ({len(present)} existing left as they are)" if args.skip_existing and present else ""), file=sys.stderr)
    # The workers make a person's folder as they write its first crop, out of this process's sight: the folders
    # not there yet are noted now, to be taken back while empty (taking_back_folders: a stop, a failure).
    made = _folders_to_make(folders)
    for folder in reversed(made):  # each alone, deepest taken back first: one never made keeps none above it
        made_for_outputs([folder])
    try:
        with stop_on_signals():
            failures = align_folder(args.images, [names[i] for i in todo], landmarks[todo],
                                    [outputs[i] for i in todo], image_size=args.image_size, fmt=args.format,
                                    quality=args.quality, workers=args.workers)
    except Stopped as stop:
        remove_temporaries(folders)  # the pool's workers have ended (its block terminated them)
        print(f"\nalign: stopped by {stop.name}: the crops written are whole; rerun with --skip-existing to align the "
              "rest", file=sys.stderr)
        return 128 + stop.number
    except WorkerEnded as error:
        remove_temporaries(folders)
        print(f"\nalign: error: {error}: the crops written are whole; rerun with --skip-existing to align the rest",
              file=sys.stderr)
        return 2
    reasons = dict(failures)
    if reasons:  # a crop that could not be written (a full disk) leaves the folder made for it empty
        for folder in made:
            remove_folders_made([folder])
    listed = [f"{where[todo[i]]}: {reasons[i]}" for i in sorted(reasons)] + failed
    for shown, text in enumerate(listed):
        if shown == _SHOWN_FAILURES:
            print(f"align: ... and {len(listed) - shown} more", file=sys.stderr)
            break
        print(f"align: {text}", file=sys.stderr)
    written = len(todo) - len(reasons)
    print(f"align: wrote {written} crop(s) to {args.output} in {time.monotonic() - started:.1f} s"
          + (f"; {len(reasons)} face(s) could not be aligned" if reasons else "")
          + (f"; {len(failed)} photo(s) without a face or unreadable" if failed else ""), file=sys.stderr)
    return 1 if reasons or failed else 0


def _detected_faces(args) -> tuple[list[str], np.ndarray, list[str]]:
    """(each face's photo, relative to --images; (F, 5, 2) landmarks; "<photo>: why" for each photo
    without a face or unreadable) of the photos under --images, found by --detector. What the photos'
    names decide is checked before any detection (two photos that would write one crop, crops named
    the other way of --all-faces). With --skip-existing and one face a photo, the existing crops are
    checked as the landmarks route checks them, and photos with a good crop are not detected again."""
    from train.embed import detect_faces, images_under

    root = os.path.realpath(args.images)
    if os.path.commonpath([root, os.path.realpath(args.output)]) == root:
        raise ValueError(f"--output {args.output} is inside --images: the next run would take the crops for photos; "
                         "name a folder beside it")
    paths = images_under(args.images)  # (was "--images <it> holds no .jpg/.jpeg/.png/.bmp images")
    names = [os.path.relpath(p, args.images) for p in paths]
    crops = output_paths(names, args.images, args.output, args.format)  # one face a photo: its plain name
    if args.all_faces:
        plain = [crop for crop in crops if os.path.lexists(crop)]
        if plain:
            raise ValueError(f"{plain[0]} exists: crops of one face a photo ({len(plain)}) are where --all-faces "
                             "writes <photo>_<k>; name another --output, or align without --all-faces")
    else:
        numbered = [crop for crop in output_paths(names, args.images, args.output, args.format, several=True)
                    if os.path.lexists(crop)]
        if numbered:
            # (counted by photo: output_paths(several=True) names each photo's first crop, <photo>_1)
            raise ValueError(f"{numbered[0]} exists: crops of --all-faces (of {count_of(len(numbered), 'photo')}) are "
                             "where this run writes one face a photo; name another --output, or pass --all-faces")
    if args.skip_existing and not args.all_faces:
        present = [i for i, crop in enumerate(crops) if os.path.lexists(crop)]
        others, empty, _ = _check_existing([crops[i] for i in present], args.image_size)
        if others:
            path, width, height = others[0]
            raise ValueError(f"{len(others)} of the {len(present)} existing crops are not --image-size "
                             f"{args.image_size} ({path} is {width}x{height}): --skip-existing would mix crop sizes; "
                             "name another --output, or pass --overwrite")
        done = {present[k] for k in range(len(present))} - {present[k] for k in empty}
        paths = [p for i, p in enumerate(paths) if i not in done]
    with stop_on_signals():  # the detector's loader workers leave Ctrl-C and SIGTERM to this process
        photos, points, _, failures = detect_faces(args.detector, paths, all_faces=args.all_faces,
                                                   device=args.device, workers=args.workers)
    prefix = os.path.join(args.images, "")
    failed = [text[len(prefix):] if text.startswith(prefix) else text for text in failures]
    return [os.path.relpath(paths[i], args.images) for i in photos], points, failed


def _folders_to_make(folders: list[str]) -> list[str]:
    """Those of ``folders``, and of the folders above them, that are not there yet (``folders_missing``'s), deepest
    first: what writing into them makes."""
    missing = set()
    for folder in folders:
        missing.update(folders_missing(folder))
    return sorted(missing, key=lambda folder: folder.count(os.sep), reverse=True)


def _check_writable(folder: str) -> None:
    """Makes ``folder`` and writes a file in it, before any crop is made (``check_output_folder`` has
    refused a file in the way and a folder it cannot write in); OSError naming --output when it cannot."""
    made = folders_missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        made_for_outputs(made)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"--output {folder} cannot be written: {error.strerror or error}") from None


def _check_existing(paths: list[str], size: int) -> tuple[list[tuple[str, int, int]], list[int], list[int]]:
    """((path, width, height) of each of ``paths`` that is not a ``size`` square, the indices of
    the empty ones, the indices of the others that do not open as images), from their headers."""
    others, empty, foreign = [], [], []
    for k, path in enumerate(paths):
        try:
            if os.path.getsize(path) == 0:
                empty.append(k)
                continue
            with Image.open(path) as crop:
                if crop.width != crop.height or crop.width != size:
                    others.append((path, crop.width, crop.height))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            foreign.append(k)
    return others, empty, foreign


def _other_format_paths(path: str) -> list[str]:
    """Where a crop of ``path``'s face in the other formats would be."""
    stem, suffix = os.path.splitext(path)
    return [stem + other for other in FORMAT_EXTENSIONS.values() if other != suffix]


if __name__ == "__main__":
    sys.exit(main())
