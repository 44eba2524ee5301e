"""How many images a second does the trainer's data loader deliver to the device?

    python benchmarks/bench_loader.py                    # a RecordIO pack of synthetic faces, made here
    python benchmarks/bench_loader.py --data /data/faces_emore --device cuda --workers 1,2,4,8
    python benchmarks/bench_loader.py --augment 0,0.2,1 --scaled-on device   # AdaFace's augmentations' cost
    python benchmarks/bench_loader.py --augment 0,0.2,1 --kinds all          # all six, blur, hue, grayscale too

The trainer's loader (`train.data.build_train_loader`, random order, random flips) over a folder in
insightface's layout (`train.rec` + `train.idx`, JPEG faces) or any other `--data` the trainer takes.
Without --data, --images synthetic faces of --image-size pixels (JPEG, quality 95, as MS1MV2 packs
them) are packed into a temporary folder with `train.tools.pack_rec`. For each --workers count, two rows:
  - `device`: what the trainer does. The workers decode and flip, the batch stays uint8 through the
    workers' shared memory and the host-to-device copy (pinned when CUDA is there), and
    `to_model_input` scales it on --device;
  - `worker`: the batch scaled to float32 in the workers, as the trainer did before, then copied.
A row times --batches batches of --batch-size after --warmup batches (worker start-up excluded), up to
the device holding the scaled batch (synchronised at the end on CUDA). The main process runs one
intra-op thread. --augment p adds the augmentations --kinds names, each with probability p, a row set for
each p: by default AdaFace's three (`--crop-augmentation`, `--low-res-augmentation`,
`--photometric-augmentation`); `--kinds all` adds the blur, hue and grayscale (`--blur-augmentation`,
`--hue-augmentation`, `--grayscale-augmentation`, at their default strengths), or name some (`--kinds blur,hue`).
Rows (device, CPU, versions, git sha, augmentation and its kinds, images/s) go to --out when given.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.bench_loss import device_name, git_sha, write_rows  # noqa: E402
from train.data import Augmentation, build_train_dataset, build_train_loader, stop_loader_workers  # noqa: E402
from train.data.augment import ORDER  # noqa: E402
from train.data.synthetic import render_face  # noqa: E402
from train.data.transforms import encode_image, to_model_input  # noqa: E402
from train.tools.pack_rec import pack_image_folder  # noqa: E402


ADAFACE = ("crop", "low_res", "photometric")  # --kinds' default: the rows of before the other three came


class ScaledInWorkers(torch.utils.data.Dataset):
    """The dataset's items scaled to float32 where they are loaded (the `worker` rows)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        image, label = self.dataset[key]
        return to_model_input(image), label


def pack_synthetic_faces(folder, images, image_size, identities=100):
    faces = os.path.join(folder, "faces")
    for index in range(images):
        identity, sample = index % identities, index // identities
        os.makedirs(os.path.join(faces, str(identity)), exist_ok=True)
        with open(os.path.join(faces, str(identity), f"{sample}.jpg"), "wb") as f:
            f.write(encode_image(render_face(0, identity, sample, image_size), quality=95))
    pack = os.path.join(folder, "pack")
    os.makedirs(pack)
    pack_image_folder(faces, pack, log=None)
    return pack


def images_per_second(loader, device, batches, warmup, scale_on_device):
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    began = time.perf_counter()
    count = 0
    for _ in range(batches):
        images, labels = next(stream)
        images = images.to(device, non_blocking=True)
        if scale_on_device:
            images = to_model_input(images)
        labels.to(device, non_blocking=True)
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - began), images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a --data of the trainer (default: synthetic faces packed here)")
    parser.add_argument("--images", type=int, default=4096, help="synthetic faces to pack (without --data)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--augment", default="0",
                        help="comma-separated probabilities of each of --kinds' augmentations, a row set each")
    parser.add_argument("--kinds", default=",".join(ADAFACE),
                        help=f"the augmentations --augment turns on, comma-separated, of {', '.join(ORDER)}, or all; "
                        "default AdaFace's three")
    parser.add_argument("--scaled-on", default="device,worker", help="the rows: device, worker or both")
    parser.add_argument("--out", help="write the rows (JSON) here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    kinds = list(ORDER) if args.kinds == "all" else [kind.strip() for kind in args.kinds.split(",")]
    if not kinds or not set(kinds) <= set(ORDER):
        parser.error(f"--kinds takes all or some of {', '.join(ORDER)}, comma-separated, got {args.kinds}")
    kinds = [kind for kind in ORDER if kind in kinds]  # (in the order they apply, each once)
    try:
        probabilities = [float(p) for p in args.augment.split(",")]
        augmentations = [Augmentation(**dict.fromkeys(kinds, p)) for p in probabilities]
    except ValueError as error:  # before the packing and the timing, not after them
        parser.error(f"--augment {args.augment}: probabilities in [0, 1], comma-separated ({error})")
    scaled_on = args.scaled_on.split(",")
    if not set(scaled_on) <= {"device", "worker"}:
        parser.error(f"--scaled-on takes device and worker, got {args.scaled_on}")
    with tempfile.TemporaryDirectory() as folder:
        data = args.data
        if data is None:
            began = time.perf_counter()
            data = pack_synthetic_faces(folder, args.images, args.image_size)
            print(f"packed {args.images} synthetic {args.image_size} px faces in {time.perf_counter() - began:.1f} s",
                  file=sys.stderr)
        dataset, _ = build_train_dataset(data, image_size=args.image_size)
        common = dict(device=device_name(device), cpu=device_name(torch.device("cpu")), cores=os.cpu_count(),
                      torch=torch.__version__, git=git_sha(), data=args.data or f"synthetic {args.images}",
                      images=len(dataset), image_size=args.image_size, batch_size=args.batch_size,
                      batches=args.batches, augmentations=",".join(kinds))
        print(f"{common['device']} | {common['cpu']}, {common['cores']} cores | torch {common['torch']} | "
              f"git {common['git']} | {common['data']} ({len(dataset)} images, {args.image_size} px) | "
              f"batch {args.batch_size}" + (f" | augment {common['augmentations']}" if any(probabilities) else ""))
        print(f"{'augment':>7} {'workers':>7} {'scaled on':>9} {'images/s':>9} {'MB/batch':>9}")
        rows = []
        for (p, augmentation), count in ((pair, count) for pair in zip(probabilities, augmentations)
                                          for count in workers):
            dataset.augment = augmentation
            for scaled in scaled_on:
                source = dataset if scaled == "device" else ScaledInWorkers(dataset)
                loader = build_train_loader(source, batch_size=args.batch_size, num_workers=count, seed=0)
                try:
                    rate, loaded = images_per_second(loader, device, args.batches, args.warmup, scaled == "device")
                finally:
                    stop_loader_workers(loader)
                copied = args.batch_size * 3 * args.image_size ** 2 * (1 if scaled == "device" else 4) / 2 ** 20
                assert loaded.dtype == torch.float32 and loaded.device.type == device.type
                print(f"{p:>7g} {count:>7} {scaled:>9} {rate:>9.0f} {copied:>9.1f}")
                rows.append(dict(common, augment=p, workers=count, scaled_on=scaled, images_per_s=round(rate, 1),
                                 mb_per_batch=round(copied, 2)))
    if args.out:
        write_rows(rows, args.out)


if __name__ == "__main__":
    main()
