"""smoe-opt as an Olive pass: ``SmoeOpt`` merges and/or compresses the experts of an ONNX
MoE model inside an Olive workflow, typically between conversion and quantisation.

Olive finds a pass through its package configuration, so a workflow that uses ``SmoeOpt``
is run with Olive's configuration plus this pass::

    python -m smoe_opt.olive workflow.json            # olive.workflows.run, SmoeOpt registered

or, with Olive's own command line::

    python -m smoe_opt.olive --write-package-config smoe_olive.json
    olive run --config workflow.json --package-config smoe_olive.json

In the workflow JSON the pass is ``{"type": "SmoeOpt", "target_size": 0.5, "calib_text":
..., "tokenizer": ...}``; its options are the ``smoe-opt`` flags with ``-`` spelled ``_``
(see :meth:`SmoeOpt._default_config`). Calibration data comes from smoe-opt's own sources
(``calib``, ``calib_text`` + ``tokenizer``, ``calib_random``, ``data_free``, ``stats``) or
from an Olive ``data_config`` whose batches are the model's inputs. The run's report (the
JSON of ``--report``) is written beside the output model as ``smoe_opt_report.json`` and
its headline numbers are kept in the output model's ``model_attributes["smoe_opt"]``.

Importing this module needs ``olive-ai`` (which itself needs torch); ``import smoe_opt``
does not.
"""
from .smoe_pass import REPORT_NAME, SmoeOpt
from .workflow import package_config, run_workflow, write_package_config

__all__ = ["SmoeOpt", "REPORT_NAME", "package_config", "write_package_config", "run_workflow"]
