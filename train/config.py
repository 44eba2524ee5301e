"""The trainer's options: one argparse parser, a ``--config FILE`` (YAML or JSON) whose keys
are the flag names, and the rule that the command line overrides the file.

The defaults are the demo's (synthetic data, the small network, a few hundred steps), so
that a bare ``python -m train`` runs it; real training starts from ``train/configs/*.yaml``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

from . import insightface_config
from .models import NETWORKS, is_factory_spec
from .tools import ArgumentParser, count_of

LOSSES = ("arcface", "cosface", "sphereface", "combined", "adaface", "elasticface-arc", "elasticface-cos",
          "elasticface-arc+", "elasticface-cos+", "magface", "curricularface")
# The losses that take --interclass-filter and --subcenters (the others set their own margins or negatives).
PLAIN_MARGIN_LOSSES = ("arcface", "cosface", "sphereface", "combined")
# Which of --m1, --m2 and --m3 each loss reads, with the value each takes when not given (None: --arcface-m).
# The losses not named read none: arcface and elasticface-arc(+) take --arcface-m, adaface and magface
# their own per-row margins.
MARGIN_FLAGS = {"combined": {"m1": 1.0, "m2": None, "m3": 0.0}, "cosface": {"m3": 0.35},
                "elasticface-cos": {"m3": 0.35}, "elasticface-cos+": {"m3": 0.35}, "sphereface": {"m1": 4.0}}
# The losses whose margin is --arcface-m.
ARCFACE_M_LOSSES = ("arcface", "elasticface-arc", "elasticface-arc+", "curricularface")
LR_SCHEDULES = ("step", "poly", "cosine")  # train.trainer.LearningRateSchedule's kinds
DISTILL_LOSSES = ("cosine", "mse")  # train.distill.distillation_loss's
# Minutes a process waits at a collective (torchrun) before the run fails: rank 0 verifies and writes the
# checkpoint (8.4 GB of centres and momentum at WebFace42M's 2M identities) alone while the others wait at the
# next step's all-reduce. torch's own default for NCCL is 10 minutes, which a slow disk can outlast.
DIST_TIMEOUT_MINUTES = 30.0
# The range torch takes: 2.13 counts the timeout in whole milliseconds, and adds it to its clocks in 64-bit
# nanoseconds, which overflow past 1.5e8 minutes; 2.4's store counts its connection's timeout in whole seconds.
# Outside it (1e-6, 2e8, and 1e-3 on 2.4.1; 1e9 passed only as the overflow wrapped round), the process group's
# store timed out at once, with a traceback ("The client socket has timed out after 0s").
DIST_TIMEOUT_LEAST_MINUTES = 0.05  # (3 s)
DIST_TIMEOUT_MOST_MINUTES = 1e7  # (19 years)
# The defaults of the parameters that only some losses read (a value other than these, given to a
# loss that does not read it, is refused).
SGD_MOMENTUM = 0.9
# The augmentations' flags, in the order they apply (train.data.augment.ORDER), and the defaults of their strengths
# (train.data.augment's, repeated: that module imports torch, which parsing the options does not).
AUGMENTATION_FLAGS = ("--crop-augmentation", "--low-res-augmentation", "--blur-augmentation",
                      "--photometric-augmentation", "--hue-augmentation", "--grayscale-augmentation")
BLUR_KERNEL, BLUR_SIGMA, HUE_SHIFT = 5, (0.1, 2.0), 0.05
OWN_PARAMETER_DEFAULTS = {"arcface_m": 0.5, "adaface_m": 0.4, "adaface_h": 0.333, "elastic_std": 0.05,
                          "magface_easy_margin": False}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in str(text).replace(",", " ").split()]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in str(text).replace(",", " ").split()]


class _InSteps(argparse.Action):
    """A length in steps (--max-steps, --warmup-steps, --lr-steps) that replaces the same length given
    earlier in epochs (``epochs_dest``): the two spellings are one setting, and the later one counts (a
    config's ``epochs: 20`` with ``--max-steps 100`` on the command line runs 100 steps). The epoch
    options need no such action: given, they are converted once the data is read and replace the steps."""

    def __init__(self, option_strings, dest, epochs_dest: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.epochs_dest = epochs_dest

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, self.epochs_dest, None)


class _NetworkChoices(tuple):
    """--network's choices: the built-in networks' names, and any ``package.module:factory`` (which the
    listing in argparse's usage and errors shows as that pattern)."""

    def __contains__(self, name: object) -> bool:
        return tuple.__contains__(self, name) or (isinstance(name, str) and is_factory_spec(name))


def _str_list(text: str) -> list[str]:
    """Comma- or space-separated names; an empty string (or 'none') is an empty list."""
    names = str(text).replace(",", " ").split()
    return [] if names == ["none"] else names


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a help that does not say its default itself, and none for a
    default of None (the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m train", name="train",
        description="Train a face-recognition backbone with an ArcFace-style margin loss. "
        "With no arguments it runs the demo: the small network on synthetic faces, a few minutes on a CPU.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML or JSON file whose keys are flag names (either spelling), or an insightface "
                   "arcface_torch config (configs/*.py, read, not run); the command line overrides it")
    # What torch.distributed.launch (arcface_torch's older launch lines) passes each process besides
    # LOCAL_RANK in its environment, which is what is read: accepted rather than an "unrecognized
    # arguments" stop, and dropped in resolve().
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("data and model")
    g.add_argument("--data", "--data-set", "--data_set", dest="data", default="synthetic",
                   help="'synthetic', 'random' (fixed random images on the device, labels drawn each step over "
                        "--num-classes: a step's speed and memory without the loader), a folder with train.rec/"
                        "train.idx (insightface layout), an ImageFolder tree, or a list file (.lst, .txt) of lines "
                        "'path label', 'flag<TAB>path<TAB>label' or 'index<TAB>label<TAB>path'")
    g.add_argument("--val-targets", "--val_targets", dest="val_targets", type=_str_list, default=None,
                   help="verification sets, comma separated: names of <data>/<name>.bin, or .bin / pairs-file "
                   ".txt paths (a pairs list, LFW's pairs.txt, CALFW's or CPLFW's pair file), or RFW's folder "
                   "(its four races, and their mean, std and skewed error ratio); "
                   "default lfw,cfp_fp,agedb_30 (one synthetic set named 'synthetic' for --data synthetic); "
                   "'none' for no verification")
    # The demo's size: few identities with many images each, so that in a few hundred steps the
    # class centres are learned (θ falls from 90° to about 50°) and verification on other
    # identities climbs from near chance to about 90%.
    g.add_argument("--synthetic-identities", "--synthetic_identities", dest="synthetic_identities", type=int,
                   default=100, help="--data synthetic: number of training identities")
    g.add_argument("--synthetic-images-per-identity", "--synthetic_images_per_identity",
                   dest="synthetic_images_per_identity", type=int, default=160,
                   help="--data synthetic: images of each training identity")
    # AdaFace's flags and values (its MS1MV2 / WebFace4M runs: 0.2 each); off by default, as in
    # arcface_torch, whose training sees the flip alone.
    g.add_argument("--crop-augmentation", "--crop_augmentation_prob", dest="crop_augmentation", type=float,
                   default=0.0, help="probability of AdaFace's crop augmentation: black outside a random box of "
                   "20-100%% of the image, the face left where it is (AdaFace: 0.2)")
    g.add_argument("--low-res-augmentation", "--low_res_augmentation_prob", dest="low_res_augmentation",
                   type=float, default=0.0, help="probability of AdaFace's low-resolution augmentation: shrunk to "
                   "20-100%% of its side and enlarged back, each with a random filter (AdaFace: 0.2)")
    g.add_argument("--photometric-augmentation", "--photometric_augmentation_prob", dest="photometric_augmentation",
                   type=float, default=0.0, help="probability of AdaFace's photometric augmentation: brightness, "
                   "contrast and saturation each scaled by 0.5-1.5 (AdaFace: 0.2)")
    # torchvision's GaussianBlur, ColorJitter(hue=) and RandomGrayscale, as arcface_torch's dali_aug has them.
    g.add_argument("--blur-augmentation", dest="blur_augmentation", type=float, default=0.0,
                   help="probability of a Gaussian blur (torchvision's GaussianBlur: --blur-kernel taps, a sigma drawn "
                   "from --blur-sigma)")
    g.add_argument("--blur-kernel", dest="blur_kernel", type=int, default=BLUR_KERNEL,
                   help="--blur-augmentation's kernel size in pixels, odd, at most 2 x --image-size - 1")
    g.add_argument("--blur-sigma", dest="blur_sigma", type=_float_list, default=list(BLUR_SIGMA),
                   help="--blur-augmentation's range of the standard deviation in pixels, LOW,HIGH (or one value), "
                   "drawn uniformly; default 0.1,2.0")
    g.add_argument("--hue-augmentation", dest="hue_augmentation", type=float, default=0.0,
                   help="probability of a hue shift (torchvision's ColorJitter(hue=--hue-shift)), saturation and "
                   "brightness kept")
    g.add_argument("--hue-shift", dest="hue_shift", type=float, default=HUE_SHIFT,
                   help="--hue-augmentation's largest shift H, a fraction of the colour circle in (0, 0.5] and above "
                   "1/255 (Pillow's hue is a byte), drawn uniformly from -H to H")
    g.add_argument("--grayscale-augmentation", dest="grayscale_augmentation", type=float, default=0.0,
                   help="probability of turning the image grey, its luma in all three channels "
                   "(torchvision's RandomGrayscale)")
    g.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=None,
                   help="the number of identities the data must have (checked; taken from the data when not given); "
                   "--data random: the identities, any number (needed)")
    g.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                   help="input side in pixels; default 112 (aligned faces), 64 for the synthetic demo")
    g.add_argument("--network", choices=_NetworkChoices(NETWORKS + ("package.module:factory",)), default="small",
                   help="the backbone: r18 to r200, r2060 (iResNet), small (the demo's), mbf, mbf_large "
                   "(MobileFaceNet; the image size a multiple of 16), vit_* (arcface_torch's Vision Transformers), or "
                   "package.module:factory, a network of your own: the factory, imported from PYTHONPATH, called with "
                   "embedding_size= and image_size=, returns an nn.Module mapping N x 3 x H x W images to N x D "
                   "embeddings")
    g.add_argument("--embedding-size", "--embedding_size", dest="embedding_size", type=int, default=512,
                   help="length of the face embedding the backbone gives (and of each class centre)")
    g.add_argument("--keep-prob", "--keep_prob", dest="keep_prob", type=float, default=1.0,
                   help="dropout keep probability in the embedding head")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass to save memory")
    g.add_argument("--channels-last", dest="channels_last",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="the backbone's weights and input images in the channels-last (NHWC) memory layout, which "
                   "tensor-core convolutions prefer")
    g.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the backbone's training forward and backward (the first steps compile: "
                   "minutes for r100); verification and checkpoints use the plain module")
    g.add_argument("--compile-backend", dest="compile_backend", default="inductor",
                   help="torch.compile backend for --compile (inductor; aot_eager for checking)")
    g.add_argument("--compile-mode", dest="compile_mode", default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode for --compile (the inductor backend; default: torch.compile's own)")
    g.add_argument("--pretrained-model", "--pretrained_model", dest="pretrained_model", default=None,
                   help="initialise from this backbone state dict or training checkpoint, or the weights of an "
                   "ONNX model whose layers are --network's (insightface's w600k_r50.onnx for r50)")
    g.add_argument("--finetuning", action=argparse.BooleanOptionalAction, default=False,
                   help="with --pretrained_model: take the backbone only and start fresh class centres "
                   "(new identities); otherwise a checkpoint's class centres are loaded too when they fit")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, default="arcface",
                   help="arcface: cos(θ+m); cosface: cos θ-m; sphereface: cos(mθ); combined: cos(m1·θ+m2)-m3; "
                   "adaface: margins from the embedding norm (--adaface-m, --adaface-h); elasticface-arc / "
                   "elasticface-cos: each row's margin drawn from N(--arcface_m or --m3, --elastic-std), and with + "
                   "(ElasticFace+) the draws handed out by target cosine, the largest to the hardest row; magface: "
                   "a margin from 0.45 to 0.8 as the norm goes from 10 to 110, plus its norm regulariser "
                   "(lambda_g 35); curricularface: cos(θ+m) (--arcface_m) and hard negatives c·(t+c), t a running "
                   "mean of the target cosines (the chunked PyTorch path, not the fused op; also sharded)")
    g.add_argument("--arcface-s", "--arcface_s", "--scale", dest="arcface_s", type=float, default=64.0,
                   help="scale s of the logits (all losses)")
    g.add_argument("--arcface-m", "--arcface_m", dest="arcface_m", type=float,
                   default=OWN_PARAMETER_DEFAULTS["arcface_m"],
                   help="additive angular margin of --loss arcface (the mean one of elasticface-arc)")
    g.add_argument("--m1", type=float, default=None,
                   help="multiplicative angular margin (sphereface: 4, combined: 1.0)")
    g.add_argument("--m2", type=float, default=None, help="additive angular margin (combined: --arcface_m)")
    g.add_argument("--m3", type=float, default=None, help="additive cosine margin (cosface: 0.35, combined: 0.0)")
    g.add_argument("--adaface-m", "--adaface_m", dest="adaface_m", type=float,
                   default=OWN_PARAMETER_DEFAULTS["adaface_m"],
                   help="AdaFace's margin m (its paper: 0.4)")
    g.add_argument("--adaface-h", "--adaface_h", dest="adaface_h", type=float,
                   default=OWN_PARAMETER_DEFAULTS["adaface_h"],
                   help="AdaFace's h: how far the norm moves the margin (its paper: 0.333)")
    g.add_argument("--elastic-std", "--elastic_std", dest="elastic_std", type=float, default=None,
                   help="ElasticFace's standard deviation of the per-row margin (default: its paper's 0.05; for "
                   "elasticface-arc+ and -cos+ its configurations' 0.0175 and 0.02)")
    g.add_argument("--magface-easy-margin", "--magface_easy_margin", dest="magface_easy_margin",
                   action=argparse.BooleanOptionalAction, default=OWN_PARAMETER_DEFAULTS["magface_easy_margin"],
                   help="--loss magface: no margin where cos θ <= 0, as MagFace's training code (MagLinear's "
                   "easy_margin=True); off: the margin at every θ")
    g.add_argument("--margin-grad", "--margin_grad", dest="margin_grad", choices=("exact", "straight_through"),
                   default="exact",
                   help="the target logit's gradient: exact (of cos(m1·θ+m2), the paper's) or straight_through "
                   "(as if the angular margin were not there: arcface_torch's loss, which applies it under "
                   "no_grad). The same loss value; the configs that follow arcface_torch's ArcFace use the latter")
    g.add_argument("--subcenters", "--loss_K", dest="subcenters", type=int, default=1,
                   help="sub-center ArcFace: K centres a class, each class's cosine the best of its K (the paper: "
                   "3, for noisy data; python -m train.tools.clean then drops what the dominant sub-centres leave). "
                   "With arcface, cosface, sphereface or combined; the chunked PyTorch path, not the fused op")
    g.add_argument("--interclass-filter", "--interclass-filtering-threshold", "--interclass_filtering_threshold",
                   dest="interclass_filter", type=float, default=0.0,
                   help="partial FC's inter-class filtering (arcface_torch's interclass_filtering_threshold): other "
                   "classes whose cosine to a sample exceeds this get logit 0 and no gradient, taken for the same "
                   "person filed twice. 0: off. With arcface, cosface, sphereface or combined (also sharded); the "
                   "chunked PyTorch path, not the fused op")
    g.add_argument("--loss-impl", "--loss_impl", dest="loss_impl", choices=("fused", "reference"), default="fused",
                   help="the compiled arcface_ext op, or its pure-PyTorch reference")
    g.add_argument("--sharded-classes", "--model-parallel", dest="sharded_classes",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="split the class centres across the processes (model parallel, as arcface_torch's "
                   "partial FC): each holds C / world of them and their optimizer state, "
                   "and no C x D gradient is all-reduced. For hundreds of thousands of identities and more")
    g.add_argument("--save-sharded", dest="save_sharded", action=argparse.BooleanOptionalAction, default=False,
                   help="with --sharded-classes under torchrun: each process writes its own centres and their "
                   "optimizer state beside checkpoint.pt (checkpoint-centres-<rank>-of-<world>-<id>.pt), rather than "
                   "rank 0 gathering the whole matrix into it. Elsewhere the checkpoint is one file, as without it")
    g.add_argument("--sample-rate", "--sample_rate", dest="sample_rate", type=float, default=1.0,
                   help="partial FC's class sampling: each step's softmax runs over the batch's identities and "
                   "a uniform sample of the others, this fraction of all (of each process's shard with "
                   "--sharded-classes); insightface's WebFace42M configurations use 0.2-0.3. 1: every class")

    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, metavar="PATH",
                   help="a frozen teacher backbone whose embedding of each training image the student's is pulled "
                   "toward (what --pretrained_model takes: a checkpoint, train.export's backbone.pt, insightface's "
                   "backbone.pth; or an ONNX model, run by onnxruntime); its embedding size must be --embedding-size's")
    g.add_argument("--teacher-network", "--teacher_network", dest="teacher_network", default=None,
                   choices=_NetworkChoices(NETWORKS + ("package.module:factory",)),
                   help="the teacher's network, for a bare state dict whose weights do not tell it (a "
                   "package.module:factory network's, built at --embedding-size and --image-size); a file that "
                   "records its network needs none")
    g.add_argument("--distill-weight", "--distill_weight", dest="distill_weight", type=float, default=1.0,
                   help="the distillation term's weight: the student minimises the margin loss plus this times the "
                   "term (0: the term is logged, not trained on)")
    g.add_argument("--distill-loss", "--distill_loss", dest="distill_loss", choices=DISTILL_LOSSES, default="cosine",
                   help="cosine: 1 - cos(student, teacher) (ShrinkTeaNet's angular distillation); mse: the mean "
                   "squared difference of the L2-normalised embeddings' elements (PocketNet's), 2 (1 - cos) / "
                   "--embedding-size. Each the mean over the batch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd (with --momentum) or adamw (PyTorch's betas), each with --decay")
    g.add_argument("--lr", type=float, default=None, help="base learning rate; default 0.1 (sgd) or 0.001 (adamw)")
    g.add_argument("--centres-lr-scale", "--centres_lr_scale", dest="centres_lr_scale", type=float, default=1.0,
                   help="the class centres' learning rate is --lr times this, the backbone's --lr, under one schedule "
                   "and --decay; when not 1, metrics.jsonl logs centres_lr beside lr (the backbone's)")
    g.add_argument("--momentum", type=float, default=SGD_MOMENTUM,
                   help="SGD's, below 1 (AdamW has its betas, PyTorch's)")
    g.add_argument("--decay", "--weight-decay", "--weight_decay", dest="decay", type=float, default=5e-4,
                   help="weight decay")
    g.add_argument("--lr-schedule", "--lr_schedule", dest="lr_schedule", choices=LR_SCHEDULES, default=None,
                   help="step: divide by 10 at --lr-steps (the paper); poly: (1-t)^2 decay after warm-up "
                   "(insightface); cosine: (1+cos(pi t))/2 after warm-up; default step when --lr-steps is given, "
                   "else poly")
    # Each length in steps has a spelling in epochs, converted when the data is read (this run's epoch:
    # the images a process reads over its images a step); the later of the two given counts.
    g.add_argument("--lr-steps", "--lr_steps", dest="lr_steps", type=_int_list, default=None,
                   action=_InSteps, epochs_dest="lr_epochs",
                   help="steps at which the step schedule divides the learning rate by 10, e.g. 100000,160000")
    g.add_argument("--lr-epochs", "--lr_epochs", "--lr-milestones", "--lr_milestones", dest="lr_epochs",
                   type=_float_list, default=None,
                   help="--lr-steps in epochs, e.g. 12,20,24 (AdaFace's --lr_milestones)")
    g.add_argument("--warmup-steps", "--warmup_steps", dest="warmup_steps", type=int, default=None,
                   action=_InSteps, epochs_dest="warmup_epochs",
                   help="linear warm-up from 0; default 5%% of --max-steps for poly and cosine, 0 for step")
    g.add_argument("--warmup-epochs", "--warmup_epochs", "--warmup_epoch", dest="warmup_epochs", type=float,
                   default=None, help="--warmup-steps in epochs (arcface_torch's warmup_epoch)")
    g.add_argument("--margin-warmup-steps", "--margin_warmup_steps", dest="margin_warmup_steps", type=int, default=0,
                   action=_InSteps, epochs_dest="margin_warmup_epochs",
                   help="raise the loss's margin linearly from none to its value over the first N optimiser steps "
                   "(m2 and m3 from 0, m1 from 1), for a run that stalls at a high loss from the start; 0: off. Not "
                   "with adaface or magface, whose margins follow the embedding's norm")
    g.add_argument("--margin-warmup-epochs", "--margin_warmup_epochs", dest="margin_warmup_epochs", type=float,
                   default=None, help="--margin-warmup-steps in epochs")
    g.add_argument("--max-steps", "--max_step", "--max_steps", dest="max_steps", type=int, default=300,
                   action=_InSteps, epochs_dest="epochs",
                   help="optimiser steps to train (the schedule's length), each of --gradient-acc passes")
    g.add_argument("--epochs", "--num-epoch", "--num_epoch", dest="epochs", type=float, default=None,
                   help="--max-steps in epochs of the training data (a fraction counts: 0.5)")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128,
                   help="images per process and forward pass (the global batch is this times the world "
                   "size times --gradient-acc)")
    g.add_argument("--gradient-acc", "--gradient_acc", dest="gradient_acc", type=int, default=1,
                   help="forward/backward passes of --batch-size images whose mean gradient makes one optimiser "
                   "step (gradient accumulation: a larger batch than fits in memory; the schedule counts steps)")
    g.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none",
                   help="autocast dtype of the convolutional trunk (the head and the loss stay fp32)")
    g.add_argument("--loss-amp", "--loss_amp", dest="loss_amp", choices=("none", "fp16", "bf16"), default="none",
                   help="autocast dtype of the margin loss: its GEMMs then run on 16-bit copies of the "
                   "embeddings and the fp32 class centres (the chunked path's losses: a chunk of centres at a "
                   "time; tensor cores on GPUs; fp32 accumulation and loss). Worth it when the classes run into "
                   "the hundreds of thousands")
    g.add_argument("--grad-clip", "--grad_clip", dest="grad_clip", type=float, default=5.0,
                   help="clip the backbone's gradient norm to this (0: off), as insightface does")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order, the augmentations and the synthetic data")
    g.add_argument("--device", default="auto",
                   help="'auto' (cuda:LOCAL_RANK when available, else cpu), 'cpu', 'cuda', ...")
    g.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, default=1,
                   help="DataLoader worker processes per training process")
    g.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=DIST_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="under torchrun, how long a process waits for the others at a collective before the run "
                        "fails (rank 0 verifies and writes checkpoints alone meanwhile)")
    g.add_argument("--output", "--models_base_dir", "--models-base-dir", dest="output", default=None,
                   help="output folder for checkpoints, metrics and plots; default runs/<network>")
    g.add_argument("--log-every", "--log_every", dest="log_every", type=int, default=10,
                   help="write a metrics.jsonl line every N steps")
    g.add_argument("--eval-every", "--eval_every", dest="eval_every", type=int, default=100,
                   help="run verification every N steps (and at the start and the end; 0: only at the end)")
    g.add_argument("--save-every", "--save_every", dest="save_every", type=int, default=100,
                   help="write the checkpoint every N steps (and at the end)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto': <output>/checkpoint.pt if it exists")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="also log to <output>/tensorboard when the tensorboard package is installed")
    g.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                   help="also log to Weights & Biases (the wandb package; main process only; WANDB_MODE=offline "
                   "logs into <output>/wandb without an account, for `wandb sync` later)")
    g.add_argument("--wandb-project", "--wandb_project", dest="wandb_project", default="arcface-ext",
                   help="the W&B project of --wandb")
    g.add_argument("--wandb-entity", "--wandb_entity", dest="wandb_entity", default=None,
                   help="the W&B team or user of --wandb (default: your account's default entity)")
    g.add_argument("--wandb-run-name", "--wandb_run_name", dest="wandb_run_name", default=None,
                   help="the W&B run's display name; {output} stands for the --output folder's name, the "
                   "default")
    g.add_argument("--wandb-artifacts", "--wandb_artifacts", dest="wandb_artifacts",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="with --wandb: log each checkpoint.pt the run writes (every --save-every steps, at the "
                   "end; not a stop by a signal's) as a version of the W&B run's artifact model-<run id>, of type "
                   "model, aliased latest, step-<S>, and best (best-<target> for each target) where the save's step "
                   "has the best verification so far; main process only. With --save-sharded, checkpoint.pt without "
                   "the centre shards")
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write loss.png, verification.png and target_angle.png at the end")
    return p


