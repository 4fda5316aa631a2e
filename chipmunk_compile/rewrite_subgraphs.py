"""Inline the subgraphs of higher-order ops that only change how a region is compiled or
differentiated, before matching: activation checkpointing and nested compile regions.

Dynamo records `torch.utils.checkpoint.checkpoint(fn, *args)` as `tag_activation_checkpoint(body,
*args)` and a call of a `torch.compiler.nested_compile_region` function (under `no_grad`) as
`invoke_subgraph(body, identifier, *args)`, one body shared by every call. Each body is a subgraph of
its own, out of the patterns' sight: a DiT that checkpoints its blocks (research code often does,
whatever the grad mode) or marks them as a nested compile region got no sites, and nothing said why.

Invariants:
- Both ops compute their body's forward values: checkpointing changes only what a backward pass
  recomputes (and the chipmunk ops are inference-only), a nested compile region only lets the
  compiler reuse one compiled body. So each call is replaced by a copy of its body (its nodes with
  their fake values and module stacks, its inputs bound to the call's operands, its attributes (a
  nested body) carried over under new names), and the call's `getitem` users take the copied
  outputs. Nested regions are inlined in turn. A shared body was traced in its first caller: the
  module stacks of each copy are re-rooted at its own caller (the call's innermost module, when it
  is of the same class as the body's outermost one), so sites keep their callers' paths
  (`blocks.1.fc2`, not the first caller's `blocks.0.fc2`).
- A call whose body is not a graph attribute, whose inputs do not line up with its operands, or
  whose result is used other than through `getitem` of a constant index stays as it is.
- Called by `rewrite.find_matches` before any pattern runs; one of the graph writers.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .patterns.fx_utils import is_call

# op -> how many arguments precede the operands (the body; for invoke_subgraph also its identifier)
_REGIONS = {op: lead for name, lead in (("tag_activation_checkpoint", 1), ("invoke_subgraph", 2))
            if (op := getattr(torch.ops.higher_order, name, None)) is not None}


def inline_subgraphs(gm: fx.GraphModule) -> int:
    """Inline every checkpointed region and nested compile region of `gm` that can be; returns how
    many calls were inlined."""
    count = 0
    while True:  # an inlined body may hold a nested region
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _REGIONS]
        done = [node for node in calls if _inline(gm, node, _REGIONS[node.target])]
        count += len(done)
        if not done:
            break
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _reroot(node: fx.Node, body: fx.GraphModule):
    """A function that moves a body node's module stack from the module the body was traced in to
    the call's own module, or None when they are the same or cannot be told apart."""
    call_stack = list((node.meta.get("nn_module_stack") or {}).items())
    roots = [next(iter(st.values())) for n in body.graph.nodes if (st := n.meta.get("nn_module_stack"))]
    if not call_stack or not roots:
        return None
    (body_path, body_cls), (_, (call_path, call_cls)) = roots[0], call_stack[-1]
    if body_path == call_path or body_cls is not call_cls or any(r != roots[0] for r in roots):
        return None

    def reroot(stack: dict) -> dict:
        moved = dict(call_stack)  # the caller's stack, then the body's inner modules under it
        for key, (path, cls) in list(stack.items())[1:]:
            moved[f"{key}@{call_path}"] = (call_path + path[len(body_path):], cls) if path.startswith(body_path) \
                else (path, cls)
        return moved

    return reroot


def _inline(gm: fx.GraphModule, node: fx.Node, lead: int) -> bool:
    body_node, args = node.args[0], node.args[lead:]
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
    reroot = _reroot(node, body)
    with gm.graph.inserting_before(node):
        for n in body.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":  # carried over under a name unique in gm
                name = f"{body_node.target}_{n.target}".replace(".", "_")
                while hasattr(gm, name) and getattr(gm, name) is not getattr(body, n.target):
                    name += "_"
                setattr(gm, name, getattr(body, n.target))
                env[n] = gm.graph.get_attr(name)
                env[n].meta = dict(n.meta)
                continue
            env[n] = gm.graph.node_copy(n, lambda a: env[a])
            if reroot is not None and "nn_module_stack" in n.meta:
                env[n].meta["nn_module_stack"] = reroot(n.meta["nn_module_stack"])
    for user in list(node.users):
        user.replace_all_uses_with(fx.node.map_arg(results[user.args[1]], lambda a: env[a]))
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body_node.users:  # a shared body goes with its last call
        gm.graph.erase_node(body_node)
    return True
