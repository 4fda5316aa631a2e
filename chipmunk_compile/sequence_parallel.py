"""Spatial grouping through sequence (context) parallelism: Ulysses all-to-all attention.

Under Ulysses (diffusers' `enable_parallelism(ContextParallelConfig(ulysses_degree=W))`, xDiT,
cache-dit) each rank holds a contiguous 1/W of every token stream and runs the MLPs on it; around
attention, an all-to-all trades token shards for head shards, so the attention sees all W·S
tokens of its local heads in rank-major order: [rank 0's S local tokens, rank 1's, ...]. With
text, that is [text₀, image₀, text₁, image₁, ...]: neither the grid's token count nor a plain
text side, so the grouping of `grouping.py` alone finds no order for either kind of site.

This module reads both from the graph:
- `gathered_tokens(q)`: the attention's token axis is (source rank, local token) when q comes from
  an `all_to_all_single` through view-like ops only. The layouts are followed symbolically (atoms
  of `grouping._step_layout`), so any reshape/permute spelling of the exchange is recognized, and
  anything else (a gather along heads, a non-equal split) is not.
- `graph_sharding(gm, n_img)`: in a graph with such an all-to-all, which shard of the image stream
  this rank holds: an input or token tensor of n_img tokens chunked along its token axis into W
  pieces, piece r taken (diffusers' split hooks run inside the compiled forward); else the
  all-to-all's process group (`dist.get_rank`), with equal chunks in rank order assumed, and said
  so in the report.
Then an attention site gets the grid's tile order mapped to where each token sits after the
exchange (`gathered_perm`), and an MLP site of one shard gets the tile order restricted to its
shard (`shard_order`).

Ranks must also make the same host decisions wherever a decision changes which collectives run:
`collective_groups(gm)` names the process groups a graph communicates over; such a graph records no
step graphs (graphs.py: capturing collectives needs every rank to record the same calls, and each
rank decides alone when to record), and the adaptive step cache takes the largest input change
over the group (`agree_max`), so every rank skips the same calls.

Invariants: a perm only chooses which tokens share a query group or token block; outputs keep
the original order, so a wrong guess about the sharding costs quality, never correctness.
Pure graph analysis, as grouping.py: the graph is never changed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .patterns.fx_utils import LAYOUT_METHODS, schema_kwargs

_A2A = "all_to_all_single"
_WAIT = "wait_tensor"
_CHUNK = {"chunk", "tensor_split"}


@dataclass
class Sharding:
    world: int
    rank: int
    source: str  # for reports


def _name(node: fx.Node) -> Optional[str]:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) or str(node.target)
    return None


def _is(node, name: str) -> bool:
    return isinstance(node, fx.Node) and _name(node) is not None and _name(node).split(".")[0] == name


def _a2a_world(a2a: fx.Node) -> Optional[int]:
    """W of an all_to_all_single with W equal splits (as lists, or None: equal by definition)."""
    outs = a2a.args[1] if len(a2a.args) > 1 else a2a.kwargs.get("output_split_sizes")
    ins = a2a.args[2] if len(a2a.args) > 2 else a2a.kwargs.get("input_split_sizes")
    if isinstance(outs, (list, tuple)) and isinstance(ins, (list, tuple)):
        if len(outs) == len(ins) and outs and len(set(outs) | set(ins)) == 1:
            return len(outs)
        return None
    group = _group(a2a)
    try:
        import torch.distributed as dist

        return dist.get_world_size(group) if group is not None else None
    except Exception:  # noqa: BLE001 - no process group at hand: unknown
        return None


def _group_name(node: fx.Node):
    """A functional collective's `group_name` argument, or None (wait_tensor names no group)."""
    return (schema_kwargs(node) or {}).get("group_name")


def _group(a2a: fx.Node):
    """The process group of an all_to_all_single node (by its name argument), or None."""
    name = _group_name(a2a)
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(name) if isinstance(name, str) else name
    except Exception:  # noqa: BLE001
        return None


