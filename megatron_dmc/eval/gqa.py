"""GQA uptraining baseline, conversion step (Ainslie et al., 2023): an HF Llama directory
-> an HF Llama directory with fewer KV heads, each the mean of a group of the original
K/V heads (checkpoint-level mean pooling of the k_proj/v_proj rows). Uptraining the result
is `python -m megatron_dmc.train --dmc-stage plain` on its imported checkpoint (the main
job's `eval.gqa_uptrain` does all of it, docs/demo.md).

    python -m megatron_dmc.eval.gqa --src SRC_DIR --dst DST_DIR --kv-heads 1

Shapes: G new KV heads, R old KV heads pooled into one, D head dim, E hidden size.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_KV_KEY = re.compile(r"self_attn\.[kv]_proj\.(weight|bias)$")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".index.json")


def check_gqa_target(config: PretrainedConfig, num_kv_heads: int) -> None:
    """Raise ValueError unless the model's KV heads pool evenly into `num_kv_heads`."""
    old = config.num_key_value_heads
    if num_kv_heads < 1 or old % num_kv_heads != 0:
        raise ValueError(
            f"cannot pool {old} KV heads into {num_kv_heads}: pick a divisor of {old} "
            f"(CR = {old} / kv_heads)"
        )


def pool_kv_heads(
    state_dict: dict[str, torch.Tensor], config: PretrainedConfig, num_kv_heads: int
) -> dict[str, torch.Tensor]:
    """Mean-pool every layer's K/V projection into `num_kv_heads` heads (a new dict)."""
    check_gqa_target(config, num_kv_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_key_value_heads // num_kv_heads
    pooled = dict(state_dict)
    for key, tensor in state_dict.items():
        if _KV_KEY.search(key):
            grouped_GRD_ = tensor.reshape(num_kv_heads, group, head_dim, *tensor.shape[1:])
            pooled[key] = grouped_GRD_.float().mean(dim=1).flatten(0, 1).to(tensor.dtype)
    return pooled


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        skip = path.name == "config.json" or path.name.endswith(_WEIGHT_FILES)
        if path.is_file() and not skip and not (dst / path.name).exists():
            shutil.copyfile(path, dst / path.name)


def convert_to_gqa(src_dir: str | Path, dst_dir: str | Path, num_kv_heads: int) -> Path:
    """Write a copy of the HF Llama at src_dir with `num_kv_heads` mean-pooled KV heads."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(src)
    check_gqa_target(config, num_kv_heads)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    state = pool_kv_heads(model.state_dict(), config, num_kv_heads)
    config.num_key_value_heads = num_kv_heads
    pooled = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    pooled.load_state_dict(state, strict=True)
    dst.mkdir(parents=True, exist_ok=True)
    pooled.save_pretrained(dst)
    _copy_side_files(src, dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="HF Llama directory")
    parser.add_argument("--dst", required=True, help="output HF Llama directory")
    parser.add_argument("--kv-heads", type=int, required=True, help="KV heads after pooling")
    args = parser.parse_args(argv)
    print(convert_to_gqa(args.src, args.dst, args.kv_heads))


if __name__ == "__main__":
    from megatron_dmc.cli_errors import run

    raise SystemExit(run(main))
