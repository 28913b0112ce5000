"""The post-processing node's errors: one base, library errors converted at the edges.

::

    PostprocessError
    ├── SettingsError        a flag or environment value is invalid
    ├── ModelLoadError       a model or its weights cannot be loaded
    ├── ShardError           a download shard is missing, corrupt or disagrees with its parquet
    └── OutputError          an output cannot be written
"""

from __future__ import annotations


class PostprocessError(Exception):
    """Base of every error of ``gpu_postprocess``."""


class SettingsError(PostprocessError):
    """A setting is invalid."""


class ModelLoadError(PostprocessError):
    """A model, a checkpoint or a weights file cannot be loaded."""


class ShardError(PostprocessError):
    """A download shard cannot be read or is inconsistent."""


class OutputError(PostprocessError):
    """An output file cannot be written."""