def _option_table(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every spelling of every option (without dashes, ``no-plots`` included), and each dest, -> its action."""
    table = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        table[action.dest] = action
        for opt in action.option_strings:
            table[opt.lstrip("-")] = action
    return table


def _refuse_repeated_keys(keys: list[str], path: str) -> None:
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise SystemExit(f"{path}: {twice} is given {keys.count(twice)} times: keep one")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding one mapping."""
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as error:
            raise SystemExit(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}): a YAML or JSON "
                             "config is a text file") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"{path}: reading YAML needs PyYAML (pip install pyyaml), "
                             "or write the config as JSON") from None
        try:
            # A key given twice: the parsers keep the later one without a word.
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            keys = [key.value for key, _ in root.value] if isinstance(root, yaml.MappingNode) else []
            _refuse_repeated_keys(keys, path)
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise SystemExit(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=lambda pairs: _refuse_repeated_keys([k for k, _ in pairs], path)
                              or dict(pairs))
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: not valid JSON: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Turn a config mapping into command-line tokens, so that the file's values get exactly
    the command line's parsing, choices and error messages (a value outside an option's choices is
    reported here, naming the file)."""
    table = _option_table(parser)
    run_args = "config" in config
    if run_args:
        # A run's args.json: it names the --config its values came from (they are all in it), and its
        # warm-up, when the default share of its --max-steps, stays the default (a new --max-steps on the
        # command line moves it, as it moves the run's own on a resume).
        config = {key: value for key, value in config.items() if key != "config"}
        steps = config.get("max_steps")
        if isinstance(steps, int) and config.get("warmup_steps") == default_warmup_steps(
                steps, config.get("lr_schedule", "poly")):
            del config["warmup_steps"]
        # So does its --elastic-std when its loss's default (every run records one): another --loss on the
        # command line takes its own (an arcface run's 0.05 trained elasticface-arc+ at it, not at 0.0175).
        if config.get("elastic_std") == default_elastic_std(config.get("loss", "arcface")):
            del config["elastic_std"]
    unknown = sorted((k for k in config if k not in table), key=str)  # (a YAML key may be a number: 3: 4)
    if unknown:
        # A key a letter or two from a flag's name (num_epochs, lr_milestone, NUM_EPOCH) names that flag.
        close = {k: difflib.get_close_matches(str(k).lower(), table, n=1, cutoff=0.8) for k in unknown}
        raise SystemExit(f"{source}: unknown key(s) "
                         f"{', '.join(f'{k} ({close[k][0]}?)' if close[k] else str(k) for k in unknown)}; keys are "
                         "the flag names of `python -m train --help` (e.g. max-steps or max_step)")
    # Two spellings of one option (max-steps and max_step, plots and no-plots): the later one won, without a word.
    # So are a length in steps and in epochs (max-steps and epochs), but in a run's args.json, which holds both.
    in_steps = {} if run_args else {"epochs": "max_steps", "warmup_epochs": "warmup_steps", "lr_epochs": "lr_steps",
                                    "margin_warmup_epochs": "margin_warmup_steps"}
    spellings: dict[str, list[str]] = {}
    for key in config:
        spellings.setdefault(in_steps.get(table[key].dest, table[key].dest), []).append(key)
    twice = next((keys for keys in spellings.values() if len(keys) > 1), None)
    if twice:
        both = len({table[key].dest for key in twice}) > 1
        raise SystemExit(f"{source}: {' and '.join(twice)} are one option"
                         f"{' (in steps and in epochs)' if both else ''}, given {len(twice)} times: keep one")
    argv = []
    for key, value in config.items():
        action = table[key]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise SystemExit(f"{source}: {key} must be true or false, got {value!r}")
            if key.startswith("no-") and f"--{key}" in action.option_strings:  # no-plots: true
                value = not value
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue
        else:
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            if action.type is not None:
                try:
                    action.type(str(value))
                except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                    # argparse would print its usage and name the flag, not the file
                    raise SystemExit(f"{source}: {key} {value!r}: {error}") from None
            if action.choices is not None and str(value) not in action.choices:
                # argparse would say "invalid choice" without naming the file the value came from
                raise SystemExit(f"{source}: {key} {value!r} is not one this trainer has: "
                                 f"{', '.join(map(str, action.choices))}")
            argv.append(f"{flag}={value}")  # one token: a value such as -inf is not taken for a flag
    return argv


def default_elastic_std(loss: str) -> float:
    """--elastic-std's default for ``loss``: ElasticFaceLoss's own for the ElasticFace losses (0.0175 and
    0.02 with +), the value that asks nothing (0.05) for the others, which do not read it."""
    if not loss.startswith("elasticface-"):
        return OWN_PARAMETER_DEFAULTS["elastic_std"]
    from arcface_ext.modules import ELASTICFACE_STDS

    return ELASTICFACE_STDS[loss.split("-")[1].rstrip("+"), loss.endswith("+")]


def default_warmup_steps(max_steps: int, lr_schedule: str) -> int:
    return 0 if lr_schedule == "step" else max(1, max_steps // 20)


def _show_numbers(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def steps_from_epochs(args: argparse.Namespace, steps_per_epoch: int) -> None:
    """Set ``--max-steps``, ``--warmup-steps`` and ``--lr-steps`` from ``--epochs``, ``--warmup-epochs``
    and ``--lr-epochs`` where those are given, each rounded to the nearest of the run's optimiser steps,
    ``steps_per_epoch`` of them an epoch (the trainer's: the images a process reads // its images a
    step, as its sampler counts them); then the default warm-up, a share of the steps.
    Raises SystemExit naming the option when a length comes to no step."""
    def steps(epochs: float) -> int:
        return math.floor(epochs * steps_per_epoch + 0.5)

    epoch_note = f"{count_of(steps_per_epoch, 'step')} an epoch"
    if args.epochs is not None:
        args.max_steps = steps(args.epochs)
        if args.max_steps < 1:
            raise SystemExit(f"--epochs {args.epochs:g} is no step, at {epoch_note}: train longer")
    if args.warmup_epochs is not None:
        args.warmup_steps = steps(args.warmup_epochs)
    elif args.warmup_steps is None:
        args.warmup_steps = default_warmup_steps(args.max_steps, args.lr_schedule)
    if args.margin_warmup_epochs is not None:
        args.margin_warmup_steps = steps(args.margin_warmup_epochs)
    if args.lr_epochs is not None:
        args.lr_steps = [steps(epoch) for epoch in args.lr_epochs]
        if min(args.lr_steps) < 1 or len(set(args.lr_steps)) < len(args.lr_steps):
            raise SystemExit(f"--lr-epochs {_show_numbers(args.lr_epochs)} are steps "
                             f"{','.join(map(str, args.lr_steps))} at {epoch_note}: the steps must be distinct "
                             "and at least 1")


def resolve(args: argparse.Namespace, given: Iterable[str] = ()) -> argparse.Namespace:
    """Fill the defaults that depend on other options; ``given``: the names of the options the command
    line gave, whatever their values (parse_args's; a config's defaults are not given)."""
    local_rank = vars(args).pop("local_rank", None)
    if local_rank is not None:
        if os.environ.setdefault("LOCAL_RANK", str(local_rank)) != str(local_rank):
            raise SystemExit(f"--local-rank {local_rank}, but LOCAL_RANK is {os.environ['LOCAL_RANK']} in the "
                             "environment: launch with torchrun, which sets LOCAL_RANK alone")
    if args.val_targets is None:
        args.val_targets = (["synthetic"] if args.data == "synthetic" else [] if args.data == "random"
                            else ["lfw", "cfp_fp", "agedb_30"])
    if args.data == "random" and args.num_classes is None:
        raise SystemExit("--data random needs --num-classes: the number of identities its labels are drawn over")
    if args.image_size is None:
        args.image_size = 64 if args.data == "synthetic" else 112
    if args.lr is None:
        args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
    # Lengths given in epochs replace those in steps (an --lr-steps given later has cleared them), and
    # become steps when the data is read (steps_from_epochs); until then the steps they set are unknown.
    if args.lr_epochs is not None:
        args.lr_steps = None
    if args.warmup_epochs is not None:
        args.warmup_steps = None
    if args.margin_warmup_epochs is not None:
        args.margin_warmup_steps = None
    for flag, values in (("--epochs", [args.epochs]), ("--warmup-epochs", [args.warmup_epochs]),
                         ("--lr-epochs", args.lr_epochs), ("--margin-warmup-epochs", [args.margin_warmup_epochs])):
        positive = flag not in ("--warmup-epochs", "--margin-warmup-epochs")
        bad = [v for v in values or [] if v is not None and not (math.isfinite(v) and (v > 0 if positive else v >= 0))]
        if bad:
            raise SystemExit(f"{flag} must be {'finite and > 0' if positive else 'finite and >= 0'}, got {bad[0]:g}")
    if args.lr_epochs is not None and len(set(args.lr_epochs)) < len(args.lr_epochs):
        raise SystemExit(f"--lr-epochs {_show_numbers(args.lr_epochs)}: the epochs must be distinct")
    lr_steps_flag = "--lr-epochs" if args.lr_epochs else "--lr-steps"
    if args.lr_schedule is None:
        args.lr_schedule = "step" if args.lr_steps or args.lr_epochs else "poly"
    if args.elastic_std is None:
        args.elastic_std = default_elastic_std(args.loss)
    if args.warmup_steps is None and args.warmup_epochs is None and args.epochs is None:
        args.warmup_steps = default_warmup_steps(args.max_steps, args.lr_schedule)
    if args.lr_schedule == "step" and not (args.lr_steps or args.lr_epochs):
        raise SystemExit("--lr-schedule step needs --lr-steps (e.g. --lr-steps 100000,160000) or --lr-epochs "
                         "(e.g. --lr-epochs 12,20,24)")
    # A step at 0 or before divided the base rate from the first step (a lower --lr), one named twice by
    # 100 there: typos, not schedules.
    if args.lr_steps and (min(args.lr_steps) < 1 or len(set(args.lr_steps)) < len(args.lr_steps)):
        raise SystemExit(f"--lr-steps {','.join(map(str, args.lr_steps))}: the steps must be distinct and at least 1")
    if args.lr_schedule != "step" and (args.lr_steps or args.lr_epochs):
        # (a config's poly, with --lr-steps added on the command line)
        raise SystemExit(f"{lr_steps_flag} goes with --lr-schedule step, but the schedule is {args.lr_schedule}: add "
                         "--lr-schedule step")
    # A margin flag the loss does not read would be silently ignored (--loss arcface --m2 0.4 trains at
    # --arcface-m).
    reads = MARGIN_FLAGS.get(args.loss, {})
    unread = [f"--{name}" for name in ("m1", "m2", "m3") if getattr(args, name) is not None and name not in reads]
    # So would the other losses' own parameters (--loss cosface --arcface-m 0.2 trained at --m3 0.35).
    # Only a value other than the default counts: args.json lists every option, and is a config.
    read_by = {"arcface_m": args.loss in ARCFACE_M_LOSSES
                            or (args.loss == "combined" and args.m2 is None),
               "adaface_m": args.loss == "adaface", "adaface_h": args.loss == "adaface",
               "elastic_std": args.loss.startswith("elasticface"), "magface_easy_margin": args.loss == "magface"}
    unread += [f"--{dest.replace('_', '-')}"
               + ("" if isinstance(getattr(args, dest), bool) else f" {getattr(args, dest):g}")
               for dest, read in read_by.items() if not read and getattr(args, dest) != OWN_PARAMETER_DEFAULTS[dest]]
    if unread:
        own = {"arcface": "--arcface-m", "curricularface": "--arcface-m",
               "elasticface-arc": "--arcface-m and --elastic-std", "adaface": "--adaface-m and --adaface-h",
               "magface": "its fixed MS1MV2 settings (and --magface-easy-margin)",
               "elasticface-cos": "--m3 and --elastic-std"}.get(
                   args.loss.rstrip("+"), " ".join(f"--{name}" for name in reads))
        raise SystemExit(f"{' and '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to --loss "
                         f"{args.loss}, whose margin is {own}")
    # The loss's own checks, as one-line errors naming the flag (a module built with them raises).
    from arcface_ext._checks import MAX_ANGULAR_MARGIN, MAX_COSINE_MARGIN

    m1, m2, m3 = margins(args)
    if not 0 < m1 < math.inf:  # (the loss module refused it with a traceback, after the data was read)
        raise SystemExit(f"--m1 (a multiplicative angular margin) must be a finite number > 0, got {m1} "
                         "(SphereFace's is 4, 1 is none)")
    if not -MAX_ANGULAR_MARGIN <= m2 <= MAX_ANGULAR_MARGIN:
        raise SystemExit(f"{'--m2' if args.m2 is not None else '--arcface-m'} (an angular margin, in radians) must "
                         f"lie in [-pi/2, pi/2], got {m2} (ArcFace's 0.5 rad is 28.6 degrees)")
    if not -MAX_COSINE_MARGIN <= m3 <= MAX_COSINE_MARGIN:
        raise SystemExit(f"{'--m3' if args.m3 is not None else '--arcface-m'} (a cosine margin) must lie in [-1, 1], "
                         f"got {m3}")
    if args.loss == "adaface" and not (0 <= args.adaface_m <= 1 and 0 < args.adaface_h < math.inf):
        raise SystemExit(f"--adaface-m must lie in [0, 1] and --adaface-h be > 0, got {args.adaface_m} and "
                         f"{args.adaface_h}")
    if args.loss.startswith("elasticface") and not 0 <= args.elastic_std < math.inf:
        raise SystemExit(f"--elastic-std must be finite and >= 0, got {args.elastic_std}")
    if not args.output:  # (a config file's "" too: none, as its other paths' "")
        args.output = os.path.join("runs", args.network.replace(":", "."))  # (package.module:factory)
    if args.finetuning and not args.pretrained_model:  # (was a run from random weights, without a word)
        raise SystemExit("--finetuning takes the backbone of --pretrained_model (with fresh class centres): give "
                         "--pretrained_model too")
    if not args.teacher:  # (each was a run without distillation, without a word)
        parser = build_parser()
        # A value other than the default, or any value the command line gave: --distill-weight 1 alone was
        # taken silently. (A config's default value is not one: args.json lists every option.)
        named = [f"--{dest.replace('_', '-')} {getattr(args, dest)}" for dest in
                 ("teacher_network", "distill_weight", "distill_loss")
                 if getattr(args, dest) != parser.get_default(dest) or dest in given]
        if named:
            raise SystemExit(f"{' and '.join(named)} {'goes' if len(named) == 1 else 'go'} with --teacher (the "
                             "backbone the student is distilled from): give --teacher too")
    if not 0.0 < args.keep_prob <= 1.0:
        raise SystemExit(f"--keep-prob must be in (0, 1], got {args.keep_prob}")
    if args.compile_mode and args.compile_backend != "inductor":
        raise SystemExit(f"--compile-mode is an inductor option; --compile-backend is {args.compile_backend}")
    if not 0.0 < args.sample_rate <= 1.0:
        raise SystemExit(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    # Checked here, before a run moves an earlier one aside or builds anything: a bad value used to
    # train on and fail mid-run (--log-every 0), or fail deep inside torch with a traceback.
    for flag, value, least in (("--max-steps", args.max_steps, 1),
                               ("--warmup-steps", 0 if args.warmup_steps is None else args.warmup_steps, 0),
                               ("--margin-warmup-steps", args.margin_warmup_steps or 0, 0),
                               ("--batch-size", args.batch_size, 1), ("--gradient-acc", args.gradient_acc, 1),
                               ("--log-every", args.log_every, 1), ("--eval-every", args.eval_every, 0),
                               ("--save-every", args.save_every, 0), ("--num-workers", args.num_workers, 0),
                               ("--embedding-size", args.embedding_size, 1), ("--seed", args.seed, 0),
                               ("--image-size", args.image_size, 1),
                               ("--synthetic-identities", args.synthetic_identities, 1),
                               ("--synthetic-images-per-identity", args.synthetic_images_per_identity, 1),
                               ("--num-classes", 1 if args.num_classes is None else args.num_classes, 1)):
        if value < least:
            raise SystemExit(f"{flag} must be at least {least}, got {value}")
    for flag, value, positive in (("--lr", args.lr, True), ("--centres-lr-scale", args.centres_lr_scale, True),
                                  ("--arcface-s", args.arcface_s, True),
                                  ("--momentum", args.momentum, False), ("--decay", args.decay, False),
                                  ("--grad-clip", args.grad_clip, False),
                                  ("--distill-weight", args.distill_weight, False),
                                  ("--dist-timeout", args.dist_timeout, True)):
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise SystemExit(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    if not DIST_TIMEOUT_LEAST_MINUTES <= args.dist_timeout <= DIST_TIMEOUT_MOST_MINUTES:
        raise SystemExit(f"--dist-timeout is in minutes, from {DIST_TIMEOUT_LEAST_MINUTES:g} to "
                         f"{DIST_TIMEOUT_MOST_MINUTES:g}; got {args.dist_timeout:g}")
    if args.momentum >= 1:  # (PyTorch takes it: each step's velocity then keeps all of the last, and grows)
        raise SystemExit(f"--momentum must be below 1, got {args.momentum:g} (SGD's is 0.9)")
    if args.device != "auto":  # (was torch's RuntimeError, with a traceback, after the data was read)
        import torch

        try:
            device_type = torch.device(args.device).type
        except RuntimeError:
            raise SystemExit(f"--device {args.device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
        if device_type not in ("cpu", "cuda"):
            # Apple's mps, Intel's xpu, ...: the losses run there (in plain PyTorch), the trainer has not, and its
            # set-up reads CUDA (NCCL or gloo, the CUDA random state in checkpoints, pin_memory, cudnn).
            raise SystemExit(f"--device {args.device}: the trainer runs on cpu or cuda only; it has not run on "
                             f"{device_type} hardware (arcface_ext's losses take {device_type} tensors, in plain "
                             "PyTorch, untried there too: docs/api.md, On devices without a kernel)")
    for flag in AUGMENTATION_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise SystemExit(f"{flag} is a probability: it must be in [0, 1], got {value}")
        setattr(args, flag[2:].replace("-", "_"), value + 0.0)  # -0.0 as 0.0 in args.json
    if args.blur_kernel < 3 or args.blur_kernel % 2 == 0:
        raise SystemExit(f"--blur-kernel must be an odd number of pixels, at least 3, got {args.blur_kernel}")
    # The blur mirrors the image past its edges once, as torchvision's reflect padding does, which needs
    # the half-kernel below the side (torchvision refuses more): a wider kernel's taps go round the mirror
    # again, and its weights cost (side x kernel) a line (99999: ~90 MB, ~1 s an image). The low-res
    # augmentation enlarges the image back to --image-size before the blur, so that side bounds it too.
    # (The default kernel, where no blur runs, is no one's: --image-size 1 or 2 without the blur was refused.)
    if args.blur_kernel > 2 * args.image_size - 1 and (args.blur_augmentation or args.blur_kernel != BLUR_KERNEL):
        raise SystemExit(f"--blur-kernel must be at most 2 x --image-size - 1 = {2 * args.image_size - 1} pixels "
                         f"(the blur mirrors the image once past each edge, as torchvision's), got {args.blur_kernel}")
    sigma = args.blur_sigma * 2 if len(args.blur_sigma) == 1 else args.blur_sigma  # one value: that sigma always
    if not (len(sigma) == 2 and all(math.isfinite(v) for v in sigma) and 0 < sigma[0] <= sigma[1]):
        raise SystemExit(f"--blur-sigma is LOW,HIGH in pixels with 0 < LOW <= HIGH (or one value), got "
                         f"{','.join(f'{v:g}' for v in args.blur_sigma) or 'nothing'}")
    args.blur_sigma = [v + 0.0 for v in sigma]
    if not 0.0 < args.hue_shift <= 0.5:
        raise SystemExit(f"--hue-shift is a fraction of the colour circle: it must be in (0, 0.5], "
                         f"got {args.hue_shift}")
    if args.hue_shift * 255 <= 1:  # (a draw from -H to H, cut toward 0: never a whole 255th)
        raise SystemExit(f"--hue-shift must be above 1/255 = 0.0039, got {args.hue_shift:g}: each shift is cut toward "
                         "0 to whole 255ths of the colour circle (Pillow's hue is a byte, as torchvision's on a PIL "
                         "image), and this one turns no hue")
    # AdamW has no momentum option (its betas): --optimizer adamw --momentum 0.5 trained as 0.9 did. Its
    # default passes, as args.json lists every option.
    if args.optimizer == "adamw" and args.momentum != SGD_MOMENTUM:
        raise SystemExit(f"--momentum {args.momentum:g} does not apply to --optimizer adamw (its betas are PyTorch's "
                         "0.9 and 0.999): it is --optimizer sgd's")
    if args.margin_grad != "exact" and args.loss == "magface":
        raise SystemExit("--margin-grad straight_through does not go with --loss magface, whose margin's gradient "
                         "reaches the embedding's norm")
    if args.sharded_classes and args.loss == "magface":
        raise SystemExit("--loss magface has differentiable margins, which --sharded-classes does not carry: train "
                         "it with replicated class centres")
    if args.sharded_classes and args.loss_impl != "fused":
        raise SystemExit("--sharded-classes needs --loss-impl fused (the reference has no sharded form)")
    if args.subcenters < 1:
        raise SystemExit(f"--subcenters must be at least 1, got {args.subcenters}")
    if not 0.0 <= args.interclass_filter <= 1.0:
        raise SystemExit(f"--interclass-filter must be in [0, 1] (0: off), got {args.interclass_filter}")
    # The chunked PyTorch path (arcface_ext.chunked): sub-centres and the filtering change the plain
    # losses' classes or negatives; CurricularFace sets its own negatives (and so does not go with them).
    if args.loss not in PLAIN_MARGIN_LOSSES:
        for flag, on in ((f"--subcenters {args.subcenters}", args.subcenters > 1),
                         (f"--interclass-filter {args.interclass_filter:g}", args.interclass_filter > 0)):
            if on:
                raise SystemExit(f"{flag} does not go with --loss {args.loss}: it runs on the chunked PyTorch path, "
                                 "with arcface, cosface, sphereface or combined")
    if (args.margin_warmup_steps or args.margin_warmup_epochs) and args.loss in ("adaface", "magface"):
        # (AdaFaceLoss's m would ramp the norm's sway on the margin, not the margin; MagFaceLoss has no single m)
        flag = ("--margin-warmup-epochs" if args.margin_warmup_epochs is not None else "--margin-warmup-steps")
        raise SystemExit(f"{flag} does not go with --loss {args.loss}, whose margins follow the embedding's norm: "
                         "leave the warm-up out, or warm up arcface, cosface, sphereface, combined, elasticface or "
                         "curricularface")
    if args.sharded_classes and args.loss_amp == "fp16":
        # Each rank would see overflows in its own shard of fp16 gradients only, and the gradient
        # scaler would skip steps on some ranks and not on others.
        raise SystemExit("--sharded-classes does not go with --loss-amp fp16: use --loss-amp bf16")
    return args


def option_text(dest: str, value: Any) -> str:
    """An option's value as the command line gives it, for the notes and refusals that name it: a list
    comma-separated; one --blur-sigma (a fixed sigma, kept as [v, v]) as its one value."""
    if dest == "blur_sigma" and len(value) == 2 and value[0] == value[1]:
        value = value[:1]
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return "unset" if value is None else str(value)


def unused_options(args: argparse.Namespace, world_size: int = 1) -> list[str]:
    """What the run will not use of the options given at other values than their defaults, each as a
    note's text (the trainer's set-up says them, so that training.log keeps them). Said rather than
    refused: a run's args.json given as --config lists every option, and a resume may turn --compile or
    --wandb off, leaving its --compile-mode, --wandb-project or --wandb-artifacts behind."""
    parser = build_parser()

    def given(*dests: str) -> list[str]:
        return [f"--{dest.replace('_', '-')}" + ("" if getattr(args, dest) is True
                                                 else f" {option_text(dest, getattr(args, dest))}")
                for dest in dests if getattr(args, dest) != parser.get_default(dest)]  # (a switch: its flag alone)

    notes = []
    for switch, dests in (("--compile", ("compile_backend", "compile_mode")),
                          ("--wandb", ("wandb_project", "wandb_entity", "wandb_run_name", "wandb_artifacts"))):
        unused = given(*dests) if not getattr(args, switch[2:]) else []
        if unused:
            notes.append(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used without {switch}")
    for switch, dests in (("--blur-augmentation", ("blur_kernel", "blur_sigma")),
                          ("--hue-augmentation", ("hue_shift",))):
        unused = given(*dests)
        if unused and not getattr(args, switch[2:].replace("-", "_")):
            notes.append(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used without {switch}")
    if world_size == 1 and args.dist_timeout != DIST_TIMEOUT_MINUTES:
        notes.append(f"--dist-timeout {args.dist_timeout:g} is not used: one process")
    unused = given("synthetic_identities", "synthetic_images_per_identity") if args.data != "synthetic" else []
    if unused:
        notes.append(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: the data is {args.data}, "
                     "not synthetic")
    if args.data == "random":
        unused = given("num_workers", *(flag[2:].replace("-", "_") for flag in AUGMENTATION_FLAGS))
        if unused:
            notes.append(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: --data random has "
                         "no loader and its noise is not augmented")
    # (Lengths given in epochs are named in epochs, with their steps: the notes come once they are steps.)
    length = (f"--epochs {args.epochs:g} ({count_of(args.max_steps, 'step')})" if args.epochs is not None
              else f"--max-steps {args.max_steps}")
    if args.warmup_steps is not None and args.warmup_steps > args.max_steps:  # (None: --epochs not yet in steps)
        warmup = (f"--warmup-epochs {args.warmup_epochs:g} ({count_of(args.warmup_steps, 'step')})"
                  if args.warmup_epochs is not None else f"--warmup-steps {args.warmup_steps}")
        notes.append(f"{warmup} is more than {length}: the learning "
                     f"rate rises to {args.max_steps / args.warmup_steps:.0%} of --lr {args.lr:g}, no further")
    # (The whole margin comes at step N, 0-based: a warm-up as long as the run never reaches it, where the learning
    # rate's, at (k + 1) / N, does.)
    if args.margin_warmup_steps is not None and args.margin_warmup_steps >= args.max_steps:
        warmup = (f"--margin-warmup-epochs {args.margin_warmup_epochs:g} ({count_of(args.margin_warmup_steps, 'step')})"
                  if args.margin_warmup_epochs is not None else f"--margin-warmup-steps {args.margin_warmup_steps}")
        reached = margin_fraction(args.max_steps - 1, args.margin_warmup_steps)
        # (The fewest decimals that do not round it up to the whole: 299 of 300 steps is 99.7%, not 100%.)
        percent = next(text for digits in range(16) if (text := f"{reached:.{digits}%}") != f"{1:.{digits}%}")
        than = "more than" if args.margin_warmup_steps > args.max_steps else "as long as"
        notes.append(f"{warmup} is {than} {length}: the margin rises to {percent} of its value, no further")
    late = [i for i, step in enumerate(args.lr_steps or []) if step >= args.max_steps]
    if args.lr_schedule == "step" and late:
        if args.lr_epochs is not None:
            given = (f"--lr-epochs {_show_numbers([args.lr_epochs[i] for i in late])} "
                     f"(step{'s' if len(late) > 1 else ''} {','.join(str(args.lr_steps[i]) for i in late)})")
        else:
            given = f"--lr-steps {','.join(str(args.lr_steps[i]) for i in late)}"
        notes.append(f"{given} {'is' if len(late) == 1 else 'are'} not before "
                     f"{length}: the learning rate is not divided there")
    return notes


def _epoch_sizes(argv: list[str], parser: ArgumentParser) -> dict[str, int]:
    """``--batch-size`` and ``--gradient-acc`` of the command line as an arcface_torch config's
    ``batch_size`` and ``gradient_acc``: its steps are epochs of ``num_image`` in batches of these, so
    that they follow them, as they would the file's edited values (taken as overrides of the
    computed steps, the run was as many epochs more or fewer as the batch was smaller or larger)."""
    # Read by the parser itself, which finds them as it will below (an abbreviation it takes, --batch-s,
    # was missed by a parser of these two alone, and the steps counted for the file's batch); a value
    # it refuses stops here with the error it gives below. (Below 1: left to resolve(), which names it.)
    return {key: value for key, value in _given(argv, ("batch_size", "gradient_acc"), parser).items() if value >= 1}


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None, name: str | None = None
               ) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) on top of ``--config FILE`` and the defaults; ``prog``
    and ``name``: the command its usage line names and the one its error line begins with, for a tool that
    takes the trainer's options, as preview does (default ``python -m train`` and ``train``)."""
    command_line = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.prog, parser.name = prog or parser.prog, name or parser.name
    pre = ArgumentParser(prog=parser.prog, name=parser.name, add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config and not os.path.isfile(known.config) and os.path.isfile(known.config + ".py"):
        known.config += ".py"  # configs/ms1mv2_r50, as arcface_torch's train_v2.py takes its configs
    if known.config and os.path.isdir(known.config):
        raise SystemExit(f"--config {known.config} is a folder: name a YAML or JSON file, or an arcface_torch "
                         "configs/*.py")
    if known.config and not os.path.isfile(known.config):
        raise SystemExit(f"--config {known.config}: no such file")
    file_argv = []
    try:
        if known.config and insightface_config.is_insightface_config(known.config):
            config = insightface_config.read(known.config)
            config.update(_epoch_sizes(command_line, parser))
            options = insightface_config.to_options(config, known.config)
            file_argv = _config_to_argv(options, parser, known.config)
        elif known.config:
            file_argv = _config_to_argv(load_config_file(known.config), parser, known.config)
    except OSError as error:  # (unreadable: its permissions; or the base.py beside an arcface_torch config)
        raise SystemExit(f"--config {known.config}: cannot read {error.filename or known.config}: "
                         f"{error.strerror or error}") from None
    args, unknown = parser.parse_known_args(file_argv + command_line)
    if unknown:
        # train_v2.py takes its config as its argument: say where it goes here (an arcface_torch config's
        # name only: another file, a .rec given without --data, is no config to put after --config).
        config = next((u for u in unknown if not u.startswith("-") and (
            (u.endswith(".py") and os.path.isfile(u)) or os.path.isfile(u + ".py"))), None)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (
            f" (a config file goes after --config: --config {config}; arcface_torch's train_v2.py takes it as its "
            "argument)" if config else ""))
    refused_empty = {**EMPTY_MEANS_NONE, **EMPTY_NAMES_NO_SET}
    given = _given(command_line, ("teacher_network", "distill_weight", "distill_loss", *refused_empty), parser)
    for dest, (flag, instead) in refused_empty.items():
        # (an empty shell variable, --teacher "$TEACHER", was a run without one, without a word; a config's "" is
        # none, as arcface_torch's configs write it, and the file read, not typed, says it)
        if given.get(dest) == "":
            raise SystemExit(f"{flag} is empty on the command line (an empty shell variable?): give {instead} "
                             f"leaves {flag} out" + (" (and out of its --config)" if dest != "config" else ""))
    return resolve(args, given)


