"""The errors a user can fix.  The CLI prints any :class:`HeteroError` as one paragraph and exits with 2.

Each names the file, field or value at fault and what would have been accepted; a traceback means a bug.
"""
from __future__ import annotations


def reason(err: BaseException, limit: int = 300) -> str:
    """A library's exception in one line for a paragraph: its type and its message, whitespace collapsed."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


class HeteroError(Exception):
    """A problem with the user's input or files, with a message for people."""


class ConfigError(HeteroError, ValueError):
    """A config (family or device profile) or a command-line value that cannot be used."""


class DataError(HeteroError):
    """A dataset that cannot be used as configured (no images, too few classes, bad path)."""


class ManifestError(HeteroError):
    """A family directory that cannot be used: missing stage output, tampered or foreign file, bad manifest."""


class LockError(ManifestError):
    """A directory another writing stage holds."""


class TrainingError(HeteroError):
    """Training that cannot go on: a loss or weights that became NaN or infinite (a diverging run, a broken
    frozen cloud).  Raised before anything of the failing epoch is written."""


class ExportError(HeteroError):
    """An export or runtime step that failed."""


class RuntimeUnavailable(ExportError):
    """The runtime cannot execute this artifact on this host (CoreML outside macOS, a missing package).

    Verification reports the numeric checks as skipped with this reason, never as passed.
    """


class PlatformUnavailable(RuntimeUnavailable):
    """The runtime executes only on another platform (CoreML: macOS), so no install on this host can run it.

    Its skipped checks are not counted by `verify --strict` (no machine of this kind could run them); the
    report says which platform runs them.
    """

    def __init__(self, message: str, platform: str):
        super().__init__(message)
        self.platform = platform


class CalibrationError(HeteroError):
    """An early-exit rule that cannot be calibrated or applied as asked (an unmeetable target, thresholds
    that stop nothing)."""
