"""``pytest-attn backends``: every registered backend, where it comes from, whether it runs here
and why not, and what it supports, with the versions of the libraries underneath (as
``python -m xformers.info`` does for its operators)."""
from __future__ import annotations

from pytest_attn.core.contract import Backend, Capabilities
from pytest_attn.env.packages import dist_version, flashinfer_version


def environment_lines() -> list[str]:
    """torch (and its CUDA and cuDNN), the GPU, FlashInfer, cuDNN's frontend, pytest-attn."""
    lines = [f"pytest-attn {dist_version('pytest-attn') or '(not installed: from a checkout)'}"]
    try:
        import torch
    except ImportError:
        return lines + ["torch: not installed"]
    cuda = torch.version.cuda or "none (a CPU build)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f"torch {torch.__version__} | CUDA {cuda} | cuDNN {cudnn or 'none'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm {cap})")
    else:
        lines.append("GPU: none that torch can see")
    lines.append(f"flashinfer-python {flashinfer_version() or 'not installed'} | "
                 f"nvidia-cudnn-frontend {dist_version('nvidia-cudnn-frontend') or 'not installed'}")
    return lines


def capability_lines(caps: Capabilities, requires_contiguous: bool) -> list[str]:
    head_dims = ("any" if caps.head_dims is None else ", ".join(map(str, sorted(caps.head_dims))))
    if caps.max_head_dim is not None:
        head_dims += f" (up to {caps.max_head_dim})"
    paths = []
    if caps.no_cache:
        paths.append("no cache (ragged)")
    if caps.paged_cache:
        paths.append(f"paged cache ({', '.join(sorted(caps.kv_layouts))})")
    for flag, text in (("cross_attention", "cross-attention"), ("chunked_prefill", "chunked prefill / reused prefixes"),
                       ("multi_token_generation", "speculative decoding"), ("empty_sequences", "zero-length rows")):
        if getattr(caps, flag):
            paths.append(text)
    features = [text for flag, text in (("gqa", "GQA"), ("sliding_window", "sliding window"), ("soft_cap", "soft-cap"),
                                        ("sinks", "sinks"), ("head_dim_vo", "head_dim_vo != head_dim"),
                                        ("latent_kv", "absorbed MLA (latent_kv)"))
                if getattr(caps, flag)]
    if caps.lse_base:
        features.append(f"LSE (base {caps.lse_base})")
    if caps.kv_dtypes:
        features.append(f"KV cache {', '.join(sorted(caps.kv_dtypes))}")
    features.append("strided inputs" if not requires_contiguous else "contiguous inputs only")
    return [f"devices {', '.join(sorted(caps.devices))} | dtypes {', '.join(sorted(caps.dtypes))} | "
            f"head dims {head_dims} | masks {', '.join(sorted(caps.masks))}",
            f"runs: {', '.join(paths) or 'nothing'}",
            f"features: {', '.join(features)}"]


def backend_lines(backend: Backend, availability, origin: str, broken: str = "") -> list[str]:
    """A backend's entry: name and state (available, UNAVAILABLE or BROKEN, with the reason), where it
    comes from, and what it declares it supports."""
    state = f"BROKEN: {broken}" if broken else ("available" if availability else f"UNAVAILABLE: {availability.reason}")
    lines = [f"{backend.name}  [{state}]", f"    from: {origin}"]
    try:
        lines += [f"    {line}" for line in declared_lines(backend)]
    except Exception as exc:  # its description or capabilities raise: say so, and list the others
        lines.append(f"    BROKEN: reading what it declares raised {type(exc).__name__}: {exc}")
    return lines


def declared_lines(backend: Backend) -> list[str]:
    lines = []
    if getattr(backend, "description", ""):
        lines.append(str(backend.description))
    caps = getattr(backend, "capabilities", None)
    if isinstance(caps, Capabilities):
        lines += capability_lines(caps, bool(getattr(backend, "requires_contiguous", True)))
    return lines


def report(registry) -> list[str]:
    """The environment, then every registered backend (a broken one with what broke, the others
    all the same), then the registry's problems (a name registered twice)."""
    from pytest_attn.core import calls
    from pytest_attn.env.registry import broken_reason

    lines = environment_lines() + [""]
    for backend in registry.resolve(["all"]):
        availability = calls.availability(backend)
        lines += backend_lines(backend, availability, calls.origin_of(backend), broken_reason(backend, availability))
    for problem in registry.problems:
        lines.append(f"problem: {problem}")
    return lines
