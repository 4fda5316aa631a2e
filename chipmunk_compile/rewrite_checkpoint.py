"""Inline activation-checkpointed regions before matching.

Dynamo records `torch.utils.checkpoint.checkpoint(fn, *args)` as the higher-order op
`tag_activation_checkpoint(body, *args)`, whose body is a subgraph of its own, out of the patterns'
sight: a DiT that checkpoints its blocks (research code often does, whatever the grad mode) got no
sites, and nothing said why.

Invariants:
- Checkpointing changes only what a backward pass recomputes; the forward values are the body's.
  The chipmunk ops are inference-only, so the body is copied into the graph in place of the call
  (its nodes with their fake values and module stacks, its inputs bound to the call's arguments,
  its attributes (a nested checkpoint's body) carried over under new names), and the call's
  `getitem` users take the copied outputs. Nested checkpoints are inlined in turn.
- A call whose body is not a graph attribute, whose inputs do not line up with its arguments, or
  whose result is used other than through `getitem` of a constant index stays as it is.
- Called by `rewrite.find_matches` before any pattern runs; one of the graph writers.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .patterns.fx_utils import is_call

_CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def inline_checkpoints(gm: fx.GraphModule) -> int:
    """Inline every checkpointed region of `gm` that can be; returns how many."""
    if _CHECKPOINT is None:  # pragma: no cover - a torch without the op
        return 0
    count = 0
    while True:  # an inlined body may hold a nested checkpoint
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _CHECKPOINT]
        done = [node for node in calls if _inline(gm, node)]
        count += len(done)
        if not done:
            break
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _inline(gm: fx.GraphModule, node: fx.Node) -> bool:
    body_node, args = node.args[0], node.args[1:]
    body = getattr(gm, body_node.target, None) if isinstance(body_node, fx.Node) and body_node.op == "get_attr" \
        else None
    if not isinstance(body, fx.GraphModule):
        return False
    inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in body.graph.nodes if n.op == "output"]
    results = output.args[0]
    if len(inputs) != len(args) or not isinstance(results, (tuple, list)):
        return False
    if any(not (is_call(u, operator.getitem) and isinstance(u.args[1], int) and u.args[1] < len(results))
           for u in node.users):
        return False
    env = dict(zip(inputs, args))
    with gm.graph.inserting_before(node):
        for n in body.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":  # carried over under a name unique in gm
                name = f"{body_node.target}_{n.target}".replace(".", "_")
                setattr(gm, name, getattr(body, n.target))
                env[n] = gm.graph.get_attr(name)
                env[n].meta = dict(n.meta)
                continue
            env[n] = gm.graph.node_copy(n, lambda a: env[a])
    for user in list(node.users):
        user.replace_all_uses_with(fx.node.map_arg(results[user.args[1]], lambda a: env[a]))
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body_node.users:
        gm.graph.erase_node(body_node)
    return True
