"""The chipmunk custom ops. Importing this package registers `torch.ops.chipmunk.*`."""

from .attention import attention  # noqa: F401
from .mlp import mlp  # noqa: F401
from .sites import Site  # noqa: F401