# The paths whose empty value is none in a config file, and what to say of one given empty on the command line:
# {dest: (flag, what to give; a run without it ...)}. (--config "" was a run of every default, without a word;
# --output "" was refused as a folder that "exists and is not a folder".)
EMPTY_MEANS_NONE = {
    "config": ("--config", "the YAML or JSON file, or arcface_torch's configs/*.py; a run of the defaults and the "
               "command line alone"),
    "output": ("--output", "the run's folder; a run into the default runs/<network>"),
    "pretrained_model": ("--pretrained_model", "the checkpoint to start from; a run from random weights"),
    "resume": ("--resume", "the checkpoint to continue, or auto; a run that does not resume"),
    "teacher": ("--teacher", "the backbone to distil from; a run without distillation"),
}
# And --data, whose "" names the current folder (in a file too), not none: --data "$DATA" with the variable empty,
# run where a pack lies (pack_rec's output given as .), trained on that pack without a word.
EMPTY_NAMES_NO_SET = {
    "data": ("--data", "the training set (a folder with train.rec + train.idx, an image folder, or a list file); "
             "a run on synthetic faces"),
}


def _given(argv: list[str], dests: Sequence[str], like: ArgumentParser) -> dict[str, Any]:
    """{name: value} of the names among ``dests`` whose options ``argv`` gives, whatever their values (the
    defaults too). Read by the parser itself, which finds them as it will (an abbreviation it takes too); a
    value it refuses stops with the error line of ``like``'s command (preview's, say)."""
    parser = build_parser()
    parser.prog, parser.name = like.prog, like.name
    parser.set_defaults(**dict.fromkeys(dests))
    known, _ = parser.parse_known_args(argv)
    return {dest: getattr(known, dest) for dest in dests if getattr(known, dest) is not None}


