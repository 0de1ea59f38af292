"""smoe-opt from Python: merge and compress the experts of Sparse Mixture-of-Experts ONNX
models (MC-SMoE), in-process.

    import smoe_opt
    info = smoe_opt.inspect("model.onnx")                      # dict, as `inspect --json`
    stats = smoe_opt.calibrate("model.onnx", text="corpus.txt", tokenizer="tokenizer.json")
    report = smoe_opt.optimize("model.onnx", "small.onnx", target_size=0.5,
                               text="corpus.txt", tokenizer="tokenizer.json")

Each call runs smoe-opt's command line inside this process (the same flags, checks, atomic
writes and messages as the ``smoe-opt`` binary). Failures raise :class:`SmoeOptError`
subclasses carrying the CLI's message; log records (stages, warnings) go to the
``smoe_opt`` loggers of :mod:`logging`. Calibration data may be given as numpy arrays.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from . import _native
from ._native import (
    DataError,
    InputError,
    QualityError,
    RuntimeFailure,
    SmoeOptError,
    StatsError,
    UsageError,
    WriteError,
)

__all__ = [
    "inspect",
    "calibrate",
    "optimize",
    "render_html",
    "run",
    "Stats",
    "SmoeOptError",
    "UsageError",
    "DataError",
    "StatsError",
    "InputError",
    "RuntimeFailure",
    "QualityError",
    "WriteError",
]

__version__ = _native.version()

PathLike = Union[str, "os.PathLike[str]"]

# onnxruntime (for models tract cannot run) is found through this interpreter's
# `onnxruntime` package, when it has one.
os.environ.setdefault("SMOE_PYTHON", sys.executable)


def run(*args: str) -> None:
    """Runs ``smoe-opt ARGS...`` in this process, e.g. ``run("inspect", "m.onnx")``."""
    _native.run([os.fspath(a) for a in args])


def inspect(path: PathLike) -> dict:
    """The model's summary: opsets, inputs/outputs, op counts, initializers, external data
    and the detected MoE blocks (the JSON of ``smoe-opt inspect --json``)."""
    return json.loads(_native.inspect_json(os.fspath(path)))


def _calibration_args(
    data: Any,
    text: Optional[PathLike],
    tokenizer: Optional[PathLike],
    random: Optional[int],
    data_free: bool,
    seq_len: Optional[int],
    batch: Optional[int],
    runtime: Optional[str],
    tmp: Path,
) -> list:
    given = sum(x is not None for x in (data, text, random)) + bool(data_free)
    if given > 1:
        raise UsageError("give one of data=, text=, random= or data_free=True")
    args: list = []
    if data is not None:
        if isinstance(data, (str, os.PathLike)):
            args += ["--calib", os.fspath(data)]
        else:
            args += ["--calib", _save_arrays(data, tmp)]
    elif text is not None:
        if tokenizer is None:
            raise UsageError("text= needs tokenizer= (a Hugging Face tokenizer.json)")
        args += ["--calib-text", os.fspath(text), "--tokenizer", os.fspath(tokenizer)]
    elif random is not None:
        args += ["--calib-random", str(int(random))]
    elif data_free:
        args += ["--data-free"]
    if seq_len is not None:
        args += ["--seq-len", str(int(seq_len))]
    if batch is not None:
        args += ["--batch", str(int(batch))]
    if runtime is not None:
        args += ["--runtime", runtime]
    return args


def _save_arrays(data: Any, tmp: Path) -> str:
    """numpy calibration data: a mapping of the model's input names to arrays (first axis =
    samples), or one array of token ids (``input_ids``), saved as an .npz for the run."""
    import numpy as np

    if isinstance(data, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in data.items()}
    else:
        arrays = {"input_ids": np.asarray(data)}
    for k, v in arrays.items():
        if v.dtype == object:
            raise UsageError(f"calibration array {k!r} is not numeric")
    path = tmp / "calib.npz"
    np.savez(path, **arrays)
    return os.fspath(path)


class Stats:
    """Routing statistics from :func:`calibrate`: ``path`` (the JSON file, with its ``.npz``
    sidecar beside it) and ``data`` (the JSON as a dict). Pass it to :func:`optimize` as
    ``stats=`` to reduce without calibrating again."""

    def __init__(self, path: PathLike, _tmp: Optional[tempfile.TemporaryDirectory] = None):
        self.path = Path(path)
        self._tmp = _tmp
        self.data = json.loads(self.path.read_text())

    @property
    def layers(self) -> list:
        """Per MoE layer: the block, its expert frequencies and router statistics."""
        return self.data.get("layers", [])

    def frequencies(self) -> list:
        """Each layer's routing frequency per expert."""
        return [l.get("frequency", []) for l in self.layers]

    def save(self, path: PathLike) -> Path:
        """Copies the statistics to ``path`` (JSON) and its sidecar beside it (``.npz``, the
        same stem); returns ``path``."""
        dest = Path(path)
        side = self.path.parent / self.data["sidecar"]
        shutil.copyfile(side, dest.with_suffix(".npz"))
        data = dict(self.data, sidecar=dest.with_suffix(".npz").name)
        dest.write_text(json.dumps(data, indent=2) + "\n")
        return dest

    def __repr__(self) -> str:
        return f"Stats({str(self.path)!r}, layers={len(self.layers)})"


