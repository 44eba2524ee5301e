"""Small synthetic trees in the on-disk layouts of RFW, IJB-C and TinyFace, drawn with the demo's face renderer,
so that ``train.verify``, ``train.ijb`` and ``train.tinyface`` can be tried (and their documented outputs
reproduced) without the real releases. The people are not the demo's training identities.

    python benchmarks/make_synthetic_eval_sets.py /tmp/eval_sets
    python -m train.verify --model runs/small/checkpoint.pt --targets /tmp/eval_sets/RFW
    python -m train.ijb --model runs/small/checkpoint.pt --data-root /tmp/eval_sets/IJB_release --output ijbc.json
    python -m train.tinyface --model runs/small/checkpoint.pt --data-root /tmp/eval_sets/tinyface
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import checkpoint, rfw, tinyface  # noqa: E402
from train.data.synthetic import render_face, verification_identity_base  # noqa: E402
from train.ijb import ALIGNED_SIZE, ARCFACE_TEMPLATE, warp_affine  # noqa: E402
from train.signals import run_tool, signals_held  # noqa: E402
from train.tools import (folders_missing, hidden_beside, made_for_outputs, remove_killed_runs_trees,  # noqa: E402
                         replace_folder)

SETS = ("rfw", "ijbc", "tinyface")
# Where each set goes under the output folder: the folder its tool is given.
FOLDERS = {"rfw": "RFW", "ijbc": "IJB_release", "tinyface": "tinyface"}
LOOSE = 160  # the side of RFW's and IJB-C's loose crops
RFW_IDENTITIES, RFW_IMAGES, RFW_FOLDS, RFW_PAIRS_PER_FOLD = 12, 6, 10, 3  # 60 pairs a race
IJB_IDENTITIES = 30  # two templates each: a photo and a two-frame video
IJB_SUBJECT_BASE = 500  # the 1:N lists' subject id of identity 0
TINY_PROBES, TINY_MATCHES, TINY_DISTRACTORS = 30, 2, 200


def loose_crop(face: np.ndarray, rng: np.random.Generator, background: int) -> tuple[np.ndarray, np.ndarray]:
    """(the LOOSE x LOOSE crop, its (5, 2) landmarks): the 112-pixel aligned ``face`` turned, scaled and moved
    by a random similarity onto a plain grey background; the landmarks are the ArcFace template's image."""
    angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.9, 1.15)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    matrix = np.array([[c, -s, 0.0], [s, c, 0.0]])
    centre = np.full(2, (ALIGNED_SIZE - 1) / 2)
    matrix[:, 2] = (LOOSE - 1) / 2 - matrix[:, :2] @ centre + rng.uniform(-8, 8, 2)
    drawn = warp_affine(Image.fromarray(face), matrix, LOOSE).astype(np.float32)
    cover = warp_affine(Image.new("RGB", face.shape[1::-1], (255, 255, 255)), matrix, LOOSE) / 255.0
    crop = drawn + (1 - cover) * background  # (warp_affine fades to black beyond the face)
    landmarks = ARCFACE_TEMPLATE @ matrix[:, :2].T + matrix[:, 2]
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8), landmarks


def points(landmarks: np.ndarray) -> str:
    return " ".join(f"{v:.3f}" for v in landmarks.reshape(-1))


def write_rfw(root: str, seed: int) -> None:
    """RFW's release as it unpacks: ``images/test/data/<Race>/<id>/<id>_<NNNN>.jpg`` (loose crops) and
    ``images/test/txts/<Race>/<Race>_pairs.txt``, ``<Race>_lmk.txt``; per race 10 folds of 3 matched then 3
    mismatched pairs, as RFW's 10 folds are 300 of each."""
    test = os.path.join(root, "images", "test")
    for r, race in enumerate(rfw.RACES):
        rng = np.random.default_rng((seed, r))
        base = verification_identity_base(f"RFW/{race}")
        names = [f"m.0{race[:2].lower()}{k:03d}" for k in range(RFW_IDENTITIES)]
        txts = os.path.join(test, "txts", race)
        os.makedirs(txts)
        lmk = []
        for k, who in enumerate(names):
            os.makedirs(os.path.join(test, "data", race, who))
            for n in range(1, RFW_IMAGES + 1):
                crop, landmarks = loose_crop(render_face(seed, base + k, n, ALIGNED_SIZE), rng, 70 + 30 * r)
                image = f"{who}/{who}_{n:04d}.jpg"
                Image.fromarray(crop).save(os.path.join(test, "data", race, image), quality=95)
                lmk.append(f"test/data/{race}/{image}\t{k}\t{points(landmarks)}\n")
        pairs = []
        for _ in range(RFW_FOLDS):
            for _ in range(RFW_PAIRS_PER_FOLD):
                who = names[rng.integers(RFW_IDENTITIES)]
                n1, n2 = rng.choice(np.arange(1, RFW_IMAGES + 1), 2, replace=False)
                pairs.append(f"{who}\t{n1}\t{n2}\n")
            for _ in range(RFW_PAIRS_PER_FOLD):
                a, b = rng.choice(RFW_IDENTITIES, 2, replace=False)
                n1, n2 = rng.integers(1, RFW_IMAGES + 1, 2)
                pairs.append(f"{names[a]}\t{n1}\t{names[b]}\t{n2}\n")
        with open(os.path.join(txts, f"{race}_pairs.txt"), "w") as f:
            f.writelines(pairs)
        with open(os.path.join(txts, f"{race}_lmk.txt"), "w") as f:
            f.writelines(lmk)


