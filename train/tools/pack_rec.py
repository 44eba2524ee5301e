"""Pack an ImageFolder (one sub-folder per identity), or a list file of images and labels,
into insightface's RecordIO layout, `train.rec` + `train.idx` + `property`, readable by this
trainer and by mxnet / insightface alike.

    python -m train.tools.pack_rec IMAGES OUTPUT_DIR [--quality 95] [--resize 112] [--workers N] [--overwrite]

Records: 0 holds the identity range `[N + 1, N + 1 + C]` (flag 2, no image);
1..N the images, label = identity index in sorted folder order (a list's: its k-th smallest
label is k; its images by label, in the list's order within one); N + 1 .. N + C
one per identity with the range `[first, end)` of its image records.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import multiprocessing
import os
import sys
import threading
import time
import warnings

from train.signals import (run_tool, signals_held, stop_while_importing,  # (the standard library only)
                           stop_with_the_main_process)

with stop_while_importing(__name__, "pack_rec: "):
    import numpy as np
    from PIL import Image

    from train import checkpoint
    from train.data import worker_start_method
    from train.data.imagefolder import scan_image_folder
    from train.data.imagelist import is_image_list, read_image_list, remapped_labels_note, repeated_images_note
    from train.data.recordio import RecordIOWriter, pack_payload
    from train.data.transforms import encode_image, to_rgb, unreadable_image
    from train.tools import (ArgumentParser, check_outputs, folders_missing, path_arg, plain_warnings,
                             remove_folders_made, usable_cpus)

OUTPUT_FILES = ("train.rec", "train.idx", "property")
# The workers' images go to the writer a chunk at a time, and at most _CHUNKS_PER_WORKER chunks a worker are
# in flight (submitted, not yet written), holding at most _BYTES_IN_FLIGHT bytes of images (their files' sizes
# until a chunk comes back, then its JPEGs'): the memory held stays bounded whatever the data set's size.
# 256 MiB: aligned faces (5-10 KB, 544 in flight at 8 workers: ~5 MB) never come near it, where photos of a few
# MB packed as they are (no --resize) held 1.6-2.7 GB; a chunk is then cut to its share of the budget (16 MiB
# at 8 workers, several photos), which keeps every worker busy.
_CHUNK, _CHUNKS_PER_WORKER = 32, 2
_BYTES_IN_FLIGHT = 256 * 2**20


def _image_bytes(path: str, *, resize: int | None, quality: int, counts: dict | None = None
                 ) -> tuple[bytes, tuple[int, int]]:
    """The JPEG to store for `path` and its (width, height). A JPEG already of the
    wanted size is stored as it is; anything else is decoded and re-encoded (counted in
    ``counts["re-encoded"]``)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "JPEG" and (resize is None or img.size == (resize, resize)):
                return data, img.size
            rgb = to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(unreadable_image(path, exc)) from exc
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.Resampling.BILINEAR)
    if counts is not None:
        counts["re-encoded"] = counts.get("re-encoded", 0) + 1
    return encode_image(np.asarray(rgb), quality=quality), rgb.size


def _start_worker(main_process: int) -> None:
    """A worker's initializer: a Ctrl-C at the terminal is the main process's to handle (it cancels the
    chunks not started and waits for the others); a SIGTERM ends the worker (a forked one inherits the
    main process's handler, which would raise in the worker). A worker whose main process (its parent,
    `main_process`) was killed (SIGKILL, the out-of-memory killer) ends too: it would wait for work on its
    queue forever."""
    stop_with_the_main_process()
    threading.Thread(target=_end_with_the_main_process, args=(main_process,), daemon=True).start()


def _end_with_the_main_process(main_process: int) -> None:
    # Its id is the main process's, not the parent's at this worker's start: a spawned worker imports torch for
    # seconds first, and one whose main process was killed meanwhile has a new parent by now (init, a subreaper).
    while os.getppid() == main_process:
        time.sleep(1)
    os._exit(1)


def _chunk_bytes(paths: list[str], resize: int | None, quality: int) -> list[tuple]:
    """What a worker computes: `_image_bytes` of each of `paths`, with whether it was re-encoded and the warnings
    it gave, (text, category, file, line) each, for the main process to say (`_say`)."""
    chunk = []
    for path in paths:
        counts = {}
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")  # (which to say is for the main process's filters)
            data, size = _image_bytes(path, resize=resize, quality=quality, counts=counts)
        chunk.append((data, size, bool(counts), [(str(w.message), w.category, w.filename, w.lineno) for w in said]))
    return chunk


