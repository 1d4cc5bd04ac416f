"""Build (or find) every default asset and print where it is and how big.

python -m megatron_dmc.assets [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from megatron_dmc.assets import default_corpus_dataset, eval_data_files, smollm2_hf_dir
from megatron_dmc.assets.eval_data import TASK_DIRS


def _mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the cached default assets.")
    parser.add_argument("--cache-dir", help="default: $MEGATRON_DMC_CACHE or ~/.cache/megatron_dmc")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model_dir = smollm2_hf_dir(args.cache_dir)
    print(f"model   {model_dir}  {_mb(list(model_dir.iterdir())):.1f} MB")
    corpus = default_corpus_dataset(args.cache_dir)
    for prefix in (corpus.train_prefix, corpus.held_out_prefix):
        name = Path(prefix).name
        size = _mb([Path(prefix + ".bin"), Path(prefix + ".idx")])
        print(f"corpus  {prefix}  {size:.1f} MB  {corpus.stats[name]}")
    for task in [*TASK_DIRS, "mmlu"]:
        files = eval_data_files(task)
        print(f"eval    {task:14s} {len(files):2d} file(s)  {_mb(files):.1f} MB")
    print(f"ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
