"""How a model's loop feeds a block list: which arguments of each block are the previous block's outputs.

A DiT's forward runs ``hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb)`` (Wan, LTX)
or ``encoder_hidden_states, hidden_states = block(hidden_states=..., encoder_hidden_states=..., ...)`` (FLUX): every
argument of block i > 0 is either an output of block i - 1 or the very object block 0 got. `Feeding` records which,
learned from the model's own loop (`learn`, by identity of the objects passed) and checked on every later call
(`check`), so a loop that does anything else between blocks (a ControlNet residual added, a block skipped) is named,
never run as if it did not.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch.utils import _pytree as pytree

from cachepass import block_regions
from cachepass.errors import BlockScopeUnfitError

Key = int | str  # a positional argument's index or a keyword argument's name


@dataclasses.dataclass(frozen=True)
class Feeding:
    structure: tuple  # (positional argument count, keyword names) of every block call
    fed: tuple[tuple[Key, int], ...]  # (argument of block i > 0, index of block i - 1's output it is)

    @functools.cached_property
    def output_of(self) -> dict[Key, int]:
        """``fed`` as a dict, for the check on every block call."""
        return dict(self.fed)

    def next_arguments(self, args: list, kwargs: dict, outputs: tuple) -> None:
        """``args`` / ``kwargs`` of one block call -> the next block's (in place)."""
        block_regions.feed(self.fed, args, kwargs, outputs)


class HandedOn(torch.Tensor):
    """What a block's call returns to the model's loop where the list's program has computed the whole list (every
    block but the last): the output's shape, dtype and device, and no data. The loop may read that and hand it to the
    next block (`check` matches it by identity); any other use raises `BlockScopeUnfitError` (a loop that keeps each
    block's output, as a list of features, or computes with it cannot run as one program: only the last block's output
    holds values)."""

    list_path: str

    @staticmethod
    def __new__(cls, like: torch.Tensor, list_path: str):
        handed = torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                                     device=like.device)
        handed.list_path = list_path
        return handed

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        handed = next(a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, HandedOn))
        raise BlockScopeUnfitError(
            f"scope='blocks': the model uses the output of a block of {handed.list_path} before its last "
            f"({torch.overrides.resolve_name(func) or func}) besides handing it to the next block; the list's program "
            "computes the whole list at once. scope='model' compiles this model")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # below torch functions (a C++ op): no data either
        raise BlockScopeUnfitError(f"scope='blocks': {func} reached a block's output handed on by the model's loop; the "
                                   "list's program computes the whole list at once. scope='model' compiles this model")


_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.ndim.__get__, torch.Tensor.layout.__get__, torch.Tensor.requires_grad.__get__,
             torch.Tensor.is_cuda.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel,
             torch.Tensor.stride, torch.Tensor.is_floating_point, torch.Tensor.__len__}


def handed_on(outputs: Any, list_path: str) -> Any:
    """``outputs`` (a tensor, or a tuple of tensors and Nones) as `HandedOn` placeholders of their layouts."""
    if isinstance(outputs, torch.Tensor):
        return HandedOn(outputs, list_path)
    return tuple(None if o is None else HandedOn(o, list_path) for o in outputs)


def structure(args: tuple, kwargs: dict) -> tuple:
    return len(args), tuple(kwargs)


def as_outputs(out: Any, path: str) -> tuple:
    """A block's return value as a tuple of its outputs."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if type(out) is tuple and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return out
    raise BlockScopeUnfitError(f"scope='blocks': {path} returned a {type(out).__name__}; it needs blocks that return a tensor "
                               "or a tuple of tensors (and Nones). scope='model' compiles this model")


def learn(path: str, args: tuple, kwargs: dict, previous: tuple, first: tuple[tuple, dict]) -> Feeding:
    """The feeding of block ``path`` (not the list's first) called with ``args`` / ``kwargs`` after the block before it
    returned ``previous``; ``first`` is the first block's arguments."""
    _same_structure(path, args, kwargs, first)
    fed = []
    for key, value in _items(args, kwargs):
        index = next((j for j, out in enumerate(previous) if isinstance(out, torch.Tensor) and value is out), None)
        if index is not None:
            fed.append((key, index))
        elif not _same(value, _argument(first, key)):
            raise BlockScopeUnfitError(
                f"scope='blocks': argument {key!r} of {path} is neither an output of the block before it nor the "
                "object the list's first block got (the model computes something between its blocks); scope='model' "
                "compiles this model")
    return Feeding(structure(args, kwargs), tuple(fed))


def check(feeding: Feeding, path: str, args: tuple, kwargs: dict, previous: tuple, first: tuple[tuple, dict]) -> None:
    """Raise unless block ``path`` is called as ``feeding`` says (``previous``: what the call before it returned)."""
    _same_structure(path, args, kwargs, first)
    fed = feeding.output_of
    for key, value in _items(args, kwargs):
        expected = previous[fed[key]] if key in fed else _argument(first, key)
        if not _same(value, expected):
            what = "the block before it's output" if key in fed else "the object the list's first block got"
            raise BlockScopeUnfitError(
                f"scope='blocks': argument {key!r} of {path} is not {what}, as it was when the list's compiled program "
                "was made; the model's loop changed between calls (a ControlNet residual, other arguments); "
                "scope='model' compiles this model")


def _same_structure(path: str, args: tuple, kwargs: dict, first: tuple[tuple, dict]) -> None:
    if structure(args, kwargs) != structure(*first):
        raise BlockScopeUnfitError(f"scope='blocks': {path} is called with arguments {_describe(args, kwargs)}, the list's first "
                                   f"block with {_describe(*first)}; scope='model' compiles this model")


def _items(args: tuple, kwargs: dict):
    yield from enumerate(args)
    yield from kwargs.items()


def _argument(call: tuple[tuple, dict], key: Key) -> Any:
    args, kwargs = call
    return args[key] if isinstance(key, int) else kwargs[key]


def _same(value: Any, expected: Any) -> bool:
    """The same object, an equal plain value (a number, a string, None), or a tuple, list or dict of such (a loop that
    rebuilds ``(cos, sin)`` per block hands on the same tensors)."""
    if value is expected:
        return True
    if type(value) is not type(expected):
        return False
    if isinstance(value, (tuple, list)):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    if isinstance(value, dict):
        return value.keys() == expected.keys() and all(_same(value[k], expected[k]) for k in value)
    return type(value) in (bool, int, float, str, type(None)) and value == expected


def _describe(args: tuple, kwargs: dict) -> str:
    return f"({len(args)} positional, keywords {sorted(kwargs)})"
