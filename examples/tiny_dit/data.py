"""Procedural, class-conditioned 64x64 image set for the tiny DiT ("shapes").

Every image has a two-colour linear-gradient background (sometimes with faint stripes), one large
*dominant* object whose shape and colour palette give the class, and 0-3 small distractor objects of
the other shapes. Objects are filled with a solid colour, stripes or a checkerboard, rotated, and
anti-aliased (alpha from a signed distance). 5 shapes x 2 palettes = 10 classes:

    class = palette * 5 + shape,   shapes = circle, square, triangle, ring, cross,
                                   palettes = warm (red/orange/yellow/pink on dark navy-plum)
                                              cool (blue/teal/green/purple on light cream-grey)

Determinism: all random *parameters* (a few numbers per object) are drawn on the CPU from a
``torch.Generator`` seeded with ``seed``, then moved to ``device`` and rendered there with vectorised
tensor ops (no per-pixel Python). The same seed therefore gives the same images on CPU and GPU (up to
float rounding of the renderer). Images are ``(B, 3, 64, 64)`` float32 in [-1, 1].

Videos (``generate_video_batch``): the same scenes, in motion. Every object drifts along a straight line
at its own velocity and turns at its own rate; the background gradient and its stripes turn slowly.
Frame f renders the scene at time f (frames are one time unit apart), so consecutive frames
differ a little and every frame is a class-correct image. Videos are ``(B, T, 3, size, size)``.
"""

from __future__ import annotations

import math

import torch

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "ring", "cross")
PALETTES = ("warm", "cool")
CLASS_NAMES = [f"{p} {s}" for p in PALETTES for s in SHAPES]
NUM_CLASSES = len(CLASS_NAMES)
MAX_OBJECTS = 4  # 1 dominant + up to 3 distractors

# Palette colours in [0, 1] RGB: two background colours and four object colours each.
_BG = torch.tensor(
    [
        [[0.08, 0.08, 0.24], [0.36, 0.10, 0.36]],  # warm: dark navy -> plum
        [[0.96, 0.92, 0.80], [0.72, 0.80, 0.86]],  # cool: cream -> light grey-blue
    ]
)
_FG = torch.tensor(
    [
        [[0.92, 0.14, 0.12], [1.00, 0.55, 0.05], [1.00, 0.90, 0.20], [1.00, 0.45, 0.62]],  # warm
        [[0.10, 0.28, 0.90], [0.00, 0.62, 0.64], [0.14, 0.68, 0.22], [0.50, 0.24, 0.80]],  # cool
    ]
)

# Per-object parameter columns (float32, shape (B, K, P)).
_P_FIELDS = (
    "present", "shape", "cx", "cy", "r", "rot", "fill", "tex_freq", "tex_rot",
    "c1r", "c1g", "c1b", "c2r", "c2g", "c2b",
)
_PI = {n: i for i, n in enumerate(_P_FIELDS)}


def class_of(shape: int, palette: int) -> int:
    return palette * len(SHAPES) + shape


