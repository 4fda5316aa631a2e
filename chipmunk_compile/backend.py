"""The `chipmunk` torch.compile backend (entry point `torch_dynamo_backends`).

    torch.compile(model, backend="chipmunk", options={"config": "flux", "chipmunk.attn.top_keys": 0.1})

Invariants:
- The rewrite happens on the Dynamo (torch-level) FX graph, before Inductor; the placeholder set
  is never changed. Options other than `config`, `compiler` and `chipmunk.*` go to Inductor as
  config patches, together with the options of `mode`.
- The returned wrapper is plain Python that runs on every call, outside any CUDA graph: it advances
  the session's step tracker (entry graphs only, or the session's `step_frame` while it has none;
  once per model call; a method of the model that its forward calls after a graph break is no entry
  beside the forward's own entry frame, and a graph of no module with no site tracks nothing) and
  applies step caching;
  then it calls the compiled graph through a `GraphRunner` (graphs.py), which records one CUDA
  graph per step signature on CUDA inputs (config `cuda_graphs`). The ops read the step from the
  tracker; nothing syncs inside the graph.
- A graph without any site still goes through the same path and runs unchanged.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import weakref
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

from .config import ChipmunkConfig
from .graphs import GraphRunner, graph_blockers, static_input_indices
from .rewrite import Plan, rewrite
from .ops import twin_states
from .ops.sites import GraphInstances
from .patterns.fx_utils import SIGNAL_VALUES, signal_like, source_name
from .grouping import outermost_session
from .runtime import (Session, install_diffusers_context_probe, module_position, note_site_frame, session_for,
                      stack_modules, stack_root)
from .sequence_parallel import collective_groups
from .symbolic_grid import read_symbols
from .step_cache import StepCache, main_input_index

log = logging.getLogger("chipmunk_compile")
_COMPILERS = ("inductor", "eager")
# torch.compile imports this module when it resolves backend="chipmunk", before the first call:
# probing diffusers' cache_context now means the very first call already sees its branch name.
install_diffusers_context_probe()


def split_options(options: Optional[dict]) -> tuple[ChipmunkConfig, str, dict]:
    """(chipmunk config, inner compiler name, Inductor config patches) from torch.compile options."""
    opts = dict(options or {})
    spec = opts.pop("config", None)
    compiler = opts.pop("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"chipmunk: options['compiler'] must be one of {_COMPILERS}, got {compiler!r}")
    nested: dict[str, Any] = {}
    for key in [k for k in opts if k.startswith("chipmunk.")]:
        value = opts.pop(key)
        parts = key.split(".")[1:]
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    config = ChipmunkConfig.from_any(spec)
    if nested:
        config = config.merged(nested)
    return config, compiler, opts


def find_owner(gm: torch.fx.GraphModule) -> tuple[Optional[torch.nn.Module], bool, tuple]:
    """(the nn.Module whose forward Dynamo is tracing, whether this graph starts that forward, the
    traced frame's (file, first line, name))."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        tx = None
    if tx is None:
        return None, True, ()
    code = getattr(tx, "f_code", None)
    name = getattr(code, "co_name", "")
    frame = _code_key(code) if code is not None else ("", 0, name)
    entry = not (name.startswith("torch_dynamo_resume") or name.startswith("__resume"))
    f_locals = getattr(tx, "f_locals", {}) or {}
    sources = [source_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
    owner = next((v for k, v in f_locals.items()
                  if isinstance(v, torch.nn.Module) and any(s.startswith(f"L['{k}']") for s in sources)), None)
    if owner is None:
        owner = next((v for v in f_locals.values() if isinstance(v, torch.nn.Module)), None)
    return owner, entry, frame


def _inside_own_code(owner: torch.nn.Module) -> bool:
    """Whether `owner`'s forward (its class's, unwrapped from decorators such as diffusers'
    `apply_lora_scale`) is running further up the Python stack: the frame Dynamo compiles now is
    then a method that forward called, after a graph break made Dynamo run that call as a frame of
    its own (Z-Image's `_prepare_sequence`). Beside an entry frame of the forward such a frame is
    no entry: taken for one, it advanced the step a second time per model call, with no step signal
    (until session 49). The frame being compiled is not on the stack yet; a decorator's wrapper
    above the forward is not the forward."""
    code = getattr(inspect.unwrap(type(owner).forward), "__code__", None)
    if code is None:
        return False
    return any(f.f_locals.get("self") is owner for f in _stack_frames({_code_key(code)}))


def _code_key(code) -> tuple:
    """A frame's code as (file, first line, name): Dynamo runs a transformed copy of a frame's code,
    so frames compare by these rather than by code object."""
    return code.co_filename, code.co_firstlineno, code.co_name


def _stack_frames(keys, depth: Optional[int] = None):
    """The frames above the caller's whose code is one of `keys` (`_code_key`), innermost first,
    looking at most `depth` frames up."""
    f = sys._getframe(2)
    while f is not None and (depth is None or depth > 0):
        if _code_key(f.f_code) in keys:
            yield f
        f = f.f_back
        depth = None if depth is None else depth - 1


def step_signal_inputs(gm: torch.fx.GraphModule) -> list[int]:
    """Indices of the user inputs that look like a timestep/guidance signal (`patterns.fx_utils.
    signal_like`)."""
    return [i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder") if signal_like(node)]


def read_signature(args, indices: list[int]) -> Optional[tuple]:
    if not indices:
        return None
    parts = [_signal_values(args[i]) for i in indices if isinstance(args[i], torch.Tensor)]
    if not parts:
        return None
    device = parts[0].device
    flat = torch.cat([p.to(device) for p in parts])
    return tuple(flat.cpu().tolist())  # one device→host copy per model call, outside the graph


def local_names(gm: torch.fx.GraphModule, indices: list[int]) -> list[str]:
    """The frame-local names (`L['timestep']`) of the given user inputs; other sources are skipped."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = (re.fullmatch(r"L\['(\w+)'\]", source_name(placeholders[i])) for i in indices)
    return [m.group(1) for m in found if m is not None]


def frame_signature(session: Session, depth: int = 9) -> Optional[tuple]:
    """The step signature read from the locals (`session.late_signals`) of the session's entry frame,
    found on the Python stack a few levels above the compiled graph's call (Dynamo runs a frame's
    compiled code in that frame); None when the frame or its tensors are not there."""
    f = next(_stack_frames(session.entry_frames, depth), None)
    if f is None:
        return None
    values = [f.f_locals.get(name) for name in sorted(session.late_signals)]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return read_signature(tensors, list(range(len(tensors)))) if tensors else None


def _signal_values(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return (flat if flat.numel() <= SIGNAL_VALUES else flat.amax(keepdim=True)).to(torch.float64)


def first_parameter_input(gm: torch.fx.GraphModule) -> Optional[int]:
    """Index of the first placeholder that is a module parameter (identifies the module instance)."""
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        src = source_name(node)
        if "_parameters" in src:
            return i
    return None


def frame_site_name(owner: Optional[torch.nn.Module], frame: tuple) -> str:
    """The name of the sites and rejected candidates of a frame that runs in no module (a hook's
    function: TaylorSeer's attention frames), which have no module path: the frame's code,
    `<function in file:line>` for its (file, first line, name), and Dynamo's resumed frames
    (`torch_dynamo_resume_in_<fn>_at_<line>`) as `<fn in file, resumed at line N>`. '' for a
    module's frame, whose sites are named by their module paths."""
    if owner is not None or not frame:
        return ""
    file, line, name = frame
    resumed = re.fullmatch(r"torch_dynamo_resume_in_(.+)_at_(\d+)", name or "")
    if resumed:
        return f"<{resumed.group(1)} in {os.path.basename(file)}, resumed at line {resumed.group(2)}>"
    return f"<{name} in {os.path.basename(file)}:{line}>"


def _inner_compile(gm, example_inputs, compiler: str, patches: dict):
    if compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _call_grouping_input(sites, attr: str) -> Optional[int]:
    """The one graph-input index that the sites' per-call groupings name as `attr`, else None."""
    found = {getattr(s.call_grouping, attr) for s in sites if s.call_grouping is not None} - {None}
    return found.pop() if len(found) == 1 else None


def chipmunk_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                     options: Optional[dict] = None):
    config, compiler, patches = split_options(options)
    if mode:
        import torch._inductor

        patches = {**torch._inductor.list_mode_options(mode), **patches}
    install_diffusers_context_probe()
    owner, entry, frame = find_owner(gm)
    root = stack_root(owner) if owner is not None else None  # the model running the owner
    session = session_for(owner, config, frame if entry else (), root)
    if (entry and owner is not None and session.entry_frames and frame not in session.entry_frames
            and _inside_own_code(owner)):
        # a method of the model that its forward, an entry already, calls after a graph break (Z-Image's
        # `_prepare_sequence`): its calls do not begin model calls. (A forward that yields no graph of
        # its own, HiDream's, has such a method as its first frame: that one is the entry.)
        entry = False
    if entry:
        session.mark_entry(frame)
    elif session.step_frame is None:
        # until the module has an entry graph (a forward that graph-breaks before its first op
        # makes none), the first resumed frame compiled starts its calls: else no step advances
        session.step_frame = frame
    signals = step_signal_inputs(gm)
    if entry and signals:
        session.mark_signalled()
    elif signals and session.has_entry and not session.signalled:
        # a resumed graph reads the signal that the entry graph lacks (GLM-Image, Qwen-Image 2.1: the
        # timestep is used only after the first graph break): its locals, read from the entry frame
        session.late_signals.update(local_names(gm, signals))
    # the model this graph runs in, for a session with no step signal of its own (Session.leader): a
    # model whose forward Dynamo skips, or a module-less frame with sites (a hook's resumed frame)
    if owner is not None:
        session.note_root(root)
    plan = rewrite(gm, config, session, example_inputs=example_inputs, frame_name=frame_site_name(owner, frame))
    if plan.sites:
        note_site_frame(owner)
    if owner is None and plan.sites:
        session.note_root(next(iter(stack_modules()[-1:]), None))
    counters["chipmunk"]["graphs"] += 1
    counters["chipmunk"]["attention_sites"] += sum(s.kind == "attention" for s in plan.sites)
    counters["chipmunk"]["mlp_sites"] += sum(s.kind == "mlp" for s in plan.sites)
    counters["chipmunk"]["rejected"] += len(plan.rejections)
    log.info("chipmunk: %d sites rewritten, %d candidates left dense", len(plan.sites), len(plan.rejections))
    # read placeholder metadata before compile_fx, which takes ownership of (and may change) gm
    param_input = first_parameter_input(gm)
    main_input = main_input_index(gm, signals)
    static, blockers = static_input_indices(gm), graph_blockers(gm)
    groups = collective_groups(gm)
    compiled = _inner_compile(gm, example_inputs, compiler, patches)
    _remember(session, plan)
    instances = shared_instances(session, frame if entry else (), sum(s.kind == "attention" for s in plan.sites))
    instances.on_new_model = session.adopt
    for index, site in enumerate(plan.sites):
        site.graph = instances
        twin_states.register(site, frame, index)  # its state of a module follows it to a recompile
    if config.cuda_graphs and config.offload_state is True and plan.sites:
        counters["chipmunk"]["graph_disabled:offload_state"] += 1  # its copies are host-ordered, call by call
    if config.cuda_graphs and config.offload_state is not True and not patches.get("triton.cudagraphs"):
        # ("auto": a step that calls an offloaded branch is not recorded, Site.signature)
        # Inductor's own cudagraphs (reduce-overhead) partition around the ops instead
        compiled = GraphRunner(compiled, static, blockers, plan.sites, session, instances,
                               max_bytes=config.cuda_graphs_max_gib * 2**30)
    # weak: the instances must not keep the sites (caches) or the runner alive through a cycle,
    # which only the cyclic collector would free (torch._dynamo.reset() frees them at once)
    sites_ref = [weakref.ref(site) for site in plan.sites]
    runner_ref = weakref.ref(compiled) if isinstance(compiled, GraphRunner) else None

    def forget(ordinals):  # freed modules' caches, and the step graphs that hold their weights
        for site in (ref() for ref in sites_ref):
            if site is not None:
                site.drop_instances(ordinals)
        runner = runner_ref() if runner_ref is not None else None
        if runner is not None:
            runner.drop_instances(ordinals)

    earlier = instances.on_forget  # another graph of the frame, sharing these instances
    instances.on_forget = forget if earlier is None else (lambda ordinals: (earlier(ordinals), forget(ordinals)))
    step_cache = None
    if config.step_cache.enabled:
        if session.step_cache is None:
            session.step_cache = StepCache(config.step_cache)
        step_cache = session.step_cache
        if not entry:  # a resumed frame: the model is split into several graphs
            step_cache.multi_graph = True
        step_cache.groups = groups or step_cache.groups

    # the graph inputs that give a new token count its grid (grouping.CallGrouping): position ids
    # (values) and a conv-embedded or patchified latent (shape only)
    ids_input = _call_grouping_input(plan.sites, "ids_input")
    conv_input = _call_grouping_input(plan.sites, "shape_input")
    # a graph without sites that takes the model's latent: its size gives later graphs their grid
    latent_input = (plan.grouping or {}).get("latent_input")
    # the inputs of a conv-embedded image stream of runs (FramePack's latents): their shapes per call
    run_inputs = (plan.grouping or {}).get("run_inputs")
    # the size symbols of a grid read from a symbolic merge (symbolic_grid.py): host ints per call
    symbol_readers = (plan.grouping or {}).get("symbol_readers")
    # the rotary tables whose decoded positions give a new token count its grid (regional blocks)
    rotary = next((s.call_grouping.rotary for s in plan.sites
                   if s.call_grouping is not None and s.call_grouping.rotary is not None), None)
    # a static grid from this graph's position ids: another grid of the same count per generation
    regroup = next((s.regroup[0] for s in plan.sites if s.regroup is not None), None)
    outer = outermost_session(session)
    kind = type(owner) if owner is not None else None
    # a graph of no module with no site (a resumed frame of a hook or wrapper around the model): its
    # session of its own reads nothing, so its calls are not counted as steps (nor warned about)
    tracks = owner is not None or bool(plan.sites) or (step_cache is not None and entry)

    def locate():  # (a block's position in its model, the block, the model), on its first call here
        try:
            return module_position(kind)
        except Exception:  # noqa: BLE001 — an unusual stack: number the block by first sight instead
            log.debug("chipmunk: no module position from the call stack", exc_info=True)
            return None, None, None

    def chipmunk_call(*args):
        if ids_input is not None:  # a reference only; read on a new count's first call
            session._chipmunk_call_ids = args[ids_input]
        if conv_input is not None:
            session._chipmunk_call_conv_input = args[conv_input]
        if symbol_readers is not None:
            session._chipmunk_call_symbols = read_symbols(symbol_readers, args)
        if rotary is not None:  # references only; decoded on a new count's first call
            session._chipmunk_call_rotary = rotary.sources(args)
        if latent_input is not None:  # a reference only; its shape is read when a graph compiles
            outer._chipmunk_call_latent = args[latent_input]
        begins = instances.enter(args[param_input].data_ptr(), locate) if param_input is not None else True
        if begins and tracks and (entry or (frame == session.step_frame and not session.has_entry)):
            late = frame_signature(session) if not signals and session.late_signals else None
            # once per model call; with no signal here it may come in a later graph of the call (HiDream)
            session.begin_call(late if late is not None else (lambda: read_signature(args, signals)),
                               instances.module(), deferrable=not signals and late is None)
            if session is outer:  # no earlier call's shapes stand for this one
                outer._chipmunk_call_run_shapes = None
        elif signals and tracks:  # a resumed graph that reads the signal its call's entry graph lacked
            session.resolve_pending(lambda: read_signature(args, signals))
        if run_inputs is not None:  # shapes only: no sync
            outer._chipmunk_call_run_shapes = tuple(tuple(args[i].shape) for i in run_inputs)
        if regroup is not None:  # reads the ids on a generation's first call only
            regroup.update(args, session.position().generation)
        if step_cache is not None and entry:
            if len(instances.keys) > 1:  # one graph serves several blocks: not a whole-model call
                step_cache.multi_graph = True
            return step_cache(session, args, compiled, main_input)
        return compiled(*args)

    chipmunk_call._chipmunk_plan = plan
    chipmunk_call._chipmunk_session = session
    session.watch(chipmunk_call, plan.sites)
    return chipmunk_call


def shared_instances(session: Session, frame: tuple, attention_sites: int) -> GraphInstances:
    """The block numbering of a graph: shared by the graphs of one entry frame in a session (a
    recompile serves the blocks the earlier graph served; each block keeps its ordinal, caches and
    layers, and only the model's first block begins a call), new where their attention counts
    differ (the layers count by them) or the frame is not known."""
    instances = session.frame_instances.get(frame) if frame else None
    if instances is None or instances.attention_sites != attention_sites:
        instances = GraphInstances(attention_sites)
        if frame:
            session.frame_instances[frame] = instances
    return instances


def _remember(session: Session, plan: Plan) -> None:
    plans = getattr(session, "plans", None)
    if plans is None:
        plans = session.plans = []
    plans.append(plan)
