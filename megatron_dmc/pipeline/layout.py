"""Where the main job writes everything, under one output directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def cr_tag(target_cr: float) -> str:
    """`2x`, `2.5x`: the name of a target CR in paths and tables."""
    return f"{target_cr:g}x"


def default_out(preset_name: str) -> Path:
    """The main job's default output directory: outputs/demo for the default preset, else
    outputs/<preset>."""
    return Path("outputs") / ("demo" if preset_name == "default" else preset_name)


def row_key(method: str, target_cr: float) -> str:
    """`dmc_2x`, `dms_4x`: a trained row's name in paths, step names and eval files."""
    return f"{method}_{cr_tag(target_cr)}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def preset_file(self) -> Path:
        """The preset the outputs were made with (a re-run with another one is refused)."""
        return self.root / "preset.json"

    @property
    def done_dir(self) -> Path:
        """One JSON marker per finished step (its timings); a step without one re-runs."""
        return self.root / "steps"

    @property
    def assets_file(self) -> Path:
        return self.root / "assets.json"

    @property
    def tiny_hf_dir(self) -> Path:
        return self.root / "tiny_hf"

    @property
    def model_yaml(self) -> Path:
        """The Megatron model shape of the HF source, for `--model`."""
        return self.root / "model.yaml"

    @property
    def megatron_dir(self) -> Path:
        return self.root / "megatron"

    @property
    def zero_out_dir(self) -> Path:
        return self.root / "train" / "zero_out"

    def train_dir(self, method: str, target_cr: float) -> Path:
        return self.root / "train" / row_key(method, target_cr)

    def export_dir(self, method: str, target_cr: float) -> Path:
        return self.root / "export" / row_key(method, target_cr)

    @property
    def ablation_dir(self) -> Path:
        """Where `python -m megatron_dmc.pipeline.ablation` writes by default; the report
        includes its table when `ablation.json` is there."""
        return self.root / "ablation"

    @property
    def gqa_dir(self) -> Path:
        """The mean-pooled GQA model (HF)."""
        return self.root / "gqa_hf"

    @property
    def gqa_model_yaml(self) -> Path:
        """The Megatron model shape of the pooled model."""
        return self.root / "gqa" / "model.yaml"

    @property
    def gqa_megatron_dir(self) -> Path:
        return self.root / "gqa" / "megatron"

    @property
    def gqa_train_dir(self) -> Path:
        return self.root / "train" / "gqa"

    @property
    def gqa_export_dir(self) -> Path:
        """The uptrained GQA model (HF)."""
        return self.root / "export" / "gqa"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def decode_file(self) -> Path:
        return self.root / "decode" / "decode.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def summary(self) -> Path:
        """Every number of the report, machine-readable."""
        return self.root / "summary.json"
