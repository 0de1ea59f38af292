"""The ``SmoeOpt`` Olive pass: runs smoe-opt's main job on the pass's input model."""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.common.config_utils import ParamCategory
from olive.passes.pass_config import BasePassConfig, PassConfigParam
from olive.resource_path import LocalFile, LocalFolder

import smoe_opt

logger = logging.getLogger(__name__)

__all__ = ["SmoeOpt", "REPORT_NAME"]

#: The report's file name, beside the output model.
REPORT_NAME = "smoe_opt_report.json"

# Pass options that are smoe-opt flags taking a value: option name -> flag.
_VALUE_FLAGS = {
    "keep": "--keep",
    "experts": "--experts",
    "target_size": "--target-size",
    "target_bytes": "--target-bytes",
    "method": "--method",
    "compress": "--compress",
    "pipeline": "--pipeline",
    "calib": "--calib",
    "calib_text": "--calib-text",
    "tokenizer": "--tokenizer",
    "calib_random": "--calib-random",
    "stats": "--stats",
    "seq_len": "--seq-len",
    "batch": "--batch",
    "runtime": "--runtime",
    "eval_data": "--eval-data",
    "holdout": "--holdout",
    "max_error": "--max-error",
    "emit": "--emit",
    "report_html": "--report-html",
}


def _param(type_: Any, description: str, category: Optional[ParamCategory] = None) -> PassConfigParam:
    extra = {"category": category} if category is not None else {}
    return PassConfigParam(type_=type_, default_value=None, description=description, **extra)