def sample_params(batch_size: int, generator: torch.Generator, labels: torch.Tensor | None = None):
    """Draw the random scene parameters on the CPU.

    Returns ``(labels (B,) int64, objs (B, K, P) float32, bg (B, 8) float32)`` where ``bg`` holds
    two background colours, the gradient angle and the background-stripe contrast/frequency/angle.
    """
    g = generator
    B, K = batch_size, MAX_OBJECTS
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu().reshape(B)
    shape = labels % len(SHAPES)
    palette = labels // len(SHAPES)

    def rand(*s):
        return torch.rand(*s, generator=g)

    objs = torch.zeros(B, K, len(_P_FIELDS))
    # Distractor shapes: any shape except the dominant one.
    other = (shape[:, None] + 1 + torch.randint(0, len(SHAPES) - 1, (B, K), generator=g)) % len(SHAPES)
    shapes = torch.cat([shape[:, None], other[:, 1:]], dim=1)
    present = torch.cat([torch.ones(B, 1), (rand(B, K - 1) < 0.75).float()], dim=1)
    r = torch.cat([0.38 + 0.17 * rand(B, 1), 0.10 + 0.10 * rand(B, K - 1)], dim=1)
    cxy = torch.cat([(rand(B, 1, 2) - 0.5) * 0.7, (rand(B, K - 1, 2) - 0.5) * 1.7], dim=1)
    # Fill: 0 solid, 1 stripes, 2 checker. Dominant: 50/25/25; distractors: 70/30/0.
    u = rand(B, K)
    fill = torch.where(u < 0.5, 0.0, torch.where(u < 0.75, 1.0, 2.0))
    fill[:, 1:] = (u[:, 1:] >= 0.7).float()
    # Colours from the class palette, with a small jitter; c2 (texture colour) differs from c1.
    i1 = torch.randint(0, 4, (B, K), generator=g)
    i2 = (i1 + 1 + torch.randint(0, 3, (B, K), generator=g)) % 4
    fg = _FG[palette]  # (B, 4, 3)
    c1 = torch.gather(fg, 1, i1[..., None].expand(B, K, 3)) + 0.06 * (rand(B, K, 3) - 0.5)
    c2 = torch.gather(fg, 1, i2[..., None].expand(B, K, 3)) + 0.06 * (rand(B, K, 3) - 0.5)
    objs[..., _PI["present"]] = present
    objs[..., _PI["shape"]] = shapes.float()
    objs[..., _PI["cx"]] = cxy[..., 0]
    objs[..., _PI["cy"]] = cxy[..., 1]
    objs[..., _PI["r"]] = r
    objs[..., _PI["rot"]] = rand(B, K) * 2 * math.pi
    objs[..., _PI["fill"]] = fill
    objs[..., _PI["tex_freq"]] = 2 * math.pi / (0.16 + 0.16 * rand(B, K))  # period 0.16-0.32 (5-10 px)
    objs[..., _PI["tex_rot"]] = rand(B, K) * math.pi
    objs[..., _PI["c1r"]: _PI["c1b"] + 1] = c1.clamp(0, 1)
    objs[..., _PI["c2r"]: _PI["c2b"] + 1] = c2.clamp(0, 1)

    bg = torch.zeros(B, 10)
    bgc = _BG[palette] + 0.08 * (rand(B, 2, 3) - 0.5)  # (B, 2, 3)
    flip = rand(B) < 0.5  # which background colour is at which end
    bgc = torch.where(flip[:, None, None], bgc.flip(1), bgc)
    bg[:, 0:6] = bgc.reshape(B, 6).clamp(0, 1)
    bg[:, 6] = rand(B) * 2 * math.pi  # gradient direction
    bg[:, 7] = (rand(B) < 0.3).float() * 0.08  # faint background stripes (contrast)
    bg[:, 8] = 2 * math.pi / (0.2 + 0.2 * rand(B))
    bg[:, 9] = rand(B) * math.pi
    return labels, objs, bg