def write_ijbc(root: str, seed: int) -> None:
    """insightface's ``IJB_release/IJBC``: ``loose_crop/<n>.jpg`` and in ``meta/`` ``ijbc_face_tid_mid.txt``,
    ``ijbc_name_5pts_score.txt``, ``ijbc_template_pair_label.txt`` (every pair of templates) and the 1:N lists
    (each identity's first template enrolled, the first half of them in G1, the others in G2; the second
    templates are the probes)."""
    rng = np.random.default_rng((seed, len(rfw.RACES)))
    base = verification_identity_base("IJBC")
    meta, crops = os.path.join(root, "IJBC", "meta"), os.path.join(root, "IJBC", "loose_crop")
    os.makedirs(meta)
    os.makedirs(crops)
    tid_mid, landmark_lines, templates, images_of = [], [], [], {}
    for who in range(IJB_IDENTITIES):
        for _ in range(2):
            template_id = 100 + len(templates)
            templates.append((template_id, who))
            for media_id, frames in ((1000 + template_id, 1), (2000 + template_id, 2)):
                for _ in range(frames):
                    name = f"{len(tid_mid) + 1}.jpg"
                    face = render_face(seed, base + who, len(tid_mid), ALIGNED_SIZE)
                    crop, landmarks = loose_crop(face, rng, 110)
                    Image.fromarray(crop).save(os.path.join(crops, name), quality=95)
                    landmark_lines.append(f"{name} {points(landmarks)} {rng.uniform(0.5, 1.0):.3f}\n")
                    tid_mid.append(f"{name} {template_id} {media_id}\n")
                    images_of.setdefault(template_id, []).append(name)
    pairs = [f"{a} {b} {int(wa == wb)}\n" for i, (a, wa) in enumerate(templates) for b, wb in templates[i + 1:]]
    for suffix, lines in (("name_5pts_score", landmark_lines), ("face_tid_mid", tid_mid),
                          ("template_pair_label", pairs)):
        with open(os.path.join(meta, f"ijbc_{suffix}.txt"), "w") as f:
            f.writelines(lines)
    half = 2 * (IJB_IDENTITIES // 2)
    lists = {"gallery_G1": templates[0:half:2], "gallery_G2": templates[half::2], "probe_mixed": templates[1::2]}
    for name, chosen in lists.items():
        with open(os.path.join(meta, f"ijbc_1N_{name}.csv"), "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            f.writelines(f"{t},{IJB_SUBJECT_BASE + who},img/{image}\n" for t, who in chosen for image in images_of[t])


def write_tinyface(root: str, seed: int) -> None:
    """TinyFace's ``tinyface/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}/<identity>_<n>.jpg``: one
    probe and two gallery faces of each of 30 people and 200 distractors, each face shrunk to 16-32 pixels
    (the probes cut narrower than tall). The distractors' names are not read (the release's have another
    form); theirs start from 1000 so that none reads as a probe's identity."""
    rng = np.random.default_rng((seed, len(rfw.RACES) + 1))
    base = verification_identity_base("TinyFace")
    data = os.path.join(root, "Testing_Set")
    for folder in tinyface.FOLDERS:
        os.makedirs(os.path.join(data, folder))

    def save(identity: int, sample: int, path: str, *, narrow: bool = False) -> None:
        side = int(rng.integers(16, 33))
        image = Image.fromarray(render_face(seed, base + identity, sample, ALIGNED_SIZE))
        image = image.resize((side, side), Image.BICUBIC)
        if narrow:  # as the release's probes, which are not square
            cut = side // 8
            image = image.crop((cut, 0, side - cut, side))
        image.save(os.path.join(data, path), quality=95)

    for who in range(1, TINY_PROBES + 1):
        save(who, 0, os.path.join("Probe", f"{who}_1.jpg"), narrow=True)
        for k in range(1, TINY_MATCHES + 1):
            save(who, k, os.path.join("Gallery_Match", f"{who}_{k}.jpg"))
    for k in range(TINY_DISTRACTORS):
        save(1000 + k, 0, os.path.join("Gallery_Distractor", f"{1000 + k}_1.jpg"))


WRITERS = {"rfw": write_rfw, "ijbc": write_ijbc, "tinyface": write_tinyface}
# In each set's folder: what tells --overwrite that the folder is one this script wrote, not a real release.
MARK = "SYNTHETIC.txt"


def check_folder(folder: str, sets, overwrite: bool) -> None:
    """ValueError (one line) where ``folder`` cannot take ``sets``: it is a file, or a folder cannot be made
    there; it holds anything and ``overwrite`` is not set; or, with it, a set's place holds something this
    script did not write (a real release, a file of the user's)."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is {checkpoint.what_stands_at(folder)}, not a folder")
    in_the_way = checkpoint.nearest_existing(folder)
    if not os.path.isdir(in_the_way):
        raise ValueError(f"cannot make the folder {folder}: {in_the_way} is {checkpoint.what_stands_at(in_the_way)}")
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    if not overwrite:
        raise ValueError(f"{folder} is not empty: give an empty or new folder, or --overwrite to replace its "
                         + ", ".join(f"{FOLDERS[s]}/" for s in sets))
    for name in sets:
        path = os.path.join(folder, FOLDERS[name])
        if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)
                                          and os.path.isfile(os.path.join(path, MARK))):
            raise ValueError(f"{path} was not written by this script (it holds no {MARK}): --overwrite replaces "
                             "only the trees it wrote; name another folder")


def write_sets(folder: str, sets=SETS, *, seed: int = 0, overwrite: bool = False, written=None) -> dict[str, str]:
    """Write ``sets`` under ``folder``; {set: the folder to give its tool} (``written``, where given, is filled
    as each set is in place). ValueError where :func:`check_folder` refuses. Each set is written in a hidden
    folder beside its place and moved there whole (the one it replaces removed after), so that a run stopped
    or failed leaves each set whole or as it was."""
    check_folder(folder, sets, overwrite)
    made = folders_missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot make the folder {folder}: {error.strerror or error}") from None
    made_for_outputs(made)
    written = {} if written is None else written
    for name in sets:
        path = os.path.join(folder, FOLDERS[name])
        remove_killed_runs_trees(path)
        staging, replaced = hidden_beside(path, "partial"), None
        os.mkdir(staging)
        try:
            WRITERS[name](staging, seed)
            with open(os.path.join(staging, MARK), "w") as f:
                f.write(f"Synthetic faces written by benchmarks/make_synthetic_eval_sets.py --seed {seed}: "
                        "not the real release.\n")
            with signals_held():
                replaced = replace_folder(staging, path)
                staging = None
                written[name] = path
        finally:
            with signals_held(final=False):
                for leftover in (staging, replaced):
                    if leftover is not None:
                        shutil.rmtree(leftover, ignore_errors=True)
    return written


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=os.path.basename(__file__),  # (the same name in its messages when main() is called in-process)
        description="Write small synthetic RFW, IJB-C and TinyFace trees (the demo's faces, people it did not "
                    "train on) in the layouts train.verify, train.ijb and train.tinyface read.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="what each tree holds, and the tool to give it to:\n"
               "  RFW/          4 races x 12 people x 6 loose crops (160 px) and landmarks, 60 pairs a race\n"
               "                python -m train.verify --model runs/small/checkpoint.pt --targets FOLDER/RFW\n"
               "  IJB_release/  IJBC: 30 people x 2 templates (a photo, 2 video frames), 180 loose crops, 1:1 and 1:N\n"
               "                python -m train.ijb --model runs/small/checkpoint.pt --data-root FOLDER/IJB_release\n"
               "  tinyface/     Testing_Set: 30 probes, 60 gallery faces, 200 distractors, of 16-32 px\n"
               "                python -m train.tinyface --model runs/small/checkpoint.pt --data-root FOLDER/tinyface\n"
               f"each holds a {MARK} saying it is synthetic; --overwrite replaces only folders that hold one")
    p.add_argument("folder", help="where to write them; created if missing, and refused if it holds anything")
    p.add_argument("--sets", default=",".join(SETS), type=lambda s: [x.strip().lower() for x in s.split(",")],
                   help=f"which trees, comma-separated (default: {','.join(SETS)})")
    p.add_argument("--seed", type=non_negative, default=0,
                   help="the faces' and the layout's seed; the same seed writes the same files (default: 0, "
                        "the demo's)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds files already, replacing the sets' folders there that "
                        f"this script wrote (those holding {MARK}); anything else there is refused")
    args = p.parse_args(argv)
    unknown = [s for s in args.sets if s not in SETS]
    if unknown or not args.sets:
        p.error(f"--sets: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(SETS)}")
    written = {}

    def work() -> int:
        write_sets(args.folder, list(dict.fromkeys(args.sets)), seed=args.seed, overwrite=args.overwrite,
                   written=written)
        for name, path in written.items():
            print(f"wrote {path} ({name})")
        return 0

    def said(stop) -> str:  # (a set is whole in its place, or not there)
        return (f": {', '.join(written.values())} written whole, the others not" if written
                else ": nothing written")

    return run_tool(work, tool=p.prog, said=said)


if __name__ == "__main__":
    sys.exit(main())
