"""Typed metric records: the shape of each ``metrics/*.json`` file the run report reads, stated once.

The stages ``gate``, ``evaluate``, ``export`` and ``promote`` pass their result through the
record (:func:`validated`) before writing it, and the report (:mod:`tempering.html_report`) reads
every file it shows through its record (also ``validate``, ``dedup`` and the training stages'
files), so neither side guesses a shape: a file that does not match is rejected with a
:class:`RecordError` naming the file and the field
(``metrics/gate.json: checks[2].passed: expected a bool, got str 'yes'``).

Records validate the fields the report reads and keep the whole dict they came from, so
:meth:`Record.to_dict` gives back exactly the same keys and values (the JSON files stay
byte-for-byte what they were, and ``dvc metrics`` keeps working). Fields not named here pass
through untouched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tempering import TemperingError


class RecordError(TemperingError):
    """A metrics file that does not have the shape its record states."""


_KINDS = {"str": str, "bool": bool, "int": int, "num": (int, float), "list": list, "dict": dict}
_WORDS = {"str": "a string", "bool": "a bool", "int": "an integer", "num": "a number", "list": "a list",
          "dict": "an object"}


def _is(value: Any, kind: str) -> bool:
    if kind in ("int", "num") and isinstance(value, bool):
        return False
    if kind == "num" and isinstance(value, float) and not math.isfinite(value):
        return True  # NaN / inf are numbers the writer meant (json writes them as NaN / Infinity)
    return isinstance(value, _KINDS[kind])


class _Reader:
    """Reads typed fields out of one dict, naming the file and the field path on a mismatch."""

    def __init__(self, data: Any, source: str, path: str = ""):
        self.source, self.path = source, path
        if not isinstance(data, dict):
            self.fail(f"expected an object, got {type(data).__name__}")
        self.data = data

    def where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, msg: str, key: str | int | None = None):
        where = self.where(key) if key is not None else (self.path or "(top level)")
        raise RecordError(f"{self.source}: {where}: {msg}")

    def get(self, key: str, kind: str, *, required: bool = False, default: Any = None) -> Any:
        if key not in self.data:
            if required:
                self.fail(f"missing (expected {_WORDS[kind]})", key)
            return default
        value = self.data[key]
        if value is None and not required:
            return default
        if not _is(value, kind):
            self.fail(f"expected {_WORDS[kind]}, got {type(value).__name__} {str(value)[:40]!r}", key)
        return value

    def child(self, key: str, value: Any) -> _Reader:
        """A reader for the object under ``key``."""
        return _Reader(value, self.source, self.where(key))

    def at(self, key: str, sub: str | int, value: Any) -> _Reader:
        """A reader for one item (list index or object key) of the container under ``key``."""
        inner = f"{self.where(key)}[{sub}]" if isinstance(sub, int) else f"{self.where(key)}.{sub}"
        return _Reader(value, self.source, inner)

    def nums(self, key: str) -> dict[str, float]:
        """An object of numbers (None allowed as a value)."""
        d = self.get(key, "dict", default={})
        for k, v in d.items():
            if v is not None and not _is(v, "num"):
                self.fail(f"expected a number, got {type(v).__name__} {str(v)[:40]!r}", f"{key}.{k}")
        return d

    def strs(self, key: str) -> tuple[str, ...]:
        items = self.get(key, "list", default=[])
        for i, v in enumerate(items):
            if not isinstance(v, str):
                self.fail(f"expected a string, got {type(v).__name__}", f"{key}[{i}]")
        return tuple(items)

    def interval(self, key: str) -> tuple[float, float] | None:
        ci = self.get(key, "list")
        if ci is None:
            return None
        if len(ci) != 2 or not all(_is(v, "num") for v in ci):
            self.fail(f"expected [low, high] numbers, got {str(ci)[:60]}", key)
        return (float(ci[0]), float(ci[1]))


@dataclass(frozen=True)
class Record:
    """A validated metrics record; ``raw`` is the dict it was read from (returned by ``to_dict``)."""

    raw: dict = field(repr=False, compare=False)
    FILE: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None):
        return cls._read(_Reader(data, source or cls.FILE))

    @classmethod
    def _read(cls, r: _Reader):  # pragma: no cover - each record defines it
        raise NotImplementedError

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)


def validated(record_cls: type[Record], data: dict, source: str) -> dict:
    """What a stage writes: ``data`` itself, once its record accepted it (the same keys and values)."""
    return record_cls.from_dict(data, source).to_dict()


# ----------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class GateCheck(Record):
    benchmark: str = ""
    kind: str = ""
    passed: bool = False
    reason: str = ""
    threshold: float | None = None
    candidate: float | None = None
    reference: float | None = None
    delta: float | None = None
    ci: tuple[float, float] | None = None
    n: int | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    discordance: float | None = None
    mde: float | None = None

    @classmethod
    def _read(cls, r: _Reader) -> GateCheck:
        return cls(r.data, benchmark=r.get("benchmark", "str", required=True), kind=r.get("kind", "str", required=True),
                   passed=r.get("passed", "bool", required=True), reason=r.get("reason", "str", default=""),
                   threshold=r.get("threshold", "num"), candidate=r.get("candidate", "num"),
                   reference=r.get("reference", "num"), delta=r.get("delta", "num"), ci=r.interval("ci"),
                   n=r.get("n", "int"), p_value=r.get("p_value", "num"), p_adjusted=r.get("p_adjusted", "num"),
                   discordance=r.get("discordance", "num"), mde=r.get("mde", "num"))


@dataclass(frozen=True)
class GateRecord(Record):
    """``metrics/gate.json`` (tasks/gate.py): the verdict, every check and its reason."""

    FILE: ClassVar[str] = "metrics/gate.json"
    passed: bool = False
    reasons: tuple[str, ...] = ()
    checks: tuple[GateCheck, ...] = ()
    test: str | None = None
    confidence: float | None = None
    metric: str | None = None
    multiplicity: str | None = None
    not_checked: tuple[str, ...] = ()
    certifies: tuple[str, ...] = ()
    n_checks: int | None = None
    n_failed: int | None = None

    @classmethod
    def _read(cls, r: _Reader) -> GateRecord:
        checks = r.get("checks", "list", default=[])
        return cls(r.data, passed=r.get("passed", "bool", required=True), reasons=r.strs("reasons"),
                   checks=tuple(GateCheck._read(r.at("checks", i, c)) for i, c in enumerate(checks)),
                   test=r.get("test", "str"), confidence=r.get("confidence", "num"), metric=r.get("metric", "str"),
                   multiplicity=r.get("multiplicity", "str"), not_checked=r.strs("not_checked"),
                   certifies=r.strs("certifies"), n_checks=r.get("n_checks", "int"), n_failed=r.get("n_failed", "int"))


# ----------------------------------------------------------------------------- promote


@dataclass(frozen=True)
class PromoteRecord(Record):
    """``metrics/promote.json`` (tasks/promote.py): the registered version, or why there is none."""

    FILE: ClassVar[str] = "metrics/promote.json"
    promoted: bool = False
    registry: str | None = None
    alias: str | None = None
    version: str | None = None
    model_path: str | None = None
    model_hash: str | None = None
    reused_version: bool | None = None
    aliases: dict = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    production: str | None = None

    @classmethod
    def _read(cls, r: _Reader) -> PromoteRecord:
        aliases = r.get("aliases", "dict", default={})
        for k, v in aliases.items():
            if not isinstance(v, str):
                r.fail(f"expected a version string, got {type(v).__name__}", f"aliases.{k}")
        return cls(r.data, promoted=r.get("promoted", "bool", required=True), registry=r.get("registry", "str"),
                   alias=r.get("alias", "str"), version=r.get("version", "str"), model_path=r.get("model_path", "str"),
                   model_hash=r.get("model_hash", "str"), reused_version=r.get("reused_version", "bool"),
                   aliases=aliases, reasons=r.strs("reasons"), production=r.get("production", "str"))


# ----------------------------------------------------------------------------- export


@dataclass(frozen=True)
class InterpPoint(Record):
    alpha: float = 1.0
    domain_gain: float | None = None
    within_limits: bool | None = None
    seconds: float | None = None
    drift: dict = field(default_factory=dict)   # kl, kl_upper, perplexity_ratio, perplexity_ratio_upper

    @classmethod
    def _read(cls, r: _Reader) -> InterpPoint:
        drift = r.get("drift", "dict", default={})
        if drift:
            for k in ("kl", "kl_upper", "perplexity_ratio", "perplexity_ratio_upper", "texts"):
                r.child("drift", drift).get(k, "num")
        return cls(r.data, alpha=r.get("alpha", "num", required=True), domain_gain=r.get("domain_gain", "num"),
                   within_limits=r.get("within_limits", "bool"), seconds=r.get("seconds", "num"), drift=drift)


@dataclass(frozen=True)
class Interpolation(Record):
    """``interpolation`` of ``metrics/export.json``: the dev sweep (``{"enabled": false}`` when off)."""

    points: tuple[InterpPoint, ...] = ()
    chosen: float | None = None
    metric: str = "acc"
    reason: str | None = None
    limits: dict = field(default_factory=dict)
    dev_questions: int | None = None
    dev_drift_texts: int | None = None

    @classmethod
    def _read(cls, r: _Reader) -> Interpolation:
        points = r.get("points", "list", default=[])
        dev = r.child("dev", r.get("dev", "dict", default={}))
        benches = dev.get("benchmarks", "dict", default={})
        for name, b in benches.items():
            dev.at("benchmarks", name, b).get("n", "int")
        return cls(r.data, points=tuple(InterpPoint._read(r.at("points", i, p))
                                        for i, p in enumerate(points)),
                   chosen=r.get("chosen", "num"), metric=r.get("metric", "str", default="acc"),
                   reason=r.get("reason", "str"), limits=r.nums("limits"),
                   dev_questions=sum((b.get("n") or 0) for b in benches.values()) if dev.data else None,
                   dev_drift_texts=dev.get("drift_texts", "int"))


@dataclass(frozen=True)
class ExportRecord(Record):
    """``metrics/export.json`` (tasks/export.py): the merge check and the interpolation sweep."""

    FILE: ClassVar[str] = "metrics/export.json"
    check: dict = field(default_factory=dict)   # prompts, matches, token_agreement, max_logit_diff, dtype
    interpolation: Interpolation | None = None

    @classmethod
    def _read(cls, r: _Reader) -> ExportRecord:
        check = {k: r.get(k, kind) for k, kind in (("prompts", "int"), ("matches", "int"), ("token_agreement", "num"),
                                                  ("max_logit_diff", "num"), ("dtype", "str")) if k in r.data}
        interp = r.get("interpolation", "dict")
        return cls(r.data, check=check,
                   interpolation=Interpolation._read(r.child("interpolation", interp)) if interp else None)


@dataclass(frozen=True)
class ExportMeta(Record):
    """``models/export/meta.json`` as the report reads it: the merge check's sample outputs."""

    FILE: ClassVar[str] = "models/export/meta.json"
    git_sha: str | None = None
    samples: tuple[dict, ...] = ()

    @classmethod
    def _read(cls, r: _Reader) -> ExportMeta:
        samples = r.get("samples", "list", default=[])
        for i, s in enumerate(samples):
            r.at("samples", i, s)
        return cls(r.data, git_sha=r.get("git_sha", "str"), samples=tuple(samples))


