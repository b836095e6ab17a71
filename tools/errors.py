"""The exception hierarchy of the domain layer.

Adapters translate these: the CLI prints one line and exits non-zero, the chat agent
returns a tool message, the MCP server raises ToolError.
"""

from __future__ import annotations


class FacsynthError(Exception):
    """Base class of every error facsynth raises on purpose."""


class DataError(FacsynthError):
    """A dataset file or row is malformed; the message names file, line and field."""


class ModelError(FacsynthError):
    """A model or tokenizer cannot be found or loaded."""


class SAEError(FacsynthError):
    """An SAE cannot be found, loaded or does not fit the model."""


class ConfigError(FacsynthError):
    """A setting has an invalid value."""
