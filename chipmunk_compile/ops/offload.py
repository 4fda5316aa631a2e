"""Site caches kept in host memory (config `offload_state`), for models whose sparse state outgrows
the GPU: HunyuanVideo 720p holds ~1.4 GB per attention site (output cache + int32 key lists), ~80 GB
over its 58 sparse layers; Wan2.1-14B with CFG about 1.5 GB per site and branch.

Each cache of a branch has its home in pinned host memory. A call of a cached op stages its branch
into one of two device slots; while it computes, the branch that was staged right after it last
time (steps repeat their call order) is copied into the other slot on a side stream. A call that
writes its caches copies its slot back home. Device memory: two slots instead of every site.
Which branches: all (`offload_state: true`), or under "auto" those placed when a branch as large as
the largest so far would leave less than `offload_reserve` of the device's memory free.

Invariants:
- Home memory is the truth between calls. A branch's device tensors (`BranchState.cache`) are valid
  only inside its `staged` call; afterwards the slot may be refilled for another branch.
- Every copy of a session runs on one copy stream, so copies are ordered among themselves. A slot
  is refilled only after the compute of the call that used it (an event the copy stream waits on)
  and after that call's write-back; a call reads its slot only after its fill (an event the compute
  stream waits on). A branch is found in a slot only if the slot holds it at its current epoch.
- A wrong or missing prediction costs a copy on the compute stream (counted `offload_miss`), never
  stale data; a call that raises leaves its slot owned by no branch (its home is not overwritten).
- Pinned memory is registered at its exact size (cudaHostRegister), not rounded up to a power of
  two by the caching host allocator. A home is released (new shapes, a `release`, the model freed)
  only after a device synchronize, so no asynchronous copy outlives the memory it reads or writes;
  one dropped while a CUDA graph is captured waits (still registered) for the next staged call.
- Never inside a CUDA-graph recording (the op asks for an eager call): with `true` the backend
  records no graphs, under "auto" a step that calls an offloaded branch is not recorded
  (`Site.signature` is None). On CPU (tests) the same bookkeeping runs with plain host tensors, and
  "auto" never offloads (no device capacity to run short of).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Optional

import torch

from .. import runtime
from .sites import count, log


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of `t` as a flat uint8 tensor (any layout an allocator chose)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class _Home:
    """A branch cache's home: `nbytes` of host memory, page-locked for asynchronous copies when
    `cuda` (registered at its exact size; unregistered before the memory is released)."""

    def __init__(self, nbytes: int, cuda: bool):
        self.bytes = torch.empty(nbytes, dtype=torch.uint8)
        self.registered = False
        if cuda and nbytes:
            self.registered = int(torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), nbytes, 0)) == 0
            if not self.registered:  # still correct, only the copies are synchronous
                count("offload_unpinned")

    def __del__(self):
        if self.registered:  # no copy may still be reading or writing it once it is released
            _RETIRED.append(self.bytes)
            release_retired()


_RETIRED: list = []  # registered homes dropped while a capture was running: released at the next chance


def release_retired() -> None:
    """Synchronize and unregister the dropped homes, unless a CUDA graph is being captured (a
    synchronize would break it; they wait for the next staged call)."""
    if not _RETIRED:
        return
    try:
        if torch.cuda.is_current_stream_capturing():
            return
        torch.cuda.synchronize()
        cudart = torch.cuda.cudart()
        while _RETIRED:
            cudart.cudaHostUnregister(_RETIRED.pop().data_ptr())
    except Exception:  # noqa: BLE001 — interpreter shutdown: nothing left to protect
        _RETIRED.clear()


class _Slot:
    def __init__(self):
        self.tensors: dict[tuple, torch.Tensor] = {}  # (name, shape, dtype, alloc) -> device tensor
        self.owner: Optional[tuple] = None  # (weakref to the BranchState, its epoch)
        self.copied: Optional[torch.cuda.Event] = None  # after the copy stream's last copy into or out of it

    def holds(self, st) -> bool:
        return self.owner is not None and self.owner[0]() is st and self.owner[1] == st.epoch

    def tensor(self, key: tuple, device, stream) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            name, shape, dtype, alloc = key
            t = alloc(*shape, dtype=dtype, device=device) if alloc else torch.empty(shape, dtype=dtype, device=device)
            if stream is not None:  # freed only after the copy stream's use of it
                t.record_stream(stream)
            self.tensors[key] = t
        return t


class StateOffload:
    """The two device slots, the copy stream and the learned call order of one session on one
    device, and which of its branches are offloaded (`offload_state` true: all; "auto": those
    that would leave less than `reserve` of the device's memory free)."""

    def __init__(self, device: torch.device, mode: Any = True, reserve: float = 0.15):
        self.device = device
        self.mode, self.reserve = mode, reserve
        self.largest = 0  # bytes of the largest branch seen (the estimate for a branch not allocated yet)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots = (_Slot(), _Slot())
        self.current = 0  # slot of the last staged call
        self.last: Optional[weakref.ref] = None  # the branch state of the last staged call
        # branch state -> weakref to the one staged right after it last time (steps repeat the order)
        self.after: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    # -- which branches -----------------------------------------------------------------------------
    def decide(self, st) -> bool:
        """Whether `st` (before its first cache) keeps its caches in host memory. "auto": when a
        branch as large as the largest so far would leave less than `reserve` of the device's memory
        free. Read once per branch (new shapes decide again), outside any recording."""
        if self.mode is True:
            return True
        if runtime.RECORDING is not None:
            raise runtime.NeedsEagerCall("a branch's first caches are placed outside a recording")
        try:
            capacity = self.capacity()
            short = self.reserve * capacity + self.largest - self.free_bytes() if capacity > 0 else 0
            if short > 0 and st.site.session.drop_idle_states(short):  # idle shapes' caches go first
                torch.cuda.empty_cache()  # what they freed counts as free only once the allocator returns it
                short = self.reserve * capacity + self.largest - self.free_bytes()
            tight = short > 0
        except Exception as e:  # noqa: BLE001 — a query this torch/driver lacks: keep it on the device
            count("offload_auto_unavailable")
            log.warning("chipmunk: offload_state 'auto' cannot read the device's free memory (%s)", e)
            return False
        if tight:
            count("offload_auto_branch")
        return tight

    def capacity(self) -> int:
        """What this process may allocate on the device (its per-process limit), 0 off CUDA."""
        if not self.cuda:
            return 0
        total = torch.cuda.get_device_properties(self.device).total_memory
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        fraction = get_fraction(self.device) if get_fraction is not None else 1.0
        return int(total * fraction)

    def free_bytes(self) -> int:
        """What a new large block can surely get: the driver's free memory within the per-process
        limit. Blocks the caching allocator holds unused do not count: they are pieces of segments
        still partly in use (HunyuanVideo at full depth in 80 GiB: 8.4 GiB of them, and the model's
        3.4 GiB MLP buffer fit in none; counting them kept too many branches on the device)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(free, self.capacity() - torch.cuda.memory_reserved(self.device))

    def measured(self, st) -> None:
        """`st` allocated a cache (on the device or at home): keep the largest branch size."""
        self.largest = max(self.largest, st.nbytes)

    # -- a call ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged(self, st, writes: bool):
        """Bind `st`'s caches to a device slot for one call; copy them home after it if `writes`."""
        if runtime.RECORDING is not None:
            raise runtime.NeedsEagerCall("offloaded state is staged by host-ordered copies")
        release_retired()
        i = self._stage(st)
        self._learn(st)
        self._prefetch(self._next(st), self.slots[i ^ 1])
        try:
            yield
        except BaseException:
            self.slots[i].owner = None  # half-written: no later call may take it for the branch
            raise
        self._unstage(st, self.slots[i], writes)

    def _stage(self, st) -> int:
        hit = [i for i, slot in enumerate(self.slots) if slot.holds(st)]
        if hit:
            i = hit[0]
            if self.cuda and self.slots[i].copied is not None:  # its fill, or the last write-back out of it
                torch.cuda.current_stream(self.device).wait_event(self.slots[i].copied)
            count("offload_hit")
        else:
            i = self.current ^ 1  # never the slot the previous call may still be computing in
            if self.cuda:  # after every pending copy: a prefetch into i, a write-back of st's home
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.slots[i].owner = (weakref.ref(st), st.epoch)
            self._fill(self.slots[i], st)
            if st.home:
                count("offload_miss")
        self.current = i
        slot = self.slots[i]
        for name, (key, _) in st.home.items():
            st.cache[name] = slot.tensor(key, self.device, self.stream)
        return i

    def _unstage(self, st, slot: _Slot, writes: bool) -> None:
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(done)  # the slot is refilled only after this call's compute
        if not writes:
            return
        if not self.cuda:
            for key, home in st.home.values():
                home.bytes.copy_(_bytes(slot.tensors[key]))
            return
        with torch.cuda.stream(self.stream):
            for key, home in st.home.values():
                home.bytes.copy_(_bytes(slot.tensors[key]), non_blocking=True)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self.stream)

    def _fill(self, slot: _Slot, st) -> None:
        for key, home in st.home.values():
            _bytes(slot.tensor(key, self.device, self.stream)).copy_(home.bytes, non_blocking=self.cuda)

    def _prefetch(self, st, slot: _Slot) -> None:
        if st is None or slot.holds(st):
            return
        slot.owner = (weakref.ref(st), st.epoch)
        for key, _ in st.home.values():  # allocated outside the side stream's context
            slot.tensor(key, self.device, self.stream)
        if not self.cuda:
            self._fill(slot, st)
            return
        with torch.cuda.stream(self.stream):
            self._fill(slot, st)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self.stream)
        count("offload_prefetch")

    # -- the call order ---------------------------------------------------------------------------
    def _learn(self, st) -> None:
        last = self.last() if self.last is not None else None
        if last is not None and last is not st:
            self.after[last] = weakref.ref(st)
        self.last = weakref.ref(st)

    def _next(self, st):
        """The branch staged right after `st` last time (None before that is known)."""
        nxt = self.after.get(st)
        nxt = nxt() if nxt is not None else None
        return nxt if nxt is not None and nxt.home else None

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, st, name: str, shape, dtype, alloc) -> torch.Tensor:
        """A new cache `name` of the staged branch `st`: its device tensor in st's slot and its home."""
        slot = self.slots[self.current]
        if not slot.holds(st):
            raise RuntimeError(f"chipmunk: cache {name!r} allocated outside its branch's staged call")
        key = (name, tuple(shape), dtype, alloc)
        t = slot.tensor(key, self.device, self.stream)
        st.home[name] = (key, _Home(_bytes(t).numel(), self.cuda))
        return t

    def device_bytes(self) -> int:
        return sum(_bytes(t).numel() for slot in self.slots for t in slot.tensors.values())
