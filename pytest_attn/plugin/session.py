"""Per-run state: which backends run, on which device, with which dtypes and seed.

Built on first use (:func:`attn_session_of`): at configure time when the run gave any pytest-attn
option, else only when a collected test asks for pytest-attn's fixtures, so that in a project that
does not use it the plugin imports no backend. torch is imported only when a test needs it, or
when the device is a GPU: the header of a CPU run reads torch's build off disk (torch_build).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from pytest_attn.core import calls
from pytest_attn.core.contract import Availability, Backend
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import dtype_name
from pytest_attn.env.registry import Registry, broken_reason

CPU_MAX_TOKENS = 2048  # default --attn-max-tokens on CPU: keeps the reference quick

SESSION_KEY = pytest.StashKey["AttnSession"]()


def attn_session_of(config) -> "AttnSession":
    """The run's session, made on first use (see the module docstring)."""
    if SESSION_KEY not in config.stash:
        config.stash[SESSION_KEY] = AttnSession.from_config(config)
    return config.stash[SESSION_KEY]


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
    allow_unavailable: bool = False
    config: Any = field(default=None, repr=False, compare=False)  # the pytest config (its hooks)
    file_cases: dict = field(default_factory=dict)  # name -> (case, its file): --attn-case-file
    fuzz: Optional[str] = None  # --attn-fuzz as given: ci, nightly or a count
    _availability: dict = field(default_factory=dict)
    _fuzzed: dict = field(default_factory=dict)  # backend name -> its fuzz cases

    @classmethod
    def from_config(cls, config) -> "AttnSession":
        from pytest_attn.plugin.options import allow_unavailable, seed, split_list

        opt = config.getoption
        dtypes = [dtype_name(d) for d in split_list(config, "attn_dtype")]
        cases = split_list(config, "attn_cases")
        session = cls(Registry.discover(), split_list(config, "attn_backend"), opt("attn_device"), dtypes, seed(config),
                      bool(opt("attn_strict")), cases, opt("attn_max_tokens"), allow_unavailable(config),
                      config=config, file_cases=_load_case_files(split_list(config, "attn_case_file")),
                      fuzz=opt("attn_fuzz", None))
        session.cases()  # an unknown case name or tag is a usage error now, not at collection
        return session

    # -- cases ----------------------------------------------------------------------------------
    @property
    def catalog(self) -> dict:
        """The catalog's cases and those of --attn-case-file, by name."""
        from pytest_attn.cases.catalog import CATALOG

        return {**CATALOG, **{name: case for name, (case, _) in self.file_cases.items()}}

    def fuzz_names(self) -> set:
        from pytest_attn.cases.fuzz import FUZZ_TAG, fuzz_names, tier

        return set(fuzz_names(self.seed, tier(self.fuzz).count)) | {FUZZ_TAG} if self.fuzz else set()

    def cases(self) -> list:
        """The catalog and case-file cases --attn-cases selects (all without it; none when it names
        only fuzz cases). An unknown name or tag is an AttnInputError."""
        from pytest_attn.cases.catalog import select

        wanted = [n for n in self.case_filter if n not in self.fuzz_names()]
        if self.case_filter and not wanted:
            return []
        return select(wanted, self.catalog)

    def fuzz_cases(self, backend: Backend) -> list:
        """This backend's --attn-fuzz cases that --attn-cases selects; the same ones on every run with
        this seed and tier (see cases/fuzz.py). Drawn only where the backend says it runs them."""
        from pytest_attn.cases.fuzz import FUZZ_TAG, fuzz_cases, tier

        if not self.fuzz:
            return []
        if backend.name not in self._fuzzed:
            from pytest_attn.check.minimize import runs_every_step

            accept = functools.partial(runs_every_step, backend, device=self.device) if self.availability(backend) \
                else None
            self._fuzzed[backend.name] = fuzz_cases(self.seed, backend.name, backend.capabilities, tier(self.fuzz),
                                                    accept)
        chosen = self._fuzzed[backend.name]
        if self.case_filter and FUZZ_TAG not in self.case_filter:
            chosen = [c for c in chosen if c.name in self.case_filter]
        return chosen

    def case_source_options(self, case) -> list[str]:
        """The options that make a case exist in a run: its --attn-case-file, or --attn-fuzz (the
        seed is given apart); none for a catalog case."""
        from pytest_attn.cases.fuzz import FUZZ_TAG

        if case.name in self.file_cases:
            return [f"--attn-case-file={self.file_cases[case.name][1]}"]
        if self.fuzz and FUZZ_TAG in case.tags and case.name in self.fuzz_names():
            return [f"--attn-fuzz={self.fuzz}"]
        return []

    # -- backends -------------------------------------------------------------------------------
    def availability(self, backend: Backend) -> Availability:
        if backend.name not in self._availability:
            self._availability[backend.name] = calls.availability(backend)
        return self._availability[backend.name]

    def require_available(self, backend: Backend) -> Backend:
        """The backend, or a skip with the reason it is unavailable (a failure under --attn-strict)."""
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

    @functools.cached_property
    def named(self) -> list[Backend]:
        """Backends named one by one with --attn-backend (not through 'all'): a run must test them."""
        return self.registry.resolve([n for n in self.requested if n != "all"])

    def check_named(self) -> None:
        """A named backend that is broken (its package fails to import, names no Backend, or its
        available() raises) is a usage error, not a skip: the run would test nothing of it."""
        for backend in self.named:
            problem = broken_reason(backend, self.availability(backend))
            if problem:
                raise AttnInputError(f"--attn-backend={backend.name} cannot be used: {problem}")

    def selects(self, prefix: str) -> bool:
        """Whether a selected backend is named ``prefix`` or ``prefix-...`` (a variant)."""
        return any(b.name == prefix or b.name.startswith(prefix + "-") for b in self.selected)

    @property
    def unavailable(self) -> list[tuple[str, str]]:
        return [(b.name, self.availability(b).reason) for b in self.registry.resolve(["all"]) if not self.availability(b)]

    # -- device ---------------------------------------------------------------------------------
    @functools.cached_property
    def device(self) -> str:
        from pytest_attn.env import devices

        return devices.resolve(self.device_option)

    @property
    def device_type(self) -> str:
        from pytest_attn.env import devices

        return devices.kind(self.device)

    @property
    def max_tokens(self) -> Optional[int]:
        """Cases longer than this are deselected; 0 means no limit."""
        if self.max_tokens_option is not None:
            return self.max_tokens_option or None
        return CPU_MAX_TOKENS if self.device_type == "cpu" else None

    def describe_device(self) -> str:
        from pytest_attn.env import torch_build

        if self.device_type == "cuda":
            import torch

            return f"{self.device} ({torch.cuda.get_device_name(self.device)}), torch {torch.__version__}"
        return f"cpu, torch {torch_build.version()}"


def _load_case_files(paths: list[str]) -> dict:
    """name -> (case, file) of every --attn-case-file; a bad file, or a name the catalog has, is an
    AttnInputError (a usage error)."""
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.cases.serialize import load_cases

    loaded = load_cases(paths) if paths else {}
    for name, (_, path) in loaded.items():
        if name in CATALOG:
            raise AttnInputError(f"--attn-case-file: case {name!r} in {path} has the name of the catalog case "
                                 f"{name!r}; rename the one in {path}")
    return loaded

