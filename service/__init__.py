"""compute-api: answer cheap requests at once, run CPU-heavy ones on an autoscaled Dask cluster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("compute-api")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
