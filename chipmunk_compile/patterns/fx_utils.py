"""Small helpers to read Dynamo FX graphs: call spellings, normalized arguments, fake values.

Invariants: pure functions of nodes; nothing here edits a graph (`copy_provenance` only copies
where a node came from onto a node that a graph writer has just made).
"""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function


def val(node: Any) -> Any:
    """The fake value Dynamo recorded for `node` (None when unknown)."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def op_name(node: fx.Node) -> Optional[str]:
    """The method or function name of a call node (None for a target without one)."""
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", None)


def fn_kwargs(node: fx.Node) -> Optional[dict[str, Any]]:
    """All arguments of a call_function node by name, or None when it cannot be normalized."""
    try:
        nf = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:
        nf = None
    return dict(nf.kwargs) if nf is not None else None


def schema_kwargs(node: fx.Node, op: Any = None) -> Optional[dict[str, Any]]:
    """All arguments of a call to a torch op (OpOverload or its packet) by schema name, defaults filled
    in; `op` names the op whose schema to read when the target has none of its own (a `torch.*`
    builtin such as `torch._native_multi_head_attention`). None when there is no schema or the
    call's arguments do not bind to it."""
    target = op if op is not None else node.target
    target = getattr(target, "default", target) if isinstance(target, torch._ops.OpOverloadPacket) else target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    kw = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    kw.update(zip(names, node.args))
    kw.update(node.kwargs)
    return kw if all(n in kw for n in names) else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


LINEAR = (torch._C._nn.linear, F.linear)
SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


# SDPA's backend ops, called directly by attention libraries (diffusers' `_native_cudnn` backend
# under context parallelism, its `_native_flash` one): (output, logsumexp, ...) tuples; each op and
# its default overload map to the op.
def _aten_sdpa_ops() -> dict:
    ops = {}
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops[packet] = ops[packet.default] = packet
    return ops


ATEN_SDPA = _aten_sdpa_ops()
MATMUL = (torch.matmul, operator.matmul, torch.bmm)
SOFTMAX_FNS = (torch.softmax, F.softmax, torch.Tensor.softmax, torch.nn.functional.softmax)
DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout)
CASTS = ("to", "float", "half", "bfloat16", "type_as", "type", "contiguous")
# Tensor methods whose output is a view-like rearrangement of their input's elements (the token
# layout walks of grouping.py and sequence_parallel.py follow exactly these)
RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})
IDENTITY_METHODS = frozenset({"contiguous", "to", "float", "half", "bfloat16", "type_as", "clone", "detach"})
LAYOUT_METHODS = RESHAPE_METHODS | IDENTITY_METHODS | {"permute", "transpose", "swapaxes"}


def is_linear(node: Any) -> bool:
    return is_call(node, *LINEAR)


def linear_parts(node: fx.Node) -> tuple[Any, Any, Any]:
    kw = fn_kwargs(node) or {}
    return kw.get("input", arg(node, 0, "input")), kw.get("weight", arg(node, 1, "weight")), kw.get("bias", arg(node, 2, "bias"))


def number(x: Any) -> Any:
    """`x` as a Python number where it is a program constant: a number, or `.item()` of a function's
    default argument that Dynamo made a graph input. Under `dynamic=True` Dynamo does not specialize
    floats, so diffusers' `dispatch_attention_fn(..., dropout_p=0.0)` reaches SDPA as the `.item()`
    of a 0-d tensor input whose source is that default (until session 44 every such attention was
    rejected as "attention dropout"). A default belongs to the function, not to the call: its value
    at trace time is the value. Anything else is returned as it is."""
    if not (is_method(x, "item") and len(x.args) == 1 and isinstance(x.args[0], fx.Node)):
        return x
    source = x.args[0]
    grapharg = source.meta.get("grapharg") if source.op == "placeholder" else None
    try:
        from torch._dynamo.source import DefaultsSource
    except ImportError:  # noqa: BLE001 — another torch: no default is read
        return x
    example = getattr(grapharg, "example", None)
    if isinstance(getattr(grapharg, "source", None), DefaultsSource) and isinstance(example, torch.Tensor) \
            and example.numel() == 1 and example.device.type != "meta":
        return example.item()
    return x


def is_noop_dropout(node: Any) -> bool:
    """F.dropout with p == 0 or training=False (an identity at inference)."""
    if is_call(node, *DROPOUT):
        kw = fn_kwargs(node) or {}
        p, training = kw.get("p", arg(node, 1, "p", 0.5)), kw.get("training", arg(node, 2, "train", True))
        p = number(p)
        return (isinstance(p, (int, float)) and p == 0) or training is False
    if is_method(node, "dropout"):
        return False
    return False


def is_cast(node: Any) -> bool:
    """A dtype/layout change that keeps values (softmax upcasts, `.to(q.dtype)`)."""
    if is_method(node, *CASTS):
        return all(not isinstance(a, torch.device) for a in node.args[1:])
    return False


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def module_path(node: fx.Node) -> str:
    """Dotted module path of the innermost module that issued `node` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return source_to_path(path)


def source_name(node: fx.Node) -> str:
    """The Dynamo source of a placeholder (`L['self']._modules['blocks']...`), '' when unknown.

    Only available inside the backend: Dynamo drops `meta["grapharg"]` once the backend returns."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(src, "name", "") if src is not None else ""
    return (name() if callable(name) else name) or ""


def source_to_path(name: str) -> str:
    """`L['self'].blocks.0.attn`, `L['self']._modules['blocks']._modules['0']` or
    `L['self'].__dict__['_modules']['blocks'].0.attn` -> `blocks.0.attn`."""
    s = re.sub(r"^L\['[^']+'\]", "", name)
    # diffusers modules (custom __getattr__) appear as `.__dict__['_modules']['blocks']`
    s = re.sub(r"\.__dict__\['_(?:modules|parameters|buffers)'\]", "", s)
    s = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    s = re.sub(r"\['([^']+)'\]", r".\1", s)
    return s.lstrip(".")


