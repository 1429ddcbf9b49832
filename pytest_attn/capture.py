"""Record the attention calls of a running program as pytest-attn cases.

    import pytest_attn.capture

    with pytest_attn.capture.record("attn-cases.jsonl") as recording:
        engine.generate(prompts)          # any program: nothing engine-specific is needed
    print(recording.summary())

While the block runs, two kinds of call are read, then run as they would have been:

- FlashInfer's public wrappers (``BatchPrefillWithRaggedKVCacheWrapper``,
  ``BatchPrefillWithPagedKVCacheWrapper``, ``BatchDecodeWithPagedKVCacheWrapper``): ``plan()``
  gives the batch (indptrs, last page lengths, page size, heads, head dims, causal, window,
  soft-cap, scale) and each ``run()`` the dtypes, the LSE, the FP8 scales and the sinks. The
  methods are patched on the classes, so every wrapper of the process is seen, whoever made it.
- ``torch.nn.functional.scaled_dot_product_attention`` (through a ``TorchFunctionMode``, in the
  thread that entered ``record``) and ``flex_attention`` (its module attribute and every loaded
  module's global name bound to it): shapes, causal or explicit masks that are a causal, full or
  sliding-window mask, scale, GQA, dtype; flex's score_mod when it is none or a soft-cap.

Each ``run()`` (or SDPA/flex call) becomes one case (a :class:`~pytest_attn.cases.case.BatchCase`
of one layer), written to the ``.jsonl`` file at once, one JSON object a line, deduplicated by its
JSON and capped at ``max_cases``. A paged batch becomes a schedule that ends in exactly that batch:
new prompts are step 0's (or step 1's ``joining`` prompts), requests that already hold keys are
generation requests at step 1 after a prefill of what they held (``draft_tokens`` for more than one
new token); requests of different query lengths over a cached history become one case per length.
Calls a case cannot express (custom masks, RoPE inside the kernel, FP8 queries, score_mods that
depend on positions) are counted in ``recording.skipped`` with the reason, never guessed.

Every patch is undone when the block ends, also on an exception; one recording at a time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import sys
import threading
from collections import Counter
from typing import Any, Iterator, Optional

from pytest_attn.cases.case import BatchCase
from pytest_attn.core.errors import AttnError, AttnInputError
from pytest_attn.core.layer import DTYPES, KV_DTYPES, LayerSpec

DEFAULT_MAX_CASES = 200
FORMAT = 1
#: FlashInfer's wrappers whose plan()/run() are read, by module: (class, kind of batch).
FLASHINFER_WRAPPERS = (("flashinfer.prefill", "BatchPrefillWithRaggedKVCacheWrapper", "ragged"),
                       ("flashinfer.prefill", "BatchPrefillWithPagedKVCacheWrapper", "paged"),
                       ("flashinfer.decode", "BatchDecodeWithPagedKVCacheWrapper", "decode"))
#: Masks larger than this many elements are not classified (a dense bool matrix of them is built).
MAX_MASK_ELEMENTS = 1 << 26
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class CaptureError(AttnError, RuntimeError):
    """record() used where it cannot record: nested, concurrent, or its file cannot be written."""


class Uncapturable(Exception):
    """This call has no case that computes the same thing; the message says why (a skip reason)."""


# -- cases as JSON ------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _case_to_json(case: BatchCase) -> dict:
    """{"format": 1, "name", "layer_spec": {its non-default fields but layer_idx}, "seq_lens", the
    case's other non-default fields; layer_overrides as one object per layer}. The one writer of this
    module (the shared case serializer, pytest_attn.cases.serialize, writes the same and replaces it)."""
    layer = {f.name: _jsonable(getattr(case.layer_spec, f.name)) for f in dataclasses.fields(LayerSpec)
             if f.name != "layer_idx" and (f.default is dataclasses.MISSING
                                           or getattr(case.layer_spec, f.name) != f.default)}
    out = {"format": FORMAT, "name": case.name, "layer_spec": layer, "seq_lens": list(case.seq_lens)}
    for f in dataclasses.fields(case):
        if f.name not in out and f.name != "layer_spec" and getattr(case, f.name) != f.default:
            out[f.name] = _jsonable(getattr(case, f.name))
    if case.layer_overrides:
        out["layer_overrides"] = [{k: _jsonable(v) for k, v in layer} for layer in case.layer_overrides]
    return out


def _case_from_json(data: dict) -> BatchCase:
    """The inverse of :func:`_case_to_json` (for replaying a recording)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AttnInputError(f"not a pytest-attn case of format {FORMAT}: {str(data)[:80]}")
    fields = {k: _tuples(v) for k, v in data.items() if k not in ("format", "name", "layer_spec", "layer_overrides")}
    if data.get("layer_overrides"):
        fields["layer_overrides"] = tuple(tuple((k, _tuples(v)) for k, v in layer.items())
                                          for layer in data["layer_overrides"])
    layer = {k: _tuples(v) for k, v in data["layer_spec"].items()}
    return BatchCase(data["name"], layer_spec=LayerSpec(**layer), **fields)


def _tuples(value):
    """JSON's lists back to the tuples a case holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load(path) -> list[BatchCase]:
    """The cases of a recording (a .jsonl file written by :func:`record`)."""
    cases = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    cases.append(_case_from_json(json.loads(line)))
                except (ValueError, TypeError) as exc:
                    raise AttnInputError(f"{path}:{number}: {exc}") from None
    return cases


# -- batches to cases -----------------------------------------------------------------------------
def _name(kind: str, case_json: dict) -> str:
    digest = hashlib.sha1(json.dumps(case_json, sort_keys=True).encode()).hexdigest()[:10]
    return f"captured-{kind}-{digest}"


def _named(kind: str, description: str, **fields) -> BatchCase:
    """A case whose name is derived from everything else in it, so equal batches get equal names."""
    draft = BatchCase("captured", description=description, tags=("captured", kind), **fields)
    return dataclasses.replace(draft, name=_name(kind, {**_case_to_json(draft), "name": None}))


def ragged_case(qo_lens, kv_lens, layer: LayerSpec, source: str) -> BatchCase:
    """A batch without a cache: each request attends over its own keys (cross-attention when
    they are not its queries)."""
    qo_lens, kv_lens = tuple(qo_lens), tuple(kv_lens)
    cross = {"kv_seq_lens": kv_lens} if kv_lens != qo_lens else {}
    return _named("no-cache", f"captured from {source}: {len(qo_lens)} request(s) without a cache",
                  layer_spec=layer, seq_lens=qo_lens, **cross)


def paged_cases(qo_lens, kv_lens, layer: LayerSpec, page_size: int, kv_layout: str, source: str) -> list[BatchCase]:
    """Cases whose last step is this paged batch: requests with as many keys as queries are new
    prompts; the others held ``kv - qo`` keys before and bring ``qo`` new tokens (generation
    requests, with ``qo - 1`` draft tokens). One case per such query length, because a case's
    generation requests all bring the same number of tokens."""
    pairs = [(q, k) for q, k in zip(qo_lens, kv_lens) if q > 0]
    if not pairs:
        raise Uncapturable("a paged batch with no query token")
    if any(q > k for q, k in pairs):
        raise Uncapturable("a paged batch with more queries than keys in a request")
    new = tuple(k for q, k in pairs if q == k)
    by_len: dict[int, list[int]] = {}
    for q, k in pairs:
        if q < k:
            by_len.setdefault(q, []).append(k - q)
    common = dict(layer_spec=layer, cache=True, page_size=page_size, kv_layout=kv_layout)
    if not by_len:
        return [_named("prefill", f"captured from {source}: {len(new)} prompt(s) on a paged cache",
                       seq_lens=new, **common)]
    split = f" (one of {len(by_len)} cases split from one batch by query length)" if len(by_len) > 1 else ""
    cases = []
    for i, (q, held) in enumerate(sorted(by_len.items())):
        joining = new if i == 0 else ()
        kind = "mixed" if joining else ("decode" if q == 1 else "extend")
        cases.append(_named(kind, f"captured from {source}: {len(held)} request(s) bringing {q} token(s) over a "
                                  f"cached history" + (f" and {len(joining)} new prompt(s)" if joining else "") + split,
                            seq_lens=tuple(held), decode_steps=1, draft_tokens=q - 1, joining=joining, **common))
    return cases


# -- reading values -------------------------------------------------------------------------------
def _ints(values) -> list[int]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [int(v) for v in values]


def _diffs(indptr) -> list[int]:
    offsets = _ints(indptr)
    return [b - a for a, b in zip(offsets, offsets[1:])]


def _paged_kv_lens(indptr, last_page_len, page_size: int) -> list[int]:
    pages, last = _diffs(indptr), _ints(last_page_len)
    return [(n - 1) * page_size + l if n else 0 for n, l in zip(pages, last)]


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _layer_dtypes(q_dtype, kv_dtype, cache: bool) -> dict:
    q, kv = _dtype(q_dtype), _dtype(kv_dtype)
    if q not in DTYPES:
        raise Uncapturable(f"{q} queries: a case's queries are {', '.join(DTYPES)}")
    if kv == q:
        return {"dtype": q}
    if not cache or (kv not in DTYPES and kv not in KV_DTYPES):
        raise Uncapturable(f"{kv} keys under {q} queries" + ("" if cache else " without a cache"))
    return {"dtype": q, "kv_dtype": kv}


def _scale(value, head_dim: int) -> Optional[float]:
    """sm_scale as a case keeps it: None when it is the default 1/sqrt(head_dim)."""
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return None if math.isclose(value, head_dim ** -0.5, rel_tol=1e-6) else value


def _float(value, default: float) -> float:
    if value is None:
        return default
    return float(value.item() if hasattr(value, "item") else value)


# -- FlashInfer ------------------------------------------------------------------------------------
def _bound(function, args, kwargs, legacy_names=()) -> dict:
    """The arguments of a call by parameter name, defaults applied; positional arguments beyond the
    signature (FlashInfer's deprecated form) take the names ``legacy_names`` gives them."""
    signature = inspect.signature(function)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            values.update(zip(legacy_names, value))
        else:
            values[name] = value
    return values


def _first(values: dict, *names, default=None):
    for name in names:
        if values.get(name) is not None:
            return values[name]
    return default


def decode_plan(kind: str, values: dict) -> dict:
    """What a FlashInfer plan() call says about its batch: query and key lengths per request, the
    page size and the layer's parameters (dtypes come from run())."""
    for name, why in (("custom_mask", "a custom mask"), ("packed_custom_mask", "a custom mask"),
                      ("prefix_len_ptr", "multi-item scoring"), ("token_pos_in_items_ptr", "multi-item scoring")):
        if values.get(name) is not None:
            raise Uncapturable(f"{why} (plan's {name})")
    if str(values.get("pos_encoding_mode", "NONE")) != "NONE":
        raise Uncapturable(f"position encoding inside the kernel ({values['pos_encoding_mode']})")
    if values.get("window_right", 0) not in (0, -1, None):
        raise Uncapturable(f"window_right={values['window_right']}")
    head_dim = int(_first(values, "head_dim_qk", "head_dim"))
    head_dim_vo = values.get("head_dim_vo")
    layer = dict(num_heads=int(values["num_qo_heads"]), num_kv_heads=int(values["num_kv_heads"]),
                 head_dim=head_dim, head_dim_vo=int(head_dim_vo) if head_dim_vo not in (None, head_dim) else None,
                 sm_scale=_scale(values.get("sm_scale"), head_dim), window_left=int(values.get("window_left", -1)),
                 logits_soft_cap=_float(values.get("logits_soft_cap"), 0.0))
    if kind == "ragged":
        qo, kv = _diffs(values["qo_indptr"]), _diffs(values["kv_indptr"])
        return dict(layer=layer, causal=bool(values.get("causal")), qo_lens=qo, kv_lens=kv)
    if kind == "paged":
        page = int(values["page_size"])
        qo = _diffs(values["qo_indptr"])
        kv = _paged_kv_lens(values["paged_kv_indptr"], values["paged_kv_last_page_len"], page)
        return dict(layer=layer, causal=bool(values.get("causal")), qo_lens=qo, kv_lens=kv, page_size=page)
    page = int(values["page_size"])
    kv = _paged_kv_lens(values["indptr"], values["last_page_len"], page)
    q_len = int(values.get("q_len_per_req") or 1)
    causal = values.get("is_causal")
    # one query token sees every key either way; causal is how engines and the catalog name decode
    return dict(layer=layer, causal=True if causal is None else bool(causal), qo_lens=[q_len] * len(kv),
                kv_lens=kv, page_size=page)


def flashinfer_cases(kind: str, plan: dict, run: dict, kv_layout: str, source: str) -> list[BatchCase]:
    """The cases of one run() after a plan() (both decoded)."""
    q = run["q"]
    cache = kind != "ragged"
    if cache:
        kv_cache = run["paged_kv_cache"]
        kv_dtype = (kv_cache[0] if isinstance(kv_cache, (tuple, list)) else kv_cache).dtype
    else:
        kv_dtype = run["k"].dtype
    fields = dict(plan["layer"], mask="causal" if plan["causal"] else "full", **_layer_dtypes(q.dtype, kv_dtype, cache))
    if run.get("window_left") is not None:
        fields["window_left"] = int(run["window_left"])
    if run.get("sinks") is not None:
        fields["sinks"] = tuple(float(s) for s in run["sinks"].float().flatten().tolist())
    if run.get("return_lse"):
        fields["return_lse"] = True
    if "kv_dtype" in fields and fields["kv_dtype"] in KV_DTYPES:
        fields.update(k_scale=_float(run.get("k_scale"), 1.0), v_scale=_float(run.get("v_scale"), 1.0))
    try:
        layer = LayerSpec(**fields)
    except AttnInputError as exc:
        raise Uncapturable(str(exc)) from None
    if not cache:
        return [ragged_case(plan["qo_lens"], plan["kv_lens"], layer, source)]
    return paged_cases(plan["qo_lens"], plan["kv_lens"], layer, plan["page_size"], kv_layout, source)


# -- torch functions -----------------------------------------------------------------------------
def mask_kind(visible, q_len: int, kv_len: int) -> tuple[str, int]:
    """(mask, window_left) of a LayerSpec giving exactly this visibility matrix [q_len, kv_len]
    (queries are the last q_len of kv_len positions); Uncapturable when none does."""
    import torch

    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = torch.arange(kv_len)[None, :]
    visible = visible.to(torch.bool).cpu()
    if bool(visible.all()):
        return "full", -1
    causal = not bool((visible & (k_pos > q_pos)).any())
    behind = (q_pos - k_pos).masked_fill(~visible, -1)
    window = int(behind.max())
    for mask, window_left in (("causal" if causal else "full", -1), ("causal" if causal else "full", window)):
        expected = q_pos - k_pos <= window_left if window_left >= 0 else torch.ones_like(visible)
        if mask == "causal":
            expected = expected & (k_pos <= q_pos)
        if torch.equal(expected, visible):
            return mask, window_left
    raise Uncapturable("a mask that is not causal, full or a sliding window (bottom-right aligned)")


def _explicit_mask(attn_mask, q_len: int, kv_len: int) -> tuple[str, int]:
    import torch

    if attn_mask.dtype == torch.bool:
        visible = attn_mask
    else:
        finite = torch.isfinite(attn_mask)
        if bool((attn_mask[finite] != 0).any()):
            raise Uncapturable("an additive attention bias (a float mask with values other than 0 and -inf)")
        visible = finite
    visible = visible.expand(*visible.shape[:-2], q_len, kv_len).reshape(-1, q_len, kv_len)
    if q_len * kv_len > MAX_MASK_ELEMENTS:
        raise Uncapturable(f"a mask of {q_len}x{kv_len} (classified up to {MAX_MASK_ELEMENTS} elements)")
    if not bool((visible == visible[:1]).all()):
        raise Uncapturable("a mask that differs between batch entries or heads")
    return mask_kind(visible[0], q_len, kv_len)


def _no_cache_case(api: str, query, key, value, *, mask: str, window_left: int, scale, enable_gqa: bool,
                   soft_cap: float = 0.0, return_lse: bool = False) -> BatchCase:
    """A no-cache case from [..., heads, tokens, head_dim] tensors: every leading index is a request."""
    if query.dim() < 3:
        raise Uncapturable(f"{query.dim()}-d query (needs [..., heads, tokens, head_dim])")
    heads, q_len, head_dim = query.shape[-3:]
    kv_heads, kv_len = key.shape[-3], key.shape[-2]
    batch = math.prod(query.shape[:-3])
    if batch == 0 or q_len == 0 or kv_len == 0:
        raise Uncapturable("an empty batch")
    if kv_heads != heads and not enable_gqa:
        raise Uncapturable(f"{heads} query heads over {kv_heads} key heads without enable_gqa")
    try:
        layer = LayerSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, mask=mask,
                          window_left=window_left, sm_scale=_scale(scale, head_dim), logits_soft_cap=soft_cap,
                          head_dim_vo=value.shape[-1] if value.shape[-1] != head_dim else None,
                          return_lse=return_lse, **_layer_dtypes(query.dtype, key.dtype, cache=False))
    except AttnInputError as exc:
        raise Uncapturable(str(exc)) from None
    return ragged_case([q_len] * batch, [kv_len] * batch, layer, api)


def sdpa_case(*args, **kwargs) -> BatchCase:
    """The case of one scaled_dot_product_attention call."""
    values = dict(zip(_SDPA_PARAMS, args), **kwargs)
    query, key = values["query"], values["key"]
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if values.get("dropout_p", 0.0):
        raise Uncapturable(f"dropout_p={values['dropout_p']}")
    if values.get("attn_mask") is not None:
        if values.get("is_causal"):
            raise Uncapturable("attn_mask with is_causal")
        mask, window_left = _explicit_mask(values["attn_mask"], q_len, kv_len)
    elif values.get("is_causal"):
        if q_len != kv_len:
            raise Uncapturable(f"is_causal with {q_len} queries over {kv_len} keys: SDPA aligns it top-left, "
                               "a case bottom-right")
        mask, window_left = "causal", -1
    else:
        mask, window_left = "full", -1
    return _no_cache_case("torch.nn.functional.scaled_dot_product_attention", query, key, values["value"],
                          mask=mask, window_left=window_left, scale=values.get("scale"),
                          enable_gqa=bool(values.get("enable_gqa")))


def _soft_cap_of(score_mod) -> float:
    """0 when score_mod leaves every score as it is, the cap when it is cap * tanh(score / cap)."""
    import torch

    scores = torch.cat([torch.linspace(-60.0, 60.0, 241), torch.tensor([1e4])])[:, None, None]
    positions = torch.arange(8)
    zero = torch.zeros((), dtype=torch.int64)
    try:
        out = score_mod(scores.expand(-1, 8, 8).clone(), zero, zero, positions[:, None], positions[None, :])
    except Exception as exc:  # a score_mod reading captured tensors of its own shapes
        raise Uncapturable(f"a score_mod that cannot be probed ({type(exc).__name__})") from None
    out = out.expand(scores.shape[0], 8, 8).double()
    scores = scores.expand(-1, 8, 8).double()
    if torch.allclose(out, scores):
        return 0.0
    cap = float(out[-1, 0, 0])
    if cap > 0 and math.isfinite(cap) and torch.allclose(out, cap * torch.tanh(scores / cap), rtol=1e-4, atol=1e-4):
        return cap
    raise Uncapturable("a score_mod that is not a soft-cap (it depends on positions or changes scores otherwise)")


def flex_case(*args, **kwargs) -> BatchCase:
    """The case of one flex_attention call."""
    names = ("query", "key", "value", "score_mod", "block_mask", "scale", "enable_gqa", "return_lse")
    values = dict(zip(names, args), **kwargs)
    query, key = values["query"], values["key"]
    q_len, kv_len = query.shape[-2], key.shape[-2]
    mask, window_left = "full", -1
    block_mask = values.get("block_mask")
    mask_mod = getattr(block_mask, "mask_mod", None)
    if mask_mod is not None:  # what it allows is what flex computes; read whatever its convention
        import torch

        if q_len * kv_len > MAX_MASK_ELEMENTS:
            raise Uncapturable(f"a block mask of {q_len}x{kv_len} (classified up to {MAX_MASK_ELEMENTS} elements)")
        zero = torch.zeros((), dtype=torch.int64)
        try:
            visible = mask_mod(zero, zero, torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])
        except Exception as exc:
            raise Uncapturable(f"a mask_mod that cannot be probed ({type(exc).__name__})") from None
        mask, window_left = mask_kind(torch.as_tensor(visible).expand(q_len, kv_len), q_len, kv_len)
    aux = values.get("return_aux")
    return_lse = bool(values.get("return_lse")) or bool(getattr(aux, "lse", False))
    soft_cap = _soft_cap_of(values["score_mod"]) if values.get("score_mod") is not None else 0.0
    return _no_cache_case("torch.nn.attention.flex_attention.flex_attention", query, key, values["value"], mask=mask,
                          window_left=window_left, scale=values.get("scale"), enable_gqa=bool(values.get("enable_gqa")),
                          soft_cap=soft_cap, return_lse=return_lse)


