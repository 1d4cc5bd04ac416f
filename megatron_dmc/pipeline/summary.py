"""The job's numbers in one dict (`summary.json`), from the files the steps wrote."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict

import torch

from megatron_dmc.eval.results import ResultRow
from megatron_dmc.pipeline.decode import DecodeResult

LOSS_WINDOW = 5
"""Steps averaged for the LM loss at the start and the end of training."""


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in load],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def training_summary(
    records: list[dict], target_cr: float, seq_tokens: int, layer_head_cr: list | None
) -> dict:
    """What one target's training did: steps, tokens, LM loss start/end, final CR.

    `records` are the zero_out steps followed by this target's retrofit and finetune steps;
    `layer_head_cr` the last step's CR per (layer, KV head) as the checkpoint stores it.
    """
    dmc = [r for r in records if r.get("achieved_cr") is not None]
    last = dmc[-1] if dmc else {}
    losses = [r["lm_loss"] for r in records]
    return {
        "target_cr": target_cr,
        "steps": len(records),
        "tokens": len(records) * seq_tokens,
        "lm_loss_start": _mean(losses[:LOSS_WINDOW]),
        "lm_loss_end": _mean(losses[-LOSS_WINDOW:]),
        "final_target_cr": last.get("target_cr"),
        "final_achieved_cr": last.get("achieved_cr"),
        "cr_reference_length": last.get("cr_reference_length"),
        "final_iteration": last.get("iteration"),
        "layer_head_cr": layer_head_cr,
        "stage_steps": {s: sum(r["stage"] == s for r in records) for s in ("zero_out", "retrofit", "finetune")},
    }  # fmt: skip


def gqa_training_summary(records: list[dict], gqa_cr: float, budget_cr: float, seq_tokens: int):
    """What the GQA uptraining did: its ratio, whose budget it copied, steps, tokens, LM loss."""
    losses = [r["lm_loss"] for r in records]
    return {
        "compression_ratio": gqa_cr,
        "budget_target_cr": budget_cr,
        "steps": len(records),
        "tokens": len(records) * seq_tokens,
        "lm_loss_start": _mean(losses[:LOSS_WINDOW]),
        "lm_loss_end": _mean(losses[-LOSS_WINDOW:]),
    }


def build_summary(
    preset: dict,
    command: str,
    timings: dict,
    training: list[dict],
    rows: list[ResultRow],
    decode: list[DecodeResult],
    gqa_training: dict | None = None,
) -> dict:
    return {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "preset": preset,
        "timings": timings,
        "training": training,
        "gqa_training": gqa_training,
        "results": [asdict(r) for r in rows],
        "decode": [d.as_dict() for d in decode],
    }
