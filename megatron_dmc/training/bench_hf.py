"""The plain-training baseline of the training benchmark: transformers `LlamaForCausalLM`.

The same shape, batch and sequence as the Megatron contenders, one step = forward and
backward over every micro-batch (mean token cross-entropy), the global-norm clip and a
torch AdamW update (foreach, the trainer's CPU optimizer settings). Its weights are
transformers' own random init (its loss is not comparable with the others'; its time is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PlainStep:
    """A transformers model and its optimizer; `__call__` is one training step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    clip_grad: float
    num_microbatches: int

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        """One step; returns the mean LM loss of its micro-batches."""
        total = 0.0
        for _ in range(self.num_microbatches):
            logits_BTV = self.model(input_ids=batch["tokens"]).logits
            loss = F.cross_entropy(logits_BTV.flatten(0, 1), batch["labels"].flatten())
            (loss / self.num_microbatches).backward()
            total += float(loss.detach()) / self.num_microbatches
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


def plain_transformers_step(shape, optim_args, num_microbatches: int, device: str) -> PlainStep:
    """PlainStep for a model `shape` (LlamaShape) and the trainer's OptimizerArgs."""
    import transformers

    from megatron_dmc.schema.llama import hf_config_from_shape

    config = transformers.LlamaConfig(**hf_config_from_shape(shape))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim_args.lr, betas=(optim_args.adam_beta1, optim_args.adam_beta2),
        eps=optim_args.adam_eps, weight_decay=optim_args.weight_decay, foreach=True,
    )  # fmt: skip
    return PlainStep(model, optimizer, optim_args.clip_grad, num_microbatches)
