"""The exception hierarchy of the domain layer.

Adapters translate these: the CLI prints one line and exits non-zero, the chat agent
returns an error tool message, the MCP server raises ToolError. Anything that is not a
FacsynthError is a bug: the chat and the MCP server log its traceback and report it as an
internal error, never as the caller's mistake.
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


class UsageError(FacsynthError):
    """Bad arguments to a tool or command: the message says which and what would work."""


class FileAccessError(FacsynthError, OSError):
    """A file or folder cannot be read or written (permission denied, a full disk, a folder
    where a file is expected): the environment's problem, not a facsynth bug. It is an
    OSError too, so code that handles failed I/O handles it."""
