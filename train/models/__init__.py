"""Backbones by name: ``get_model("r50", embedding_size=512, image_size=112)``.

iResNets ``r18`` ... ``r200`` and arcface_torch's ``r2060``, the demo's ``small``, MobileFaceNet ``mbf``
and arcface_torch's ``mbf_large``, and its Vision Transformers under its names: ``vit_t``,
``vit_t_dp005_mask0``, ``vit_s``, ``vit_s_dp005_mask_0``, ``vit_b``, ``vit_b_dp005_mask_005``,
``vit_l_dp005_mask_005``, ``vit_h``; and any other backbone as ``package.module:factory``, imported
(:func:`import_factory`)."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from functools import partial

import torch
from torch import nn

from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from .mobilefacenet import MobileFaceNet, mbf, mbf_large, mobilefacenet
from .small import small
from .vit import VIT_CONFIGS, VisionTransformer, vit

_BUILDERS = {name: partial(iresnet, name) for name in IRESNET_LAYERS}
_BUILDERS["small"] = small
_BUILDERS["mbf"] = mbf
_BUILDERS["mbf_large"] = mbf_large
_BUILDERS.update({name: partial(vit, name) for name in VIT_CONFIGS})

NETWORKS = tuple(_BUILDERS)

# ``package.module:factory`` (the factory may be an attribute path, ``module:Class.build``).
_FACTORY_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# What get_model passes the built-in networks besides embedding_size and image_size, with the value that
# asks nothing of a network (and the trainer's option that sets it): a factory that does not take one is
# not passed it, and refused another value.
_OPTIONAL_KEYWORDS = {"dropout": (0.0, "--keep-prob"), "gradient_checkpointing": (False, "--gradient-checkpointing"),
                      "amp": ("none", "--amp")}


def is_factory_spec(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:factory`` (not whether it imports)."""
    return _FACTORY_SPEC.fullmatch(name) is not None


def check_network_name(name: str) -> str:
    """``name`` if it is one of :data:`NETWORKS` or has the form ``package.module:factory``, else ValueError."""
    if name in _BUILDERS or is_factory_spec(name):
        return name
    raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}, or package.module:factory "
                     "for a backbone of your own")


def import_factory(spec: str):
    """The callable ``package.module:factory`` names, imported as ``python -c 'import package.module'``
    would import it (the module on ``sys.path``: PYTHONPATH, or the current folder for ``python -m``);
    ValueError saying what is missing when it does not import or is not there."""
    module_name, _, attributes = spec.partition(":")
    try:
        factory = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if isinstance(error, ModuleNotFoundError) and f"{module_name}.".startswith(f"{missing}."):
            # (the module itself, or a package it is in, is not found)
            raise ValueError(f"cannot import {module_name} ({error}); is its folder on PYTHONPATH?") from None
        # Found, but an import in it fails (a package not installed here): its folder is not what is wrong.
        raise ValueError(f"cannot import {module_name}: an import in it fails ({error}); install what it "
                         "imports, or fix the import") from None
    for attribute in attributes.split("."):
        try:
            factory = getattr(factory, attribute)
        except AttributeError:
            if module_name == "__main__":  # a script's network, named by that script's own run (args.json)
                program = getattr(sys.modules.get("__main__"), "__file__", None) or "an interactive session"
                raise ValueError(f"__main__ ({program}) has no {attributes}: a network named __main__:... is found "
                                 "only in the script that defines it, run as the main program; put it in a module "
                                 f"and name it module:{attributes}") from None
            raise ValueError(f"{module_name} has no {attributes}") from None
    if not callable(factory):
        raise ValueError(f"{spec} is a {type(factory).__name__}, not a callable")
    return factory


