"""Train the tiny DiT with rectified flow on the procedural shapes set.

    python -m examples.tiny_dit.train --minutes 5.5 --out out/tiny      # one H100/H200
    python -m examples.tiny_dit.train --minutes 0.2 --batch 8           # CPU smoke run
    python -m examples.tiny_dit.train --image-size 128 --low-res-minutes 2 --batch 64 --split \
        --out out/tiny128                                                 # the 4096-token model
    python -m examples.tiny_dit.train --frames 8 --image-size 32 --batch 64 --split \
        --out out/tiny_video                                              # the video model (2048 tokens)

``--image-size 128`` trains the same architecture on 128x128 images (64x64 = 4096 image tokens, as
many as a 1024x1024 FLUX latent); ``--low-res-minutes`` spends the first minutes of the same budget
at half the size (1024 tokens, four times the steps per second), then goes on at full size.
``--frames T`` trains the video variant on T-frame clips of the moving shapes
(``data.generate_video_batch``; (frame, row, col) position ids; the shipped one: 8 frames of 32x32).

Eager bf16 autocast (torch.compile training hit an illegal memory access in an Inductor backward
kernel on this architecture), flash attention on CUDA (cuDNN's backward failed on this shape),
AdamW with warm-up, logit-normal flow times, 10% label dropout (to the unconditional class) for
guidance, an EMA of the weights. Stops on the wall-clock budget; writes the EMA weights (fp16
safetensors + JSON config), a sample grid and the loss log to --out. ``--split`` writes the weights
as two halves (``part1/part2.safetensors``) to stay under a 16 MiB per-file transfer limit;
``merge_parts`` joins them again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

from .data import NUM_CLASSES, generate_batch, generate_video_batch, image_grid
from .model import TinyDiT, TinyDiTConfig, count_parameters, make_img_ids
from .sampler import sample_classes


def attention_backend(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def autocast(device: torch.device):
    """bf16 autocast on CUDA (training, and sampling: the flash kernel takes half precision only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def save_split(model: TinyDiT, out: str) -> None:
    """fp16 state dict in two files of about equal size + ``tiny_flux.json``."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    keys, half, acc = sorted(sd), sum(v.numel() for v in sd.values()) // 2, 0
    parts = ({}, {})
    for k in keys:
        parts[acc >= half][k] = sd[k]
        acc += sd[k].numel()
    for i, p in enumerate(parts, 1):
        save_file(p, os.path.join(out, f"part{i}.safetensors"))
    with open(os.path.join(out, "tiny_flux.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)


def merge_parts(folder: str, weights_path: str) -> TinyDiT:
    """Join ``part1/part2.safetensors`` + ``tiny_flux.json`` of ``folder`` into one shipped weights file."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "tiny_flux.json")) as f:
        model = TinyDiT(TinyDiTConfig.from_dict(json.load(f)), zero_init=False)
    sd = {}
    for i in (1, 2):
        sd.update(load_file(os.path.join(folder, f"part{i}.safetensors")))
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(weights_path)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.5, help="wall-clock budget of the training loop")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/tiny_dit")
    ap.add_argument("--split", action="store_true", help="write the weights as part1/part2.safetensors")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=TinyDiTConfig.image_size)
    ap.add_argument("--low-res-minutes", type=float, default=0.0,
                    help="first minutes of the budget at half the image size (progressive resizing)")
    ap.add_argument("--frames", type=int, default=1, help="> 1: the video variant, clips of this many frames")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = TinyDiT(TinyDiTConfig(image_size=args.image_size, frames=args.frames)).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    print(f"tiny DiT: {count_parameters(model) / 1e6:.2f} M parameters on {device}", flush=True)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, **fused)
    warmup = 200
    budget = args.minutes * 60
    log, step, start = [], 0, time.time()
    amp = autocast(device)
    ids = model.position_ids(device)
    low_grid = model.config.grid_size // 2
    low_ids = {"img_ids": make_img_ids(low_grid, low_grid, device, frames=args.frames), "txt_ids": ids["txt_ids"]}
    last_size = None
    # every requested phase trains at least one step, however slow the machine (a loaded CPU can
    # spend a short budget on the first step alone)
    while time.time() - start < budget or last_size != args.image_size:
        low = time.time() - start < args.low_res_minutes * 60
        size = args.image_size // 2 if low else args.image_size
        seed = args.seed * 1_000_003 + step
        if args.frames > 1:
            images, labels = generate_video_batch(args.batch, seed, args.frames, device=device, size=size)
        else:
            images, labels = generate_batch(args.batch, seed=seed, device=device, size=size)
        drop = torch.rand(labels.shape, device=device) < 0.1
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        x0 = model.patchify(images)
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(args.batch, device=device))  # logit-normal flow times
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        with amp, attention_backend(device):
            v = model(xt, t, labels, low_ids if low else ids)
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if step % 100 == 0 or size != last_size:  # and the first step of each phase
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 1), "size": size})
            print(json.dumps(log[-1]), flush=True)
        last_size = size
        step += 1
    print(f"trained {step} steps in {time.time() - start:.0f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    if args.split:
        save_split(ema, args.out)
    else:
        ema.save_pretrained(os.path.join(args.out, "tiny_flux.safetensors"))
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({"steps": step, "seconds": time.time() - start, "batch": args.batch,
                   "image_size": args.image_size, "frames": args.frames, "low_res_minutes": args.low_res_minutes,
                   "log": log}, f)
    # images: two per class, a class per column; videos: one per class, a clip per row
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(2 if args.frames == 1 else 1)
    with torch.no_grad(), autocast(device), attention_backend(device):
        imgs = sample_classes(ema, labels, steps=args.sample_steps, seed=1)
    grid = image_grid(imgs, nrow=NUM_CLASSES) if args.frames == 1 else image_grid(imgs.flatten(0, 1), nrow=args.frames)
    grid.save(os.path.join(args.out, "samples.png"))


if __name__ == "__main__":
    main()
