"""pollguard: a transparent ASGI reverse proxy that ends endless 202 polling on stuck jobs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pollguard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
