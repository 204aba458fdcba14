import pytest
import torch

from m3lab.tensors import LiveTensorBytes, optimizer_state_tensors, tensor_bytes


def test_live_bytes_follow_allocations_and_frees():
    base = torch.ones(1000)  # exists before the meter: found through the garbage collector
    with LiveTensorBytes() as meter:
        start = meter.current
        a = torch.zeros(256, 1024)  # 1 MiB
        assert meter.current - start == 2**20
        b = a * 2  # another MiB
        view = b[:10]  # a view adds nothing
        assert meter.current - start == 2 * 2**20
        del a
        assert meter.current - start == 2**20
        assert meter.peak - start == 2 * 2**20
        meter.reset_peak()
        c = base + 1
        assert meter.peak - start == 2**20 + 4000
        del b, view, c
        assert meter.current == start


def test_limit_raises_out_of_memory():
    with pytest.raises(torch.OutOfMemoryError, match="memory limit"):
        with LiveTensorBytes(limit_bytes=0):
            torch.zeros(1024)


def test_optimizer_state_bytes_are_read_from_the_state():
    params = [torch.nn.Parameter(torch.randn(100, 10))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            self.optimizer = inner

    state = optimizer_state_tensors(Wrapper(optimizer))
    assert tensor_bytes(state) == 2 * 1000 * 4 + 4  # exp_avg, exp_avg_sq, step