def _chain_up(node: fx.Node, limit: int = 24) -> Optional[list]:
    """[local node L, view ops..., a2a, wait, view ops..., node]: the view-only chain from `node` up
    through one all_to_all_single, or None."""
    chain, n, a2a_seen = [node], node, False
    for _ in range(limit):
        if not n.args or not isinstance(n.args[0], fx.Node):
            return None
        name = _name(n)
        if _is(n, _A2A):
            a2a_seen = True
        elif name not in LAYOUT_METHODS and not _is(n, _WAIT):
            return chain[::-1] if a2a_seen else None
        n = n.args[0]
        chain.append(n)
        if a2a_seen and _name(n) not in LAYOUT_METHODS:
            return chain[::-1]
    return None


def exchanged(node: fx.Node) -> bool:
    """Whether `node` is an all-to-all's result, through view-like ops only."""
    return isinstance(node, fx.Node) and _chain_up(node) is not None


def gathered_tokens(q: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(local sequence node L, W) when q's token axis (dim -2) is (source rank W, one whole axis of
    L) after an all-to-all of equal shards, reached through view-like ops; else None."""
    from .grouping import _reshape_layout, _shape, _step_layout

    if not isinstance(q, fx.Node):
        return None
    chain = _chain_up(q)
    if chain is None:
        return None
    local = chain[0]
    shape = _shape(local)
    if shape is None:
        return None
    layout = [((f"d{i}", s),) for i, s in enumerate(shape)]
    world = None
    for prev, node in zip(chain, chain[1:]):
        if _is(node, _A2A):
            world = _a2a_world(node)
            numel = math.prod(_shape(prev) or (0,))
            split = _reshape_layout(layout, (world, numel // world)) if world and numel % world == 0 else None
            if split is None or len(split[0]) != 1:
                return None  # the shard index is not one whole axis (or a split of one)
            layout = [(("rank", world), *split[1])]
        elif _is(node, _WAIT):
            continue
        else:
            layout = _step_layout(node, prev, layout)
            if layout is None:
                return None
    qs = _shape(q)
    if world is None or qs is None or len(qs) < 2:
        return None
    tok = layout[-2]
    if len(tok) != 2 or tok[0] != ("rank", world) or tok[1][0].endswith("'") or not tok[1][0].startswith("d"):
        return None
    dim = int(tok[1][0][1:])
    if shape[dim] != tok[1][1]:
        return None  # only part of L's token axis: not the whole local sequence per rank
    return local, world


def a2a_sharding(gm: fx.GraphModule) -> Optional[Sharding]:
    """This rank within the first equal-split all-to-all's process group, or None."""
    for node in gm.graph.nodes:
        if _is(node, _A2A):
            world, group = _a2a_world(node), _group(node)
            try:
                import torch.distributed as dist

                rank = dist.get_rank(group) if group is not None else None
            except Exception:  # noqa: BLE001
                rank = None
            if world and rank is not None and rank >= 0:
                return Sharding(world, rank, f"rank {rank} of {world} of the all-to-all's group, "
                                             "equal token shards in rank order assumed")
    return None


def chunk_sharding(gm: fx.GraphModule, n_tokens: int) -> Optional[Sharding]:
    """(W, r) when a tensor with an n_tokens-long axis is chunked along it into W pieces and only
    piece r is used (a sequence-parallel split inside the graph); None when there is none or the
    chunks disagree."""
    from .grouping import _shape

    found = set()
    for node in gm.graph.nodes:
        if not (_name(node) in _CHUNK and node.args and isinstance(node.args[0], fx.Node)):
            continue
        shape = _shape(node.args[0])
        pieces = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("sections"))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if shape is None or not isinstance(pieces, int) or pieces < 2 or not isinstance(dim, int):
            continue
        if shape[dim % len(shape)] != n_tokens or n_tokens % pieces:
            continue
        taken = {u.args[1] for u in node.users if u.op == "call_function" and u.target is operator.getitem}
        if len(taken) == 1 and len(node.users) == 1 and isinstance(next(iter(taken)), int):
            found.add((pieces, next(iter(taken)) % pieces))
    if len(found) != 1:
        return None
    world, rank = found.pop()
    return Sharding(world, rank, f"chunk {rank} of {world} of the {n_tokens}-token stream in the graph")


