"""Helpers for the kernel tests (imported by name: tests/kernels is on sys.path under pytest)."""

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in result (unwritten or invalid elements)"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Relative-norm tolerances: fp32 runs IEEE dots (only summation order differs); fp16 rounds
# inputs of the second matmul (P or delta) and the output to 11 bits; bf16 to 8 bits.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# Defined in every compile_for_hopper script: ptxas' resource report of a compiled kernel's PTX.
_PTXAS_PRELUDE = r"""
def ptxas_resources(ptx):  # (spill-store bytes, registers per thread) that ptxas -v reports for sm_90a
    import re, subprocess, tempfile
    import triton.backends.nvidia.compiler as nv
    try:
        ptxas = nv.get_ptxas(90).path
    except TypeError:  # older Triton: no arch argument
        ptxas = nv.get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        open(d + "/k.ptx", "w").write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", d + "/k.ptx", "-o", d + "/k.cubin"],
                           capture_output=True, text=True)
    m, g = re.search(r"(\d+) bytes spill stores", r.stderr), re.search(r"Used (\d+) registers", r.stderr)
    assert m and g, r.stderr[-2000:]
    return int(m.group(1)), int(g.group(1))
"""


def compile_for_hopper(script: str, *args) -> str:
    """Run `script` (which calls triton.compile for sm_90 and asserts on the PTX; it may call
    ``ptxas_resources(ptx)``) in a subprocess without TRITON_INTERPRET, which changes how Triton
    builds a kernel; fails with its stderr. The interpreter accepts code the GPU compiler rejects,
    so CI compiles for the GPU with no GPU. Returns the script's stdout."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _PTXAS_PRELUDE + script, *map(str, args)], env=env, capture_output=True,
                       text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


_COMPILE_ONE = """
import importlib, json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, name, types, consts, warps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
k = getattr(importlib.import_module(module), name)
sig = {**dict(zip(k.arg_names, types)), **{n: "constexpr" for n in k.arg_names[len(types):]}}
out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": warps})
assert ".entry" in out.asm["ptx"]
"""


def compile_kernel_for_hopper(module: str, name: str, types: list, constexprs: dict, warps: int) -> None:
    """``compile_for_hopper`` for one @triton.jit kernel `module.name`: its leading arguments typed by
    `types` (Triton signature strings), the rest constexprs given by `constexprs`."""
    import json

    compile_for_hopper(_COMPILE_ONE, module, name, json.dumps(types), json.dumps(constexprs), warps)
