"""TP / PP / DP layouts of the DMC model against one process: loss, gradients, decision sums.

The reference runs in the pytest process (a world of one); its full weights are loaded
into every layout, so all layouts start from the same model. Training mode with Gumbel
noise: the noise is keyed by global microbatch and layer, so it is layout independent.
"""

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_dmc.compat import cpu_device_mode
from megatron_dmc.distributed import destroy_distributed, initialize_distributed
from megatron_dmc.model import build_model
from megatron_dmc.ops import DMCConfig, dms_config
from megatron_dmc.schema.llama import LlamaShape
from tests.dist_utils import run_distributed
from tests.model.helpers import (
    batch_BS,
    grads_by_global_name,
    load_full_state,
    local_slice,
    relative_error,
    run_step,
)

NAME = "tiny_gqa"
NUM_MICROBATCHES = 2


HEADS = DMCConfig(decision_source="heads", merge_delay=3, temperature=1.0)
"""Temperature 1: at 0.1 the Gumbel-sigmoid slope (1/tau) times the heads' scale (100)
turns the layouts' different fp32 summation orders into gradient differences of 1-4e-5,
which says nothing about the parallel plumbing this test checks."""

DMS = dms_config(merge_delay=3, temperature=1.0)
"""DMS (one-token slots, eviction) through the same layer; temperature 1 as above."""

DMS_QUERY = dms_config(merge_delay=3, temperature=1.0, decision_source="query")
"""DMS with the reference's repurposed query neuron (no decision heads)."""


def _reference(dmc_config: DMCConfig | None = None) -> dict:
    initialize_distributed(seed=21)
    try:
        model = build_model(LlamaShape.from_yaml(NAME), "dmc", dmc_config)
        with torch.no_grad():  # k[D-1] near c (or heads of a useful size): mixed decisions
            for layer in model.decoder.layers:
                if dmc_config is not None and dmc_config.uses_heads:
                    layer.self_attention.dmc_decision_proj.weight.normal_(0.0, 0.02)
                    continue
                weight = layer.self_attention.linear_qkv.weight
                if dmc_config is not None and dmc_config.uses_query:
                    weight.view(2, -1, 16, 64)[:, 0, -1] *= 2.0
                    continue
                weight.view(2, -1, 16, 64)[:, -2, -1] *= 400.0
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = run_step(model, batch_BS(NUM_MICROBATCHES))
        return {
            "state": state,
            "grads": grads_by_global_name(model),
            "loss": [d["loss"] for d in losses],
            "alpha_sum": [d["alpha_sum"] for d in losses],
            "dmc_config": dmc_config,
        }
    finally:
        destroy_distributed()


def _layout_errors(reference: dict, tp: int, pp: int, ddp: bool) -> dict:
    initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = build_model(LlamaShape.from_yaml(NAME), "dmc", reference["dmc_config"])
    load_full_state(model, reference["state"])
    tokens_BS = batch_BS(NUM_MICROBATCHES)
    if ddp:
        with cpu_device_mode():
            model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        dp_rank = torch.distributed.get_rank()
        tokens_BS = tokens_BS.split(tokens_BS.shape[0] // 2)[dp_rank]
    losses = run_step(model, tokens_BS)
    if ddp:
        model.finish_grad_sync()
        model = model.module
    errors = {}
    for name, grad in grads_by_global_name(model).items():
        param = dict(model.named_parameters())[_local_name(model, name)]
        errors[f"grad {name}"] = relative_error(grad, local_slice(param, reference["grads"][name]))
    if losses:
        first = torch.distributed.get_rank() if ddp else 0
        ref_loss = reference["loss"][first : first + len(losses)]
        ref_sum = reference["alpha_sum"][first : first + len(losses)]
        errors["loss"] = max(
            abs((d["loss"] - r).item()) / r.item() for d, r in zip(losses, ref_loss)
        )
        errors["alpha_sum"] = max(
            (d["alpha_sum"] - r).abs().max().item() for d, r in zip(losses, ref_sum)
        )
    return errors


def _local_name(model, global_name: str) -> str:
    for layer_index, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{layer.layer_number - 1}."
        if global_name.startswith(prefix):
            return f"decoder.layers.{layer_index}." + global_name[len(prefix) :]
    return global_name


def _all_layouts(references: list[dict]) -> list[list[dict]]:
    """One spawn for every config and layout (ranks are slow to start); the default process
    group stays up and each `initialize_distributed` rebuilds Megatron's groups."""
    layouts = ((2, 1, False), (1, 2, False), (1, 1, True))
    return [[_layout_errors(ref, tp, pp, ddp) for tp, pp, ddp in layouts] for ref in references]


CONFIGS = {
    "channel": None,
    "heads-delay3": HEADS,
    "dms-delay3": DMS,
    "dms-query-delay3": DMS_QUERY,
}


@pytest.fixture(scope="module")
def layout_errors() -> dict[str, tuple[dict, list[list[dict]]]]:
    """Per config: the one-process reference and, per rank, the errors of each layout."""
    references = [_reference(config) for config in CONFIGS.values()]
    per_rank = run_distributed(_all_layouts, world_size=2, args=(references,), timeout_s=900)
    return {
        name: (reference, [by_config[k] for by_config in per_rank])
        for k, (name, reference) in enumerate(zip(CONFIGS, references))
    }


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_pp2_dp2_match_one_process(layout_errors, name):
    reference, per_rank = layout_errors[name]
    assert all(s.sum() > 0 for s in reference["alpha_sum"]), "test needs some merges"
    for rank, layouts in enumerate(per_rank):
        for label, errors in zip(("TP=2", "PP=2", "DP=2"), layouts):
            assert errors, f"{label} rank {rank} compared nothing"
            worst = max(errors, key=errors.get)
            assert errors[worst] <= 1e-5, f"{label} rank {rank}: {worst} off by {errors[worst]:.2e}"
    pp_last = per_rank[1][1]
    assert "loss" in pp_last and "alpha_sum" in pp_last
