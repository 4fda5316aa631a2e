"""The options a model was compiled with by `torch.compile(..., backend="chipmunk", options=...)`,
read back from torch.compile's wrappers, so that `inspect(model)` reports what the compiled model runs.

Where torch keeps them: `torch.compile` wraps a string backend and its options in a
`_TorchCompileWrapper` (`compiler_name`, `kwargs["options"]`), reached from an `OptimizedModule`'s
`dynamo_ctx.callback` through `_torchdynamo_orig_backend` links, and from an in-place
`module.compile(...)` through the closure of `module._compiled_call_impl`.

Invariants: only reads, never calls or compiles anything; torch's wrapper classes differ between
versions (2.11 to 2.13 supported), so every link is a guarded getattr over a bounded walk, and a chain
it does not recognise gives None ("not compiled with chipmunk, as far as can be seen"), never an error.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

_LINKS = ("callback", "_torchdynamo_orig_backend", "_torchdynamo_orig_callable", "compiler_fn", "__wrapped__")
_MAX_OBJECTS = 64  # a compile wrapper chain is 3-6 objects deep; the bound keeps a foreign chain cheap


def compiled_in_place(module: Any) -> bool:
    """Whether `module.compile(...)` compiled `module` in place: its `__call__` then runs that
    compilation (torch keeps it in `_compiled_call_impl`), not `module._call_impl`."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _is_chipmunk_backend(fn: Any) -> bool:
    from .backend import chipmunk_backend

    return fn is chipmunk_backend


def _options_in(root: Any) -> Optional[dict]:
    """The chipmunk options held by a compile wrapper chain starting at `root` ({} when compiled with
    chipmunk and no options), else None."""
    seen: set[int] = set()
    todo = [root]
    while todo and len(seen) < _MAX_OBJECTS:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if getattr(obj, "compiler_name", None) == "chipmunk":
            kwargs = getattr(obj, "kwargs", None)
            opts = kwargs.get("options") if isinstance(kwargs, dict) else None
            return dict(opts or {})
        if isinstance(obj, functools.partial) and _is_chipmunk_backend(obj.func):
            return dict(obj.keywords.get("options") or {})
        if _is_chipmunk_backend(obj):
            return {}
        for name in _LINKS:
            try:
                todo.append(getattr(obj, name, None))
            except Exception:  # a foreign object's property may raise: not ours to read
                continue
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return None


def compiled_options(model: Any) -> Optional[dict]:
    """The options of the first chipmunk compilation found on `model` (an `OptimizedModule`, a module
    compiled in place, or a module with such submodules, as regional compilation leaves it); {} when
    compiled with chipmunk and no options; None when none is found."""
    mods = [model]
    if isinstance(model, torch.nn.Module):
        mods += [m for m in model.modules() if m is not model]
    for mod in mods:
        for root in (getattr(mod, "dynamo_ctx", None), getattr(mod, "_compiled_call_impl", None)):
            if root is None:
                continue
            opts = _options_in(root)
            if opts is not None:
                return opts
    return None
