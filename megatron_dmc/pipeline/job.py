"""The main job as a chain of steps:

assets -> import HF into Megatron -> (zero_out, channel recipes only) -> retrofit + finetune
per trained row (KV method x target CR) -> HF export -> (decision threshold calibration)
-> (GQA pooling -> import -> plain uptraining -> HF export) -> decode
benchmark -> evaluation -> report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from megatron_dmc.data.gpt_dataset import indexed_tokens
from megatron_dmc.pipeline import retrofit
from megatron_dmc.pipeline.assets import Assets, build_assets, write_model_yaml
from megatron_dmc.pipeline.eval_tasks import TASKS_DIR, run_task_evaluation
from megatron_dmc.pipeline.layout import RunLayout, cr_tag, row_key
from megatron_dmc.pipeline.preset import Preset
from megatron_dmc.pipeline.steps import Step, StepRunner

GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class Job:
    """Builds the steps of one preset in one output directory and runs them."""

    def __init__(self, preset: Preset, out_dir: Path, cache_dir: str | None = None) -> None:
        self.preset = preset
        self.layout = RunLayout(Path(out_dir))
        self.cache_dir = cache_dir

    @property
    def assets(self) -> Assets:
        return Assets.load(self.layout.assets_file)

    def steps(self) -> list[Step]:
        lay, rows = self.layout, self.preset.rows()
        steps = [
            Step("assets", "Assets (model, corpus; cached)", self._assets,
                 [lay.assets_file, lay.model_yaml, lay.tiny_hf_dir] if self.preset.model == "tiny"
                 else [lay.assets_file, lay.model_yaml]),
            Step("import", f"Import HF -> Megatron torch_dist (TP={self.preset.tensor_parallel})",
                 self._import, [lay.megatron_dir]),
        ]  # fmt: skip
        if self.preset.uses_zero_out:
            steps.append(Step("zero_out", "Stage 1: zero_out", self._zero_out,
                              [lay.zero_out_dir], True))  # fmt: skip
        recipe = self.preset.train.recipe
        for label, method, cr in rows:
            steps.append(Step(f"retrofit_{row_key(method, cr)}",
                              f"Retrofit + finetune: {label} ({recipe} recipe)",
                              lambda m=method, cr=cr: self._retrofit(m, cr),
                              [lay.train_dir(method, cr)], True))  # fmt: skip
        for label, method, cr in rows:
            steps.append(Step(f"export_{row_key(method, cr)}", f"Export {label} to HF",
                              lambda m=method, cr=cr: self._export(m, cr),
                              [lay.export_dir(method, cr)]))  # fmt: skip
        steps += self._calibrate_steps()
        if self.preset.eval.gqa_kv_heads:
            steps.append(
                Step("gqa", "GQA baseline: mean-pooled KV heads", self._gqa, [lay.gqa_dir])
            )
        if self.preset.eval.gqa_uptrain:
            steps += self._gqa_uptrain_steps()
        steps += [
            Step("decode", "Decode throughput and KV bytes vs vanilla", self._decode, [lay.decode_file]),
            Step("eval", "Evaluation: perplexity, tasks, baselines", self._eval, [lay.eval_dir], True),
            *self._task_steps(),
            Step("report", "Report", self._report, [lay.report, lay.summary, lay.plots_dir]),
        ]  # fmt: skip
        return steps

    def _calibrate_steps(self) -> list[Step]:
        if not self.preset.train.calibrate_cr:
            return []
        from megatron_dmc.eval.calibrate import CALIBRATION_FILE

        length = self.preset.eval.context_len + self.preset.eval.continuation_len
        return [Step(f"calibrate_{row_key(method, cr)}",
                     f"Calibrate {label}: decision threshold for {cr_tag(cr)} at {length} tokens",
                     lambda m=method, cr=cr: self._calibrate(m, cr),
                     [self.layout.export_dir(method, cr) / CALIBRATION_FILE])
                for label, method, cr in self.preset.rows()]  # fmt: skip

    def _gqa_uptrain_steps(self) -> list[Step]:
        lay = self.layout
        return [
            Step("gqa_import", "Import the pooled GQA model -> Megatron", self._gqa_import,
                 [lay.gqa_model_yaml, lay.gqa_megatron_dir]),
            Step("gqa_uptrain", "GQA uptraining: plain attention, the DMC run's steps, data "
                 "and LR schedule", self._gqa_uptrain, [lay.gqa_train_dir], True),
            Step("gqa_export", "Export the uptrained GQA model to HF", self._gqa_export,
                 [lay.gqa_export_dir]),
        ]  # fmt: skip

    def run(
        self,
        force: bool = False,
        redo: tuple[str, ...] = (),
        command: str = "",
        keep: Callable[[str], bool] | None = None,
    ) -> Path:
        """Run the steps (those whose name `keep` accepts, when given); returns report.md."""
        self.command = command
        self._check_preset(force)
        runner = StepRunner(self.layout.done_dir, force, redo)
        for step in self.steps():
            if keep is None or keep(step.name):
                runner(step)
        return self.layout.report

    def _check_preset(self, force: bool) -> None:
        path, current = self.layout.preset_file, dataclasses.asdict(self.preset)
        if path.is_file() and not force and json.loads(path.read_text()) != current:
            raise ValueError(
                f"{self.layout.root} holds outputs of another preset ({path}); "
                "use --force to redo everything there, or another --out"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")

    # ---- the steps
    def _assets(self) -> None:
        assets = build_assets(self.preset, self.layout.tiny_hf_dir, self.cache_dir)
        assets.save(self.layout.assets_file)
        write_model_yaml(assets.hf_dir, self.layout.model_yaml)
        print(f"   model {assets.hf_dir}\n   corpus {assets.train_prefix}")

    def _import(self) -> None:
        from megatron_dmc.convert.commands import import_hf

        import_hf(self.assets.hf_dir, self.layout.megatron_dir, self.preset.tensor_parallel)

    def _zero_out(self) -> None:
        lay = self.layout
        args = retrofit.zero_out_args(
            self.preset, self.assets, lay.model_yaml, lay.megatron_dir, lay.zero_out_dir
        )
        iters = self.preset.train.zero_out_iters
        retrofit.run_training(self.preset.tensor_parallel, args, lay.zero_out_dir, 0, iters)

    def _retrofit(self, method: str, cr: float) -> None:
        lay, t = self.layout, self.preset.train
        first = retrofit.first_iteration(self.preset, method)
        load = lay.zero_out_dir if first else lay.megatron_dir
        args = retrofit.retrofit_args(
            self.preset, self.assets, lay.model_yaml, load, lay.train_dir(method, cr), cr, method
        )
        tp = self.preset.tensor_parallel
        retrofit.run_training(tp, args, lay.train_dir(method, cr), first, t.total_iters(cr))

    def _export(self, method: str, cr: float) -> None:
        from megatron_dmc.convert.commands import export_hf

        out = self.layout.export_dir(method, cr)
        export_hf(self.layout.train_dir(method, cr), out, dmc=True, assets_from=self.assets.hf_dir)
        copy_generation_ids(Path(self.assets.hf_dir) / "config.json", out / "config.json")

    def _calibrate(self, method: str, cr: float) -> None:
        from megatron_dmc.eval.calibrate import (
            CalibrationSettings,
            calibrate_threshold,
            write_calibration,
        )
        from megatron_dmc.eval.methods import load_model

        e, export = self.preset.eval, self.layout.export_dir(method, cr)
        settings = CalibrationSettings(
            cr, e.context_len, e.continuation_len, self.preset.train.calibration_samples
        )
        tokens = indexed_tokens(self.assets.train_prefix)
        calibration = calibrate_threshold(load_model(export), tokens, settings)
        write_calibration(export, calibration)
        print(f"   threshold {calibration.threshold:.3f}: real CR on training text "
              f"{calibration.uncalibrated_cr:.3f} as trained -> {calibration.real_cr:.3f} "
              f"({len(calibration.probes)} probes)")  # fmt: skip

    def _exports(self) -> dict[str, Path]:
        """{row label: HF export} of every trained row."""
        lay = self.layout
        return {label: lay.export_dir(m, cr) for label, m, cr in self.preset.rows()}

    def _gqa(self) -> None:
        from megatron_dmc.eval.gqa import convert_to_gqa

        heads = int(self.preset.eval.gqa_kv_heads or 0)
        convert_to_gqa(self.assets.hf_dir, self.layout.gqa_dir, heads)

    def _gqa_import(self) -> None:
        from megatron_dmc.convert.commands import import_hf

        lay = self.layout
        lay.gqa_model_yaml.parent.mkdir(parents=True, exist_ok=True)
        write_model_yaml(lay.gqa_dir, lay.gqa_model_yaml)
        import_hf(lay.gqa_dir, lay.gqa_megatron_dir, self._gqa_tensor_parallel())

    def _gqa_uptrain(self) -> None:
        lay, t = self.layout, self.preset.train
        budget = self.preset.gqa_budget_cr(self._gqa_cr())
        tp = self._gqa_tensor_parallel()
        args = retrofit.uptrain_args(
            self.preset, self.assets, lay.gqa_model_yaml, lay.gqa_megatron_dir,
            lay.gqa_train_dir, budget, tp,
        )  # fmt: skip
        print(f"   {t.total_iters(budget)} steps: the {cr_tag(budget)} DMC run's budget, TP={tp}")
        retrofit.run_training(tp, args, lay.gqa_train_dir, 0, t.total_iters(budget))

    def _gqa_export(self) -> None:
        from megatron_dmc.convert.commands import export_hf

        out = self.layout.gqa_export_dir
        export_hf(self.layout.gqa_train_dir, out, dmc=False, assets_from=self.layout.gqa_dir)
        copy_generation_ids(self.layout.gqa_dir / "config.json", out / "config.json")

    def _gqa_tensor_parallel(self) -> int:
        """The preset's TP where the pooled KV heads split over it, else the largest TP that
        divides both (the global batch, hence tokens per step, is the same)."""
        return math.gcd(self.preset.tensor_parallel, int(self.preset.eval.gqa_kv_heads or 1))

    def _decode(self) -> None:
        from megatron_dmc.pipeline.decode import run_decode, run_headline, save_results

        exports = self._exports()
        tokens = indexed_tokens(self.assets.held_out_prefix)
        results = run_decode(self.assets.hf_dir, exports, tokens, self.preset.decode)
        save_results(results, self.layout.decode_file)
        run_headline(self.assets.hf_dir, exports, tokens, self.preset.decode,
                     self.layout.decode_file.parent)  # fmt: skip

    def _eval_jobs(self) -> list:
        from megatron_dmc.pipeline.evaluation import eval_jobs

        settings = self.preset.eval
        gqa_cr = self._gqa_cr()
        gqa_dir = self.layout.gqa_dir if gqa_cr else None
        uptrained = self.layout.gqa_export_dir if settings.gqa_uptrain else None
        exports = {(m, cr): self.layout.export_dir(m, cr) for _, m, cr in self.preset.rows()}
        return eval_jobs(self.assets.hf_dir, exports, settings, gqa_dir, gqa_cr, uptrained)

    def _eval(self) -> None:
        from megatron_dmc.pipeline.evaluation import run_evaluation

        tokens = indexed_tokens(self.assets.held_out_prefix)
        run_evaluation(self._eval_jobs(), tokens, self.preset.eval, self.layout.eval_dir)

    def _task_steps(self) -> list[Step]:
        tasks = self.preset.paper_tasks.tasks
        if not tasks:
            return []
        out = self.layout.root / TASKS_DIR
        return [Step("eval_tasks", f"Tasks through each cache: {', '.join(tasks)}",
                     self._eval_tasks, [out], True)]  # fmt: skip

    def _eval_tasks(self) -> None:
        tasks_dir = self.layout.root / TASKS_DIR
        run_task_evaluation(self._eval_jobs(), self.preset.paper_tasks, tasks_dir)

    def _gqa_cr(self) -> float | None:
        heads = self.preset.eval.gqa_kv_heads
        if not heads:
            return None
        config = json.loads((Path(self.assets.hf_dir) / "config.json").read_text())
        return config["num_key_value_heads"] / heads

    def _report(self) -> None:
        from megatron_dmc.pipeline.write_report import write_report

        write_report(self.preset, self.layout, getattr(self, "command", ""))


def copy_generation_ids(source_config: Path, export_config: Path) -> None:
    """Carry bos/eos/pad ids of the source into an export whose config was rebuilt from the
    checkpoint's shape (training checkpoints do not store the source config.json)."""
    source = json.loads(source_config.read_text())
    config = json.loads(export_config.read_text())
    for key in GENERATION_IDS:
        if key in source and key not in config:
            config[key] = source[key]
    export_config.write_text(json.dumps(config, indent=2) + "\n")
