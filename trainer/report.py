"""Telling the user: a progress bar (loss, lr, it/s, ETA), metrics as JSONL, TensorBoard when installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .loop import StepResult


class Report:
    """Only rank 0 makes one; other ranks get `Report.silent()`."""

    def __init__(self, output: Path, start_step: int, total_steps: int, progress: bool, tensorboard: bool):
        self.metrics_path = Path(output) / "metrics.jsonl"
        self.bar = None
        self._trim(start_step)
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="MaskAttn", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(output) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def _trim(self, start_step: int) -> None:
        """After a resume, drop metrics of steps past the checkpoint: they are about to be redone.

        A line that is not a JSON record (the last one, cut short when a run was killed mid-write)
        is dropped with a note; the checkpoint, not this log, is what resuming relies on.
        """
        if not self.metrics_path.is_file():
            return
        kept, damaged = [], 0
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.get("step", 0))
            except (ValueError, TypeError, AttributeError):  # cut short, or not a record of ours
                damaged += 1
                continue
            if step <= start_step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if damaged:
            self.note(f"{self.metrics_path}: dropped {damaged} damaged line(s) (a run killed mid-write); "
                      "the metrics of the steps before go on")

    def step(self, step: int, result: StepResult, write_metrics: bool) -> None:
        for message in result.notes:
            self.note(f"step {step}: {message}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
            self.bar.update(1)
        if write_metrics:
            record = {"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                      "grad_norm_by_stage": result.grad_norm_by_stage,
                      "step_seconds": round(result.seconds, 6), "data_seconds": round(result.data_seconds, 6)}
            if result.base_loss is not None:
                record["loss_base"] = result.base_loss
            if result.mask_loss is not None:
                record["mask_loss"] = result.mask_loss
            if result.skipped:
                record["skipped"] = "non-finite gradients: no update"
                self.note(f"step {step}: non-finite gradients (loss {result.loss}, gradient norm by stage "
                          f"{result.grad_norm_by_stage}); the update was skipped")
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.writer is not None:
                for key in ("loss", "loss_base", "mask_loss", "lr", "grad_norm", "step_seconds"):
                    if key in record:
                        self.writer.add_scalar(f"train/{key}", record[key], step)
                for stage, norm in result.grad_norm_by_stage.items():
                    self.writer.add_scalar(f"train/grad_norm_{stage}", norm, step)

    def validation(self, step: int, written: list[dict]) -> None:
        """--validate-every: the PNGs of one validation, as a metrics record (and TensorBoard images)."""
        self.metrics.write(json.dumps({"step": step, "validation": written}) + "\n")
        self.metrics.flush()
        self.note(f"validation at step {step}: {Path(written[0]['samples']).parent}" if written else
                  f"validation at step {step}: no prompts")
        if self.writer is not None:
            import numpy
            from PIL import Image

            for index, entry in enumerate(written):
                for key in ("samples", "mask_grid"):
                    with Image.open(entry[key]) as picture:
                        self.writer.add_image(f"validation/{index:02d}_{key}", numpy.asarray(picture.convert("RGB")),
                                              step, dataformats="HWC")

    def validation_failed(self, step: int, error: Exception) -> None:
        why = f"{type(error).__name__}: {error}"
        self.metrics.write(json.dumps({"step": step, "validation_error": why}) + "\n")
        self.metrics.flush()
        self.note(f"validation failed at step {step} ({why}); training goes on without validation")

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()


class SilentReport:
    def step(self, *args, **kwargs) -> None:
        pass

    def validation(self, *args, **kwargs) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
