"""The Triton expert dispatch against its reference (kernels/moe_dispatch.py), compiled on
a CUDA GPU when one is present and otherwise on CPU through TRITON_INTERPRET=1 (both set
up in tests/conftest.py), and the backend switch."""

import pytest
import torch

pytest.importorskip("triton", reason="triton does not import here; the kernels cannot run")

from kernels.backend import resolve_backend, use_triton  # noqa: E402
from kernels.moe_dispatch import (align_slots, dispatch_and_combine,  # noqa: E402
                                  dispatch_and_combine_triton)
from moe.config import ConfigError, ModelConfig  # noqa: E402
from moe.model.moe_layer import MoELayer  # noqa: E402
from tests.conftest import (DEVICE, DISPATCH_E as E, dispatch_problem,  # noqa: E402
                            needs_compiled_triton, relative_error, tiny_config)


def make_inputs(n, k, seed=0):
    """x, ids, weights, w_in, w_out of a dispatch case (tests/conftest.py), no gradient."""
    return dispatch_problem(n, k, seed)[:5]


def assert_same_as_reference(x, ids, weights, w_in, w_out, capacity):
    y, dropped = dispatch_and_combine_triton(x, ids, weights, w_in, w_out, capacity)
    y_ref, dropped_ref = dispatch_and_combine(x, ids, weights, w_in, w_out, capacity)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert dropped.item() == dropped_ref.item()
    return dropped.item()


@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (33, 2), (33, 3), (222, 1), (222, 4)])
def test_triton_dispatch_equals_reference(n, k):
    assert assert_same_as_reference(*make_inputs(n, k), capacity=None) == 0


def test_all_tokens_on_one_expert_leaves_the_others_empty():
    x, _, weights, w_in, w_out = make_inputs(33, 2)
    ids = torch.tensor([[2, 0]] * 33, device=DEVICE)  # experts 1, 3, 4, 5 get nothing
    assert_same_as_reference(x, ids, weights, w_in, w_out, capacity=None)
    assert_same_as_reference(x, ids[:, :1], weights[:, :1], w_in, w_out, capacity=None)


@pytest.mark.parametrize("capacity", [1, 5, 12])
def test_capacity_drops_the_same_slots_as_the_reference(capacity):
    x, ids, weights, w_in, w_out = make_inputs(33, 2)
    ids[:20] = torch.tensor([0, 1], device=DEVICE)  # pile slots onto experts 0 and 1 so they overflow
    assert assert_same_as_reference(x, ids, weights, w_in, w_out, capacity) > 0


def test_align_pads_each_expert_to_whole_blocks_of_one_expert():
    ids = torch.tensor([[3, 0], [3, 1], [3, 0], [2, 3], [3, 0]], device=DEVICE)  # expert 4 empty
    plan = align_slots(ids, n_experts=5, block_m=4, capacity=3)
    slots, experts = plan.sorted_slots.view(-1, 4), plan.block_expert
    n_slots = ids.numel()
    for block, expert in zip(slots.tolist(), experts.tolist()):
        real = [s for s in block if s < n_slots]
        if expert < 0:
            assert not real
        else:
            assert all(ids.t().reshape(-1)[s].item() == expert for s in real)
    # Runs: expert 0: 3 slots, 1: 1, 2: 1, 3: 5 capped at 3 -> 4 + 4 + 4 + 4 rows.
    assert plan.padded_total.item() == 16 and plan.dropped.item() == 2
    kept_of_3 = sorted(s for s in plan.sorted_slots.tolist() if s < n_slots
                       and ids.t().reshape(-1)[s] == 3)
    assert kept_of_3 == [0, 1, 2]  # first choices of tokens 0..2 win; 4's and 8's are dropped


def test_moe_layer_runs_the_forward_kernel_without_grad_and_the_trainable_one_with_grad(
        monkeypatch):
    monkeypatch.delenv("MOE_KERNEL_BACKEND", raising=False)  # the test picks the backend
    calls = []
    import kernels.ops as ops
    for name in ("dispatch_and_combine_triton", "dispatch_and_combine_trainable"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, name=name, original=original:
                            calls.append(name) or original(*args))
    torch.manual_seed(0)
    layer = MoELayer(tiny_config(kernel_backend="triton")).to(DEVICE)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 9, 32, device=DEVICE)
    with torch.no_grad():
        y_triton, _ = layer(x)
    assert calls == ["dispatch_and_combine_triton"]
    y_grad, _ = layer(x)  # needs gradients: the kernel with a backward runs
    assert calls == ["dispatch_and_combine_triton", "dispatch_and_combine_trainable"]
    torch.testing.assert_close(y_triton, y_grad.detach(), rtol=1e-5, atol=1e-5)


