"""``python -m train.tools.cluster``: the faces of an unlabelled collection grouped by person with a
trained model, as a table and, with ``--tree``, as an ImageFolder for the trainer, ``clean`` and
``pack_rec``.

    python -m train.tools.cluster --model runs/r50/checkpoint.pt --images aligned/ --output clusters.csv --tree people/

Every aligned face under ``--images`` (any nesting; as ``train.tools.align`` writes them) is embedded
as ``train.embed`` embeds it (image + mirror, unit length), or with ``--detector`` each photo's main face,
found and aligned as ``train.embed --detector`` finds it (a photo without a face is left out), or with
``--landmarks`` the faces a landmarks file lists, or the rows of a table ``train.embed`` wrote are read
(``--embeddings``). ``--all-faces`` (with ``--detector`` or ``--landmarks``) takes every face of a photo,
named ``<photo>#<k>``, and Chinese whispers keeps the faces of one photo in different clusters (a
cannot-link: one person is in a photo once). Each face is linked to its
``--neighbours`` nearest others among those at cosine ``--threshold`` or more (default: the model's
verification threshold), found in blocks, never as an N x N matrix. The clusters are cut from that graph
by Chinese whispers (each face takes the label that weighs most among its neighbours', by cosine, until
none changes), or with ``--method components`` are its connected components, which one false link
between two people joins. Clusters of fewer than ``--min-size`` faces are noise (cluster -1). Outputs:

- ``--output`` (``clusters.csv``): ``image,cluster`` a face, clusters numbered from 0 by size, largest
  first; and beside it, ``clusters.json``: the counts and sizes, the threshold and where it came from,
  the model and the options;
- ``--tree DIR``: ``DIR/cluster_0000/<image>`` a face of a cluster (noise left out; each group of
  duplicates once, as its first face, unless ``--all-duplicates``), hard links to the images (copies
  where a link cannot be made, or with ``--copy``; with ``--detector`` the photos), the image's path with
  its folders joined by ``__``; with ``--all-faces`` or ``--landmarks`` each face's aligned crop, written as
  ``train.tools.align`` writes it (``<photo>_<k>.jpg``), so that a group photo's faces go each to its
  person's folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
import time

from train.signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "cluster: "):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from train import checkpoint
    from train.data.transforms import IMAGE_EXTENSIONS, encode_image, unreadable_image
    from train.embed import (DEFAULT_COSINE_THRESHOLD, MODEL_HELP, embed_folder, embed_listed_faces, faces_are_files,
                             faces_of_photos, folder_images, load_model, made_with, model_threshold, open_detector,
                             read_about, read_table, set_amp, table_files)
    from train.ijb import ALIGNED_SIZE, align_for_model, landmarks_off_image
    from train.tools import (ArgumentParser, add_detector_option, add_embedding_options, check_embedding_options,
                             check_images_folder, check_outputs, check_photo_options, check_tree_folder, count_of,
                             hidden_beside, inside, left_out_said, link_or_copy, path_arg, plain_warnings,
                             remove_killed_runs_trees, replace_folder, summary_path, torch_device)
    from train.tools.align import FORMAT_EXTENSIONS
    from train.tools.similarity import connected_components, nearest_neighbours_among, nearest_neighbours_and_duplicates

DEFAULT_NEIGHBOURS = 10
DEFAULT_MIN_SIZE = 2
# Duplicates of one photo (saved twice, re-encoded, resized) are one node of the graph: with the demo's model
# exact copies are at cosine 1.0 and 93% of JPEG re-encodings at quality 85 at 0.99 or more, different photos of
# one person at 0.974 at most (docs/faces.md, "Clustering faces that have no names").
DEFAULT_DUPLICATE_COSINE = 0.99
METHODS = ("chinese-whispers", "components")
WHISPER_ROUNDS = 100  # dlib's chinese_whispers default: a graph that still changes after this is left as it is
WHISPER_PARTS = 16  # a round updates the faces in this many random parts, each seeing the labels of those before
LARGE_SHARE = 0.5  # a cluster holding more than this share of the faces is worth a look
TREE_PREFIX = "cluster_"
CROP_FORMAT, CROP_QUALITY = "jpeg", 95  # a --tree of faces' crops: as train.tools.align writes them by default


def neighbour_graph(index: np.ndarray, cosine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges (a, b, cosine), a < b, each once, of the graph linking each face to the neighbours
    ``nearest_neighbours`` found for it ((N, k) indices, -1 for none, and their cosines): a pair is
    an edge when either face is among the other's k nearest."""
    n, k = index.shape
    a, b, weight = np.repeat(np.arange(n), k), index.ravel(), cosine.ravel()
    found = b >= 0
    a, b, weight = a[found], b[found], weight[found]
    key = np.minimum(a, b) * n + np.maximum(a, b)
    key, first = np.unique(key, return_index=True)
    return key // n, key % n, weight[first]