class SmoeOpt(Pass):
    """Merges experts guided by routing (MC-SMoE) and/or compresses them into low-rank
    MatMul pairs, base + delta or kept neurons, under a size target; writes an ONNX model
    that any runtime runs, and a report of what changed and how far the outputs moved."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        data = ParamCategory.DATA
        return {
            "keep": _param(float, "Merge to this fraction of each layer's experts (--keep)."),
            "experts": _param(int, "Merge to this number of experts per layer (--experts)."),
            "target_size": _param(
                float, "Compress the routed experts to this fraction of their bytes (--target-size)."
            ),
            "target_bytes": _param(int, "Compress the routed experts to this many bytes (--target-bytes)."),
            "method": _param(str, "Merging method (--method): m-smoe (default), hc-smoe, prune-frequency, prune-reap, average, none."),
            "compress": _param(str, "Compression under target_size (--compress): auto (default), low-rank, base-delta, neurons, none."),
            "pipeline": _param(str, "Execution (--pipeline): auto, one-shot, sequential."),
            "calib": _param(str, "Calibration inputs: an .npz of the model's inputs (--calib).", data),
            "calib_text": _param(str, "Calibration text, cut into --seq-len windows (--calib-text).", data),
            "tokenizer": _param(str, "Hugging Face tokenizer.json for calib_text (--tokenizer).", data),
            "calib_random": _param(int, "N random token sequences as calibration (--calib-random)."),
            "data_free": PassConfigParam(
                type_=bool, default_value=False, description="Reduce from the weights alone (--data-free)."
            ),
            "data_config": PassConfigParam(
                type_=Union[DataConfig, dict],
                default_value=None,
                description=(
                    "Olive data config whose dataloader yields the model's inputs (a dict of arrays or "
                    "tensors, or one array of token ids); its batches are concatenated as calibration data."
                ),
            ),
            "stats": _param(str, "Statistics saved by `smoe-opt calibrate` (--stats).", data),
            "seq_len": _param(int, "Sequence length of text/random calibration windows (--seq-len)."),
            "batch": _param(int, "Calibration batch size (--batch)."),
            "runtime": _param(str, "Runtime for calibration and measurement (--runtime): tract, ort, auto."),
            "eval_data": _param(str, "Held-out inputs (.npz) to measure the result on (--eval-data).", data),
            "holdout": _param(float, "Fraction of the calibration data held out for measuring (--holdout)."),
            "max_error": _param(float, "Fail the pass when the measured error exceeds this (--max-error)."),
            "emit": _param(str, "How reduced experts are written (--emit)."),
            "report_html": _param(str, "Also write the visual report here (--report-html)."),
            "save_as_external_data": PassConfigParam(
                type_=bool,
                default_value=False,
                description="Write the weights to OUT.onnx.<hash>.data beside the model (--external-data).",
            ),
            "extra_args": PassConfigParam(
                type_=list,
                default_value=[],
                description="Further smoe-opt command-line flags, as the CLI spells them.",
            ),
        }

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"SmoeOpt needs an ONNX model, got {type(model).__name__}")
        out = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        out.parent.mkdir(parents=True, exist_ok=True)
        report_path = out.parent / REPORT_NAME
        args = [model.model_path, "-o", str(out), "--report", str(report_path), "-q"]
        for name, flag in _VALUE_FLAGS.items():
            value = getattr(config, name)
            if value is not None:
                args += [flag, str(value)]
        if config.data_free:
            args.append("--data-free")
        if config.save_as_external_data:
            args.append("--external-data")
        with _calibration_arrays(config.data_config) as npz:
            if npz is not None:
                args += ["--calib", npz]
            args += [str(a) for a in config.extra_args]
            logger.info("smoe-opt %s", " ".join(args))
            try:
                smoe_opt.run(*args)
            except (smoe_opt.UsageError, smoe_opt.InputError) as e:
                # Olive stops a workflow on ValueError (a user error); other failures
                # (runtime, --max-error not met, writing) are a failed pass, which Olive
                # logs and, when searching, prunes.
                raise ValueError(f"SmoeOpt: {e}") from e
        report = json.loads(report_path.read_text())
        attributes = dict(model.model_attributes or {})
        attributes["smoe_opt"] = _summary(report, report_path)
        # smoe-opt writes the weights beside the model when asked or when they pass 2 GB.
        if (report.get("saved") or {}).get("data_path"):
            handler_path = LocalFolder({"path": out.parent})
            file_name = out.name
        else:
            handler_path = LocalFile({"path": out})
            file_name = None
        return ONNXModelHandler(
            model_path=handler_path, onnx_file_name=file_name, model_attributes=attributes
        )


@contextlib.contextmanager
def _calibration_arrays(data_config: Any) -> Iterator[Optional[str]]:
    """An Olive data config's batches, concatenated and saved as one temporary .npz (None
    without a data config)."""
    if data_config is None:
        yield None
        return
    import numpy as np

    from olive.common.config_utils import validate_config

    container = validate_config(data_config, DataConfig).to_data_container()
    columns: dict[str, list] = {}
    for batch in container.create_dataloader():
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, dict):
            inputs = {"input_ids": inputs}
        for name, value in inputs.items():
            columns.setdefault(name, []).append(_to_numpy(value))
    if not columns:
        raise ValueError("SmoeOpt: the data config's dataloader yielded no batches")
    arrays = {}
    for name, parts in columns.items():
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"SmoeOpt: input {name!r} has batches of different shapes {sorted(shapes)}; "
                "pad the data config's batches to one sequence length"
            )
        arrays[name] = np.concatenate(parts, axis=0)
    with tempfile.TemporaryDirectory(prefix="smoe-opt-olive-") as tmp:
        # The package's own writer: the same checks as numpy data given to optimize().
        try:
            path = smoe_opt._save_arrays(arrays, Path(tmp))
        except smoe_opt.UsageError as e:
            raise ValueError(f"SmoeOpt: {e}") from e
        yield path


def _to_numpy(value: Any):
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array if array.ndim > 1 else array[None, :]


def _summary(report: dict, report_path: Path) -> dict:
    """The report's headline numbers, for Olive's model attributes."""
    summary: dict[str, Any] = {"report": str(report_path)}
    for key in ("method", "params_before", "params_after", "bytes_before", "bytes_after", "fidelity"):
        if key in report:
            summary[key] = report[key]
    compression = report.get("compression") or {}
    for key in ("family", "fraction"):
        if key in compression:
            summary[f"compression_{key}"] = compression[key]
    return summary