def calibrate(
    path: PathLike,
    data: Any = None,
    *,
    text: Optional[PathLike] = None,
    tokenizer: Optional[PathLike] = None,
    random: Optional[int] = None,
    data_free: bool = False,
    seq_len: Optional[int] = None,
    batch: Optional[int] = None,
    runtime: Optional[str] = None,
    out: Optional[PathLike] = None,
) -> Stats:
    """Runs calibration data through the model and returns each MoE layer's routing
    statistics (``smoe-opt calibrate``). ``data``: an .npz path, a mapping of input names to
    numpy arrays, or one array of token ids; or ``text`` + ``tokenizer``; or ``random=N``
    token sequences; or ``data_free=True``. ``out``: where to keep the statistics (default:
    a temporary folder that lives as long as the returned object)."""
    tmp = tempfile.TemporaryDirectory(prefix="smoe-opt-")
    tmp_path = Path(tmp.name)
    args = ["calibrate", os.fspath(path), "-q"]
    args += _calibration_args(
        data, text, tokenizer, random, data_free, seq_len, batch, runtime, tmp_path
    )
    dest = Path(out) if out is not None else tmp_path / "stats.json"
    args += ["-o", os.fspath(dest)]
    _native.run(args)
    return Stats(dest, tmp if out is None else None)


def optimize(
    path: PathLike,
    out: PathLike,
    *,
    keep: Optional[float] = None,
    experts: Optional[int] = None,
    target_size: Optional[float] = None,
    target_bytes: Optional[int] = None,
    method: Optional[str] = None,
    compress: Optional[str] = None,
    pipeline: Optional[str] = None,
    calib: Any = None,
    text: Optional[PathLike] = None,
    tokenizer: Optional[PathLike] = None,
    random: Optional[int] = None,
    data_free: bool = False,
    stats: Union[Stats, PathLike, None] = None,
    seq_len: Optional[int] = None,
    batch: Optional[int] = None,
    runtime: Optional[str] = None,
    eval_data: Optional[PathLike] = None,
    holdout: Optional[float] = None,
    max_error: Optional[float] = None,
    emit: Optional[str] = None,
    external_data: bool = False,
    report: Optional[PathLike] = None,
    report_html: Optional[PathLike] = None,
    extra_args: Sequence[str] = (),
) -> dict:
    """Merges and/or compresses the model's experts and writes ``out`` (the main job of the
    ``smoe-opt`` command). Returns the run's report: the same dict as ``--report`` writes.

    ``keep``/``experts``: merge to this fraction / number of experts per layer (``method``,
    default m-smoe); ``target_size``/``target_bytes``: compress the routed experts to this
    fraction / number of bytes (``compress``: auto, low-rank, base-delta, neurons, none).
    Calibration: ``calib`` (an .npz path or numpy arrays, as :func:`calibrate`'s ``data``),
    ``text`` + ``tokenizer``, ``random``, ``data_free``, or ``stats`` from :func:`calibrate`.
    ``report``/``report_html``: also keep the JSON report / write the HTML page there.
    ``extra_args``: further command-line flags, as the CLI spells them."""
    with tempfile.TemporaryDirectory(prefix="smoe-opt-") as tmp:
        tmp_path = Path(tmp)
        report_path = Path(report) if report is not None else tmp_path / "report.json"
        args = [os.fspath(path), "-o", os.fspath(out), "--report", os.fspath(report_path), "-q"]
        for flag, value in (
            ("--keep", keep),
            ("--experts", experts),
            ("--target-size", target_size),
            ("--target-bytes", target_bytes),
            ("--method", method),
            ("--compress", compress),
            ("--pipeline", pipeline),
            ("--eval-data", eval_data),
            ("--holdout", holdout),
            ("--max-error", max_error),
            ("--emit", emit),
            ("--report-html", report_html),
        ):
            if value is not None:
                args += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
        if external_data:
            args.append("--external-data")
        if stats is not None:
            args += ["--stats", os.fspath(stats.path if isinstance(stats, Stats) else stats)]
        args += _calibration_args(
            calib, text, tokenizer, random, data_free, seq_len, batch, runtime, tmp_path
        )
        args += [os.fspath(a) for a in extra_args]
        _native.run(args)
        return json.loads(report_path.read_text())


def render_html(report: PathLike, html: PathLike) -> None:
    """Renders a saved ``--report`` JSON file as a self-contained HTML page."""
    _native.run(["report", os.fspath(report), "--html", os.fspath(html), "-q"])
