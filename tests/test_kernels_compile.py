"""Every Triton kernel compiles for an H100 (sm_90), in float32 and bfloat16, on a machine
without a GPU. The interpreter forgives what the compiler refuses (types of loop-carried
values, unsupported ops, dot shapes), and it cannot run bfloat16 dots at all, so this is
the check that the GPU path builds. Runs in a subprocess: the kernels must be compiled
with TRITON_INTERPRET unset, and tests/conftest.py sets it for this process."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton does not import here; nothing to compile")

DTYPES = {"float32": ("fp32", "ieee"), "bfloat16": ("bf16", "tf32")}


def kernel_signatures(dt: str, precision: str):
    """(kernel, pointer types, constexpr values); every other argument is an i32 or fp32."""
    from kernels import attention, attention_backward, moe_dispatch, moe_dispatch_backward
    attention_grad_pointers = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", do_ptr=f"*{dt}",
                                   lse_ptr="*fp32", delta_ptr="*fp32", cu_seqlens_ptr="*i32",
                                   scale="fp32")
    attention_blocks = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=128, PRECISION=precision)
    return [
        (moe_dispatch._up_swiglu_kernel,
         dict(x_ptr=f"*{dt}", w_in_ptr=f"*{dt}", h_ptr=f"*{dt}", sorted_slots_ptr="*i32",
              block_expert_ptr="*i32"),
         dict(BLOCK_M=64, BLOCK_F=64, BLOCK_D=64, PRECISION=precision)),
        (moe_dispatch._down_weighted_kernel,
         dict(h_ptr=f"*{dt}", w_out_ptr=f"*{dt}", out_ptr="*fp32", sorted_slots_ptr="*i32",
              block_expert_ptr="*i32", weight_ptr=f"*{dt}"),
         dict(BLOCK_M=64, BLOCK_D=64, BLOCK_F=64, PRECISION=precision)),
        (attention._varlen_causal_kernel,
         dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", lse_ptr=f"*{dt}",
              cu_seqlens_ptr="*i32", scale_log2="fp32"),
         dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, PRECISION=precision, STORE_LSE=False)),
        (attention._paged_split_kernel,
         dict(q_ptr=f"*{dt}", k_pool_ptr=f"*{dt}", v_pool_ptr=f"*{dt}", block_tables_ptr="*i32",
              seq_lens_ptr="*i32", query_start_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32",
              acc_ptr="*fp32", scale_log2="fp32"),
         dict(BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, PRECISION=precision)),
        (attention._paged_prefill_kernel,
         dict(q_ptr=f"*{dt}", k_pool_ptr=f"*{dt}", v_pool_ptr=f"*{dt}", o_ptr=f"*{dt}",
              block_tables_ptr="*i32", seq_lens_ptr="*i32", query_start_ptr="*i32",
              scale_log2="fp32"),
         dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, PRECISION=precision)),
        (attention._paged_merge_kernel,
         dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", o_ptr=f"*{dt}"),
         dict(BLOCK_S=64, BLOCK_D=128)),
        (moe_dispatch_backward._swiglu_backward_kernel,
         dict(x_ptr=f"*{dt}", dy_ptr=f"*{dt}", w_in_ptr=f"*{dt}", w_out_ptr=f"*{dt}",
              weight_ptr=f"*{dt}", sorted_slots_ptr="*i32", block_expert_ptr="*i32",
              h_ptr=f"*{dt}", dpre_ptr=f"*{dt}", dweight_ptr="*fp32"),
         dict(BLOCK_M=64, BLOCK_F=64, BLOCK_D=64, PRECISION=precision)),
        (moe_dispatch_backward._grouped_weight_grad_kernel,
         dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", out_ptr=f"*{dt}", sorted_slots_ptr="*i32",
              expert_start_ptr="*i32", weight_ptr=f"*{dt}"),
         dict(A_BY_TOKEN=False, B_BY_TOKEN=True, SCALE_B=True, BLOCK_R=64, BLOCK_I=64,
              BLOCK_J=64, PRECISION=precision)),
        (attention._varlen_causal_kernel,  # the backward's forward: STORE_LSE
         dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", lse_ptr="*fp32",
              cu_seqlens_ptr="*i32", scale_log2="fp32"),
         dict(attention_blocks, STORE_LSE=True)),
        (attention_backward._varlen_dkdv_kernel,
         dict(attention_grad_pointers, dk_ptr=f"*{dt}", dv_ptr=f"*{dt}"), attention_blocks),
        (attention_backward._varlen_dq_kernel,
         dict(attention_grad_pointers, dq_ptr=f"*{dt}"), attention_blocks),
    ]


def compile_all(dtype: str) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    dt, precision = DTYPES[dtype]
    for kernel, types, constexprs in kernel_signatures(dt, precision):
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        constants = {(names.index(n),): v for n, v in constexprs.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        print(f"{kernel.fn.__name__} {dtype}: compiled for sm_90")


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}),
                    reason="this triton has no NVIDIA backend to compile with")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_kernel_compiles_for_sm90(dtype):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, __file__, dtype], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled for sm_90") == len(kernel_signatures("fp32", "ieee")), result.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    compile_all(sys.argv[1])