def _build_external(spec: str, embedding_size: int, image_size: int, **kwargs) -> nn.Module:
    """``spec``'s factory called with ``embedding_size`` and ``image_size``, and those of ``kwargs`` it takes
    (all, with a ``**kwargs``); a value it does not take, other than the one that asks nothing, is refused."""
    factory = import_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: passed what the networks here are
        signature = inspect.Signature([inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    parameters = signature.parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    taken = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
    missing = [k for k in ("embedding_size", "image_size") if not (takes_any or k in taken)]
    if missing:
        raise ValueError(f"{spec} must take the keyword arguments embedding_size and image_size; it does not take "
                         f"{' or '.join(missing)}")
    passed = {"embedding_size": embedding_size, "image_size": image_size}
    for key, value in kwargs.items():
        if takes_any or key in taken:
            passed[key] = value
        elif value != _OPTIONAL_KEYWORDS.get(key, (None,))[0]:
            flag = _OPTIONAL_KEYWORDS.get(key, (None, key))[1]
            raise ValueError(f"{spec} takes no {key}= argument, which {flag} needs: leave that option out, or "
                             "give the factory that parameter")
    try:
        signature.bind(**passed)
    except TypeError as error:  # another parameter it requires (was a traceback from the call)
        raise ValueError(f"{spec} cannot be called with {' and '.join(f'{k}=' for k in passed)}: {error}") from None
    model = factory(**passed)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def get_model(name: str, **kwargs) -> nn.Module:
    """Build backbone ``name`` (one of :data:`NETWORKS`, or ``package.module:factory``); ``kwargs`` go to
    :class:`IResNet`, :class:`MobileFaceNet` or :class:`VisionTransformer`: ``embedding_size``, ``dropout``,
    ``image_size``, ``gradient_checkpointing``, ``amp``, ... A factory is called with ``embedding_size`` and
    ``image_size`` (both required) and those of the others it takes, and must return an ``nn.Module`` that maps
    N x 3 x image_size x image_size images to N x embedding_size embeddings (:func:`check_embedding_shape`)."""
    if is_factory_spec(name):
        kwargs.setdefault("embedding_size", 512)
        kwargs.setdefault("image_size", 112)
        return _build_external(name, **kwargs)
    return _BUILDERS[check_network_name(name)](**kwargs)


def learn_embedding_scale(model: nn.Module) -> bool:
    """Let the scale of ``model``'s embedding BatchNorm (``model.features``) learn where it is fixed:
    insightface's iResNet fixes it at 1 (the paper's fixed-scale BN), so that every dimension of a batch's
    embeddings keeps unit variance and their norms stay near sqrt(D); MagFace's network learns it, and its
    loss, which makes the norm a quality score, needs it to spread them. True where it was fixed and now
    learns."""
    features = getattr(model, "features", None)
    weight = getattr(features, "weight", None) if isinstance(features, nn.BatchNorm1d) else None
    if not isinstance(weight, nn.Parameter) or weight.requires_grad:
        return False
    weight.requires_grad_(True)
    return True


def check_embedding_shape(model: nn.Module, embedding_size: int, image_size: int) -> None:
    """ValueError unless ``model`` maps two ``image_size`` images (on its parameters' device, in eval mode, without
    gradients, so that nothing of it changes) to a 2 x ``embedding_size`` tensor; also where that forward raises
    a RuntimeError or an AssertionError."""
    first = next(model.parameters(), None)
    x = torch.zeros(2, 3, image_size, image_size, device=first.device if first is not None else "cpu")
    training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except (RuntimeError, AssertionError) as error:
        # An image size it cannot take, say: torch's message, or an input check's (timm's patch embedding asserts
        # its size), its first line; the exception's name where it has none.
        said = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"it fails on 2 x 3 x {image_size} x {image_size} images: {said}") from None
    finally:
        model.train(training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, embedding_size):
        raise ValueError(f"it maps 2 x 3 x {image_size} x {image_size} images to {shape}, not to "
                         f"(2, {embedding_size}): a backbone must give N x --embedding-size embeddings")


def multiply_adds(name: str, image_size: int = 112, **kwargs) -> int:
    """Multiply-adds of backbone ``name``'s forward pass on one ``image_size`` image (``kwargs`` as for
    :func:`get_model`): its convolutions, linear layers and attention products, as torch's
    FlopCounterMode counts them (two FLOPs a multiply-add). Built and run on the meta device: no
    memory, no data, milliseconds. BatchNorm, activations and additions are not counted, as ptflops
    (arcface_torch's flops.py) does not count them in ResNets either."""
    with torch.device("meta"):
        model = get_model(name, image_size=image_size, **kwargs)
    return model_multiply_adds(model, image_size)


def model_multiply_adds(model: nn.Module, image_size: int) -> int:
    """:func:`multiply_adds` of a network already built, on one blank image on its parameters' device (the
    meta device's for :func:`multiply_adds`), in eval mode and without gradients, its mode restored after: a
    network of one's own is counted so, without calling its factory again."""
    from torch.utils.flop_counter import FlopCounterMode

    first = next(model.parameters(), None)
    x = torch.zeros(1, 3, image_size, image_size, device=first.device if first is not None else "cpu")
    # forward_trunk/forward_head: the amp="none" forward, which autocast on meta does not allow as model(x);
    # on meta scaled_dot_product_attention decomposes into the two products the counter knows. A network of
    # one's own (package.module:factory) runs as it is.
    forward = (lambda x: model.forward_head(model.forward_trunk(x))) if hasattr(model, "forward_trunk") else model
    training = model.training
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()
            forward(x)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2


__all__ = ["NETWORKS", "VIT_CONFIGS", "IBasicBlock", "IResNet", "MobileFaceNet", "VisionTransformer",
           "check_embedding_shape", "check_network_name", "get_model", "import_factory", "iresnet", "is_factory_spec",
           "learn_embedding_scale", "mbf", "mbf_large", "mobilefacenet", "model_multiply_adds", "multiply_adds",
           "small", "vit"]
