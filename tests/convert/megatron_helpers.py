"""Run a converted checkpoint through Megatron-Core (TP/PP inside gloo ranks) for logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_dmc.convert._model import build_gpt_model
from megatron_dmc.convert.megatron_io import load_into_model
from megatron_dmc.schema.checkpoint import read_metadata
from megatron_dmc.schema.llama import LlamaShape


def megatron_logits(ckpt_dir: str | Path, tokens_BT: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [B, T, V] on the last pipeline stage (None elsewhere).

    Runs at whatever TP/PP the caller initialised; PP stages hand the hidden states on
    with plain send/recv.
    """
    shape = LlamaShape.from_dict(read_metadata(ckpt_dir)["llama"])
    model = build_gpt_model(shape).eval()
    load_into_model(model, ckpt_dir)
    positions_BT = torch.arange(tokens_BT.shape[1]).expand_as(tokens_BT)
    t = tokens_BT.shape[1]
    causal_mask_11TT = torch.ones(1, 1, t, t, dtype=torch.bool).triu(diagonal=1)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden_TBH = torch.empty(tokens_BT.shape[1], tokens_BT.shape[0], shape.hidden_size)
            dist.recv(hidden_TBH, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden_TBH)
        out = model(tokens_BT, positions_BT, attention_mask=causal_mask_11TT)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return _gather_vocab(out)[..., : shape.vocab_size]


def _gather_vocab(logits_BTv: torch.Tensor) -> torch.Tensor:
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits_BTv) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits_BTv.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def hf_logits(hf_dir: str | Path, tokens_BT: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens_BT).logits