def test_under_autocast_the_experts_run_in_half_precision_and_train_float32_weights(monkeypatch):
    monkeypatch.delenv("MOE_KERNEL_BACKEND", raising=False)  # the test picks the backend
    import kernels.ops as ops
    seen = []
    original = ops.dispatch_and_combine_trainable
    monkeypatch.setattr(ops, "dispatch_and_combine_trainable", lambda x, ids, w, w_in, w_out, c:
                        seen.append((x.dtype, w.dtype, w_in.dtype, w_out.dtype))
                        or original(x, ids, w, w_in, w_out, c))
    torch.manual_seed(0)
    layer = MoELayer(tiny_config(kernel_backend="triton")).to(DEVICE)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 9, 32, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y, _ = layer(x)
    assert seen == [(torch.float16,) * 4] and y.dtype == torch.float16
    y.float().square().sum().backward()
    assert layer.w_in.grad.dtype == torch.float32 and layer.w_in.grad.abs().sum() > 0
    expect, _ = layer(x)  # float32 throughout
    torch.testing.assert_close(y.float(), expect.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_dispatch_under_autocast_computes_in_its_dtype(backend):
    # the one entry point MoELayer and expert parallelism both run their experts through
    from kernels.ops import expert_dispatch
    gen = torch.Generator().manual_seed(3)
    x, w_in, w_out = (torch.randn(*shape, generator=gen).to(DEVICE) * 0.3
                      for shape in ((11, 32), (4, 32, 48), (4, 24, 32)))
    ids = torch.randint(0, 4, (11, 2), generator=gen).to(DEVICE)
    weights = torch.rand(11, 2, generator=gen).to(DEVICE)
    expect, _ = expert_dispatch(x, ids, weights, w_in, w_out, None, "torch")
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y, _ = expert_dispatch(x, ids, weights, w_in, w_out, None, backend)
    assert expect.dtype == torch.float32 and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), expect, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("form", ["dense", "gathered"])
def test_inference_dispatch_forms_return_the_autocast_dtype(form):
    # CUDA autocast runs sum in float32; the forms hand back their operands' dtype
    from kernels.moe_dispatch import dispatch_dense, dispatch_gathered
    fn = dispatch_dense if form == "dense" else dispatch_gathered
    gen = torch.Generator().manual_seed(4)
    x, w_in, w_out = (torch.randn(*shape, generator=gen).to(DEVICE, torch.float16) * 0.3
                      for shape in ((7, 32), (4, 32, 48), (4, 24, 32)))
    ids = torch.randint(0, 4, (7, 2), generator=gen).to(DEVICE)
    weights = torch.rand(7, 2, generator=gen).to(DEVICE, torch.float16)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y, _ = fn(x, ids, weights, w_in, w_out)
    assert y.dtype == torch.float16


def test_backend_resolution_and_environment_override(monkeypatch):
    monkeypatch.delenv("MOE_KERNEL_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", DEVICE) == ("triton" if DEVICE.type == "cuda" else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"  # allowed under TRITON_INTERPRET=1
    monkeypatch.setenv("MOE_KERNEL_BACKEND", "torch")
    assert resolve_backend("triton", "cpu") == "torch"
    assert not use_triton("triton", torch.zeros(1))
    monkeypatch.setenv("MOE_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MOE_KERNEL_BACKEND"):
        resolve_backend("auto", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MOE_KERNEL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("auto", "cpu")


def test_config_refuses_an_unknown_backend_by_name():
    with pytest.raises(ConfigError, match="kernel_backend.*auto.*triton.*torch"):
        ModelConfig(kernel_backend="cuda")


def test_half_precision_dispatch_accumulates_in_float32():
    # float16, not bfloat16: the interpreter's tl.dot multiplies bfloat16 bit patterns
    # (triton-lang/triton#11584), so bfloat16 can only be checked on a GPU.
    x, ids, weights, w_in, w_out = make_inputs(33, 2)
    y, _ = dispatch_and_combine_triton(x.half(), ids, weights.half(), w_in.half(), w_out.half(), None)
    y_ref, _ = dispatch_and_combine(x, ids, weights, w_in, w_out, None)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1, 2), (33, 2), (300, 3)])
def test_half_precision_dispatch_is_within_rounding_of_a_float64_reference(dtype, n, k):
    x, ids, weights, w_in, w_out = make_inputs(n, k, seed=n)
    half = [t.to(dtype) for t in (x, weights, w_in, w_out)]
    y, _ = dispatch_and_combine_triton(half[0], ids, *half[1:], None)
    y_ref, _ = dispatch_and_combine(half[0].double(), ids, *(t.double() for t in half[1:]),
                                    None)  # the same rounded inputs, float64 arithmetic
    assert y.dtype == dtype
    assert relative_error(y, y_ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA the refusal is a device-side assert, "
                    "which ends the process's CUDA context")
@pytest.mark.parametrize("bad", [-1, E])
def test_out_of_range_expert_ids_are_refused_on_both_paths(bad):
    x, ids, weights, w_in, w_out = make_inputs(5, 2)
    ids[3, 1] = bad
    for dispatch in (dispatch_and_combine, dispatch_and_combine_triton):
        with pytest.raises(RuntimeError, match=f"expert ids must lie in 0 .. {E - 1}"):
            dispatch(x, ids, weights, w_in, w_out, None)


def test_float64_runs_the_reference_and_the_kernel_refuses_it():
    x, ids, weights, w_in, w_out = (t.double() if t.is_floating_point() else t
                                    for t in make_inputs(5, 2))
    assert not use_triton("triton", x, w_in)  # whatever MOE_KERNEL_BACKEND says
    with pytest.raises(ValueError, match="dispatch_and_combine"):
        dispatch_and_combine_triton(x, ids, weights, w_in, w_out, None)
