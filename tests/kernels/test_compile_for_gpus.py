"""The Triton kernels compile, ahead of time, to cubins for A100 (sm_80) and H100 (sm_90).

No GPU is needed: Triton's own toolchain (bundled ptxas) lowers the kernels for a named target.
This catches what the interpreter cannot (type and specialization errors of the real compiler)
on machines, like CI's, that have no GPU. Whether they are fast is for bench/ on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.timing import patience

VQ_GEMV = {
    "x_ptr": "*{x}",
    "perm_ptr": "*i32",
    "words_ptr": "*i32",
    "cb_ptr": "*fp16",
    "tiles_ptr": "*i64",
    "out_ptr": "*fp32",
    "B": "i32",
    "M": "i32",
    "Q": "i32",
    "stride_xb": "i32",
    "stride_ob": "i32",
}
VQ_DEQUANT = {
    "perm_ptr": "*i32",
    "words_ptr": "*i32",
    "cb_ptr": "*fp16",
    "tiles_ptr": "*i64",
    "w_ptr": "*{x}",
    "M": "i32",
    "Q": "i32",
    "stride_wm": "i32",
}
SCALAR_GEMV = {
    "x_ptr": "*{x}",
    "words_ptr": "*i32",
    "scales_ptr": "*fp16",
    "zeros_ptr": "*fp16",
    "out_ptr": "*fp32",
    "B": "i32",
    "M": "i32",
    "N": "i32",
    "n_groups": "i32",
    "bits": "i32",
    "group_size": "i32",
    "stride_xb": "i32",
    "stride_ob": "i32",
}
SCALAR_DEQUANT = {
    "words_ptr": "*i32",
    "scales_ptr": "*fp16",
    "zeros_ptr": "*fp16",
    "w_ptr": "*{x}",
    "M": "i32",
    "N": "i32",
    "n_groups": "i32",
    "bits": "i32",
    "group_size": "i32",
    "stride_wm": "i32",
}
KERNELS = {
    "vq_gemv": (
        "kernels.vq_triton",
        "_vq_gemv_kernel",
        VQ_GEMV,
        {"D": 3, "N_PQ": 2, "FIELDS": 6, "BLOCK_B": 4, "BLOCK_M": 64, "BLOCK_K": 32},
    ),
    "vq_dequant": (
        "kernels.vq_triton",
        "_vq_dequant_kernel",
        VQ_DEQUANT,
        {"D": 3, "N_PQ": 2, "FIELDS": 6, "BLOCK_M": 64, "BLOCK_K": 32},
    ),
    "scalar_gemv": (
        "kernels.scalar_triton",
        "_scalar_gemv_kernel",
        SCALAR_GEMV,
        {"TILE_K": 256, "BLOCK_B": 1, "BLOCK_M": 64, "BLOCK_K": 32},
    ),
    "scalar_dequant": (
        "kernels.scalar_triton",
        "_scalar_dequant_kernel",
        SCALAR_DEQUANT,
        {"BLOCK_M": 64, "BLOCK_K": 64},
    ),
}


ARCHS, DTYPES = (80, 90), ("fp16", "bf16", "fp32")


def compile_all() -> dict[str, str]:
    """{kernel/dtype/sm_arch: "ok" or the compiler's error}. Run in a process without the interpreter."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (module, attr, signature, constants) in sorted(KERNELS.items()):
        fn = getattr(importlib.import_module(module), attr)
        for dtype in DTYPES:
            sig = {k: v.format(x=dtype) for k, v in signature.items()} | dict.fromkeys(constants, "constexpr")
            for arch in ARCHS:
                key = f"{name}/{dtype}/sm_{arch}"
                if list(sig) != fn.arg_names:
                    results[key] = f"signature out of date: {list(sig)} vs {fn.arg_names}"
                    continue
                try:
                    compiled = triton.compile(
                        ASTSource(fn=fn, signature=sig, constexprs=constants), target=GPUTarget("cuda", arch, 32)
                    )
                    ok = bool(compiled.asm["cubin"]) and f"sm_{arch}" in compiled.asm["ptx"]
                    results[key] = "ok" if ok else "no cubin for the target"
                except Exception as exc:  # reported per kernel by the test
                    results[key] = f"{type(exc).__name__}: {exc}"[:2000]
    return results


def test_kernels_compile_to_cubins_for_a100_and_h100() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_compile_for_gpus"],
        env=env,
        capture_output=True,
        text=True,
        timeout=patience(600),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == len(KERNELS) * len(ARCHS) * len(DTYPES)
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert not failed, failed


if __name__ == "__main__":
    sys.stdout.write(json.dumps(compile_all()) + "\n")
