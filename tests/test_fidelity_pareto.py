"""benchmarks/fidelity_pareto.py: families, Pareto fronts, front look-ups, paired noise, and the sampler shift."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import fidelity_pareto as fp  # noqa: E402


def test_family_of():
    assert fp.family_of({"preset": "flux"}) == fp.CHIPMUNK
    assert fp.family_of({"preset": "flux", "attn": {"enabled": False}}) == fp.CHIPMUNK
    assert fp.family_of({**fp.OFF, "step_cache": {"enabled": True}}) == fp.STEPCACHE
    assert fp.family_of({"preset": "flux", "step_cache": {"enabled": True}}) == fp.COMBO
    with pytest.raises(ValueError):
        fp.family_of(fp.OFF)
    # every grid entry has a family, and the grid covers all three
    assert {fp.family_of(c) for c in fp.GRID.values()} == set(fp.FAMILIES)


def test_pareto_front():
    pts = [(0.5, 30.0), (0.4, 28.0), (0.6, 29.0), (0.9, 35.0), (0.4, 27.0), (0.7, 35.0), (0.5, 30.0)]
    # (0.6, 29) is beaten by (0.5, 30); (0.9, 35) by (0.7, 35); (0.4, 27) by (0.4, 28); the repeat of (0.5, 30) dropped
    assert fp.pareto_front(pts) == [1, 0, 5]
    assert fp.pareto_front([]) == []
    front = [pts[i] for i in fp.pareto_front(pts)]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(front, front[1:]))


def test_best_within_and_cheapest_at_least():
    pts = [(0.4, 28.0), (0.5, 31.0), (0.8, 30.0), (0.9, 36.0)]
    assert fp.best_within(pts, 0.3) is None
    assert fp.best_within(pts, 0.45) == 0
    assert fp.best_within(pts, 0.85) == 1  # the front does not drop to 30 dB at 0.8
    assert fp.best_within(pts, 1.0) == 3
    assert fp.cheapest_at_least(pts, 30.0) == 1
    assert fp.cheapest_at_least(pts, 32.0) == 3
    assert fp.cheapest_at_least(pts, 40.0) is None


def test_interp_front():
    pts = [(0.6, 36.0), (0.3, 29.0), (0.4, 32.0), (0.35, 20.0)]
    front = fp.pareto_front(pts)
    assert front == [1, 2, 0]
    assert fp.interp_front(pts, front, 0.29) is None
    i, j, w = fp.interp_front(pts, front, 0.35)  # halfway between 29 dB @0.3 and 32 dB @0.4
    assert (i, j) == (1, 2) and w * pts[i][1] + (1 - w) * pts[j][1] == pytest.approx(30.5)
    i, j, w = fp.interp_front(pts, front, 0.55)
    assert (i, j) == (2, 0) and w == pytest.approx(0.25)
    assert fp.interp_front(pts, front, 0.9) == (0, 0, 1.0)


def test_mean_sem_and_paired_delta():
    m, sd, se = fp.mean_sem([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and sd == pytest.approx(math.sqrt(5 / 3)) and se == pytest.approx(sd / 2)
    assert fp.mean_sem([7.0]) == (7.0, 0.0, 0.0)
    # a constant per-image offset has no paired noise, however spread the images are
    d, se = fp.paired_delta([30.0, 20.0, 40.0], [29.0, 19.0, 39.0])
    assert d == pytest.approx(1.0) and se == pytest.approx(0.0)
    with pytest.raises(ValueError):
        fp.paired_delta([1.0], [1.0, 2.0])


def _row(name, fam, flops, per):
    m, sd, se = fp.mean_sem(per)
    return {"setting": name, "family": fam, "flops_ratio": flops, "psnr_db": m, "psnr_sem": se, "psnr_std": sd,
            "psnr_per_image": per, "ssim": 0.9, "seconds": 1.0, "config": {}}


def test_summary_fronts_and_comparisons(tmp_path):
    rows = [_row("sc-a", fp.STEPCACHE, 0.4, [33.0, 35.0]), _row("sc-b", fp.STEPCACHE, 0.6, [36.0, 38.0]),
            _row("cm-a", fp.CHIPMUNK, 0.7, [29.0, 30.0]), _row("cm-b", fp.CHIPMUNK, 0.75, [30.0, 31.0]),
            _row("cm-c", fp.CHIPMUNK, 0.9, [30.0, 32.0]),
            _row("cmsc-a", fp.COMBO, 0.5, [34.0, 37.0]), _row("cmsc-b", fp.COMBO, 0.3, [20.0, 22.0]),
            _row("sc-none", fp.STEPCACHE, 1.0, [math.inf])]  # skipped nothing: equals dense, left out
    s = fp.summarize(rows, 30.0)
    assert s["fronts"] == {fp.STEPCACHE: ["sc-a", "sc-b"], fp.CHIPMUNK: ["cm-a", "cm-b", "cm-c"],
                           fp.COMBO: ["cmsc-b", "cmsc-a"]}
    assert s["best_chipmunk_at_target"]["setting"] == "cm-b"
    a, b = s["combo_vs_fronts"]
    assert a["vs"][0]["reference"] == "sc-a" and a["vs"][0]["delta_db"] == pytest.approx(1.5) and a["vs"][0]["above"]
    # interpolated between sc-a (34 dB @0.4) and sc-b (37 dB @0.6): 35.5 dB at 0.5, so cmsc-a is not above
    assert a["vs"][0]["interp_between"] == ["sc-a", "sc-b"] and a["vs"][0]["interp_psnr_db"] == pytest.approx(35.5)
    assert a["vs"][0]["interp_delta_db"] == pytest.approx(0.0) and not a["vs"][0]["interp_above"]
    assert a["vs"][1]["reference"] is None  # cheaper than every chipmunk point
    assert b["vs"][0]["reference"] is None
    summary = fp.write(str(tmp_path / "p"), {"classes": [0, 1]}, rows, 30.0)
    assert (tmp_path / "p.csv").read_text().count("\n") == len(rows) + 1
    assert fp.plot(rows, summary, str(tmp_path / "p.png"), "t") in ("PIL", "matplotlib")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_dense_call_flops_counts_cpu_attention():
    # The FLOPs ratios of the fidelity benchmarks divide by this count: on CPU, SDPA's flash kernel
    # has no FlopCounterMode formula, and attention used to count as 0.
    import torch
    import torch.nn.functional as F

    from benchmarks.fidelity import dense_call_flops

    B, H, N, D = 1, 2, 96, 32
    q = torch.randn(B, H, N, D)
    w = torch.randn(D, D)
    flops = dense_call_flops(lambda: F.scaled_dot_product_attention(q, q, q) @ w)
    assert flops == 4 * B * H * N * N * D + 2 * B * H * N * D * D


def test_shift_reaches_the_sampler_and_resume_refuses_rows_of_another_shift(tmp_path):
    # --shift spaces the steps as a pipeline's flow shift does (HunyuanVideo: 7); a refresh schedule
    # in steps means other noise levels under another shift, so rows of two shifts never mix
    import json

    import torch

    from benchmarks.fidelity import TinyRunner

    equal, shifted = (TinyRunner("cpu", torch.float32, [0], None, shift=s) for s in (1.0, 7.0))
    a, _ = equal.generate(equal.transformer, steps=3, seed=0)
    b, _ = shifted.generate(shifted.transformer, steps=3, seed=0)
    assert (a - b).abs().max().item() > 1e-2
    meta = {"model": "tiny-dit", "classes": [0], "steps": 3, "seed": 0, "shift": 1.0}
    (tmp_path / "fidelity_pareto.json").write_text(json.dumps({"meta": meta, "rows": [{"setting": "cm-method"}]}))
    with pytest.raises(SystemExit, match="shift"):
        fp.main(["--classes", "0", "--steps", "3", "--shift", "7", "--settings", "cm-default",
                 "--resume", "--out", str(tmp_path)])


def test_resume_refuses_rows_of_another_guidance_and_reads_old_metas_with_defaults(tmp_path):
    # --resume and the dense cache compare one list of sampling fields (until session 55 --resume
    # left out the guidance scale, so rows of two guidance scales could land in one table)
    import json

    meta = {"model": "tiny-dit", "classes": [0], "steps": 3, "seed": 0, "guidance": 2.5, "shift": 1.0}
    (tmp_path / "fidelity_pareto.json").write_text(json.dumps({"meta": meta, "rows": [{"setting": "cm-method"}]}))
    with pytest.raises(SystemExit, match="guidance"):
        fp.main(["--classes", "0", "--steps", "3", "--settings", "cm-default", "--resume", "--out", str(tmp_path)])
    # a meta written before shift (session 54) or guidance existed: their defaults
    assert fp.sampling({"classes": [0], "steps": 3, "seed": 0}) == ([0], 3, 0, None, 1.0)
    assert fp.sampling(meta) != fp.sampling({**meta, "guidance": None})
