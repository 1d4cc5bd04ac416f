import pytest
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dmc.distributed import destroy_distributed, initialize_distributed


def test_single_process_world_and_bad_sizes():
    try:
        initialize_distributed(seed=3)
        assert dist.get_world_size() == 1
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        with pytest.raises(ValueError, match="not divisible"):
            initialize_distributed(tensor_model_parallel_size=2)
        with pytest.raises(ValueError, match=">= 1"):
            initialize_distributed(pipeline_model_parallel_size=0)
    finally:
        destroy_distributed()
