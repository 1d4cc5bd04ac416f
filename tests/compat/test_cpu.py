import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mpu_random

from megatron_dmc.compat import CpuRNGStatesTracker, cpu_device_mode, ensure_cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")


def test_idempotent_and_current_device():
    assert ensure_cpu_compat()
    patched = torch.cuda.current_device
    assert ensure_cpu_compat()
    assert torch.cuda.current_device is patched
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()


def _seeded_tracker() -> CpuRNGStatesTracker:
    ensure_cpu_compat()
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, CpuRNGStatesTracker)
    return tracker


def test_tracker_forks_cpu_generator_and_restores_it():
    tracker = _seeded_tracker()
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork():
        second = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)
    assert not torch.equal(first, second)
    expected = torch.Generator().manual_seed(7 + 2718)
    assert torch.equal(first, torch.rand(3, generator=expected))


def test_recompute_rng_state_is_the_cpu_generator():
    tracker = _seeded_tracker()
    states = mpu_random._get_all_rng_states()
    a = torch.rand(2)
    with tracker.fork():
        b = torch.rand(2)
    mpu_random._set_all_rng_states(*states)
    assert torch.equal(torch.rand(2), a)
    with tracker.fork():
        assert torch.equal(torch.rand(2), b)


def test_cpu_device_mode_rewrites_cuda():
    ensure_cpu_compat()
    with cpu_device_mode():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2, device=0).device.type == "cpu"
        x = torch.arange(3)
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.to(torch.float64).dtype == torch.float64
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(2, device="cuda")
