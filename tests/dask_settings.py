"""compute-api's Dask settings (service/dask.yaml), and what a Dask process actually reads."""

from __future__ import annotations

from typing import Any

import yaml

from bench.processes import DASK_SETTINGS as FILE  # the one path to service/dask.yaml


def project_settings() -> dict[str, Any]:
    """Every setting of service/dask.yaml by its dotted key, e.g. ``distributed.worker.profile.enabled``."""
    def leaves(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out
    return leaves(yaml.safe_load(FILE.read_text()), "")


def variable(key: str) -> str:
    """The DASK_* environment variable that sets ``key``."""
    return "DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split("."))


def read_settings_script(keys: list[str]) -> str:
    """Python source printing, as JSON, the values a fresh ``dask`` process of this environment reads for
    ``keys``, and its ``logging.distributed`` level (distributed imported, as ``dask scheduler`` does)."""
    return (
        "import json, dask.config, distributed\n"
        f"keys = {keys!r}\n"
        "print(json.dumps({'settings': {k: dask.config.get(k) for k in keys},"
        " 'logging': dask.config.config.get('logging', {}).get('distributed')}))\n"
    )
