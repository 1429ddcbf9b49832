"""Calls into a backend that check what comes back, and errors that say whose code failed.

A backend is somebody else's code: it may return None where the contract wants an Availability,
a reason list, a Plan or a Tolerance, or raise from any method. Every call the suite makes goes
through here, so that such a backend fails (or is reported unavailable) with its name, where it
came from (built in, or which package and entry point) and what to fix, and no other backend or
test is affected.
"""
from __future__ import annotations

from typing import Any, Optional

from pytest_attn.core.contract import Availability, Backend, Plan, Tolerance
from pytest_attn.core.errors import AttnError, UnsupportedCase

ORIGIN_ATTR = "_pytest_attn_origin"  # set on each backend by the registry: "built in (backends/x.py)" etc.


class BackendError(AttnError):
    """A backend broke its contract: it raised, or returned something of the wrong kind."""


def origin_of(backend: Any) -> str:
    return getattr(backend, ORIGIN_ATTR, None) or f"{type(backend).__module__}.{type(backend).__qualname__}"


def set_origin(backend: Backend, origin: str) -> None:
    try:
        object.__setattr__(backend, ORIGIN_ATTR, origin)
    except (AttributeError, TypeError):  # __slots__ without room for it: the class name will do
        pass


def who(backend: Any) -> str:
    name = getattr(backend, "name", None) or type(backend).__name__
    return f"backend {name!r} ({origin_of(backend)})"


def call(backend: Backend, method: str, *args, **kwargs) -> Any:
    """``backend.method(*args, **kwargs)``; an exception that is not pytest-attn's own (nor an
    assertion, nor pytest's skip/fail) becomes a BackendError naming the backend, chained to it so
    the traceback still shows where in the backend it happened."""
    __tracebackhide__ = True  # a report shows the backend's frames, not this wrapper
    try:
        return getattr(backend, method)(*args, **kwargs)
    except (AttnError, AssertionError):
        raise
    except Exception as exc:
        raise BackendError(f"{who(backend)} raised in {method}(): {type(exc).__name__}: {exc}. This is a bug in "
                           f"the backend, not in pytest-attn: fix its {method}() (the traceback above shows where)") from exc


class BrokenAvailability(Availability):
    """available() broke its contract (raised, returned the wrong kind, or gave no reason): the
    backend is unusable, which a run that names it must not take for "not on this machine"."""


def availability(backend: Backend) -> Availability:
    """available(), never raising: an exception or a wrong return is reported as unavailable, as a
    BrokenAvailability."""
    try:
        result = backend.available()
    except Exception as exc:  # a broken backend must not take the run down
        return BrokenAvailability(False, f"available() raised {type(exc).__name__}: {exc} ({origin_of(backend)}); "
                                         "available() must return an Availability and never raise")
    if not isinstance(result, Availability):
        return BrokenAvailability(False, f"available() returned {result!r}, not an Availability "
                                         f"({origin_of(backend)}); return pytest_attn.Availability(True), or "
                                         "Availability(False, 'why not')")
    if not result.ok and not (isinstance(result.reason, str) and result.reason.strip()):
        return BrokenAvailability(False, f"unavailable, without a reason ({origin_of(backend)}); give "
                                         "Availability(False, 'why not') a reason a user can act on")
    return result


def unsupported(backend: Backend, layer, metadata, device: str) -> list[str]:
    __tracebackhide__ = True
    reasons = call(backend, "unsupported", layer, metadata, device)
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) and r.strip() for r in reasons):
        raise BackendError(f"{who(backend)}: unsupported() returned {reasons!r}; it must return a list of reasons, "
                           "each a non-empty sentence (an empty list when it can run the case)")
    return list(reasons)


def require_supported(backend: Backend, layer, metadata, device: str) -> None:
    __tracebackhide__ = True
    reasons = unsupported(backend, layer, metadata, device)
    if reasons:
        raise UnsupportedCase(backend.name, reasons)


def plan(backend: Backend, metadata, layer, device: str) -> Plan:
    __tracebackhide__ = True
    result = call(backend, "plan", metadata, layer, device=device)
    if not isinstance(result, Plan):
        raise BackendError(f"{who(backend)}: plan() returned {result!r}, not a pytest_attn.Plan; decide how to run "
                           "the batch and return Plan(...) (see the README's Writing a backend)")
    if result.layer is None:
        raise BackendError(f"{who(backend)}: plan() returned a Plan without its layer; pass layer=layer to Plan(...): "
                           "forward() reads the layer (scale, mask, layer_idx) from plan.layer")
    return result.for_batch(metadata)


def tolerance(backend: Backend, dtype: str) -> Tolerance:
    __tracebackhide__ = True
    result = call(backend, "tolerance", dtype)
    if not isinstance(result, Tolerance):
        raise BackendError(f"{who(backend)}: tolerance({dtype!r}) returned {result!r}, not a pytest_attn.Tolerance; "
                           "return Tolerance() for the default rule, or leave tolerance() out")
    return result


