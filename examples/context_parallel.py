"""Chipmunk under context parallelism: the trained tiny DiT split over ranks with diffusers' Ulysses.

    torchrun --nproc-per-node 2 -m examples.context_parallel            # CPU (gloo) or one GPU per rank (NCCL)
    torchrun --nproc-per-node 2 -m examples.context_parallel --no-grouping

Every rank holds 1/W of the tokens; around each attention an all-to-all trades token shards for head
shards. Nothing here is chipmunk-specific beyond `torch.compile(..., backend="chipmunk")`: the backend
finds the attention behind the all-to-all, groups its queries by the image grid across the shards,
and each rank's MLPs by the grid of its own shard (`inspect()`/`stats()` name the grouping).

Rank 0 prints the fidelity of the sharded chipmunk generation against the sharded dense one, and the
grouping of each kind of site. `--no-grouping` shows what the grouping is worth (raster order).
Sites keep their `min_tokens` per rank: at 2 ranks the tiny DiT's MLPs see 512 (+4) tokens, under the
presets' 1024, and stay dense; a YAML with `mlp: {min_tokens: 256}` makes them sparse as in one process.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import chipmunk_compile  # noqa: E402
from benchmarks.fidelity import TinyRunner  # noqa: E402
from chipmunk_compile.metrics import psnr  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="*", default=[0, 3])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--config", default="flux", help="chipmunk preset / YAML path")
    ap.add_argument("--no-grouping", action="store_true")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    elif torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1  # diffusers' mesh setup divides by it on a CPU-only host
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    from diffusers import ContextParallelConfig

    runner = TinyRunner(device, dtype, args.classes, guidance=None)
    runner.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad():
        dense, _ = runner.generate(runner.transformer, args.steps, seed=0)
        options = {"config": args.config, "compiler": "inductor" if cuda else "eager"}
        if args.no_grouping:
            options["chipmunk.grouping.enabled"] = False
        compiled = torch.compile(runner.transformer, backend="chipmunk", options=options)
        sparse, _ = runner.generate(compiled, args.steps, seed=0)
    if rank == 0:
        kinds = collections.Counter((s["kind"], s["grouping"]) for s in chipmunk_compile.stats(compiled)["sites"])
        print(f"{world} ranks (Ulysses), {args.steps} steps, config {args.config}"
              f"{', grouping off' if args.no_grouping else ''}")
        for (kind, grouping), n in kinds.items():
            print(f"  {n:2d} {kind:9s} {grouping}")
        print(f"PSNR chipmunk vs dense (both sharded): {psnr(sparse.float().cpu(), dense.float().cpu()):.2f} dB")
    dist.barrier()  # rank 0 printed; no rank tears the group down under another
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