def chinese_whispers(n: int, a: np.ndarray, b: np.ndarray, weight: np.ndarray, *, seed: int = 0,
                     rounds: int = WHISPER_ROUNDS, parts: int = WHISPER_PARTS,
                     node_weight: np.ndarray | None = None, apart: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> np.ndarray:
    """(n,) a label for each node of the graph of edges (a, b) with positive weights, by Chinese
    whispers (Biemann, 2006): every node starts with its own label, then in each round, in an order
    drawn from ``seed``, takes the label whose nodes among its neighbours weigh most (ties: the
    smallest label), until a round changes none or after ``rounds``. A round updates its nodes in
    ``parts`` groups, each group at once from the labels the groups before it left (node by node, as
    the algorithm has it, is a Python loop over every node; all at once, labels can swap back and
    forth for ever). ``node_weight`` ((n,), default 1 each) multiplies a neighbour's vote: a node that
    stands for several copies of a face votes as all of them.

    ``apart`` (pairs (c, d) of nodes, the faces of one photo) are cannot-links: no two such nodes ever
    share a label. A node takes the heaviest label that none of its pairs holds (none: it keeps its
    own), and of pairs that take one label in the same group the one whose vote weighs more (ties: the
    first in the group's order) keeps it, the others their labels of before. Every node starts apart,
    and a label kept or given up was none of its pairs' before the group, nor taken by them in it."""
    source, target, weights, starts = _adjacency(a, b, np.concatenate([weight, weight]).astype(np.float64), n)
    if node_weight is not None:
        weights = weights * node_weight[target]
    if apart is not None:
        _, mates, _, mate_starts = _adjacency(*apart, None, n)
        position = np.full(n, -1)
    label = np.arange(n)
    linked = np.flatnonzero(np.diff(starts))
    if not len(linked):
        return label
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        changed = 0
        for group in np.array_split(rng.permutation(linked), min(parts, len(linked))):
            edges, node = _rows(starts, group)
            votes, at = np.unique(node * n + label[target[edges]], return_inverse=True)
            score = np.bincount(at, weights=weights[edges])
            if apart is not None:  # (a label a pair holds gets no vote)
                mate_edges, mate_node = _rows(mate_starts, group)
                score[np.isin(votes, mate_node * n + label[mates[mate_edges]])] = -np.inf
            voter = votes // n
            ranked = np.lexsort((-score, voter))  # each node's votes, the heaviest first (then the smallest label)
            winners = ranked[np.r_[True, voter[ranked][1:] != voter[ranked][:-1]]]
            new = votes[winners] % n
            if apart is not None:
                won = score[winners]
                new[np.isneginf(won)] = label[group][np.isneginf(won)]
                position[group] = np.arange(len(group))
                other = position[mates[mate_edges]]
                both = other >= 0
                mine, theirs = mate_node[both], other[both]
                lost = (new[mine] == new[theirs]) & ((won[mine] < won[theirs])
                                                     | ((won[mine] == won[theirs]) & (mine > theirs)))
                new[mine[lost]] = label[group][mine[lost]]
                position[group] = -1
            changed += int(np.count_nonzero(new != label[group]))
            label[group] = new
        if not changed:
            break
    return label


def _adjacency(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None, n: int):
    """The undirected edges (a, b) of a graph of ``n`` nodes as (source, target, weight, starts): each edge both
    ways, sorted by source, node i's from ``starts[i]`` to ``starts[i + 1]``."""
    source, target = np.concatenate([a, b]), np.concatenate([b, a])
    order = np.argsort(source, kind="stable")
    source, target = source[order], target[order]
    return source, target, None if weight is None else weight[order], np.searchsorted(source, np.arange(n + 1))


def _rows(starts: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the edges of ``nodes``, each one's node as a position in ``nodes``) of an adjacency's ``starts``."""
    first, count = starts[nodes], starts[nodes + 1] - starts[nodes]
    return np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum()), \
        np.repeat(np.arange(len(nodes)), count)


def numbered_clusters(label: np.ndarray, min_size: int) -> np.ndarray:
    """Each node's cluster, numbered from 0 by size, largest first (ties: the one whose first node
    comes first), from any labelling; -1 for a node whose label has fewer than ``min_size`` nodes."""
    n = len(label)
    sizes = np.bincount(label, minlength=n)
    first = np.full(n, n)
    np.minimum.at(first, label, np.arange(n))
    kept = np.flatnonzero(sizes >= min_size)
    number = np.full(n, -1)
    number[kept[np.lexsort((first[kept], -sizes[kept]))]] = np.arange(len(kept))
    return number[label]


def photo_neighbours(unit: torch.Tensor, index: np.ndarray, cosine: np.ndarray, first: np.ndarray, k: int,
                     threshold: float, *, device="cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The faces' neighbours (``nearest_neighbours_and_duplicates``' indices and cosines, each face's
    first duplicate ``first``) as those of the distinct photos: ((M,) the photos, each its first face;
    (M, k) indices among them; (M, k) cosines), what ``nearest_neighbours`` gives for ``unit[photos]``.
    A photo's neighbours are those found for its face unless some were duplicates of others, or it
    has duplicates itself: those are searched again among the photos alone."""
    n = len(first)
    photos = np.flatnonzero(first == np.arange(n))
    if len(photos) == n:
        return photos, index, cosine
    photo = np.full(n, -1)
    photo[photos] = np.arange(len(photos))
    index, cosine = index[photos], cosine[photos]
    again = (np.bincount(first, minlength=n)[photos] > 1) | ((index >= 0) & (first[index] != index)).any(axis=1)
    index = np.where(index >= 0, photo[index], -1)
    if again.any():
        index[again], cosine[again] = nearest_neighbours_among(unit[photos], np.flatnonzero(again), k, threshold,
                                                               device=device)
    return photos, index, cosine


def cluster_embeddings(unit: torch.Tensor, threshold: float, *, neighbours: int = DEFAULT_NEIGHBOURS,
                       method: str = METHODS[0], min_size: int = DEFAULT_MIN_SIZE, device="cpu",
                       log=None, duplicate_cosine: float = DEFAULT_DUPLICATE_COSINE,
                       photo_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((N,) the cluster of each of the (N, D) unit embeddings (-1: noise), numbered by size, largest
    first; (N,) the first face of each face's duplicates, itself for a face with none): the graph of each
    face's ``neighbours`` nearest at ``threshold`` or more, cut by Chinese whispers or into its connected
    components (``method``). Faces joined by cosines of
    ``duplicate_cosine`` or more (at least ``threshold``) are duplicates of one photo: one node of the
    graph, whose vote weighs as many faces, whose neighbours are other photos (each face's nearest
    would be its own duplicates, and the duplicates of a photo a cluster of their own), and whose
    cluster every duplicate takes. ``photo_of`` ((N,) each face's photo, any numbering) keeps
    the faces of one photo in different clusters, as cannot-links of Chinese whispers (one person is in a
    photo once); the components of ``method`` components keep no such constraint."""
    index, cosine, first = nearest_neighbours_and_duplicates(unit, neighbours, threshold,
                                                             max(duplicate_cosine, threshold), device=device, log=log)
    photos, index, cosine = photo_neighbours(unit, index, cosine, first, neighbours, threshold, device=device)
    a, b, weight = neighbour_graph(index, cosine)
    if method == "components":
        label = connected_components(len(photos), a, b)
    else:
        faces = np.bincount(first, minlength=len(first))[photos]
        node = np.searchsorted(photos, first)  # (each face's node: its group of duplicates)
        label = chinese_whispers(len(photos), a, b, weight, node_weight=faces.astype(np.float64),
                                 apart=None if photo_of is None else faces_of_one_photo(photo_of, node))
    return numbered_clusters(photos[label][np.searchsorted(photos, first)], min_size), first


def faces_of_one_photo(photo_of: np.ndarray, node: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(c, d), c < d, each pair once: the nodes (``node[i]`` face i's, default the faces themselves) of the
    faces of one photo, ``photo_of`` ((N,) each face's photo); a node with two faces of one photo (a face
    and its mirror in the photo, as duplicates) is no pair of its own."""
    node = np.arange(len(photo_of)) if node is None else node
    order = np.argsort(photo_of, kind="stable")
    _, starts, count = np.unique(photo_of[order], return_index=True, return_counts=True)
    # Each face with every face after it in its photo: (m - 1) + ... + 1 pairs of a photo of m faces.
    later = np.repeat(starts + count, count) - np.arange(len(order)) - 1
    c = np.repeat(np.arange(len(order)), later)
    d = c + 1 + np.arange(later.sum()) - np.repeat(np.cumsum(later) - later, later)
    c, d = node[order[c]], node[order[d]]
    key = np.unique(np.minimum(c, d) * len(node) + np.maximum(c, d))
    key = key[key // len(node) != key % len(node)]
    return key // len(node), key % len(node)


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.tools.cluster", name="cluster", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=path_arg, metavar="DIR",
                        help="a folder of aligned face crops (any nesting), as train.tools.align writes them; photos "
                        "with --detector or --landmarks")
    source.add_argument("--embeddings", type=path_arg, metavar="TABLE",
                        help="a table python -m train.embed wrote (.npy with its .txt, or .csv): its rows are "
                        "clustered as they are, without embedding")
    p.add_argument("--model", type=path_arg, default=None,
                   help=MODEL_HELP + "; with --embeddings only for its threshold (default: the model the table's "
                   ".json names, where it still is)")
    p.add_argument("--landmarks", type=path_arg, metavar="FILE", default=None,
                   help="with --images: cluster the faces this file lists in the photos under it, each aligned from "
                   "its 5 landmarks (as train.embed --landmarks)")
    p.add_argument("--extension", default=None, help="appended to every image path of --landmarks")
    add_detector_option(p, "the images under --images", "each one's main face (--all-faces: every face)")
    p.add_argument("--all-faces", action="store_true",
                   help="with --detector: every face of a photo; with --landmarks: an image listed on several lines "
                   "is several faces; named <image>#<k>. The faces of one photo are kept in different clusters "
                   "(Chinese whispers), and --tree holds each face's aligned crop")
    p.add_argument("--output", type=path_arg, default="clusters.csv",
                   help="the table image,cluster (a .csv; default clusters.csv), with the summary beside it (.json)")
    p.add_argument("--tree", type=path_arg, metavar="DIR", default=None,
                   help="also lay the clustered faces out as an ImageFolder, DIR/cluster_NNNN/<image> (hard links, "
                   "or copies where a link cannot be made; noise left out); with --all-faces or --landmarks each "
                   "face's aligned crop, as train.tools.align writes it (<image>_<k>.jpg, 112 pixels)")
    p.add_argument("--copy", action="store_true", help="with --tree: copy the images rather than link them")
    p.add_argument("--all-duplicates", action="store_true",
                   help="with --tree: lay out every duplicate of a photo (see --duplicate-cosine); without it, each "
                   "group of duplicates is there once, as its first face in the table's order (the one the others "
                   "duplicate), so that no photo weighs more than once in training; the table lists every face")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine similarity at or above which two faces may be linked (default: from the model's "
                   f"last verification, as train.embed --compare takes it; else {DEFAULT_COSINE_THRESHOLD})")
    p.add_argument("--neighbours", "--neighbors", dest="neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help="how many of its nearest others (at --threshold or more) each face is linked to; a pair is "
                   f"linked when either is among the other's (default {DEFAULT_NEIGHBOURS})")
    p.add_argument("--method", choices=METHODS, default=METHODS[0],
                   help="how the clusters are cut from the graph: chinese-whispers (the default), or its connected "
                   "components (one false link joins two people)")
    p.add_argument("--duplicate-cosine", type=float, default=None,
                   help="faces at this cosine or more are duplicates of one photo (saved twice, re-encoded, "
                   "resized): one node of the graph, put in one cluster (default "
                   f"{DEFAULT_DUPLICATE_COSINE}, or --threshold where that is higher)")
    p.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                   help=f"clusters of fewer faces are noise, cluster -1 (default {DEFAULT_MIN_SIZE})")
    add_embedding_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output, its .json and a --tree this tool wrote, when they exist")
    args = p.parse_args(argv)
    if args.images and not args.model:
        p.error("--images needs --model, the model that embeds the faces")
    check_embedding_options(p, args)
    check_photo_options(p, args, "--images", " (--embeddings is a table of faces embedded already)")
    if args.neighbours < 1:
        p.error(f"--neighbours must be at least 1, got {args.neighbours}")
    if args.min_size < 1:
        p.error(f"--min-size must be at least 1, got {args.min_size}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        p.error(f"--threshold is a cosine similarity above 0 and at most 1, got {args.threshold:g}")
    if args.duplicate_cosine is not None and not 0 < args.duplicate_cosine < 1:
        p.error(f"--duplicate-cosine is a cosine similarity above 0 and below 1, got {args.duplicate_cosine:g} (the "
                "cosine of a face to an exact copy of it is 1 give or take rounding)")
    if not args.output.endswith(".csv"):
        p.error(f"--output names a .csv file, got {args.output}")
    if args.copy and not args.tree:
        p.error("--copy goes with --tree")
    if args.copy and (args.all_faces or args.landmarks):
        p.error("--copy: with --all-faces or --landmarks the tree holds the faces' aligned crops, written, not linked")
    if args.all_duplicates and not args.tree:
        p.error("--all-duplicates goes with --tree")
    # Ctrl-C and SIGTERM unwind (the decoding workers leave them to this process): the outputs are written
    # whole, all of them, or none.
    return run_tool(lambda: run(args), tool="cluster")


def main(argv: list[str] | None = None) -> int:
    with plain_warnings():
        return _main(argv)


def run(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming the argument or file at fault. The
    inputs, the model and the outputs are checked before any face is embedded."""
    device = torch_device(args.device)
    table_about = {}
    if args.images:
        check_images_folder(args.images)
        source_folder = args.images
    else:
        names, embeddings = read_table(args.embeddings)
        if not names:  # (was clustered into empty outputs, exit 0)
            raise ValueError(f"--embeddings {args.embeddings}: the table holds no faces")
        table_about = read_about(args.embeddings, embeddings) or {}
        source_folder = table_about.get("images")
    model_path = args.model
    # On the threshold, for a run that goes ahead: said once the refusals below are past (they came before them).
    notes = []
    if model_path is None and args.threshold is None and table_about.get("model"):
        if os.path.isfile(table_about["model"]):
            model_path = table_about["model"]
        else:
            notes.append(f"cluster: note: {table_about['model']}, the model the table was made with, is not there "
                         "any more: its threshold is not known")
    model, settings = (None, {})
    if model_path:  # (with --embeddings, for its threshold and embedding size)
        model, settings = load_model(model_path, device if args.images else "cpu", args.amp)
        if args.images:
            set_amp(model, args.amp, model_path, device=device)
    threshold, threshold_source, note = model_threshold(model_path, settings, args.threshold, tool="cluster")
    notes += [note] if note else []
    if args.embeddings and args.model:
        width = settings.get("embedding_size")
        if width is not None and width != embeddings.shape[1]:
            raise ValueError(f"--model {args.model} gives {width}-D embeddings, --embeddings {args.embeddings} holds "
                             f"{embeddings.shape[1]}-D ones: the table was made with another model")
    if args.embeddings and model_path:
        # (One question with search's: the same weights, a checkpoint and its train.export backbone.pt, are one model.)
        told = made_with(table_about, model_path, model, {})
        recorded = table_about.get("model")
        if told is not None and not told[0]:
            notes.append(f"cluster: note: --embeddings {args.embeddings} was made with another model than "
                         f"{model_path} ({recorded} as it was then; its .json records the SHA-256 of that model's "
                         f"{told[1]}): the threshold is {model_path}'s, which may not suit the table's embeddings")
        elif told is None and recorded and os.path.realpath(recorded) != os.path.realpath(model_path):
            notes.append(f"cluster: note: the table was made with {recorded}; the threshold is --model "
                         f"{args.model}'s")

    if args.duplicate_cosine is not None and args.duplicate_cosine < threshold:
        raise ValueError(f"--duplicate-cosine {args.duplicate_cosine:g} is below the threshold {threshold:.4f} ("
                         f"{threshold_source}): duplicates are faces more alike than linked ones; give one above it")
    duplicate_cosine = max(threshold, DEFAULT_DUPLICATE_COSINE if args.duplicate_cosine is None
                           else args.duplicate_cosine)
    outputs = [args.output, summary_path(args.output)]
    inputs = (model_path, checkpoint.settings_path(model_path) if model_path else None, args.detector, args.landmarks,
              *(table_files(args.embeddings, about=True) if args.embeddings else ()))
    detector = open_detector(args.detector, device) if args.detector else None
    check_outputs(outputs, args.overwrite, inputs=inputs, image_folders=(args.images,) if args.images else ())
    if args.tree:
        _check_tree(args, source_folder, table_about)
    for note in notes:
        print(note, file=sys.stderr)

    failures = []
    # Where each face was aligned from (photo, landmarks), for a tree of the faces' crops: with --all-faces a
    # photo is in the cluster of each of its faces, and with --landmarks a face is anywhere in its photo.
    aligned_from = [] if args.all_faces or args.landmarks else None
    if args.landmarks:
        print(f"cluster: embedding the faces {args.landmarks} lists in the photos under {args.images} with "
              f"{args.model} ({settings['image_size']}px) on {device}", file=sys.stderr, flush=True)
        names, embeddings = embed_listed_faces(model, args.images, args.landmarks, settings["image_size"],
                                               extension=args.extension, several=args.all_faces, device=device,
                                               batch_size=args.batch_size, workers=args.workers,
                                               aligned_from=aligned_from)
    elif args.images:
        paths, names = folder_images(args.images, failures)
        print(f"cluster: embedding {len(paths)} {'photos' if args.detector else 'faces'} under {args.images} with "
              f"{args.model} ({settings['image_size']}px) on {device}", file=sys.stderr, flush=True)
        names, embeddings = embed_folder(model, args.images, paths, names, settings["image_size"], failures=failures,
                                         detector=detector, all_faces=args.all_faces, device=device,
                                         batch_size=args.batch_size, workers=args.workers, aligned_from=aligned_from)
    # Rows named <photo>#<k> (--all-faces, or a table train.embed --detector/--landmarks --all-faces wrote): the
    # faces of one photo, which are not one person.
    several = args.all_faces or faces_of_photos(table_about.get("faces"), names)
    photo_of = np.unique([photo_of_face(name) for name in names], return_inverse=True)[1].ravel() if several \
        else None

    started = time.monotonic()
    unit = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)), dim=1)
    clusters, duplicate_of = cluster_embeddings(
        unit, threshold, neighbours=args.neighbours, method=args.method, min_size=args.min_size, device=device,
        duplicate_cosine=duplicate_cosine, photo_of=photo_of,
        log=lambda message: print(f"cluster: {message}", file=sys.stderr, flush=True))
    seconds = time.monotonic() - started
    together = 0  # faces that share their cluster with another face of their photo (components keep no constraint)
    if photo_of is not None:
        clustered = np.flatnonzero(clusters >= 0)
        counts = np.unique(photo_of[clustered] * len(names) + clusters[clustered], return_counts=True)[1]
        together = int(counts[counts > 1].sum())
    sizes = np.bincount(clusters[clusters >= 0]).tolist()
    noise = int(np.count_nonzero(clusters < 0))
    duplicates = int(np.count_nonzero(duplicate_of != np.arange(len(duplicate_of))))
    duplicated = len(np.unique(duplicate_of[duplicate_of != np.arange(len(duplicate_of))]))
    summary = {
        "made_by": "train.tools.cluster",
        "images": os.path.abspath(args.images) if args.images else source_folder,
        "embeddings": os.path.abspath(args.embeddings) if args.embeddings else None,
        "detector": os.path.abspath(args.detector) if args.detector else None,
        "landmarks": os.path.abspath(args.landmarks) if args.landmarks else None, "all_faces": args.all_faces,
        "model": os.path.abspath(model_path) if model_path else None,
        "threshold": round(threshold, 6), "threshold_from": threshold_source,
        "method": args.method, "neighbours": args.neighbours, "min_size": args.min_size,
        "duplicate_cosine": round(duplicate_cosine, 6),
        "faces": len(names), "clusters": len(sizes), "clustered": int(sum(sizes)), "noise": noise,
        # (faces that duplicate an earlier face, and the faces they duplicate: each in its face's cluster)
        "duplicates": duplicates, "duplicated_faces": duplicated,
        "left_out": len(failures), "sizes": sizes, "seconds": round(seconds, 3),
        "tree": os.path.abspath(args.tree) if args.tree else None,
    }
    if photo_of is not None:  # (faces of one photo in one cluster: none by Chinese whispers)
        summary.update(photos=int(photo_of.max()) + 1 if len(names) else 0,
                       faces_with_a_photo_mate_in_their_cluster=together)
    tree_said = ""
    staging = replaced = None
    try:
        if args.tree:
            # Each group of duplicates once (its first face, which the others duplicate): a photo there 15 times
            # would weigh 15 times in training and in clean's class means.
            in_tree = clusters if args.all_duplicates else np.where(duplicate_of == np.arange(len(names)), clusters, -1)
            left_out = int(np.count_nonzero(in_tree < 0) - noise)
            staging, links, copies, shortened = _build_tree(args.tree, source_folder, names, in_tree, len(sizes),
                                                            args.copy, aligned_from, several=args.all_faces)
            summary["tree_files"] = {"hard links": links, "copies": copies, "names shortened": shortened,
                                     "duplicates left out": left_out}
            if aligned_from is not None:
                summary["tree_files"]["face crops"] = copies
                del summary["tree_files"]["copies"]
            tree_said = (f", {args.tree} ("
                         + (count_of(copies, 'face crop') if aligned_from is not None else
                            f"{count_of(links, 'hard link')}, {count_of(copies, 'copy', 'copies')}")
                         + (f"; {count_of(shortened, 'name')} too long for the file system shortened" if shortened
                            else "")
                         + (f"; {count_of(left_out, 'duplicate')} left out, each group there once as its first face "
                            "(--all-duplicates keeps them)" if left_out else "") + ")")
        summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with signals_held():  # the table, its summary and the tree: all of them or none
            with checkpoint.written_together() as files:
                _write_csv(files, args.output, names, clusters)
                files.write_json(summary_path(args.output), summary)
                if staging is not None:  # (once the files are whole, which are renamed after it)
                    replaced = replace_folder(staging, args.tree)
                    staging = None
    finally:
        # This run's tree when it stopped, or the tree it replaced: a stop that comes while it goes waits
        # for it (a large tree takes a while), or it would stay, hidden, as big as the tree with --copy.
        with signals_held(final=False):
            for folder in (staging, replaced):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
    largest = sizes[0] if sizes else 0
    median = int(np.median(sizes)) if sizes else 0
    print(f"cluster: {count_of(len(names), 'face')}"
          + (f" of {count_of(summary['photos'], 'photo')}" if photo_of is not None else "")
          + f": {count_of(len(sizes), 'cluster')} of {args.min_size} or more"
          + (f" (largest {largest}, median {median})" if sizes else "")
          + f", {noise} noise"
          + (f"; {count_of(duplicates, 'duplicate')} of {count_of(duplicated, 'face')} (cosine {duplicate_cosine:g} or "
             "more), each in its face's cluster" if duplicates else "")
          + left_out_said((len(failures), "photo" if args.detector else "image"))
          + f"; threshold {threshold:.4f} ({threshold_source}), {args.method} on "
          f"{count_of(args.neighbours, 'neighbour')}, {seconds:.1f} s; wrote {args.output}, "
          f"{summary_path(args.output)}{tree_said}", file=sys.stderr)
    if len(names) >= 20 and largest > LARGE_SHARE * len(names):
        print(f"cluster: note: the largest cluster holds {largest} of the {len(names)} faces: a collection of "
              "mostly one person, or different people joined (at a low --threshold, or by --method components' "
              "chains); look at it, or raise --threshold", file=sys.stderr)
    if together:
        said = f"cluster: note: {count_of(together, 'face')} share their cluster with another face of their photo"
        if args.method == "components":
            print(f"{said} (--method components does not keep them apart; chinese-whispers does, but for "
                  f"duplicates of each other, cosine {duplicate_cosine:g} or more)", file=sys.stderr)
        else:  # (Chinese whispers keeps them apart but for the faces of one node: duplicates of each other)
            print(f"{said}: duplicates of each other (cosine {duplicate_cosine:g} or more: one face found twice, or "
                  "its image in a mirror), one node of the graph", file=sys.stderr)
    return 1 if failures else 0


def photo_of_face(name: str) -> str:
    """The photo of a face named ``<photo>#<k>`` (its k-th face, as ``--all-faces`` names them)."""
    return os.path.normpath(name.rpartition("#")[0] or name)


def _write_csv(files: checkpoint.FilesTogether, path: str, names: list[str], clusters: np.ndarray) -> None:
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "cluster"])
        writer.writerows(zip(names, clusters.tolist()))
    files.write(path, write, binary=False)


def _check_tree(args, source_folder: str | None, about: dict | None) -> None:
    """ValueError naming --tree when the images cannot be laid out there: a table that does not say
    where its images are, or whose rows are not one image file each (:func:`train.embed.faces_are_files`:
    faces a landmarks file lists, every face a detector found); a folder that is (or holds, or lies in)
    the images; one that exists, without --overwrite, or that holds what this tool does not write."""
    if args.embeddings:
        if not about:
            raise ValueError(f"--tree: {args.embeddings} does not say where its images are (train.embed writes that "
                             "in the .json beside it): cluster the folder of images with --images instead")
        if about.get("faces") is None:  # (train.ijb's and train.tinyface's --save-features tables, or by hand)
            raise ValueError(f"--tree: {args.embeddings}'s .json does not say what its rows are (its \"faces\", "
                             "which train.embed writes and train.ijb's and train.tinyface's tables lack): cluster the "
                             "folder of images with --images instead")
        if not faces_are_files(about.get("faces")):
            raise ValueError(f"--tree: the rows of {args.embeddings} are faces {about.get('faces')}, not image files "
                             "to lay out, and the table keeps no landmarks to crop them: cluster the photos with "
                             "--images and that --detector or --landmarks (the tree then holds each face's crop), or "
                             "align them with train.tools.align, then cluster the crops")
        if not source_folder or not os.path.isdir(source_folder):
            raise ValueError(f"--tree: {source_folder}, the folder of {args.embeddings}'s images, is not there any "
                             "more")
    if inside(args.output, args.tree):
        raise ValueError(f"--output {args.output} lies in --tree {args.tree}: a tree holds the clusters' folders "
                         "only; write the table elsewhere")
    if inside(args.tree, source_folder) or inside(source_folder, args.tree):
        raise ValueError(f"--tree {args.tree} and the images' folder {source_folder} overlap: name a folder outside "
                         "it (the next run would take the tree's faces for more images)")
    check_tree_folder(args.tree, args.overwrite, _tree_folder, "a tree of clusters")


def _tree_folder(path: str) -> bool:
    """Whether ``path`` is a folder as ``--tree`` writes them: cluster_<number>, holding images only."""
    name = os.path.basename(path)
    if not (name.startswith(TREE_PREFIX) and name[len(TREE_PREFIX):].isdigit()) or os.path.islink(path) \
            or not os.path.isdir(path):
        return False
    return all(f.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(os.path.join(path, f))
               for f in os.listdir(path))


def _build_tree(tree: str, source_folder: str, names: list[str], clusters: np.ndarray, count: int,
                copy: bool, aligned_from: list | None = None, *, several: bool = False) -> tuple[str, int, int, int]:
    """A hidden folder beside ``tree`` holding cluster_NNNN/<name> for each clustered face, a hard link
    to its image (a copy with ``copy``, or where the file system refuses the link: another device, no
    hard links); (that folder, links made, copies made, names shortened to fit the file system). With
    ``aligned_from`` (each face's (photo path, landmarks)) each face's aligned crop is written instead,
    named as ``train.tools.align`` names it (``several``: the names are ``<photo>#<k>``, the crops
    ``<photo stem>_<k>.jpg``), and counted as a copy."""
    if aligned_from is not None:
        names = [_crop_name(name, several) for name in names]
        crops = _FaceCrops(aligned_from)
    remove_killed_runs_trees(tree)
    staging = hidden_beside(tree, "partial")
    os.mkdir(staging)  # (as a folder is made: mkdtemp's would be the user's alone)
    try:
        longest = os.pathconf(staging, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        longest = 255
    width = max(4, len(str(count - 1)))
    links = copies = shortened = 0
    try:
        taken = set()
        for c in range(count):
            os.mkdir(os.path.join(staging, f"{TREE_PREFIX}{c:0{width}d}"))
        for face, (name, c) in enumerate(zip(names, clusters.tolist())):
            if c < 0:
                continue
            whole = name.replace(os.sep, "__").replace("/", "__")
            stem, extension = os.path.splitext(whole)
            k = 1
            while True:
                told_apart = f"~{k}" if k > 1 else ""  # a/b__c.jpg and a__b/c.jpg: both a__b__c.jpg
                flat = f"{stem}{told_apart}{extension}"
                cut = len(os.fsencode(flat)) > longest
                if cut:
                    flat = _shortened(whole, name, longest, told_apart)
                if (c, flat) not in taken:
                    break
                k += 1
            shortened += cut
            taken.add((c, flat))
            target = os.path.join(staging, f"{TREE_PREFIX}{c:0{width}d}", flat)
            if aligned_from is not None:
                with open(target, "wb") as f:
                    f.write(crops[face])
                copies += 1
                continue
            linked = link_or_copy(os.path.join(source_folder, name), target, copy)
            links += linked
            copies += not linked
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, links, copies, shortened


def _crop_name(name: str, several: bool) -> str:
    """Where ``train.tools.align`` writes the crop of the face ``name`` (``several``: ``<photo>#<k>``, the k-th face
    of its photo): the photo's path with the crops' extension, ``_<k>`` after its name."""
    photo, _, number = name.rpartition("#") if several else (name, "", "")
    return os.path.splitext(photo)[0] + (f"_{number}" if number else "") + FORMAT_EXTENSIONS[CROP_FORMAT]


class _FaceCrops:
    """Item i: the encoded 112-pixel crop of face i of ``aligned_from`` ((photo path, (5, 2) landmarks) a face),
    aligned as ``train.tools.align`` aligns it, each photo decoded once for its faces that come one after
    another. ValueError naming a photo that cannot be read any more (it was, to embed its faces)."""

    def __init__(self, aligned_from: list):
        self.aligned_from, self.path, self.upright = aligned_from, None, None

    def __getitem__(self, index: int) -> bytes:
        path, landmarks = self.aligned_from[index]
        if path != self.path:
            self.path = self.upright = None
            try:
                with Image.open(path) as image:
                    self.upright = ImageOps.exif_transpose(image)  # (the landmarks' pixels, as LooseCrops reads them)
                    self.upright.load()
            except FileNotFoundError:
                raise ValueError(unreadable_image(path, "no such file")) from None
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise ValueError(unreadable_image(path, error)) from None
            self.path = path
        off = landmarks_off_image(landmarks, self.upright.width, self.upright.height)
        if off:
            raise ValueError(f"{path}: {off}")
        return encode_image(align_for_model(self.upright, landmarks, ALIGNED_SIZE), fmt=CROP_FORMAT,
                            quality=CROP_QUALITY)


def _shortened(flat: str, name: str, longest: int, told_apart: str = "") -> str:
    """``flat`` (the image ``name``'s path, its folders joined by ``__``) cut to a name of at most
    ``longest`` bytes that still reads as it and keeps its extension: its first characters, ``~``
    and 16 hex digits of the SHA-256 of ``name`` (so that two long names that begin alike differ),
    then ``told_apart``, the ``~k`` (8 bytes at most) that tells it from a name already taken."""
    stem, extension = os.path.splitext(flat)
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = longest - len(os.fsencode(tag + extension)) - 8
    stem = stem[:room]
    while len(os.fsencode(stem)) > room:  # (a character may take several bytes)
        stem = stem[:-1]
    return stem + tag + told_apart + extension


if __name__ == "__main__":
    sys.exit(main())