def _file_sizes(paths: list[str]) -> list[int]:
    sizes = []
    for path in paths:
        try:
            sizes.append(os.path.getsize(path))
        except OSError:  # (the worker names the image: `_image_bytes`' error)
            sizes.append(0)
    return sizes


def _sizes(paths: list[str], threads: int):
    """The files' sizes on disk of `paths`, in their order (0 where there is none to read), taken a little ahead
    of their use by `threads` threads, _CHUNK files a task: one at a time in this process, a round trip to the
    server each on NFS or Lustre (~6 us a stat on a local disk) would set the pace of the whole pack, where the
    workers read `threads` images at a time. The first _CHUNK in this thread: the workers are forked at the first
    chunk's submission, which must find no other thread running."""
    from concurrent.futures import ThreadPoolExecutor

    batches = (paths[start:start + _CHUNK] for start in range(0, len(paths), _CHUNK))
    yield from _file_sizes(next(batches, []))
    pool = ThreadPoolExecutor(threads)
    try:
        ahead = collections.deque(pool.submit(_file_sizes, batch)
                                  for batch in itertools.islice(batches, _CHUNKS_PER_WORKER * threads))
        while ahead:
            sizes = ahead.popleft().result()
            ahead.extend(pool.submit(_file_sizes, batch) for batch in itertools.islice(batches, 1))
            yield from sizes
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _chunks(paths: list[str], max_bytes: int, threads: int):
    """`paths` in runs of consecutive images, (paths, their files' bytes on disk) each: at most _CHUNK images,
    and past its first image at most `max_bytes` (an image over it is a chunk alone). A run of _CHUNK is
    yielded without the next file's size (so the first chunk needs only the sizes `_sizes` takes itself)."""
    chunk, held = [], 0
    with contextlib.closing(_sizes(paths, threads)) as sizes:
        for path, size in zip(paths, sizes):
            if chunk and held + size > max_bytes:
                yield chunk, held
                chunk, held = [], 0
            chunk.append(path)
            held += size
            if len(chunk) == _CHUNK:
                yield chunk, held
                chunk, held = [], 0
    if chunk:
        yield chunk, held


def _say(warned: list[tuple], registries: dict) -> None:
    """The warnings a worker recorded (Pillow's, of a palette image with transparency or a very large image), said
    here as this process says its own: once at each place (`registries`, one a file, for the run), where each worker
    said them once and for images read ahead of an unreadable one, which this process never reaches."""
    for text, category, filename, lineno in warned:
        warnings.warn_explicit(text, category, filename, lineno, registry=registries.setdefault(filename, {}))


def _images_bytes(paths: list[str], *, resize: int | None, quality: int, workers: int = 0):
    """`_image_bytes` of every one of `paths` and whether it was re-encoded, yielded in their order: in this
    process with `workers` 0, else by that many processes (`_chunk_bytes`). The first image that cannot be
    read, in `paths`' order, raises as it does in this process. A generator: close it (or exhaust it) to end
    the workers. The chunks in flight, from their submission until their images are written, hold at most
    _BYTES_IN_FLIGHT (files' sizes for those not back yet); a chunk over it goes alone, when nothing else is
    held, so that it is packed too."""
    if workers == 0 or len(paths) < 2:
        for path in paths:
            counts = {}
            data, size = _image_bytes(path, resize=resize, quality=quality, counts=counts)
            yield data, size, bool(counts)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # The workers are handed the functions by their module's name, which is this module's importable one
    # also where it runs as __main__ (runpy.run_module's: a worker's __main__ is another module).
    from train.tools import pack_rec as module

    budget = _BYTES_IN_FLIGHT
    chunks = _chunks(paths, budget // (workers * _CHUNKS_PER_WORKER), workers)
    upcoming = next(chunks)
    pending = collections.deque()  # (future, its files' bytes on disk), in the paths' order
    held = 0  # the bytes of the chunks in flight: their files' sizes, then their JPEGs' once back until written
    registries = {}
    # (concurrent.futures rather than multiprocessing.Pool: a worker killed mid-chunk, by the kernel's
    # out-of-memory killer, is an error there, where a Pool waits for the lost chunk forever.)
    # (Forked or spawned by this process, never by a forkserver (worker_start_method): their parent is this one.)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(worker_start_method()),
                               initializer=module._start_worker, initargs=(os.getpid(),))

    def submit_what_fits() -> None:
        nonlocal upcoming, held
        while upcoming is not None and len(pending) < workers * _CHUNKS_PER_WORKER:
            chunk, on_disk = upcoming
            if held and held + on_disk > budget:  # (with nothing held, a chunk over the budget goes alone)
                return
            pending.append((pool.submit(module._chunk_bytes, chunk, resize, quality), on_disk))
            held += on_disk
            upcoming = next(chunks, None)

    try:
        submit_what_fits()
        while pending:
            future, on_disk = pending.popleft()
            try:
                done = future.result()
            except BrokenProcessPool as error:
                raise OSError(f"a process reading the images ended without a word (out of memory?): {error}") from None
            received = sum(len(data) for data, *_ in done)
            held += received - on_disk
            submit_what_fits()
            for data, size, re_encoded, warned in done:
                _say(warned, registries)
                yield data, size, re_encoded
            held -= received
            del future, done, data  # (written: not held while the next chunk is waited for)
            submit_what_fits()
    finally:  # an error or a stop: the chunks not started are dropped, the workers end
        chunks.close()
        pool.shutdown(wait=True, cancel_futures=True)


