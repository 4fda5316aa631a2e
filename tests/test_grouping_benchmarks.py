"""The grouping benchmarks run and report what they claim, at a few steps on the trained tiny DiT:
benchmarks/aspect_grouping.py (the regrouped arm equals compiling at that ratio, the stale one
kept the compiled grid) and benchmarks/regional_grouping.py (regional blocks grouped on the
rotary grid, or not at all with grouping off)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import fresh_dynamo  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("diffusers")
if not os.path.exists(os.path.join(ROOT, "examples", "tiny_dit", "weights", "tiny_flux.safetensors")):
    pytest.fail("the trained tiny DiT's weights are missing from the checkout")


def test_aspect_grouping(tmp_path, fresh_dynamo):
    import aspect_grouping

    rows = {r["arm"]: r for r in aspect_grouping.main(["--classes", "0", "--steps", "4", "--out", str(tmp_path)])}
    assert rows["regrouped"]["psnr_db"] == rows["direct"]["psnr_db"]
    assert rows["regrouped"]["rel_err_tokens"] == rows["direct"]["rel_err_tokens"]
    assert rows["stale"]["rel_err_tokens"] != rows["direct"]["rel_err_tokens"]
    assert "64×16" in rows["regrouped"]["grouping"] and "16×64" in rows["stale"]["grouping"]
    saved = json.load(open(tmp_path / "aspect_grouping_tiny_flux.json"))
    assert [r["arm"] for r in saved["rows"]] == ["regrouped", "stale", "direct"]


def test_regional_grouping(tmp_path, fresh_dynamo):
    import regional_grouping

    rows = {r["arm"]: r for r in regional_grouping.main(["--classes", "0", "--steps", "4", "--out", str(tmp_path)])}
    assert rows["regional"]["grouping"].startswith("rotary table input image_rotary_emb (cos, sin)")
    assert rows["regional-ungrouped"]["grouping"] == "none: grouping disabled"
    assert rows["whole"]["grouping"].startswith("position ids input img_ids")
    assert all(r["sparse_attention_calls"] > 0 for r in rows.values())
    assert (tmp_path / "regional_grouping_tiny_flux.csv").exists()


def test_zoo_resolutions(fresh_dynamo):
    """benchmarks/zoo_resolutions.py on three rows: a conv-embedded DiT and a per-frame conv video DiT run
    at three sizes with nothing ungrouped (CogVideoX on t×h×w, per call), a packed-token latent is
    skipped, and a model whose other inputs are tied to its size says so."""
    import zoo_resolutions

    sd3, cog, flux, dit = (zoo_resolutions.measure(k) for k in ("sd3", "cogvideox", "flux", "dit"))
    assert sd3["status"] == cog["status"] == "ok" and sd3["ungrouped"] == cog["ungrouped"] == "0 0 0"
    assert cog["no_grid"] == "0/4 0/4 0/4" and "t×h×w (symbolic) 3×" in cog["grids"], cog
    assert flux["status"].startswith("skipped") and dit["status"].startswith("eager fails at 16×24 too"), (flux, dit)
