"""Check a config's values against the type annotations of the objects they build, before any is built.

Hydra passes ``trainer.max_epochs=five`` on as the string ``"five"``; the Trainer takes it and a training
process fails later with an AssertionError. Here every key of a node with ``_target_`` is checked
against the annotation of the target's parameter of that name (``max_epochs: Optional[int]``), nested
nodes too, and the first mismatch is one line naming the key. Annotations this does not understand
(classes other than the builtins, callables, type variables) accept anything: the target itself
still checks those.
"""

from __future__ import annotations

import collections.abc
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_ANY = object()  # an annotation not understood: anything goes


def _annotations(target: Any) -> dict[str, Any]:
    """Parameter name -> annotation (``_ANY`` where it cannot be evaluated) of a class or a function."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    namespace = vars(sys.modules.get(getattr(fn, "__module__", ""), typing))
    out = {}
    for name, p in params.items():
        hint = p.annotation
        if isinstance(hint, str):  # `from __future__ import annotations`
            try:
                hint = eval(hint, {**vars(typing), **namespace})  # noqa: S307 - the target's own annotation text
            except Exception:
                hint = _ANY
        out[name] = _ANY if hint is inspect.Parameter.empty else hint
    return out


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        element = _element(hint)
        return "a list" if element is _ANY else f"a list of {_describe(element).removeprefix('an ').removeprefix('a ')}s"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _element(hint: Any) -> Any:
    """The element type of ``list[int]``, ``Sequence[int]``, ``tuple[int, ...]`` (else anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not args or (origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)):
        return _ANY
    return args[0]


def _matches(value: Any, hint: Any) -> bool:
    if hint is _ANY or hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # an object built from the node; checked on its own
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        return all(_matches(v, _element(hint)) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, (DictConfig, dict))
    return True  # classes, callables, type variables: the target checks them


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value) if isinstance(value, str) else str(value)


def _kind(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", type(None): "null",
             ListConfig: "a list", list: "a list", DictConfig: "a mapping", dict: "a mapping"}
    return kinds.get(type(value), type(value).__name__)


def type_errors(node: DictConfig, where: str) -> Optional[str]:
    """The first value in ``node`` (a config with ``_target_``, at key ``where``) whose type its target's
    annotation rules out, as one line naming the key; None if all fit. Interpolations are resolved."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    try:
        target = get_method(node._target_) if not inspect.isclass(node._target_) else node._target_
    except Exception:
        return None  # an unknown target: instantiating it says so
    hints = _annotations(target)
    for key in node:
        if str(key).startswith("_") or OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            continue  # Hydra's own keys; a node shared from elsewhere (strategy.network) is checked where it is set
        if OmegaConf.is_missing(node, key):
            continue  # `???`: building the node says which value is missing
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue  # an interpolation that does not resolve: building the node says so
        hint = hints.get(str(key), _ANY)
        if not _matches(value, hint):
            return f"`{where}.{key}` must be {_describe(hint)}, got {_shown(value)} ({_kind(value)})"
        nested = type_errors(value, f"{where}.{key}") if isinstance(value, DictConfig) else None
        if nested:
            return nested
    return None