def pack_image_folder(image_folder: str, output_dir: str, *, quality: int = 95, resize: int | None = None,
                      overwrite: bool = False, workers: int = 0, log=sys.stderr) -> dict:
    """Write `train.rec`, `train.idx` and `property` for `image_folder` (or a list file:
    `train.data.imagelist.read_image_list`) into
    `output_dir`; returns {'images', 'identities', 'image_size'}. Files appear
    only once complete (written under temporary names, then renamed; the temporaries
    are removed on an error). Existing files are replaced only with `overwrite`
    (ValueError otherwise, before any image is read). `workers` processes read, check and encode the
    images (0: this process); the files are the same bytes whatever their number."""
    listed = is_image_list(image_folder)
    identities, samples = (read_image_list if listed else scan_image_folder)(image_folder)
    if listed:  # a record's identity is a range of records: each label's images together (a stable sort)
        samples.sort(key=lambda sample: sample[1])
    made = folders_missing(output_dir)  # (with those above it: a new n1/n2/n3's n1 and n2)
    check_outputs([os.path.join(output_dir, name) for name in OUTPUT_FILES], overwrite)
    repeats = repeated_images_note(identities, samples) if listed else None
    if log is not None and repeats:  # (said before the packing, which takes a while)
        print(f"pack_rec: warning: {repeats}", file=log)
    counts = {"re-encoded": 0}
    encoded = _images_bytes([path for path, _ in samples], resize=resize, quality=quality, workers=workers)

    def images():
        for (_, label), (data, size, re_encoded) in zip(samples, encoded):
            counts["re-encoded"] += re_encoded
            yield label, data, size

    try:
        with contextlib.closing(encoded):  # (the workers end with the packing, however it ends)
            summary = write_pack(output_dir, images(), num_images=len(samples), num_identities=len(identities),
                                 log=log)
    except BaseException:  # an error or a stop: no empty folder of this run's making is left
        remove_folders_made(made)
        raise
    note = remapped_labels_note(identities) if listed else None
    if log is not None and note:
        print(f"pack_rec: note: {note}", file=log)
    if log is not None and counts.get("re-encoded"):
        print(f"pack_rec: note: {counts['re-encoded']} of the {len(samples)} images were re-encoded as JPEG (quality "
              f"{quality}{f'; resized to {resize}x{resize} where they were not' if resize is not None else ''}): "
              "insightface's RecordIO holds JPEGs", file=log)
    return summary


