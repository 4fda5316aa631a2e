"""CPU tests of the example tiny DiT (examples/tiny_dit): data, packing, model, sampler, shipped weights."""

import os

import torch

from examples.tiny_dit import data
from examples.tiny_dit.model import (
    WEIGHTS_PATH,
    TinyDiT,
    TinyDiTConfig,
    load_pretrained,
    make_img_ids,
    patchify,
    unpatchify,
)
from examples.tiny_dit.sampler import flow_sigmas, sample, sample_classes

SMALL = TinyDiTConfig(num_layers=1, num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=32)


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
    x0 = m.patchify(x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    with torch.no_grad():
        v = m(xt, t, labels)
    loss = ((v - (noise - x0)) ** 2).mean().item()
    assert loss < 0.15, loss  # trained: ~0.05; an untrained model gives ~1


def test_shipped_128_weights_load_and_denoise():
    """The 128x128 model (4096 image tokens, the fidelity benchmark's larger model) is shipped and trained."""
    path = os.path.join(os.path.dirname(WEIGHTS_PATH), "tiny_flux_128.safetensors")
    assert os.path.exists(path), f"missing shipped weights {path}"
    m = load_pretrained("cpu", torch.float32, path)
    assert m.config.image_size == 128 and m.config.num_image_tokens == 4096
    x, labels = data.generate_batch(2, seed=123, size=128)
    x0 = m.patchify(x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    with torch.no_grad():
        v = m(xt, t, labels)
    loss = ((v - (noise - x0)) ** 2).mean().item()
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