# -- the recording --------------------------------------------------------------------------------
class Recording:
    """What one :func:`record` block saw: the cases written, and the calls it could not express."""

    def __init__(self, path, max_cases: int):
        self.path = str(path)
        self.max_cases = max_cases
        self.cases: list[BatchCase] = []
        self.calls = 0  # attention calls seen (each run(), SDPA or flex call)
        self.duplicates = 0
        self.dropped = 0  # distinct cases beyond max_cases, not written
        self.skipped: Counter = Counter()  # reason -> calls
        self._seen: set[str] = set()
        self._file = None
        self._lock = threading.Lock()

    def add(self, make, *args, **kwargs) -> None:
        """Record the case(s) ``make(*args, **kwargs)`` builds; never raises into the program."""
        with self._lock:
            self.calls += 1
            try:
                cases = make(*args, **kwargs)
            except Uncapturable as exc:
                self.skipped[str(exc)] += 1
                return
            except Exception as exc:  # a call this module misreads must not break the program
                self.skipped[f"could not read the call ({type(exc).__name__}: {exc})"] += 1
                return
            for case in cases if isinstance(cases, list) else [cases]:
                self._write(case)

    def _write(self, case: BatchCase) -> None:
        line = json.dumps(_case_to_json(case), sort_keys=True)
        if line in self._seen:
            self.duplicates += 1
            return
        if len(self.cases) >= self.max_cases:
            self.dropped += 1
            return
        self._seen.add(line)
        self.cases.append(case)
        self._file.write(line + "\n")
        self._file.flush()  # a program that crashes next keeps the case that crashed it

    def summary(self) -> str:
        text = (f"pytest-attn capture: {len(self.cases)} cases in {self.path} from {self.calls} attention calls "
                f"({self.duplicates} repeated a case, {self.dropped} beyond max_cases={self.max_cases}, "
                f"{sum(self.skipped.values())} not expressible as a case)")
        return "\n".join([text] + [f"  skipped {n}x: {reason}" for reason, n in self.skipped.most_common()])


