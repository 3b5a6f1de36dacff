"""Checkpoint state a resumed run needs beyond the weights (sempa_dist/checkpoint.py)."""

import pytest
import torch

from sempa_dist.checkpoint import restore_rng, rng_state


def draws(device: torch.device) -> torch.Tensor:
    return torch.cat([torch.rand(4), torch.rand(4, device=device).cpu()])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA generator needs a GPU (bench/gpu_check.py checks it there)"))])
def test_rng_state_round_trip_continues_the_same_random_stream(device):
    device = torch.device(device)
    torch.manual_seed(3)
    state = rng_state(device)
    assert set(state) == ({"torch_rng", "cuda_rng"} if device.type == "cuda" else {"torch_rng"})
    expected = draws(device)
    torch.manual_seed(99)  # anything in between
    draws(device)
    restore_rng(state, device)
    assert torch.equal(draws(device), expected)


def test_a_gpu_checkpoint_resumes_on_cpu():
    """A state with a CUDA generator restores the CPU one on a CPU run and ignores the other."""
    torch.manual_seed(5)
    state = {**rng_state(torch.device("cpu")), "cuda_rng": [0] * 16}
    expected = torch.rand(3)
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