# ----------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class BenchmarkScores(Record):
    role: str | None = None
    n: int | None = None
    scores: dict = field(default_factory=dict)   # model -> {metric: value}
    delta: dict = field(default_factory=dict)
    delta_vs_production: dict = field(default_factory=dict)

    MODELS: ClassVar[tuple[str, ...]] = ("base", "candidate", "production")

    @classmethod
    def _read(cls, r: _Reader) -> BenchmarkScores:
        return cls(r.data, role=r.get("role", "str"), n=r.get("n", "int"),
                   scores={m: r.nums(m) for m in cls.MODELS if m in r.data}, delta=r.nums("delta"),
                   delta_vs_production=r.nums("delta_vs_production"))


@dataclass(frozen=True)
class GenerationGroup(Record):
    """One benchmark's greedy generations: each model's match rate, n, and the examples shown."""

    rates: dict = field(default_factory=dict)   # model -> share of answers naming the right choice
    n: int = 0
    examples: tuple[dict, ...] = ()

    @classmethod
    def _read(cls, r: _Reader) -> GenerationGroup:
        examples = r.get("examples", "list", required=True)
        for i, ex in enumerate(examples):
            r.at("examples", i, ex)
        rates = {}
        for k in r.data:
            if k not in ("examples", "n"):
                rates[k] = r.get(k, "num")
        return cls(r.data, rates=rates, n=r.get("n", "int", required=True), examples=tuple(examples))

    @property
    def stats(self) -> dict:
        """The scalar facts in the order the stage wrote them (each model's rate, then n)."""
        return {k: v for k, v in self.raw.items() if k != "examples"}


