"""Where inputs and corpora live: a local path, or any URI a pyarrow filesystem opens
(`s3://`, `gs://`, `abfs://`, `hdfs://`; others through fsspec, e.g. `hf://`).

Credentials come from the environment (AWS_*, GOOGLE_*, AZURE_STORAGE_*, HF_*), never from
config; workers on other nodes get them in memory (`storage_env`). An S3-compatible server
is reached with URI options: `s3://bucket/path?endpoint_override=host:9000&scheme=http`.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path inside it) for a URI; (None, the path) for a local one. Raises
    ValueError with the reason when no filesystem takes the URI."""
    if not is_remote(path):
        return None, path.removeprefix("file://")
    try:
        return pafs.FileSystem.from_uri(path)
    except Exception as first:  # pyarrow has no such filesystem: try fsspec's
        try:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(path)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
        except Exception:
            raise ValueError(str(first)) from None


def storage_env() -> dict[str, str]:
    """Object-store credentials and settings from this process's environment, for workers
    on other nodes (in memory only, like API keys)."""
    prefixes = ("AWS_", "GOOGLE_", "AZURE_STORAGE_", "HF_")
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