def graph_sharding(gm: fx.GraphModule, n_img: int) -> Optional[Sharding]:
    """Which equal shard of the n_img-token image stream this rank holds, in a graph with a Ulysses
    all-to-all (a chunk of tokens elsewhere is no sign of sharding): from a chunk in the graph into
    as many shards, else from the all-to-all's process group; None when neither tells."""
    a2a = a2a_sharding(gm)
    if a2a is None:
        return None
    sh = chunk_sharding(gm, n_img)
    if sh is not None and a2a.world == sh.world:
        return sh
    return a2a if n_img % a2a.world == 0 else None


def shard_order(img_order: torch.Tensor, n_img: int, sh: Sharding) -> torch.Tensor:
    """This rank's image tokens (local indices) in the order they have in `img_order`."""
    per = n_img // sh.world
    lo = sh.rank * per
    mine = img_order[(img_order >= lo) & (img_order < lo + per)]
    return (mine - lo).to(img_order.dtype)


def gathered_perm(img_order: torch.Tensor, n_img: int, n_text: int, text_first: bool, world: int):
    """(perm, text mask) over the W·S gathered tokens, S = (n_img + n_text) / W per rank, each rank's
    shard = [its text shard, its image shard] (or image first): the grid's order of the whole image,
    then the text, mapped to where each token sits after the all-to-all."""
    from .grouping import site_perm

    img_l, txt_l = n_img // world, n_text // world
    s = img_l + txt_l
    j = torch.arange(n_img)
    img_pos = (j // img_l) * s + (txt_l if text_first else 0) + j % img_l
    t = torch.arange(n_text)
    txt_pos = (t // max(txt_l, 1)) * s + (0 if text_first else img_l) + t % max(txt_l, 1)
    # logical order of site_perm: text then image (text_first) or image then text
    phys = torch.cat([txt_pos, img_pos] if text_first else [img_pos, txt_pos])
    logical = site_perm(n_img + n_text, img_order, n_text, text_first).long()
    perm = phys[logical].to(torch.int32)
    keep = torch.zeros(n_img + n_text, dtype=torch.bool)
    keep[txt_pos] = True
    return perm, keep


def collective_groups(gm: fx.GraphModule) -> list[str]:
    """Names of the process groups that the graph's functional collectives run over, in order
    ("?" for one whose group is not a plain name); waits, which name no group, aside."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or _namespace(node.target) != "_c10d_functional":
            continue
        kw = schema_kwargs(node) or {}
        if "group_name" not in kw:
            continue  # wait_tensor
        name = kw["group_name"]
        name = name if isinstance(name, str) else "?"
        if name not in names:
            names.append(name)
    return names


def _namespace(target) -> Optional[str]:
    """An op's namespace (OpOverload and OpOverloadPacket alike), else None."""
    op = getattr(target, "default", target) if isinstance(target, torch._ops.OpOverloadPacket) else target
    return getattr(op, "namespace", None)


def covering_group(names: list[str]) -> Optional[str]:
    """The one of the named process groups that holds every rank of all of them (Ulysses: the
    all-to-all's group and the flattened mesh's, the same ranks), else None."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        ranks = {n: set(dist.get_process_group_ranks(_resolve_process_group(n))) for n in names}
    except Exception:  # noqa: BLE001 - a group that is not a name, or gone
        return None
    every = set().union(*ranks.values()) if ranks else set()
    return next((n for n, r in ranks.items() if r == every), None)


def agree_max(value: torch.Tensor, group_name: str) -> torch.Tensor:
    """`value` (a one-element tensor) replaced by its maximum over the named process group."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    out = value.detach().float().reshape(1).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=_resolve_process_group(group_name))
    return out