@dataclass(frozen=True)
class SftHeldout(Record):
    rows: int = 0
    reason: str | None = None
    nll_base: float | None = None
    nll_candidate: float | None = None
    nll_gain: float | None = None
    rows_improved: int | None = None
    examples: tuple[dict, ...] = ()

    @classmethod
    def _read(cls, r: _Reader) -> SftHeldout:
        examples = r.get("examples", "list", default=[])
        for i, ex in enumerate(examples):
            r.at("examples", i, ex)
        return cls(r.data, rows=r.get("rows", "int", default=0), reason=r.get("reason", "str"),
                   nll_base=r.get("nll_base", "num"), nll_candidate=r.get("nll_candidate", "num"),
                   nll_gain=r.get("nll_gain", "num"), rows_improved=r.get("rows_improved", "int"),
                   examples=tuple(examples))


@dataclass(frozen=True)
class ModelRef(Record):
    path: str | None = None
    hash: str | None = None
    cache: str | None = None

    @classmethod
    def _read(cls, r: _Reader) -> ModelRef:
        return cls(r.data, path=r.get("path", "str"), hash=r.get("hash", "str"), cache=r.get("cache", "str"))


@dataclass(frozen=True)
class EvaluateRecord(Record):
    """``metrics/evaluate.json`` (tasks/evaluate.py): per-benchmark scores of base, candidate and
    production, drift, generations and the held-out SFT rows."""

    FILE: ClassVar[str] = "metrics/evaluate.json"
    bundle_hash: str | None = None
    limit: Any = None
    models: dict = field(default_factory=dict)          # who -> ModelRef
    benchmarks: dict = field(default_factory=dict)      # name -> BenchmarkScores
    drift: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    generations: dict = field(default_factory=dict)     # benchmark -> GenerationGroup
    sft_heldout: SftHeldout | None = None

    @classmethod
    def _read(cls, r: _Reader) -> EvaluateRecord:
        def each(key: str, rec: type[Record]) -> dict:
            d = r.get(key, "dict", default={})
            return {k: rec._read(r.at(key, k, v)) for k, v in d.items()}

        drift = r.get("drift", "dict", default={})
        held = r.get("sft_heldout", "dict")
        return cls(r.data, bundle_hash=r.get("bundle_hash", "str"), limit=r.data.get("limit"),
                   models=each("models", ModelRef), benchmarks=each("benchmarks", BenchmarkScores), drift=drift,
                   skipped=r.get("skipped", "dict", default={}), generations=each("generations", GenerationGroup),
                   sft_heldout=SftHeldout._read(r.child("sft_heldout", held)) if held else None)


