"""Where a decode step's time goes: torch.profiler over a few steps, grouped by stage.

    python -m megatron_dmc.bench.profile --batch 16 --context 1024 --cr 4 --backend blocked

SmolLM2-135M's real weights (the asset cache); the cache of one prefilled prompt is copied
to every row (bench/fill.py). Stages: q/k/v/o projections, DMC decisions (with the query
RoPE), cache write, attention, MLP, LM head, the rest (norms, residuals, embedding,
argmax), and the Python/dispatch overhead inside all of them (step time outside every aten
op and the compiled kernel). Profiler times are wall time; the step's process CPU time
without the profiler is printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from megatron_dmc.bench.workloads import filled_decode, smollm2_model, with_mode

STAGES = {
    "projections": "decode.projections",
    "decisions": "decode.decisions",
    "cache write": "decode.cache_write",
    "attention": "decode.attention",
    "MLP": "decode.mlp",
    "LM head": "decode.lm_head",
}


@contextlib.contextmanager
def module_scopes(model: torch.nn.Module) -> Iterator[None]:
    """record_function ranges around the projections, MLPs and LM head (forward hooks)."""
    handles, open_ranges = [], []
    names = {"q_proj": "projections", "k_proj": "projections", "v_proj": "projections",
             "o_proj": "projections", "mlp": "MLP", "lm_head": "LM head"}  # fmt: skip
    for name, module in model.named_modules():
        stage = names.get(name.rsplit(".", 1)[-1])
        if stage is None:
            continue

        def enter(_module, _inputs, label=STAGES[stage]):
            scope = record_function(label)
            scope.__enter__()
            open_ranges.append(scope)

        def leave(_module, _inputs, _output):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def breakdown(prof, steps: int) -> dict[str, float]:
    """ms per step of each stage, the rest, Python overhead and the whole step (profiler)."""
    events = {e.key: e for e in prof.key_averages()}
    per_step = {k: events[v].cpu_time_total / 1e3 / steps if v in events else 0.0
                for k, v in STAGES.items()}  # fmt: skip
    total = events["decode.step"].cpu_time_total / 1e3 / steps
    in_ops = sum(e.self_cpu_time_total for k, e in events.items() if not k.startswith("decode."))
    per_step["other ops"] = total - sum(per_step.values())
    per_step["of which Python/dispatch overhead"] = total - in_ops / 1e3 / steps
    per_step["step"] = total
    return per_step


def profile_decode(model, batch: int, context: int, steps: int, backend: str) -> dict:
    """Breakdown of `steps` profiled decode steps after one untimed warm-up step."""
    run = filled_decode(model, batch, context, steps + 2)
    run.step(backend)
    start = time.process_time()
    run.step(backend)
    cpu_ms = 1e3 * (time.process_time() - start)
    with module_scopes(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("decode.step"):
                run.step(backend)
    return {"cpu_ms_unprofiled": cpu_ms, **breakdown(prof, steps)}


def markdown(label: str, result: dict) -> str:
    step = result["step"]
    lines = [f"| {label} | profiler ms/step | share |", "| --- | ---: | ---: |"]
    for key, ms in result.items():
        if key not in ("step", "cpu_ms_unprofiled"):
            lines.append(f"| {key} | {ms:.1f} | {100 * ms / step:.0f}% |")
    lines.append(f"| **step (profiler wall)** | {step:.1f} | 100% |")
    lines.append(f"| step, process CPU time, unprofiled | {result['cpu_ms_unprofiled']:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cr", type=float, nargs="*", default=[0, 4], help="0 = vanilla; else FORCED")
    p.add_argument("--backend", nargs="*", default=["padded"])
    args = p.parse_args(argv)
    if args.batch < 1 or args.context < 1 or args.steps < 1:
        raise SystemExit("error: --batch, --context and --steps must be >= 1")
    torch.set_num_threads(1)
    model = smollm2_model()
    for cr in args.cr:
        mode = None if cr == 0 else float(cr)
        for backend in args.backend:
            label = "vanilla" if mode is None else f"DMC FORCED {cr:g}x"
            result = profile_decode(with_mode(model, mode), args.batch, args.context, args.steps,
                                    backend)  # fmt: skip
            print(f"\n{label}, backend {backend}, batch {args.batch}, context {args.context}")
            print(markdown(f"{label} ({backend})", result), flush=True)


if __name__ == "__main__":
    main()
