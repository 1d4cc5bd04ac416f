"""Process CPU time of evaluating DMC vs vanilla on one protocol, side by side in one run.

    python tools/eval_cost.py --model DIR --held-out PREFIX [--samples 2] [--merge-rate 0.5]

The DMC model is the given Llama with DMC config fields and its decision channel (k_proj
row D-1 of every KV head) rescaled so that about `--merge-rate` of the tokens merge: what
is timed is the cost of the compressed cache, not the quality of an untrained rule.
Rows: vanilla through transformers' DynamicCache, vanilla through the paged engine, DMC
through the paged engine (and, with --hf-dmc, DMC through transformers' DMCCache).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_dmc.eval.caches import NativeCache, PagedEngine
from megatron_dmc.eval.methods import load_model
from megatron_dmc.eval.perplexity import continuation_perplexity, strided_perplexity
from megatron_dmc.hf import DMCLlamaForCausalLM, LlamaDMCConfig


def dmc_twin(
    model: torch.nn.Module, merge_rate: float, sample_ids: torch.Tensor, merge_delay: int = 0
):
    """The same weights as a DMC Llama whose channel D-1 merges about `merge_rate` of tokens."""
    config = LlamaDMCConfig(
        **model.config.to_dict(), dmc_window_size=12, dmc_init_val=5.0, dmc_merge_delay=merge_delay
    )
    twin = DMCLlamaForCausalLM(config).eval()
    twin.load_state_dict(model.state_dict(), strict=False)
    groups, dim = config.num_key_value_heads, config.head_dim
    hidden = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda mod, args, out, i=i: hidden.__setitem__(i, args[0])
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(sample_ids[None])
        for hook in hooks:
            hook.remove()
        for i, layer in enumerate(twin.model.layers):
            rows_GDC = layer.self_attn.k_proj.weight.view(groups, dim, -1)
            logit_TG = hidden[i][0] @ rows_GDC[:, dim - 1].T
            # alpha = 1 where the logit exceeds 5: rescale so that `merge_rate` of them do
            signs_2G = torch.stack([torch.ones(groups), -torch.ones(groups)])
            cut_2G = torch.quantile(logit_TG[None] * signs_2G[:, None], 1 - merge_rate, dim=1)
            best_G = cut_2G.argmax(0)
            sign_G = signs_2G.gather(0, best_G[None])[0]
            cut_G = cut_2G.gather(0, best_G[None])[0].clamp_min(1e-3)
            rows_GDC[:, dim - 1] *= (sign_G * 5.0 / cut_G)[:, None]
    return twin


def timed(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--held-out", required=True, help="IndexedDataset prefix")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--merge-rate", type=float, default=0.5)
    parser.add_argument("--hf-dmc", action="store_true")
    parser.add_argument("--merge-delay", type=int, default=0, help="also time DMC with this delay")
    args = parser.parse_args()
    from megatron_dmc.data.gpt_dataset import indexed_tokens

    torch.manual_seed(0)
    tokens = indexed_tokens(args.held_out)
    model = load_model(args.model)
    twin = dmc_twin(model, args.merge_rate, tokens[: args.context])
    runs = [("vanilla/transformers", model, NativeCache("vanilla"))]
    runs += [("vanilla/engine", model, PagedEngine("vanilla"))]
    runs += [("dmc/engine", twin, PagedEngine("dmc"))]
    if args.merge_delay:
        delayed = dmc_twin(model, args.merge_rate, tokens[: args.context], args.merge_delay)
        runs += [(f"dmc-delay{args.merge_delay}/engine", delayed, PagedEngine("dmc"))]
    if args.hf_dmc:
        runs += [("dmc/transformers", twin, NativeCache("dmc"))]
    protocols = {
        "continuation": lambda m, k: continuation_perplexity(
            m, k, tokens, args.context, 128, args.samples
        ),
        "strided": lambda m, k: strided_perplexity(
            m, k, tokens, args.context, args.context // 2, 32, args.context * args.samples
        ),
    }
    rows = []
    for protocol, run in protocols.items():
        for label, m, method in runs:
            result, seconds = timed(run, m, method)
            rows.append(
                dict(
                    protocol=protocol,
                    run=label,
                    cpu_s=round(seconds, 2),
                    ppl=round(result.perplexity, 3),
                    kv_bytes=result.kv_bytes,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    for protocol in protocols:
        cost = {r["run"]: r["cpu_s"] for r in rows if r["protocol"] == protocol}
        for label in [name for name in cost if name.startswith("dmc")]:
            over_engine = cost[label] / cost["vanilla/engine"]
            over_transformers = cost[label] / cost["vanilla/transformers"]
            print(
                f"{protocol}: {label} over vanilla/engine {over_engine:.2f}x, "
                f"over vanilla/transformers {over_transformers:.2f}x"
            )


if __name__ == "__main__":
    main()