def write_pack(output_dir: str, images, *, num_images: int, num_identities: int, log=sys.stderr,
               tool: str = "pack_rec", shown_dir: str | None = None) -> dict:
    """Write `train.rec`, `train.idx` and `property` into `output_dir` from `images`, an iterable of
    `num_images` (label, JPEG bytes, (width, height): None after the first where it is not known) in
    label order (each label's images together), labels in [0, num_identities), every label present.
    The layout is insightface's (the module's docstring); `property` gives the first image's size, and
    a note the other sizes seen. The files replace any there once complete:
    check them first (`check_outputs`). `shown_dir` is the folder the log names (where the caller
    will move the files: this run's outputs are then not written yet). Returns {'images', 'identities',
    'image_size'}."""
    rec_path, idx_path, property_path = (os.path.join(output_dir, name) for name in OUTPUT_FILES)
    first_identity_record = num_images + 1
    image_range = [[0, 0] for _ in range(num_identities)]
    image_size, written, previous, sizes, more_sizes = None, 0, -1, {}, False
    start = time.time()
    try:
        with RecordIOWriter(rec_path + ".tmp", idx_path + ".tmp") as writer:
            writer.write(0, pack_payload([first_identity_record, first_identity_record + num_identities], b""))
            for key, (label, data, size) in enumerate(images, 1):
                if key > num_images or not previous <= label < num_identities:
                    raise ValueError(f"{tool}: image {key} of {num_images} has label {label}: expected labels in "
                                     f"[0, {num_identities}), each label's images together")
                image_size = image_size or size
                if size is None:  # not known (clean's RecordIO images after the first)
                    pass
                elif size in sizes or len(sizes) < 3:
                    sizes[size] = True
                else:
                    more_sizes = True
                writer.write(key, pack_payload(float(label), data, id=key))
                if image_range[label][0] == 0:
                    image_range[label][0] = key
                image_range[label][1] = key + 1
                previous, written = label, key
                if log is not None and key % 10000 == 0:
                    print(f"{tool}: {key}/{num_images} images, {key / (time.time() - start):.0f}/s", file=log)
            empty = [label for label, (first, _) in enumerate(image_range) if first == 0]
            if written != num_images or empty:
                raise ValueError(f"{tool}: {written} images of the {num_images} expected, "
                                 f"{len(empty)} of {num_identities} labels without an image")
            for label, (first, end) in enumerate(image_range):
                writer.write(first_identity_record + label, pack_payload([first, end], b""))
        width, height = image_size
        with signals_held(final=shown_dir is None):  # the three files together, or none
            # (the property whole before the pack's renames: a full disk as it was written last left a new pack
            # beside another's property)
            with checkpoint.written_together() as together:
                together.write(property_path, lambda f: f.write(f"{num_identities},{height},{width}\n"), binary=False)
                os.replace(rec_path + ".tmp", rec_path)
                os.replace(idx_path + ".tmp", idx_path)
    finally:  # an error, a Ctrl-C or a SIGTERM leaves no half-written pack behind
        for tmp in (rec_path + ".tmp", idx_path + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
    if log is not None:
        shown = os.path.join(shown_dir, OUTPUT_FILES[0]) if shown_dir else rec_path
        print(f"{tool}: wrote {num_images} images of {num_identities} identities to {shown}", file=log)
        others = [f"{w}x{h}" for w, h in sizes if (w, h) != image_size]
        if others:
            print(f"{tool}: note: the images are not all {width}x{height} (width x height), the size the property "
                  f"file gives: {', '.join(others)}{' and others' if more_sizes else ''} too. Aligned faces "
                  "are all one size: align the photos first (python -m train.tools.align), or --resize N; the "
                  "trainer resizes each image to --image-size", file=log)
        elif width != height:
            print(f"{tool}: note: the images are {width}x{height} (width x height), not square as aligned faces "
                  "are (python -m train.tools.align makes 112x112 crops)", file=log)
    return {"images": num_images, "identities": num_identities, "image_size": (height, width)}


def _main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.tools.pack_rec", name="pack_rec",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("image_folder", type=path_arg, metavar="images",
                        help="root with one sub-folder of aligned face images per identity, or a list file (.lst, "
                             ".txt) of lines 'path label', 'flag<TAB>path<TAB>label' or 'index<TAB>label<TAB>path'")
    parser.add_argument("output_dir", type=path_arg, help="where train.rec, train.idx and property are written")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    parser.add_argument("--resize", type=int, default=None, metavar="N",
                        help="resize every image to N x N (default: keep sizes, store JPEGs as they are)")
    parser.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                        help="processes reading, checking and encoding the images; the files are the same whatever "
                             "their number (0: in this process; default: one a core this process may use, up to 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace train.rec, train.idx and property if OUTPUT_DIR holds them")
    args = parser.parse_args(argv)
    if args.resize is not None and args.resize < 1:
        parser.error(f"--resize must be at least 1, got {args.resize}")
    if not 1 <= args.quality <= 100:  # (as align and make_bin take it; was passed to Pillow as it was)
        parser.error(f"--quality must be 1 to 100, got {args.quality}")
    if args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")

    def pack() -> int:
        pack_image_folder(args.image_folder, args.output_dir, quality=args.quality, resize=args.resize,
                          overwrite=args.overwrite, workers=args.workers, log=sys.stderr)
        return 0

    return run_tool(pack, tool="pack_rec", whole=": the pack is written whole", blank_line=False,
                    said=lambda stop: None if stop.after_writing else
                    ": nothing written (what the folder held is as it was)")



def main(argv: list[str] | None = None) -> int:
    with plain_warnings():  # the image folder's warnings as one line each
        return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
