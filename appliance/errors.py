"""The one error root of the appliance.

    ApplianceError            anything the appliance reports to a person or a client
    ├── ConfigError           appliance.toml is unreadable or invalid
    ├── CatalogError          models.toml is invalid, or a model name is unknown
    ├── StoreError            the model store: missing, corrupt or half-installed models
    │   └── ChecksumMismatch  a file is not the one its source announced (nothing installed)
    ├── EngineError           an engine process would not start or stopped answering
    ├── ClusterError          Ray or the running appliance is not where it should be
    ├── PlanError             nothing the GPUs present can serve the model
    ├── CostError             inputs the break-even cannot use
    └── InstallError          a playbook run failed or could not start

Every message says what went wrong and what to do next. The CLI prints the message
without a traceback (``--debug`` shows it); the gateway turns errors into the OpenAI
error envelope.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class ConfigError(ApplianceError):
    """appliance.toml cannot be read or does not validate."""


class CatalogError(ApplianceError):
    """models.toml does not validate, or a model name is not in it."""


class StoreError(ApplianceError):
    """A model in the store is missing, corrupt or could not be installed."""


class ChecksumMismatch(StoreError):
    """The store's manifest pass found a file whose sha256 is not the one its source
    announced; the install was abandoned. ``path`` is relative to the model directory."""

    def __init__(self, path: str, actual: str, expected: str) -> None:
        super().__init__(
            f"Checksum mismatch for {path}: sha256 {actual}, expected {expected}. "
            "Nothing was installed.",
            hint="The source serves a damaged copy of the file; run the command again, or "
            "install from another copy.",
        )
        self.path = path
        self.actual = actual
        self.expected = expected


class EngineError(ApplianceError):
    """An engine process failed to start, died, or never became healthy."""


class ClusterError(ApplianceError):
    """The Ray cluster or the running appliance is not in the expected state."""


class PlanError(ApplianceError):
    """No configuration of the GPUs present can serve the model."""


class CostError(ApplianceError):
    """The inputs to `appliance cost` are invalid, unreadable, or the chart cannot be written."""


class InstallError(ApplianceError):
    """The installer could not run, or a host failed to install."""
