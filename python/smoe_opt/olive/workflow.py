"""Olive's package configuration with ``SmoeOpt`` registered, and running a workflow with it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from olive.package_config import OlivePackageConfig


def package_config() -> dict:
    """Olive's default package configuration with ``SmoeOpt`` added."""
    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config.setdefault("passes", {})["SmoeOpt"] = {
        "module_path": "smoe_opt.olive.smoe_pass.SmoeOpt",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
    }
    return config


def write_package_config(path: Union[str, "os.PathLike[str]"]) -> Path:
    """Writes :func:`package_config` to ``path``, for ``olive run --package-config``."""
    dest = Path(path)
    dest.write_text(json.dumps(package_config(), indent=2) + "\n")
    return dest


def run_workflow(config: Union[str, "os.PathLike[str]", dict], **kwargs: Any) -> Any:
    """Runs an Olive workflow (a JSON path or dict) with ``SmoeOpt`` registered."""
    from olive.workflows import run

    if not isinstance(config, dict):
        config = os.fspath(config)
    return run(config, package_config=package_config(), **kwargs)