def margins(args: argparse.Namespace) -> tuple[float, float, float]:
    """(m1, m2, m3) of ``cos(m1·θ + m2) - m3`` for ``--loss`` (for ElasticFace the mean margins;
    AdaFace's and MagFace's are per row, from the embedding norm: (1, 0, 0) here)."""
    if args.loss in ("adaface", "magface"):
        return 1.0, 0.0, 0.0
    if args.loss in ARCFACE_M_LOSSES:
        return 1.0, args.arcface_m, 0.0
    values = {"m1": 1.0, "m2": 0.0, "m3": 0.0}
    for name, default in MARGIN_FLAGS[args.loss].items():
        given = getattr(args, name)
        values[name] = given if given is not None else args.arcface_m if default is None else default
    return values["m1"], values["m2"], values["m3"]


def margin_fraction(step: int, warmup_steps: int) -> float:
    """How much of its margin the loss takes in the optimiser step after ``step`` steps (0-based, the
    learning rate's count) under ``--margin-warmup-steps``: a linear rise from 0 at the first step to all
    of it at step ``warmup_steps`` and after. Linear, as the margin schedulers of WeSpeaker and 3D-Speaker
    offer it and docs/usage.md's example ramps: the margin is half its value half way."""
    return 1.0 if step >= warmup_steps else step / warmup_steps


def warmed_up_margins(args: argparse.Namespace, step: int) -> tuple[float, float, float]:
    """(m1, m2, m3) of the optimiser step after ``step`` steps: :func:`margins`, with the warm-up's
    fraction t of each (m2 and m3 from 0, m1 from 1, none being a margin at all)."""
    m1, m2, m3 = margins(args)
    t = margin_fraction(step, args.margin_warmup_steps or 0)
    if t == 1.0:
        return m1, m2, m3
    return 1.0 + t * (m1 - 1.0), t * m2, t * m3
