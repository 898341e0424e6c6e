"""Gradients of the Triton expert dispatch (kernels/moe_dispatch_backward.py) against the
reference's autograd, compiled on a CUDA GPU when one is present and otherwise on CPU
through TRITON_INTERPRET=1 (both set up in tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton does not import here; the kernels cannot run")

from kernels.moe_dispatch import dispatch_and_combine  # noqa: E402
from kernels.moe_dispatch_backward import dispatch_and_combine_trainable  # noqa: E402
from tests.conftest import DEVICE, DISPATCH_D as D, needs_compiled_triton, relative_error  # noqa: E402
from tests.conftest import dispatch_gradients as gradients, dispatch_problem as make_inputs  # noqa: E402


def assert_gradients_match_reference(x, ids, weights, w_in, w_out, dy, capacity=None):
    y, dropped, grads = gradients(dispatch_and_combine_trainable, x, ids, weights, w_in, w_out,
                                  dy, capacity)
    y_ref, dropped_ref, grads_ref = gradients(dispatch_and_combine, x, ids, weights, w_in, w_out,
                                              dy, capacity)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, grad, grad_ref in zip(("x", "weights", "w_in", "w_out"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5, msg=f"d {name}")
    return dropped.item()


@pytest.mark.parametrize("n,k", [(1, 1), (1, 3), (33, 2), (33, 3)])
def test_dispatch_gradients_equal_reference_autograd(n, k):
    assert assert_gradients_match_reference(*make_inputs(n, k)) == 0


def test_dispatch_gradients_with_empty_experts_are_zero_for_them():
    x, _, weights, w_in, w_out, dy = make_inputs(9, 2)
    ids = torch.tensor([[2, 0]] * 9, device=DEVICE)  # experts 1, 3, 4, 5 get nothing
    assert_gradients_match_reference(x, ids, weights, w_in, w_out, dy)
    _, _, (_, _, d_w_in, d_w_out) = gradients(dispatch_and_combine_trainable, x, ids, weights,
                                              w_in, w_out, dy, None)
    assert d_w_in[[1, 3, 4, 5]].abs().max() == 0 and d_w_out[[1, 3, 4, 5]].abs().max() == 0


@pytest.mark.parametrize("capacity", [1, 5])
def test_dropped_slots_get_no_gradient_like_the_reference(capacity):
    x, ids, weights, w_in, w_out, dy = make_inputs(33, 2)
    ids[:20] = torch.tensor([0, 1], device=DEVICE)  # pile slots onto experts 0 and 1 so they overflow
    assert assert_gradients_match_reference(x, ids, weights, w_in, w_out, dy, capacity) > 0


def test_half_precision_gradients_are_close_to_float32():
    x, ids, weights, w_in, w_out, dy = make_inputs(17, 2)
    _, _, grads = gradients(dispatch_and_combine_trainable, x.half(), ids, weights.half(),
                            w_in.half(), w_out.half(), dy.half(), None)
    _, _, grads_ref = gradients(dispatch_and_combine, x, ids, weights, w_in, w_out, dy, None)
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == torch.float16
        torch.testing.assert_close(grad.float(), grad_ref, rtol=2e-2, atol=2e-2)


def test_an_empty_batch_gives_empty_and_zero_gradients():
    _, _, _, w_in, w_out, _ = make_inputs(1, 2)
    x, ids, weights, dy = (torch.zeros(0, D, device=DEVICE),
                           torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                           torch.zeros(0, 2, device=DEVICE), torch.zeros(0, D, device=DEVICE))
    _, _, (d_x, d_weights, d_w_in, d_w_out) = gradients(
        dispatch_and_combine_trainable, x, ids, weights, w_in, w_out, dy, None)
    assert d_x.shape == (0, D) and d_weights.shape == (0, 2)
    assert d_w_in.abs().max() == 0 and d_w_out.abs().max() == 0


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_are_within_rounding_of_a_float64_reference(dtype):
    x, ids, weights, w_in, w_out, dy = make_inputs(300, 2, seed=5)
    half = [t.to(dtype) for t in (x, weights, w_in, w_out, dy)]
    y, _, grads = gradients(dispatch_and_combine_trainable, half[0], ids, *half[1:], None)
    wide = [t.double() for t in half]
    y_ref, _, grads_ref = gradients(dispatch_and_combine, wide[0], ids, *wide[1:], None)
    for name, got, expect in zip(("y", "x", "weights", "w_in", "w_out"), [y] + grads,
                                 [y_ref] + grads_ref):
        assert got.dtype == dtype, name
        assert relative_error(got, expect) < (2e-2 if dtype == torch.bfloat16 else 4e-3), name