# ----------------------------------------------------------------------------- training stages


@dataclass(frozen=True)
class DpoHeldout(Record):
    """``heldout`` of ``metrics/dpo.json``: preference accuracy on pairs DPO never trained on."""

    pairs: int | None = None
    prompts: int | None = None
    accuracy: dict = field(default_factory=dict)   # base / sft / dpo
    margin: dict = field(default_factory=dict)
    accuracy_delta: float | None = None            # DPO - SFT, paired
    ci: tuple[float, float] | None = None
    gain_certified: bool = False

    @classmethod
    def _read(cls, r: _Reader) -> DpoHeldout:
        vs = r.child("dpo_vs_sft", r.get("dpo_vs_sft", "dict", default={}))
        return cls(r.data, pairs=r.get("pairs", "int"), prompts=r.get("prompts", "int"), accuracy=r.nums("accuracy"),
                   margin=r.nums("margin"), accuracy_delta=vs.get("accuracy_delta", "num"), ci=vs.interval("ci"),
                   gain_certified=bool(vs.get("gain_certified", "bool", default=False)))


@dataclass(frozen=True)
class TrainRecord(Record):
    """``metrics/{cpt,sft,dpo}.json``: a training stage's facts, or that it passed its input through."""

    enabled: bool | None = None
    trained: bool | None = None
    note: str | None = None
    pointer: str | None = None
    heldout: DpoHeldout | None = None

    @classmethod
    def _read(cls, r: _Reader) -> TrainRecord:
        held = r.get("heldout", "dict")
        return cls(r.data, enabled=r.get("enabled", "bool"), trained=r.get("trained", "bool"),
                   note=r.get("note", "str"), pointer=r.get("pointer", "str"),
                   heldout=DpoHeldout._read(r.child("heldout", held)) if held else None)

    @property
    def passed_through(self) -> bool:
        return self.enabled is False or self.trained is False


# ----------------------------------------------------------------------------- data stages


@dataclass(frozen=True)
class ValidateRecord(Record):
    """``metrics/validate.json`` (tasks/validate.py): rows read, kept and quarantined, by reason."""

    FILE: ClassVar[str] = "metrics/validate.json"
    by_reason: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    failed_sources: tuple[str, ...] = ()

    @classmethod
    def _read(cls, r: _Reader) -> ValidateRecord:
        for k in ("read", "kept", "quarantined"):
            r.get(k, "int")
        sources = r.get("sources", "dict", default={})
        for path, s in sources.items():
            r.at("sources", path, s).nums("by_reason")
        return cls(r.data, by_reason=r.nums("by_reason"), sources=sources, failed_sources=r.strs("failed_sources"))


@dataclass(frozen=True)
class DedupRecord(Record):
    """``metrics/dedup.json`` (tasks/dedup.py): duplicates and contamination removed, per kind."""

    FILE: ClassVar[str] = "metrics/dedup.json"
    kinds: dict = field(default_factory=dict)
    contaminated_by_benchmark: dict = field(default_factory=dict)

    @classmethod
    def _read(cls, r: _Reader) -> DedupRecord:
        for k in ("read", "kept", "exact_duplicate", "near_duplicate", "contaminated"):
            r.get(k, "int")
        kinds = r.get("kinds", "dict", default={})
        for k, v in kinds.items():
            r.at("kinds", k, v)
        return cls(r.data, kinds=kinds, contaminated_by_benchmark=r.nums("contaminated_by_benchmark"))
