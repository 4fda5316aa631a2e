"""The pure parts of benchmarks/bench_resolutions.py: the sizes it alternates and each variant's config."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_resolutions as br  # noqa: E402
from chipmunk_compile.config import ChipmunkConfig  # noqa: E402


def test_sizes_parse_as_height_by_width_in_pixels():
    assert br.parse_sizes("768x1280, 1024X1024") == [(768, 1280), (1024, 1024)]


@pytest.mark.parametrize("text", ["768x1280", "768x1280,1000x1024", "768*1280,1024x1024", "x1024,1024x1024"])
def test_bad_sizes_are_refused_with_the_reason(text):
    with pytest.raises(SystemExit, match="--sizes"):
        br.parse_sizes(text)


def test_variant_configs():
    assert br.config_of(br.BASELINE, "default") is None
    assert ChipmunkConfig.from_any(br.config_of(br.CHIPMUNK, "default")).state_shapes == 2
    one = ChipmunkConfig.from_any(br.config_of(br.SHAPES1, "default"))
    assert one.state_shapes == 1 and one.attn == ChipmunkConfig.from_any("default").attn
