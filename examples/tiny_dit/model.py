"""A small FLUX-architecture DiT on 64x64 RGB pixels, class-conditioned (and its video variant).

The denoiser is an unchanged diffusers ``FluxTransformer2DModel`` (MMDiT: double-stream blocks, then
single-stream blocks, RoPE over 3-column position ids). The pixels are packed 2x2 like Flux packs its
latents: a 64x64x3 image becomes 32x32 = 1024 image tokens of 12 channels. The class is fed the way
Flux is fed text: a learned embedding gives ``num_text_tokens`` tokens of ``joint_attention_dim``
channels (``encoder_hidden_states``) plus a ``pooled_projections`` vector. Label ``num_classes`` is the
"unconditional" class used for classifier-free guidance.

Video variant (``frames`` > 1): the same transformer on ``frames`` frames of ``image_size`` pixels; every
frame is packed as above and the frames' tokens follow one another (frame-major, as a video DiT's
t×h×w latent flattened). The position ids are (frame, row, col), so Flux's 3-axis RoPE becomes a 3-D
(t, h, w) RoPE, as in HunyuanVideo, and chipmunk reads a t×h×w grid from them (voxel grouping).

Conventions (rectified flow, as Flux): ``x_t = (1 - t) * x_0 + t * noise``, t in [0, 1] (1 = pure noise),
the transformer predicts the velocity ``noise - x_0``, and ``timestep`` is passed as ``t`` itself
(a (B,) tensor in [0, 1]; Flux pipelines pass ``t/1000`` of their 0-1000 timesteps, the same value).

Public API::

    cfg = TinyDiTConfig()                         # defaults = the shipped model
    transformer = build_transformer(cfg)          # a bare FluxTransformer2DModel
    model = TinyDiT(cfg)                          # transformer + class embeddings
    model = load_pretrained(device, dtype)        # shipped weights, eval mode
    cond = model.class_condition(labels)          # {"encoder_hidden_states", "pooled_projections"}
    ids = model.position_ids(device)              # {"img_ids", "txt_ids"}
    tokens = patchify(images); images = unpatchify(tokens, 64, 64)
    tokens = model.patchify(videos)               # (B, T, C, H, W) -> (B, T*h*w, C*p*p) when frames > 1
    out = model.transformer(hidden_states=tokens, timestep=t, **cond, **ids, return_dict=False)[0]
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_PATH = os.path.join(WEIGHTS_DIR, "tiny_flux.safetensors")
VIDEO_WEIGHTS_PATH = os.path.join(WEIGHTS_DIR, "tiny_flux_video.safetensors")
CONFIG_PATH = os.path.join(WEIGHTS_DIR, "tiny_flux.json")


# Key names of the first training script's config JSON.
_LEGACY_KEYS = {"patch": "patch_size", "heads": "num_attention_heads", "head_dim": "attention_head_dim",
                "text_tokens": "num_text_tokens"}


@dataclass
class TinyDiTConfig:
    image_size: int = 64
    image_channels: int = 3
    patch_size: int = 2
    num_layers: int = 3  # double-stream (MMDiT) blocks
    num_single_layers: int = 4  # single-stream blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    joint_attention_dim: int = 256  # width of the class "text" tokens
    pooled_projection_dim: int = 256
    axes_dims_rope: tuple[int, int, int] = field(default=(16, 24, 24))  # sums to attention_head_dim
    num_text_tokens: int = 8
    num_classes: int = 10
    frames: int = 1  # > 1: the video variant (frames of image_size pixels, (t, row, col) position ids)

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to {self.attention_head_dim}")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")

    @property
    def token_channels(self) -> int:
        return self.image_channels * self.patch_size**2

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.frames * self.grid_size**2

    @property
    def uncond_label(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyDiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {_LEGACY_KEYS.get(k, k): v for k, v in d.items()}
        return cls(**{k: v for k, v in d.items() if k in names})

    def transformer_kwargs(self) -> dict:
        """Arguments of ``diffusers.FluxTransformer2DModel`` for this config."""
        return dict(
            patch_size=1,  # pixels are packed outside the transformer, as Flux packs latents
            in_channels=self.token_channels,
            out_channels=None,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            guidance_embeds=False,
            axes_dims_rope=self.axes_dims_rope,
        )


def build_transformer(config: TinyDiTConfig | None = None, zero_init: bool = True):
    """A fresh ``diffusers.FluxTransformer2DModel`` for ``config`` (float32, CPU).

    ``zero_init`` zeroes the adaLN modulation and the output projection (adaLN-Zero, as DiT), so that
    every block starts as the identity; it only matters for training from scratch.
    """
    from diffusers import FluxTransformer2DModel

    config = config or TinyDiTConfig()
    tr = FluxTransformer2DModel(**config.transformer_kwargs())
    if zero_init:
        with torch.no_grad():
            for name, mod in tr.named_modules():
                if isinstance(mod, nn.Linear) and (
                    name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) or name in (
                        "norm_out.linear", "proj_out")
                ):
                    mod.weight.zero_()
                    if mod.bias is not None:
                        mod.bias.zero_()
    return tr


def patchify(images: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)*(W/p), C*p*p)`` tokens, row-major over the patch grid (Flux packing)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, height: int = 64, width: int = 64, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, C*p*p)`` -> ``(B, C, height, width)``."""
    B, N, D = tokens.shape
    p = patch_size
    C = D // (p * p)
    x = tokens.reshape(B, height // p, width // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def make_img_ids(grid_h: int, grid_w: int, device=None, dtype=torch.float32, frames: int = 1) -> torch.Tensor:
    """Flux image position ids ``(frames*grid_h*grid_w, 3)``: columns (frame, row, col), frame-major
    (frame 0 only for an image: Flux's (0, row, col))."""
    ids = torch.zeros(frames, grid_h, grid_w, 3, device=device, dtype=dtype)
    ids[..., 0] = torch.arange(frames, device=device, dtype=dtype)[:, None, None]
    ids[..., 1] = torch.arange(grid_h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device, dtype=dtype)[None, :]
    return ids.reshape(frames * grid_h * grid_w, 3)


def patchify_video(videos: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """``(B, T, C, H, W)`` -> ``(B, T*(H/p)*(W/p), C*p*p)``: each frame packed by :func:`patchify`, frame-major."""
    B, T = videos.shape[:2]
    tokens = patchify(videos.flatten(0, 1), patch_size)
    return tokens.reshape(B, T * tokens.shape[1], tokens.shape[2])


def unpatchify_video(tokens: torch.Tensor, frames: int, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify_video`: ``(B, T*h*w, C*p*p)`` -> ``(B, T, C, height, width)``."""
    B, N, D = tokens.shape
    imgs = unpatchify(tokens.reshape(B * frames, N // frames, D), height, width, patch_size)
    return imgs.reshape(B, frames, *imgs.shape[1:])


def make_txt_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux text position ids ``(num_tokens, 3)``: all zeros."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


class TinyDiT(nn.Module):
    """The diffusers transformer plus the class-conditioning embeddings.

    ``self.transformer`` is the plain ``FluxTransformer2DModel`` (compile *that*); this wrapper only
    turns labels into Flux-style conditioning and holds the config.
    """

    def __init__(self, config: TinyDiTConfig | None = None, zero_init: bool = True):
        super().__init__()
        self.config = config or TinyDiTConfig()
        c = self.config
        self.transformer = build_transformer(c, zero_init=zero_init)
        n = c.num_classes + 1  # + the unconditional class
        self.text = nn.Embedding(n, c.num_text_tokens * c.joint_attention_dim)  # class -> T text tokens
        self.pooled = nn.Embedding(n, c.pooled_projection_dim)  # class -> pooled projection

    # ---- conditioning -------------------------------------------------------------------------
    @property
    def uncond_label(self) -> int:
        return self.config.uncond_label

    def class_condition(self, labels: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Labels ``(B,)`` (``num_classes`` = unconditional) -> ``{"encoder_hidden_states": (B, T, J),
        "pooled_projections": (B, P)}`` in the parameters' dtype and device."""
        w = self.text.weight
        labels = torch.as_tensor(labels, dtype=torch.long, device=w.device).reshape(-1)
        c = self.config
        ehs = self.text(labels).reshape(-1, c.num_text_tokens, c.joint_attention_dim)
        return {"encoder_hidden_states": ehs, "pooled_projections": self.pooled(labels)}

    def uncond_condition(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self.class_condition([self.uncond_label] * batch_size)

    def position_ids(self, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """``{"img_ids": (N_img, 3), "txt_ids": (T, 3)}`` as the transformer expects (2-D, no batch)."""
        if device is None:
            device = self.text.weight.device
        g = self.config.grid_size
        return {
            "img_ids": make_img_ids(g, g, device, dtype, frames=self.config.frames),
            "txt_ids": make_txt_ids(self.config.num_text_tokens, device, dtype),
        }

    # ---- pixels <-> tokens ------------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)``, or videos ``(B, T, C, H, W)`` for the video variant, to tokens."""
        if self.config.frames > 1:
            return patchify_video(images, self.config.patch_size)
        return patchify(images, self.config.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.frames > 1:
            return unpatchify_video(tokens, c.frames, c.image_size, c.image_size, c.patch_size)
        return unpatchify(tokens, c.image_size, c.image_size, c.patch_size)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, ids: dict | None = None):
        """Velocity prediction for packed tokens ``(B, N, C)`` at times ``t`` ``(B,)`` in [0, 1]."""
        ids = ids if ids is not None else self.position_ids(tokens.device)
        return self.transformer(
            hidden_states=tokens, timestep=t, **self.class_condition(labels), **ids, return_dict=False
        )[0]

    # ---- weights ---------------------------------------------------------------------------------------
    def save_pretrained(self, weights_path: str, config_path: str | None = None, dtype=torch.float16) -> None:
        from safetensors.torch import save_file

        config_path = config_path or os.path.splitext(weights_path)[0] + ".json"
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, weights_path, metadata={"format": "pt", "config": json.dumps(self.config.to_dict())})
        with open(config_path, "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, weights_path: str = WEIGHTS_PATH, config_path: str | None = None,
                        device="cpu", dtype=torch.float32) -> "TinyDiT":
        from safetensors.torch import load_file

        config_path = config_path or os.path.splitext(weights_path)[0] + ".json"
        with open(config_path) as f:
            config = TinyDiTConfig.from_dict(json.load(f))
        model = cls(config, zero_init=False)
        model.load_state_dict(load_file(weights_path), strict=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_pretrained(device="cpu", dtype=torch.float32, weights_path: str = WEIGHTS_PATH) -> TinyDiT:
    """The shipped model (``weights/tiny_flux.safetensors`` + ``weights/tiny_flux.json``), eval mode,
    no grads. Raises ``FileNotFoundError`` if the weights are missing."""
    if not os.path.exists(weights_path):
        raise FileNotFoundError(weights_path)
    return TinyDiT.from_pretrained(weights_path, device=device, dtype=dtype)


def weights_tag(weights_path: str | None) -> str:
    """'' for the shipped 64x64 model (None), '_<file stem>' for other weights: the suffix of the
    result files a benchmark writes for them."""
    return "" if weights_path is None else "_" + os.path.splitext(os.path.basename(weights_path))[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Names used by the first version of train.py (kept so older scripts keep working).
TinyConfig = TinyDiTConfig
WEIGHTS = WEIGHTS_PATH
CONFIG = CONFIG_PATH
parameter_count = count_parameters
TinyDiT.save = lambda self, weights_path, config_path=None: self.save_pretrained(weights_path, config_path)
