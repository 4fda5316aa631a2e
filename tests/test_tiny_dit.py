"""CPU tests of the example tiny DiT (examples/tiny_dit): data, packing, model, sampler, shipped weights."""

import os

import torch

from examples.tiny_dit import data
from examples.tiny_dit.model import (
    VIDEO_WEIGHTS_PATH,
    WEIGHTS_PATH,
    TinyDiT,
    TinyDiTConfig,
    load_pretrained,
    make_img_ids,
    patchify,
    patchify_video,
    unpatchify,
    unpatchify_video,
)
from examples.tiny_dit.sampler import flow_sigmas, sample, sample_classes

SMALL = TinyDiTConfig(num_layers=1, num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=32)


def _flow_loss(m, x, labels, t) -> float:
    """The rectified-flow training loss of `m` on clean images/videos `x` at flow times `t` (fixed noise)."""
    x0 = m.patchify(x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    with torch.no_grad():
        v = m(xt, t, labels)
    return ((v - (noise - x0)) ** 2).mean().item()


def test_data_deterministic_and_structured():
    x1, l1 = data.generate_batch(32, seed=7)
    x2, l2 = data.generate_batch(32, seed=7)
    x3, _ = data.generate_batch(32, seed=8)
    assert x1.shape == (32, 3, 64, 64) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(l1, l2)
    assert not torch.equal(x1, x3)
    assert x1.min() >= -1 and x1.max() <= 1
    assert len(data.CLASS_NAMES) == data.NUM_CLASSES == 10
    # structure: every image has spatial variation (objects on a background), not a constant
    assert (x1.flatten(1).std(dim=1) > 0.1).all()
    # classes differ: the palette halves differ in brightness, the same seed with other labels changes images
    warm, _ = data.generate_batch(16, seed=3, labels=torch.zeros(16, dtype=torch.long))
    cool, _ = data.generate_batch(16, seed=3, labels=torch.full((16,), 5))
    assert cool.mean() - warm.mean() > 0.5
    circ, _ = data.generate_batch(16, seed=3, labels=torch.full((16,), 5))
    cross, _ = data.generate_batch(16, seed=3, labels=torch.full((16,), 9))
    assert (circ - cross).abs().mean() > 0.05


def test_patchify_roundtrip_and_ids():
    x = torch.randn(2, 3, 64, 64)
    tok = patchify(x, 2)
    assert tok.shape == (2, 1024, 12)
    assert torch.equal(tok[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # token 1 = row 0, col 1, (c, dy, dx) order
    assert torch.equal(unpatchify(tok, 64, 64, 2), x)
    ids = make_img_ids(32, 32)
    assert ids.shape == (1024, 3) and ids[33].tolist() == [0.0, 1.0, 1.0]


def test_model_forward_shapes():
    m = TinyDiT(SMALL).eval()
    cond = m.class_condition([0, 10])
    assert cond["encoder_hidden_states"].shape == (2, 8, 32) and cond["pooled_projections"].shape == (2, 32)
    ids = m.position_ids()
    assert ids["img_ids"].shape == (1024, 3) and ids["txt_ids"].shape == (8, 3)
    with torch.no_grad():
        out = m(torch.randn(2, 1024, 12), torch.tensor([0.3, 0.9]), torch.tensor([1, 10]))
    assert out.shape == (2, 1024, 12)


def test_sampler_two_steps_with_cfg():
    m = TinyDiT(SMALL, zero_init=False).eval()
    s = flow_sigmas(2)
    assert s.tolist() == [1.0, 0.5, 0.0]
    calls = []

    def spy(**kw):
        calls.append(kw["timestep"].tolist())
        return m.transformer(**kw)

    out = sample_classes(m, [3, 4], transformer=spy, steps=2, seed=0, guidance_scale=2.0)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert calls == [[1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5]]  # cond + uncond per step
    again = sample(m.transformer, m.class_condition([3, 4]), steps=2, seed=0, guidance_scale=2.0,
                   uncond=m.uncond_condition(2))
    assert torch.equal(out, again)


def test_shipped_weights_load_and_denoise():
    # Must fail (not skip) when the shipped weights are missing.
    assert os.path.exists(WEIGHTS_PATH), f"missing shipped weights {WEIGHTS_PATH}"
    m = load_pretrained("cpu", torch.float32)
    assert 10e6 < sum(p.numel() for p in m.parameters()) < 12e6
    assert type(m.transformer).__name__ == "FluxTransformer2DModel"
    x, labels = data.generate_batch(4, seed=123)
    loss = _flow_loss(m, x, labels, torch.tensor([0.2, 0.4, 0.6, 0.8]))
    assert loss < 0.15, loss  # trained: ~0.05; an untrained model gives ~1


def test_shipped_128_weights_load_and_denoise():
    """The 128x128 model (4096 image tokens, the fidelity benchmark's larger model) is shipped and trained."""
    path = os.path.join(os.path.dirname(WEIGHTS_PATH), "tiny_flux_128.safetensors")
    assert os.path.exists(path), f"missing shipped weights {path}"
    m = load_pretrained("cpu", torch.float32, path)
    assert m.config.image_size == 128 and m.config.num_image_tokens == 4096
    x, labels = data.generate_batch(2, seed=123, size=128)
    loss = _flow_loss(m, x, labels, torch.tensor([0.3, 0.7]))
    assert loss < 0.15, loss  # trained: ~0.03; an untrained model gives ~1


def test_training_with_a_low_resolution_phase(tmp_path):
    """--low-res-minutes trains at half the size first, then at full size, and writes loadable weights."""
    import json

    from examples.tiny_dit.train import main, merge_parts

    main(["--image-size", "32", "--low-res-minutes", "0.01", "--minutes", "0.03", "--batch", "2",
          "--sample-steps", "1", "--split", "--out", str(tmp_path)])
    with open(tmp_path / "train_log.json") as f:
        log = json.load(f)
    assert log["image_size"] == 32
    assert [e["size"] for e in log["log"]][:1] == [16] and log["log"][-1]["size"] == 32, log["log"]
    m = merge_parts(str(tmp_path), str(tmp_path / "w.safetensors"))
    assert m.config.num_image_tokens == 256 and (tmp_path / "samples.png").exists()


# ---- the video variant ---------------------------------------------------------------------------
VIDEO = TinyDiTConfig(num_layers=1, num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=32,
                      image_size=16, frames=4)


def test_video_data_moves_and_starts_at_the_image():
    v1, l1 = data.generate_video_batch(6, seed=5, frames=8, size=32)
    v2, l2 = data.generate_video_batch(6, seed=5, frames=8, size=32)
    img, labels = data.generate_batch(6, seed=5, size=32)
    assert v1.shape == (6, 8, 3, 32, 32) and torch.equal(v1, v2) and torch.equal(l1, l2)
    assert torch.equal(v1[:, 0], img) and torch.equal(l1, labels)  # frame 0 is the still scene of the seed
    step = (v1[:, 1:] - v1[:, :-1]).abs().flatten(2).mean(2)  # (B, 7): every frame moves, a little
    assert (step > 0.003).all() and (step < 0.15).all(), step
    # motion accumulates: the last frame is further from the first than the second is
    far, near = (v1[:, -1] - v1[:, 0]).abs().mean(), (v1[:, 1] - v1[:, 0]).abs().mean()
    assert far > 2 * near


def test_video_packing_ids_and_sampling():
    x = torch.randn(2, 4, 3, 16, 16)
    tok = patchify_video(x, 2)
    assert tok.shape == (2, 4 * 64, 12)
    assert torch.equal(tok[:, 64:128], patchify(x[:, 1], 2))  # frame-major: frame 1's tokens follow frame 0's
    assert torch.equal(unpatchify_video(tok, 4, 16, 16, 2), x)
    ids = make_img_ids(8, 8, frames=4)
    assert ids.shape == (256, 3) and ids[64 + 9].tolist() == [1.0, 1.0, 1.0]  # (frame, row, col)
    assert torch.equal(make_img_ids(8, 8), ids[:64])  # an image: frame 0, Flux's ids unchanged
    m = TinyDiT(VIDEO, zero_init=False).eval()
    assert m.config.num_image_tokens == 256 and m.position_ids()["img_ids"].shape == (256, 3)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    out = sample_classes(m, [1, 2], steps=2, seed=0)
    assert out.shape == (2, 4, 3, 16, 16) and torch.isfinite(out).all()


def test_video_model_grouped_in_voxels():
    """chipmunk reads the (frame, row, col) ids as a t×h×w grid and groups in the video presets' voxels."""
    import chipmunk_compile

    m = TinyDiT(VIDEO, zero_init=False).eval()
    cond, ids = m.class_condition([1]), m.position_ids()
    report = chipmunk_compile.inspect(m.transformer, hidden_states=torch.randn(1, 256, 12), timestep=torch.ones(1),
                                      return_dict=False, config={"preset": "hunyuan-video", "attn": {"min_tokens": 0}},
                                      **cond, **ids)
    attn = [s for s in report.sites if s.kind == "attention"]
    assert len(attn) == 2 and all("position ids input img_ids t×h×w 4×8×8" in s.grouping for s in attn), \
        [s.grouping for s in attn]
    assert all("text 8 first" in s.grouping for s in attn)


def test_shipped_video_weights_load_and_denoise():
    """The video model (8 frames of 32x32, 2048 tokens) is shipped and trained on moving shapes."""
    assert os.path.exists(VIDEO_WEIGHTS_PATH), f"missing shipped weights {VIDEO_WEIGHTS_PATH}"
    m = load_pretrained("cpu", torch.float32, VIDEO_WEIGHTS_PATH)
    assert m.config.frames == 8 and m.config.num_image_tokens == 2048
    x, labels = data.generate_video_batch(2, seed=123, frames=8, size=32)
    loss = _flow_loss(m, x, labels, torch.tensor([0.3, 0.7]))
    assert loss < 0.15, loss  # trained: ~0.055 at the end of training; an untrained model gives ~1


def test_video_ssim_is_the_mean_over_frames():
    from chipmunk_compile.metrics import psnr, ssim

    a = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    b = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    frames = [ssim(a[:, f], b[:, f]) for f in range(3)]
    assert abs(ssim(a, b) - sum(frames) / 3) < 1e-12
    assert abs(psnr(a[:1], b[:1]) - psnr(a[0].reshape(1, -1), b[0].reshape(1, -1))) < 1e-9  # all pixels of a video
