"""Errors raised by pytest-attn. Each message says what was wrong and what to do about it."""


class AttnError(Exception):
    """Base class of every pytest-attn error."""


class AttnInputError(AttnError, ValueError):
    """An argument is malformed: negative lengths, offsets that do not match the tensors, and so on."""


class UnsupportedCase(AttnError):
    """A backend cannot run this case. ``reasons`` lists why, in the backend's own words."""

    def __init__(self, backend: str, reasons):
        self.backend = backend
        self.reasons = tuple(reasons)
        super().__init__(f"backend {backend!r} does not support this case: " + "; ".join(self.reasons))


class CacheFullError(AttnError, RuntimeError):
    """The paged KV cache has no free page left for the tokens asked for."""


class UnknownBackendError(AttnError, LookupError):
    """A backend name that no module in backends/ and no entry point registers."""


class AttnCheckFailure(AssertionError):
    """A backend's output (or LSE) disagrees with the reference. ``summary`` is the one line a
    report shows for it; the message has the whole comparison."""

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


class AttnDeprecationWarning(DeprecationWarning):
    """A name or form of the public API that goes in the release after next (see CHANGELOG.md)."""


def warn_deprecated(old: str, use: str, stacklevel: int = 3) -> None:
    """Warn, once per call site, that ``old`` goes in the release after next: use ``use``."""
    import warnings

    warnings.warn(f"{old} is deprecated and will be removed in the release after next: use {use}",
                  AttnDeprecationWarning, stacklevel=stacklevel)


# Users meet these by their public name (``pytest_attn.AttnCheckFailure`` in pytest's FAILED line),
# not by the module that happens to define them.
for _exported in (AttnError, AttnInputError, UnsupportedCase, CacheFullError, UnknownBackendError,
                  AttnCheckFailure, AttnDeprecationWarning):
    _exported.__module__ = "pytest_attn"
del _exported
