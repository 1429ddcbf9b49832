"""Per-run state: which backends run, on which device, with which dtypes and seed.

Built once at configure time from the options. torch is imported only when a test needs it, or
when the device is a GPU: the header of a CPU run reads torch's build off disk (torch_build).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional

from .cases import select
from .contract import Availability, Backend, dtype_name
from .errors import AttnInputError
from .registry import Registry

DEFAULT_SEED = 20261125
CPU_MAX_TOKENS = 2048  # default --attn-max-tokens on CPU: keeps the reference quick


@dataclass
class AttnSession:
    registry: Registry
    requested: list[str]  # raw --attn-backend values; empty: every available backend
    device_option: Optional[str]
    dtypes: list[str]  # empty: each case's own dtype
    seed: int
    strict: bool
    case_filter: list[str]
    max_tokens_option: Optional[int]
    _availability: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> "AttnSession":
        opt = config.getoption
        dtypes = [dtype_name(d) for item in opt("attn_dtype") or [] for d in item.split(",") if d.strip()]
        seed = opt("attn_seed")
        if seed is None:
            seed = int(os.environ.get("PYTEST_ATTN_SEED", DEFAULT_SEED))
        cases = [c.strip() for item in opt("attn_cases") or [] for c in item.split(",") if c.strip()]
        select(cases)  # an unknown case name or tag is a usage error now, not at collection
        return cls(Registry.discover(), list(opt("attn_backend") or []), opt("attn_device"), dtypes, seed,
                   bool(opt("attn_strict")), cases, opt("attn_max_tokens"))

    # -- backends -------------------------------------------------------------------------------
    def availability(self, backend: Backend) -> Availability:
        if backend.name not in self._availability:
            try:
                self._availability[backend.name] = backend.available()
            except Exception as exc:  # a broken backend must not take the run down
                self._availability[backend.name] = Availability(False, f"available() raised {exc!r}")
        return self._availability[backend.name]

    def require_available(self, backend: Backend) -> Backend:
        """The backend, or a skip with the reason it is unavailable (a failure under --attn-strict)."""
        import pytest

        availability = self.availability(backend)
        if not availability:
            message = f"backend {backend.name!r} is unavailable here: {availability.reason}"
            if self.strict:
                pytest.fail(message + " (--attn-strict)", pytrace=False)
            pytest.skip(message)
        return backend

    @functools.cached_property
    def selected(self) -> list[Backend]:
        """Backends the tests are parametrized with: the requested ones (even if unavailable, so
        they report a skip with the reason), or by default every available one."""
        if self.requested:
            return self.registry.resolve(self.requested)
        return [b for b in self.registry.resolve(["all"]) if self.availability(b)]

    @property
    def unavailable(self) -> list[tuple[str, str]]:
        return [(b.name, self.availability(b).reason) for b in self.registry.resolve(["all"]) if not self.availability(b)]

    # -- device ---------------------------------------------------------------------------------
    @functools.cached_property
    def device(self) -> str:
        from . import torch_build

        wanted = self.device_option or ("cuda" if torch_build.cuda_available() else "cpu")
        if wanted.split(":")[0] not in ("cpu", "cuda"):
            raise AttnInputError(f"--attn-device={wanted}: use cpu, cuda or cuda:N")
        if wanted.startswith("cuda") and not torch_build.cuda_available():
            raise AttnInputError(f"--attn-device={wanted} but torch sees no CUDA device "
                                 f"(torch {torch_build.version()}); use --attn-device=cpu")
        if wanted == "cuda":
            import torch

            wanted = f"cuda:{torch.cuda.current_device()}"
        return wanted

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def max_tokens(self) -> Optional[int]:
        """Cases longer than this are deselected; 0 means no limit."""
        if self.max_tokens_option is not None:
            return self.max_tokens_option or None
        return CPU_MAX_TOKENS if self.device_type == "cpu" else None

    def describe_device(self) -> str:
        from . import torch_build

        if self.device_type == "cuda":
            import torch

            return f"{self.device} ({torch.cuda.get_device_name(self.device)}), torch {torch.__version__}"
        return f"cpu, torch {torch_build.version()}"
