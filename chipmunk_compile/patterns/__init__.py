"""Pattern registry and the built-in attention / MLP patterns (see `registry.py`)."""

from .registry import (  # noqa: F401
    AttentionMatch, MatchContext, MlpMatch, Pattern, Rejection, register_pattern, registered_patterns,
    unregister_pattern,
)
from . import attention as _attention  # noqa: F401  (registers sdpa, explicit)
from . import mlp as _mlp  # noqa: F401  (registers mlp)
from . import multihead as _multihead  # noqa: F401  (reports nn.MultiheadAttention calls left as they are)
from . import conv_feed_forward as _conv_feed_forward  # noqa: F401  (reports 1x1 conv feed-forwards)
from . import opaque_attention as _opaque_attention  # noqa: F401  (reports attention kernels in custom ops)
from .fx_utils import is_call, is_method  # noqa: F401