_ACTIVE: Optional[Recording] = None
_ACTIVE_LOCK = threading.Lock()


def _patch_flashinfer(recording: Recording, undo: list) -> None:
    import importlib

    for module_name, class_name, kind in FLASHINFER_WRAPPERS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # FlashInfer not installed (or another version without it): nothing to record
        _patch_wrapper(cls, kind, recording, undo, getattr(sys.modules[module_name],
                                                           "_BATCH_DECODE_PLAN_LEGACY_POS_ARGS", ()))


def _set(owner, name: str, value, undo: list) -> None:
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    undo.append(lambda: setattr(owner, name, original))
    setattr(owner, name, value)


def _patch_wrapper(cls, kind: str, recording: Recording, undo: list, legacy_names) -> None:
    plan, run = cls.__dict__["plan"], cls.__dict__["run"]
    plans: dict[int, dict] = {}  # id(wrapper) -> its decoded plan (or the reason it has none)
    source = f"flashinfer.{cls.__name__}"

    @functools.wraps(plan)
    def recording_plan(self, *args, **kwargs):
        try:
            plans[id(self)] = decode_plan(kind, _bound(plan, (self, *args), kwargs, legacy_names))
        except Uncapturable as exc:
            plans[id(self)] = {"skip": str(exc)}
        except Exception as exc:
            plans[id(self)] = {"skip": f"could not read {cls.__name__}.plan ({type(exc).__name__}: {exc})"}
        return plan(self, *args, **kwargs)

    def cases_of_run(wrapper, values):
        planned = plans.get(id(wrapper))
        if planned is None:
            raise Uncapturable(f"{cls.__name__}.run before a plan() inside the recording")
        if "skip" in planned:
            raise Uncapturable(planned["skip"])
        return flashinfer_cases(kind, planned, values, str(getattr(wrapper, "_kv_layout", "NHD")), source)

    @functools.wraps(run)
    def recording_run(self, *args, **kwargs):
        try:
            values = _bound(run, (self, *args), kwargs)
        except TypeError:
            values = None  # FlashInfer will say what is wrong with the call
        if values is not None:
            recording.add(cases_of_run, self, values)
        return run(self, *args, **kwargs)

    _set(cls, "plan", recording_plan, undo)
    _set(cls, "run", recording_run, undo)
    if isinstance(cls.__dict__.get("run_return_lse"), functools.partialmethod):
        _set(cls, "run_return_lse", functools.partialmethod(recording_run, return_lse=True), undo)