def forward(backend: Backend, q, k, v, metadata, plan_: Plan, out, lse: Optional[Any] = None):
    """``backend.forward`` into the buffers given, checking what comes back: ``out`` itself (its
    shape, dtype, device and storage), and with ``lse`` a buffer it wrote."""
    __tracebackhide__ = True
    kwargs = {"out": out} if lse is None else {"out": out, "lse": lse}
    result = call(backend, "forward", q, k, v, metadata, plan_, **kwargs)
    problems = returned_problems(result, out, lse)
    if problems:
        raise BackendError(f"{who(backend)}: forward() returned {'; '.join(problems)}. The contract: write into the "
                           f"`out` it is given ({describe_tensor(out)}) and return it"
                           + ("" if lse is None else f", and write the log-sum-exp into `lse` ({describe_tensor(lse)})"))
    if lse is not None and lse.numel() and bool(lse.isnan().all()):
        raise BackendError(f"{who(backend)}: forward() left the `lse` buffer it was given ({describe_tensor(lse)}) "
                           "all NaN, as the suite filled it: unwritten. The contract: write each query's log-sum-exp "
                           "into that buffer, not into one of its own")
    return result


def describe_tensor(t) -> str:
    return f"{tuple(t.shape)} {_dtype_name(t.dtype)} on {t.device}"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_tensor(obj) -> bool:
    return all(hasattr(obj, a) for a in ("shape", "dtype", "device", "data_ptr", "stride"))


def returned_problems(result, out, lse=None) -> list[str]:
    """How what forward() returned differs from the `out` buffer it was given: each a phrase naming
    what was expected and what came back. Empty when it is `out` (or a view equal to it). A pair
    returned where `lse` was given is named as such, with what each of its two differs in."""
    if result is out:
        return []
    if lse is not None and isinstance(result, (tuple, list)) and len(result) == 2:
        return ([f"a {type(result).__name__} of two (out, lse), not `out` alone (the suite reads the log-sum-exp from "
                 "the `lse` buffer it gives)"]
                + [f"its first {p}" for p in _buffer_problems(result[0], out, "out")]
                + [f"its second {p}" for p in _buffer_problems(result[1], lse, "lse")])
    return _buffer_problems(result, out, "out")


def _buffer_problems(result, buffer, name: str) -> list[str]:
    if result is buffer:
        return []
    if not _is_tensor(result):
        return [f"{_describe(result)}, not a tensor"]
    problems = []
    if tuple(result.shape) != tuple(buffer.shape):
        same_memory = result.device == buffer.device and result.data_ptr() == buffer.data_ptr()
        problems.append(f"shape {tuple(result.shape)}, expected {tuple(buffer.shape)}"
                        + (f" (a view of `{name}` with another shape: return `{name}` itself)" if same_memory else ""))
    if result.dtype != buffer.dtype:
        problems.append(f"dtype {_dtype_name(result.dtype)}, expected {_dtype_name(buffer.dtype)}")
    if result.device != buffer.device:
        problems.append(f"device {result.device}, expected {buffer.device}")
    if not problems and (result.data_ptr() != buffer.data_ptr() or tuple(result.stride()) != tuple(buffer.stride())):
        problems.append(f"a tensor that is not the `{name}` buffer it was given (another buffer, or a view of it laid "
                        f"out otherwise): the caller reads `{name}`")
    return problems


def _describe(obj) -> str:
    """What came back, in a few words: a tensor by its shape, dtype and device, never its values."""
    if _is_tensor(obj):
        return f"a tensor {describe_tensor(obj)}"
    if isinstance(obj, (tuple, list)):
        shown = ", ".join(_describe(x) for x in obj[:3]) + (", ..." if len(obj) > 3 else "")
        return f"a {type(obj).__name__} of {len(obj)} ({shown})"
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


def readback(backend: Backend, plan_: Plan) -> Optional[list[str]]:
    __tracebackhide__ = True
    result = call(backend, "readback", plan_)
    if result is not None and (not isinstance(result, (list, tuple)) or not all(isinstance(r, str) for r in result)):
        raise BackendError(f"{who(backend)}: readback() returned {result!r}; it must return None or a list of sentences")
    return None if result is None else list(result)


def check_inputs_unchanged(backend: Backend, before: dict, after: dict) -> None:
    """q, k and v must be as they were: a kernel that writes into its inputs corrupts the model."""
    __tracebackhide__ = True
    import torch

    for name, old in before.items():
        new = after[name]
        if not torch.equal(old, new) and not (old.is_floating_point() and torch.equal(old.isnan(), new.isnan())
                                              and torch.equal(old.nan_to_num(), new.nan_to_num())):
            changed = int((old != new).sum())
            raise BackendError(f"{who(backend)} modified its input {name} in place ({changed} elements changed): "
                                 f"forward() must leave q, k and v as they were")