def copy_provenance(new: fx.Node, old: fx.Node) -> None:
    """Give a node a writer made the module stack and source of the node it stands for (module
    paths, per-path overrides and grouping read them)."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def shape_of(node: Any) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_param_or_buffer(node: fx.Node) -> bool:
    """Whether a graph input is a module parameter or buffer (by Dynamo's source name)."""
    src = source_name(node)
    return "_parameters[" in src or "_buffers[" in src


SIGNAL_VALUES = 64  # inputs read whole; longer 1-D float ones (per-token timesteps) by their largest value


def signal_like(node: fx.Node) -> bool:
    """Whether a graph input looks like a timestep/guidance signal: at most 1-D, numeric, not a
    parameter or buffer, and small (≤ 64 values) or floating point (a timestep per token, Cosmos3's
    `vision_timesteps`: read as its largest value, the noisy tokens' time); or of higher rank and fed
    to a sinusoidal embedding, small, or 2-D floating point (a timestep per sample and frame or
    token: SkyReels-V2's diffusion forcing passes (B, F), Cosmos 2 / 2.5 video2world (B, 1, T, 1, 1)
    with the conditioning frames at their own time, LTX-Video image2video (B, N) with the first
    frame's tokens at 0; until session 47 these were none, so guidance calls counted as steps and no
    later generation began; a pooled text embedding (B, D) is no signal: it changes with the
    prompt, and its values made a new batch size look like the same generation). A symbolic
    length (the graph Dynamo recompiles with a dynamic batch after the batch size changed: a
    timestep per sample) is judged by its example value's length; until session 44 such inputs were
    no signal, so every call of that graph was a step of its own and no later generation began.
    Rotary position ids (a short unpadded prompt's few text ids) feed a sinusoid too, but its output
    rotates queries and keys, reaching an attention before any linear: no signal, of any rank (until
    session 49 they were, and a negative prompt of another length made every guidance call a step).
    Nor is an integer input that feeds no sinusoid: ErnieImage's `text_lens` (the prompt's and the
    negative prompt's lengths made each guidance call look like a new step or generation), a class
    label; integer timesteps enter a sinusoidal embedding."""
    if node.op != "placeholder":
        return False
    src = source_name(node)
    if any(tag in src for tag in ("_parameters[", "_buffers[", "._modules[", "__defaults__", "__kwdefaults__")):
        return False  # a function's default (a float under dynamic=True) is the same on every call
    v = node.meta.get("example_value")
    if not isinstance(v, torch.Tensor):
        return False
    numel = _hint(v.numel())
    if numel is None or numel == 0 or (numel > SIGNAL_VALUES and (not v.is_floating_point() or v.dim() > 2)):
        return False  # (a large input of rank 3 or more is a token tensor, whatever it feeds)
    sinusoids = _reached(node, _is_sinusoid, 8)
    if sinusoids and all(_rotary(s) for s in sinusoids):
        return False  # rotary position ids, of any rank
    if not sinusoids and (v.dim() >= 2 or not v.is_floating_point()):
        return False  # (an integer that feeds no sinusoid is a length, a label or an index)
    return v.dtype != torch.bool and not v.is_complex()


_SINUSOID = {"sin", "cos", "polar"}  # polar: complex rotary tables (freqs_cis)


def _is_sinusoid(n: fx.Node) -> bool:
    return (n.target if n.op == "call_method" else getattr(n.target, "__name__", None)) in _SINUSOID


def _is_attention(n: fx.Node) -> bool:
    return is_call(n, *SDPA, *SOFTMAX_FNS) or n.target in ATEN_SDPA or is_method(n, "softmax")


def _rotary(sinusoid: fx.Node, depth: int = 16) -> bool:
    """Whether `sinusoid` builds a rotary table: from its output an attention comes before any linear
    (the table multiplies queries and keys; a timestep embedding's sin and cos enter a linear)."""
    frontier, seen = [sinusoid], {sinusoid}
    for _ in range(depth):
        nxt = [u for n in frontier for u in n.users if u not in seen]
        seen.update(nxt)
        if any(is_linear(u) or _weight_product(u) for u in nxt):
            return False
        if any(_is_attention(u) for u in nxt):
            return True
        frontier = nxt
    return False


def _weight_product(n: fx.Node) -> bool:
    """A matmul or einsum with a weight (a parameter or buffer input, or its transpose): a linear
    written out, as research code's time embedders may be."""
    if not (is_call(n, *MATMUL, torch.einsum) or is_method(n, "matmul", "mm", "bmm")):
        return False
    for a in n.all_input_nodes:
        while isinstance(a.args[0] if a.args else None, fx.Node) and (
                is_method(a, "t", "transpose", "permute", "to") or is_call(a, torch.t)):
            a = a.args[0]
        if a.op == "get_attr" or (a.op == "placeholder" and is_param_or_buffer(a)):
            return True
    return False


def _reached(node: fx.Node, hit, depth: int) -> list:
    """The nodes within `depth` uses of `node` for which `hit` holds (the search stops at them)."""
    frontier, seen, found = [node], {node}, []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                (found if hit(u) else nxt).append(u)
        frontier = nxt
    return found


def _hint(n) -> Optional[int]:
    """An int, or a symbolic int's example value (None when it has none: an unbacked size)."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)  # SymNode.hint, torch 2.11 to 2.13
    return int(hint) if isinstance(hint, int) else None