def _patch_flex(recording: Recording, undo: list) -> None:
    """flex_attention does not go through __torch_function__: its module attribute, and every
    loaded module's global bound to it (``from ... import flex_attention``), are swapped."""
    module = sys.modules.get("torch.nn.attention.flex_attention")
    if module is None:
        return
    original = module.flex_attention

    @functools.wraps(original)
    def recording_flex(*args, **kwargs):
        recording.add(flex_case, *args, **kwargs)
        return original(*args, **kwargs)

    for loaded in list(sys.modules.values()):
        namespace = getattr(loaded, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                _set(loaded, name, recording_flex, undo)


def _sdpa_mode(recording: Recording):
    import torch
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention

    class RecordingSDPA(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                recording.add(sdpa_case, *args, **kwargs)
            return func(*args, **kwargs)

    return RecordingSDPA()


@contextlib.contextmanager
def record(path, *, max_cases: int = DEFAULT_MAX_CASES, flashinfer: bool = True,
           torch_functions: bool = True) -> Iterator[Recording]:
    """Record the attention calls made inside the block as cases in ``path`` (.jsonl).

    ``flashinfer``: read FlashInfer's wrappers (every thread); ``torch_functions``: SDPA (this
    thread) and flex_attention (every thread). One recording at a time."""
    global _ACTIVE
    if isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1:
        raise AttnInputError(f"max_cases must be an int >= 1, got {max_cases!r}")
    with _ACTIVE_LOCK:
        if _ACTIVE is not None:
            raise CaptureError(f"pytest_attn.capture.record is already recording to {_ACTIVE.path}: one recording "
                               "at a time; end that block before starting another")
        recording = Recording(path, max_cases)
        try:
            recording._file = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise CaptureError(f"cannot write the recording {path}: {exc.strerror}") from None
        _ACTIVE = recording
    undo: list = []
    try:
        with contextlib.ExitStack() as stack:
            if flashinfer:
                _patch_flashinfer(recording, undo)
            if torch_functions:
                _patch_flex(recording, undo)
                stack.enter_context(_sdpa_mode(recording))
            yield recording
    finally:
        for restore in reversed(undo):
            restore()
        recording._file.close()
        with _ACTIVE_LOCK:
            _ACTIVE = None