def _shape_sdf(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Signed (pseudo-)distance of every shape, selected per object. All args broadcast to (B, K, H, W)."""
    rho = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    circle = rho - r
    square = torch.maximum(au, av) - 0.8 * r
    # Equilateral triangle, circumradius r: edge normals at -90, 30, 150 degrees, inradius r/2.
    c30, s30 = math.cos(math.pi / 6), 0.5
    tri = torch.maximum(torch.maximum(-v, c30 * u + s30 * v), -c30 * u + s30 * v) - 0.5 * r
    ring = (rho - 0.72 * r).abs() - 0.28 * r
    w = 0.3 * r
    cross = torch.minimum(torch.maximum(au - w, av - r), torch.maximum(au - r, av - w))
    sdfs = torch.stack([circle, square, tri, ring, cross], dim=0)  # (5, B, K, H, W)
    idx = shape.long().expand_as(circle)[None]
    return torch.gather(sdfs, 0, idx)[0]


def render(objs: torch.Tensor, bg: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scene parameters (on any device) to images ``(B, 3, size, size)`` in [-1, 1]."""
    device = objs.device
    B, K, _ = objs.shape
    lin = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")  # (H, W), y down
    pix = 2.0 / size  # one pixel in these coordinates

    def col(name):
        return objs[..., _PI[name]][..., None, None]  # (B, K, 1, 1)

    # Background: linear gradient between two colours along a random direction, plus faint stripes.
    ang = bg[:, 6, None, None]
    proj = (xx * torch.cos(ang) + yy * torch.sin(ang)) * (0.5 / math.sqrt(2)) + 0.5  # in [0, 1]
    c0 = bg[:, 0:3, None, None]
    c1 = bg[:, 3:6, None, None]
    img = c0 + (c1 - c0) * proj[:, None]  # (B, 3, H, W)
    sang = bg[:, 9, None, None]
    stripes = torch.sin(bg[:, 8, None, None] * (xx * torch.cos(sang) + yy * torch.sin(sang)))
    img = img + bg[:, 7, None, None, None] * stripes[:, None]

    # Objects: local rotated coordinates, distance -> alpha, fill texture -> colour.
    dx = xx - col("cx")
    dy = yy - col("cy")
    rot = col("rot")
    cr, sr = torch.cos(rot), torch.sin(rot)
    u = cr * dx + sr * dy
    v = -sr * dx + cr * dy
    sdf = _shape_sdf(u, v, col("r"), col("shape"))
    alpha = (0.5 - sdf / pix).clamp(0, 1) * col("present")  # (B, K, H, W)

    trot = col("tex_rot")
    f = col("tex_freq")
    tu = torch.cos(trot) * u + torch.sin(trot) * v
    tv = -torch.sin(trot) * u + torch.cos(trot) * v
    stripe = (torch.sin(f * tu) * 3).clamp(-1, 1) * 0.5 + 0.5
    checker = (torch.sin(f * tu) * torch.sin(f * tv) * 6).clamp(-1, 1) * 0.5 + 0.5
    fill = col("fill")
    tex = torch.where(fill == 1, stripe, torch.where(fill == 2, checker, torch.zeros_like(stripe)))
    c1o = objs[..., _PI["c1r"]: _PI["c1b"] + 1][..., None, None]  # (B, K, 3, 1, 1)
    c2o = objs[..., _PI["c2r"]: _PI["c2b"] + 1][..., None, None]
    color = c1o + (c2o - c1o) * tex[:, :, None]  # (B, K, 3, H, W)
    for k in range(K):  # painter's order: dominant first, distractors on top
        a = alpha[:, k, None]
        img = img * (1 - a) + color[:, k] * a
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def sample_motion(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame rates, drawn on the CPU after the scene: ``(objs (B, K, 3), bg (B, 2))`` with each
    object's (dx, dy) in image half-widths per frame (dominant object 0.02-0.06: up to a quarter of the
    image width over 8 frames; distractors 0.03-0.09) and turn rate (up to 0.15 rad per frame), and the
    turn rates of the background gradient and of its stripes."""
    g = generator
    B, K = batch_size, MAX_OBJECTS
    speed = torch.cat([0.02 + 0.04 * torch.rand(B, 1, generator=g), 0.03 + 0.06 * torch.rand(B, K - 1, generator=g)], 1)
    heading = torch.rand(B, K, generator=g) * 2 * math.pi
    spin = (torch.rand(B, K, generator=g) - 0.5) * 0.3
    objs = torch.stack([speed * torch.cos(heading), speed * torch.sin(heading), spin], dim=-1)
    bg = torch.stack([(torch.rand(B, generator=g) - 0.5) * 0.1, (torch.rand(B, generator=g) - 0.5) * 0.8], dim=-1)
    return objs, bg


def at_frame(objs: torch.Tensor, bg: torch.Tensor, motion: tuple[torch.Tensor, torch.Tensor], f: float):
    """The scene parameters at time ``f`` (frame index): positions, rotations and the background's two
    angles moved by ``f`` times their per-frame rates."""
    vo, vb = motion
    objs, bg = objs.clone(), bg.clone()
    objs[..., _PI["cx"]] += f * vo[..., 0]
    objs[..., _PI["cy"]] += f * vo[..., 1]
    objs[..., _PI["rot"]] += f * vo[..., 2]
    bg[:, 6] += f * vb[:, 0]
    bg[:, 9] += f * vb[:, 1] * 0.1  # the stripes turn ten times slower than their drawn rate
    return objs, bg


def generate_batch(
    batch_size: int,
    seed: int,
    device: torch.device | str | None = None,
    labels: torch.Tensor | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch ``(images (B, 3, size, size) in [-1, 1], labels (B,) int64)`` on ``device``.

    ``labels`` (optional, (B,) ints in ``[0, NUM_CLASSES)``) fixes the classes; otherwise they are drawn
    uniformly from the seed.
    """
    g = torch.Generator().manual_seed(int(seed))
    labels, objs, bg = sample_params(batch_size, g, labels)
    device = torch.device(device) if device is not None else torch.device("cpu")
    objs = objs.to(device, non_blocking=True)
    bg = bg.to(device, non_blocking=True)
    return render(objs, bg, size), labels.to(device)


def generate_video_batch(
    batch_size: int,
    seed: int,
    frames: int,
    device: torch.device | str | None = None,
    labels: torch.Tensor | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch ``(videos (B, frames, 3, size, size) in [-1, 1], labels (B,) int64)``: the scene
    of ``generate_batch`` with the same seed (frame 0 is that image) set in motion by ``sample_motion``."""
    g = torch.Generator().manual_seed(int(seed))
    labels, objs, bg = sample_params(batch_size, g, labels)
    vo, vb = sample_motion(batch_size, g)
    device = torch.device(device) if device is not None else torch.device("cpu")
    objs, bg, motion = objs.to(device), bg.to(device), (vo.to(device), vb.to(device))
    video = torch.stack([render(*at_frame(objs, bg, motion, f), size) for f in range(frames)], dim=1)
    return video, labels.to(device)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2):
    """``(B, 3, H, W)`` in [-1, 1] -> a ``PIL.Image`` grid with ``nrow`` images per row."""
    from PIL import Image

    images = images.detach().float().cpu().clamp(-1, 1)
    B, C, H, W = images.shape
    ncol = nrow
    nrows = math.ceil(B / ncol)
    grid = torch.ones(C, nrows * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y: y + H, x: x + W] = images[i]
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
