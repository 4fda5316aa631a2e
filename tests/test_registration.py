"""How `backend="chipmunk"` becomes known to torch.compile: the installed entry point, or, where it
is missing, importing the package (chipmunk_compile/__init__.py). Each case runs in a fresh
interpreter, since a registration cannot be undone inside one."""

import subprocess
import sys

# hides the package's entry point from importlib.metadata, as a source tree on PYTHONPATH (or a pip
# that installed into another interpreter) leaves it
_HIDE_ENTRY_POINT = """
import importlib.metadata as md
_orig = md.entry_points
def _without_chipmunk(**kw):
    eps = _orig(**kw)
    return md.EntryPoints(e for e in eps if e.name != "chipmunk") if kw.get("group") == "torch_dynamo_backends" else eps
md.entry_points = _without_chipmunk
"""


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_installed_entry_point_finds_the_backend_without_an_import():
    out = _run("from torch._dynamo.backends.registry import lookup_backend\n"
               "import sys\n"
               "fn = lookup_backend('chipmunk')\n"
               "print(fn.__module__, 'chipmunk_compile' in sys.modules)")
    assert out.split() == ["chipmunk_compile.backend", "True"], out


def test_without_the_entry_point_importing_the_package_registers_it():
    out = _run(_HIDE_ENTRY_POINT + """
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend
try:
    lookup_backend("chipmunk")
    print("found before import")
except torch._dynamo.exc.InvalidBackend:
    print("unknown before import")
import chipmunk_compile
from chipmunk_compile.backend import chipmunk_backend
print("registered" if lookup_backend("chipmunk") is chipmunk_backend else "other")
chipmunk_compile.register()  # idempotent
print("registered" if lookup_backend("chipmunk") is chipmunk_backend else "other")
""")
    assert out.split("\n")[:3] == ["unknown before import", "registered", "registered"], out
