"""Embedding distillation (``--teacher``): a frozen teacher backbone embeds each training image as the
student sees it, and the student's margin loss gets a term that pulls its embedding toward the teacher's."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .models import is_factory_spec
from .models.iresnet import AMP_DTYPES

# Bytes read at a time when an ONNX teacher's file is digested.
_DIGEST_BLOCK = 1 << 24


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean over the batch of how far each (N, D) ``student`` embedding is from its ``teacher`` embedding,
    in fp32: ``cosine``, 1 - cos(s, t); ``mse``, the mean over the D elements of (s/|s| - t/|t|)², which is
    2 (1 - cos(s, t)) / D (``F.mse_loss`` of the unit embeddings). Both compare directions only: the norm,
    which the margin losses divide out, is left to the student."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    if kind == "mse":
        return F.mse_loss(F.normalize(student, dim=1), F.normalize(teacher, dim=1))
    raise ValueError(f"unknown distillation loss {kind!r}; expected cosine or mse")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict (each entry's name, dtype, shape and bytes, in order): the same for
    the same weights in a checkpoint, its ``train.export`` and insightface's ``.pth`` of them."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def onnx_digest(path: str) -> str:
    """SHA-256 of the ONNX model at ``path`` (a teacher, whose weights are its graph's): the file, then the
    files of external data its tensors name (a model over 2 GB keeps its weights in them), in the order
    first named. Without the onnx package (onnxruntime runs the graph without it) the file alone, with a
    note."""
    files = [path]
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError:
        print(f"note: {path}: without the onnx package the files of external data its graph may name cannot be "
              "found: the teacher's digest covers the graph file alone (pip install onnx)", file=sys.stderr)
    else:
        graph = onnx.load(path, load_external_data=False).graph
        tensors = [*graph.initializer, *(attribute.t for node in graph.node for attribute in node.attribute
                                         if attribute.type == onnx.AttributeProto.TENSOR)]
        for tensor in tensors:
            if uses_external_data(tensor):
                where = os.path.join(os.path.dirname(path), ExternalDataInfo(tensor).location)
                if where not in files:
                    files.append(where)
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(_DIGEST_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


class Teacher:
    """A frozen backbone called on the student's input batches: eval mode, no gradients, its trunk under
    the run's ``--amp`` autocast as the student's is (a network of one's own: its whole forward), the
    images resized to its own input size where that is not the run's. Not an ``nn.Module`` of the run:
    nothing of it goes into the optimiser, the checkpoint or an export (the checkpoint keeps
    :meth:`record`)."""

    def __init__(self, model: nn.Module, settings: dict[str, Any], path: str, digest: str, *, image_size: int,
                 amp: str):
        self.model, self.settings, self.path, self.digest = model, settings, path, digest
        self.input_size = int(settings["image_size"])
        self.resized = self.input_size != image_size
        self.autocast_dtype = None
        if getattr(model, "amp", None) in AMP_DTYPES:
            model.amp = amp  # (this trainer's networks: the trunk autocast, the head in fp32, as the student's)
        else:
            self.autocast_dtype = AMP_DTYPES[amp]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) fp32 embeddings of the student's input batch (scaled as ``to_model_input`` scales it)."""
        if self.resized:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        dtype = self.autocast_dtype
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(images).float()

    def record(self) -> dict[str, Any]:
        """What the checkpoint keeps of the teacher: where it was read, its digest and its settings."""
        return {"path": self.path, "digest": self.digest, **{key: self.settings[key] for key in
                                                            ("network", "embedding_size", "image_size")}}

    def describe(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        size = f"{parameters / 1e6:.2f}M parameters, " if parameters else ""
        return (f"teacher {self.settings['network']} from {self.path} ({size}{self.settings['embedding_size']}-D, "
                f"{self.input_size}px input" + (", the run's images resized to it" if self.resized else "")
                + f"; weights sha256 {self.digest[:16]})")


def load_teacher(path: str, network: str | None, *, embedding_size: int, image_size: int, amp: str,
                 device: torch.device, channels_last: bool = False, quiet: bool = False) -> Teacher:
    """The ``--teacher`` at ``path`` on ``device``: whatever ``--pretrained_model`` and ``train.embed --model``
    read (``checkpoint.load_backbone``), ``network`` naming a bare state dict's network (a package.module:factory
    one built at ``embedding_size`` and ``image_size``), or an ONNX model. ``quiet``: the loaders' notes left
    unsaid (the processes but the first). Raises FileNotFoundError or ValueError saying what is wrong, among it
    a teacher whose embeddings are not ``embedding_size``-D."""
    from .onnx_backbone import is_onnx_file, load_onnx_backbone

    said = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    if is_onnx_file(path):
        if network:
            raise ValueError(f"{path} is an ONNX model, whose graph is its network: --teacher-network is for a bare "
                             "state dict; leave it out")
        with said:
            model, settings = load_onnx_backbone(path, device)
            digest = onnx_digest(path)
    else:
        # (A network of one's own tells nothing of its sizes in its shapes: the run's, which its embeddings must be.)
        sizes = {"embedding_size": embedding_size, "image_size": image_size} if network and is_factory_spec(network) \
            else {}
        try:
            with said:
                # (a bare state dict whose weights fit the run's images is taken at their size, where it fits a
                # range: the teacher was most likely trained on them, and they need no resizing)
                model, settings = checkpoint.load_backbone(path, network=network, likely_image_size=image_size,
                                                           **sizes)
        except ValueError as error:
            message = str(error)
            if not network and "--network" in message:
                message += "; or name its network with --teacher-network"
            elif "; pass --network" in message:  # (train.export's options: --network and the sizes are the student's)
                message = (f"{message.split('; pass --network')[0]}: not the weights of network {network}; a network "
                           "of your own is --teacher-network package.module:factory")
            raise ValueError(message) from None
        digest = weights_digest(model)
        model = model.to(device).requires_grad_(False)
        if channels_last:  # (as the student's: its input batches come in that layout)
            model = model.to(memory_format=torch.channels_last)
    if settings["embedding_size"] != embedding_size:
        raise ValueError(f"{path} gives {settings['embedding_size']}-D embeddings, the student {embedding_size}-D "
                         "(--embedding-size): distillation compares them one to one; train the student at "
                         f"--embedding-size {settings['embedding_size']}, or take a teacher of {embedding_size}-D "
                         "embeddings")
    return Teacher(model.eval(), settings, os.path.abspath(path), digest, image_size=image_size, amp=amp)
