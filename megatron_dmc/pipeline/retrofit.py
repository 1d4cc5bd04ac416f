"""Training launches of the job: `python -m megatron_dmc.train` under torchrun.

Every launch is a subprocess under `torch.distributed.run` with one rank per tensor-parallel
shard, so TP=2 really runs two ranks; its console goes to `train.log` in the run
directory and a progress bar follows its `metrics.jsonl`. A launch resumes from the
checkpoints in its own run directory, so an interrupted job continues where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from megatron_dmc.pipeline.assets import Assets
from megatron_dmc.pipeline.preset import Preset
from megatron_dmc.pipeline.recipes import recipe_flags

LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"


def shared_args(preset: Preset, assets: Assets, model_yaml: Path, tensor_parallel: int):
    """Model, layout, batch, seed, LR and data: what every training launch of the job shares."""
    t = preset.train
    values = {
        "--model": model_yaml,
        "--tensor-model-parallel-size": tensor_parallel,
        "--seq-length": t.seq_length,
        "--micro-batch-size": t.micro_batch_size,
        "--global-batch-size": t.global_batch_size,
        "--seed": t.seed,
        "--lr": t.lr,
        "--min-lr": t.min_lr,
        "--data-path": assets.train_prefix,
        "--tokenizer-dir": assets.tokenizer_dir,
        "--log-interval": 1,
    }
    return [str(item) for pair in values.items() for item in pair]


def common_args(
    preset: Preset, assets: Assets, model_yaml: Path, target_cr: float, method: str = "dmc"
) -> list[str]:
    """Flags shared by the zero_out launch and the retrofit launches: the recipe, the
    schedule, then `train.extra_args` (last, so they win)."""
    t = preset.train
    ramp, zero_out = t.ramp_iters(target_cr), preset.uses_zero_out
    values = {
        "--kv-method": method,
        "--dmc-target-cr": target_cr,
        "--dmc-zero-out-iters": t.zero_out_iters if zero_out else 0,
        "--dmc-zero-out-anneal-iters": t.zero_out_anneal_iters if zero_out else 0,
        "--dmc-ramp-iters": ramp,
        "--dmc-retrofit-iters": ramp + t.hold_for(target_cr, zero_out),
        "--dmc-finetune-iters": t.finetune_iters,
    }
    if t.cr_at_eval_length and preset.recipe_values().get("dmc_merge_delay", 0):
        values["--dmc-cr-reference-length"] = preset.eval.context_len + preset.eval.continuation_len
    args = [str(item) for pair in values.items() for item in pair]
    base = shared_args(preset, assets, model_yaml, preset.tensor_parallel)
    recipe = recipe_flags(t.recipe)
    return [*base, *recipe, *args, "--log-per-head-cr", *t.extra_args]


def zero_out_args(preset: Preset, assets: Assets, model_yaml: Path, megatron_dir: Path, save: Path):
    """Stage 1 from the imported checkpoint (weights only)."""
    base = common_args(preset, assets, model_yaml, preset.target_crs[0])
    return [*base, "--dmc-stage", "zero_out", "--load", str(megatron_dir), "--finetune",
            "--save", str(save)]  # fmt: skip


def retrofit_args(
    preset: Preset,
    assets: Assets,
    model_yaml: Path,
    load: Path,
    save: Path,
    cr: float,
    method: str = "dmc",
) -> list[str]:
    """Stages 2 and 3 of one row. With zero_out, from the finished zero_out run at `load`
    (weights, optimizer and progress); without, from the imported checkpoint at `load`
    (weights only) at iteration 0."""
    base = common_args(preset, assets, model_yaml, cr, method)
    start = [] if preset.uses_zero_out and method == "dmc" else ["--finetune"]
    return [*base, "--dmc-stage", "all", "--load", str(load), *start, "--save", str(save)]


def first_iteration(preset: Preset, method: str) -> int:
    """The iteration a row's retrofit launch starts after (zero_out's steps, or 0)."""
    return preset.train.zero_out_iters if preset.uses_zero_out and method == "dmc" else 0


def uptrain_args(
    preset: Preset,
    assets: Assets,
    model_yaml: Path,
    megatron_dir: Path,
    save: Path,
    target_cr: float,
    tensor_parallel: int,
) -> list[str]:
    """Plain continued training from an imported checkpoint (weights only) on the DMC run of
    `target_cr`: its steps, tokens per step, seed and data; LR constant, then decaying over
    the finetune steps. The recipe's flags and `train.extra_args` pass through except the
    DMC-only ones."""
    t = preset.train
    plain = {
        "--dmc-stage": "plain",
        "--plain-iters": t.total_iters(target_cr),
        "--plain-decay-iters": t.finetune_iters,
        "--load": megatron_dir,
        "--save": save,
    }
    args = [str(item) for pair in plain.items() for item in pair]
    base = shared_args(preset, assets, model_yaml, tensor_parallel)
    others = without_dmc_flags([*recipe_flags(t.recipe), *t.extra_args])
    return [*base, *args, "--finetune", *others]


def without_dmc_flags(args: list[str]) -> list[str]:
    """`args` without `--dmc-*` flags and their values (`--dmc-x V` or `--dmc-x=V`)."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg.startswith("--dmc-"):
            skip_value = "=" not in arg
        else:
            kept.append(arg)
    return kept


def launch_command(tensor_parallel: int, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={tensor_parallel}", "-m", "megatron_dmc.train", *train_args]  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records, one per iteration (a resumed launch's repeat wins)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_iteration = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_iteration[record["iteration"]] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def _postfix(record: dict) -> dict[str, str]:
    shown = {"lm": record.get("lm_loss"), "cr": record.get("achieved_cr")}
    shown["target"] = record.get("target_cr")
    return {k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float)}


def run_training(
    tensor_parallel: int, train_args: list[str], run_dir: Path, first: int, last: int
) -> None:
    """Launch, follow iterations first+1..last with a progress bar, raise if it fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / LOG_FILE
    command = launch_command(tensor_parallel, train_args)
    with log.open("a") as out, tqdm(total=last - first, desc="train", unit="step") as bar:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(1.0)
            _update(bar, read_metrics(run_dir), first)
        _update(bar, read_metrics(run_dir), first)
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"training failed (exit {process.returncode}); {log} ends:\n{tail}")


def _update(bar: tqdm, records: list[dict], first: int) -> None:
    mine = [r for r in records if r["iteration"] > first]
    if mine and min(len(mine), bar.total) != bar.n:
        bar.n = min(len(mine), bar.total)
        bar.set_postfix(_postfix(mine[-1]))
