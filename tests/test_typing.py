"""arcface_ext is a typed package (PEP 561: arcface_ext/py.typed): a user's type checker reads its own
annotations. Checked here by inspection, with no type checker in the suite: every public function, and every
public method, __init__ and property of a public class, annotates its parameters and its return, so that new
API cannot land untyped (under mypy --strict each call of it would be an error, and its result Any)."""
import inspect
import sys
import typing

import pytest
import torch

import arcface_ext
from arcface_ext import chunked, distributed, functional, modules, optim, reference, sampling, subcenter

MODULES = (functional, modules, chunked, distributed, optim, reference, sampling, subcenter)
UNANNOTATED_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _is_ours(obj):
    return getattr(obj, "__module__", "").split(".")[0] == "arcface_ext"


def _members(cls):
    """(name, function) of a class's public methods, __init__, and its properties' getters and setters,
    from the class and its bases in arcface_ext (the mixins')."""
    for base in cls.__mro__:
        if not _is_ours(base):
            continue
        for name, value in vars(base).items():
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                yield from ((f"{name}.{part}", f) for part, f in (("fget", value.fget), ("fset", value.fset)) if f)
            elif inspect.isfunction(value):
                yield name, value


def public_callables():
    """{qualified name: function} over arcface_ext's __all__ and the public names each module defines."""
    found = {}
    names = [getattr(arcface_ext, name) for name in arcface_ext.__all__]
    names += [value for module in MODULES for name, value in vars(module).items()
              if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__]
    for obj in names:
        if inspect.isfunction(obj) and _is_ours(obj):
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
        elif inspect.isclass(obj) and _is_ours(obj):
            for name, function in _members(obj):
                found[f"{function.__module__}.{function.__qualname__.rsplit('.', 1)[0]}.{name}"] = function
    return found


CALLABLES = public_callables()


def test_the_public_api_is_found():
    names = set(CALLABLES)
    assert {"arcface_ext.functional.combined_margin_loss", "arcface_ext.modules.CombinedMarginLoss.forward",
            "arcface_ext.modules.AdaFaceMargins.m.fset", "arcface_ext.distributed.ShardedCombinedMarginLoss.gather",
            "arcface_ext.optim.SGD.step", "arcface_ext.chunked.shard_backward",
            "arcface_ext.sampling.sample_classes", "arcface_ext.reference.margin_psi"} <= names


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_public_callable_is_annotated(name):
    function = CALLABLES[name]
    signature = inspect.signature(function)  # (through functools.wraps: torch.no_grad's wrapper)
    parameters = list(signature.parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    missing = [p.name for p in parameters
               if p.kind not in UNANNOTATED_KINDS and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name} leaves {missing} unannotated"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    if sys.version_info >= (3, 10):  # (`X | Y` evaluates from 3.10 on; 3.9 reads it only as a string)
        typing.get_type_hints(function)  # every name in the annotations exists


def test_return_target_cosine_overloads():
    """The functions whose flag makes a pair have overloads: the common call types as a Tensor, and
    return_target_cosine=True as (loss, target cosine)."""
    if sys.version_info < (3, 11):
        pytest.skip("typing.get_overloads is Python 3.11's")
    pair = tuple[torch.Tensor, torch.Tensor]
    for function in (arcface_ext.combined_margin_loss, reference.combined_margin_loss, arcface_ext.chunked_margin_loss,
                     reference.chunked_margin_loss, arcface_ext.subcenter_margin_loss,
                     reference.subcenter_margin_loss):
        hints = [typing.get_type_hints(overload) for overload in typing.get_overloads(function)]
        flags = [(h["return_target_cosine"], h["return"]) for h in hints]
        assert flags == [(typing.Literal[False], torch.Tensor), (typing.Literal[True], pair),
                         (bool, torch.Tensor | pair)], f"{function.__module__}.{function.__name__}: {flags}"
