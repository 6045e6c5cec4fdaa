"""Application settings: the ``args`` block of serve_config.yaml, validated strictly, and SLO-class resolution.

Ray Serve drops misspelled deployment keys silently; our own settings forbid unknown keys instead, so a typo
in ``args`` fails the deploy loudly rather than serving with a default.

An SLO class is either absolute (``tpot_slo_ms: 50``) or relative to the replica's measured unloaded TPOT
(``tpot_slo_x_baseline: 1.2``), the latter being how the AdaServe paper defines its tightest class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.engine.config import EngineConfig  # dataclasses only: no torch here

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"


class SLOError(ValueError):
    """The request's SLO fields cannot be honoured (unknown class, non-positive or impossible target)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class SLOClass(BaseModel):
    """One named class. Exactly one TPOT form; at most one TTFT form: absolute (``ttft_slo_ms``) or relative
    (``ttft_slo_x_prefill`` x the replica's idle prefill time for the prompt + ``ttft_allowance_ms``). A class with
    neither gets the settings' default relative TTFT."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tpot_slo_ms: float | None = Field(default=None, gt=0)
    tpot_slo_x_baseline: float | None = Field(default=None, gt=0)
    ttft_slo_ms: float | None = Field(default=None, gt=0)
    ttft_slo_x_prefill: float | None = Field(default=None, gt=0)
    ttft_allowance_ms: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _one_tpot_form(self) -> "SLOClass":
        if (self.tpot_slo_ms is None) == (self.tpot_slo_x_baseline is None):
            raise ValueError("an SLO class needs exactly one of tpot_slo_ms or tpot_slo_x_baseline")
        if self.ttft_slo_ms is not None and self.ttft_slo_x_prefill is not None:
            raise ValueError("an SLO class takes at most one of ttft_slo_ms or ttft_slo_x_prefill")
        return self


class RequestLimits(BaseModel):
    """What one client request may ask for (``limits:`` in serve_config.yaml); beyond each, a 4xx naming it. The
    context window (prompt + max_tokens) is the engine's own limit and is checked by the replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)  # a larger request body: 413
    max_messages: int = Field(default=512, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)  # OpenAI's own limit
    max_stop_chars: int = Field(default=256, ge=1)  # per stop string: stop matching scans this much text each step
    min_ttft_slo_ms: float = Field(default=10.0, ge=0)  # below this no replica can answer (network, one step)


class AppSettings(BaseModel):
    """Everything under ``applications[].args`` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_name: str = "SmolLM2-135M-Instruct"
    engine: dict[str, Any] = {}  # EngineConfig fields; unknown names fail, omitted ones keep the engine defaults
    max_waiting: int = Field(default=64, ge=0)  # requests queued beyond max_num_seqs before 429
    slo_classes: dict[str, SLOClass] = {}
    default_slo_class: str | None = None  # applied when a request names no SLO at all
    min_tpot_slo_x_baseline: float = Field(default=0.5, gt=0)  # below this x unloaded TPOT: impossible, 400
    # The TTFT of a request with an SLO whose class (or custom target) names none: this x the replica's idle
    # prefill time for its prompt, plus the allowance (queueing room under load).
    default_ttft_slo_x_prefill: float = Field(default=10.0, gt=0)
    default_ttft_allowance_ms: float = Field(default=1000.0, ge=0)
    replica_timeout_s: float = Field(default=60.0, gt=0)  # no answer from any replica by then: 503
    unloaded_tpot_probe_tokens: int = Field(default=8, ge=2)
    unloaded_tpot_reprobes: int = Field(default=3, ge=0)  # idle re-measurements after start-up (the min is kept)
    replica_torch_threads: int | None = Field(default=None, ge=1)  # None: Ray's OMP_NUM_THREADS (num_cpus)
    limits: RequestLimits = RequestLimits()
    # A replica whose engine step has run this long, or whose last max_consecutive_step_errors steps all failed,
    # fails Serve's health check and is replaced.
    replica_stall_timeout_s: float = Field(default=120.0, gt=0)
    max_consecutive_step_errors: int = Field(default=3, ge=1)
    # Every this many seconds the engine loop hands the heap's free pages back to the OS (glibc malloc_trim, ~6 ms on
    # a 2 GB CPU replica): freed activations otherwise stay in the process and its RSS creeps up. 0: never.
    heap_trim_interval_s: float = Field(default=60.0, ge=0)
    # With ADASERVE_API_KEY set in the environment, /v1/* needs the key; /metrics too when this is true.
    metrics_require_api_key: bool = False

    @field_validator("engine")
    @classmethod
    def _engine_fields_exist(cls, engine: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine) - known)
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}; EngineConfig has {sorted(known)}")
        EngineConfig(**engine)  # value checks (cheap: no model is loaded)
        return dict(engine)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.engine)

    @model_validator(mode="after")
    def _default_class_exists(self) -> "AppSettings":
        if self.default_slo_class is not None and self.default_slo_class not in self.slo_classes:
            raise ValueError(f"default_slo_class {self.default_slo_class!r} is not among slo_classes")
        return self


@dataclass(frozen=True)
class ResolvedSLO:
    """The absolute targets a request runs under; ``slo_class`` is the metrics label ("custom", "none" or a name)."""

    tpot_slo_ms: float | None
    ttft_slo_ms: float | None  # absolute; else the relative form below, resolved by the replica for the prompt
    slo_class: str
    ttft_slo_x_prefill: float | None = None
    ttft_allowance_ms: float = 0.0


def needs_baseline(settings: AppSettings, slo_class: str | None, tpot_slo_ms: float | None) -> bool:
    """Whether resolving this request needs the replica's unloaded TPOT (relative class or floor check)."""
    name = slo_class or (settings.default_slo_class if tpot_slo_ms is None else None)
    cls = settings.slo_classes.get(name) if name else None
    return tpot_slo_ms is not None or (cls is not None and cls.tpot_slo_x_baseline is not None)


def resolve_slo(settings: AppSettings, *, slo_class: str | None, tpot_slo_ms: float | None,
                ttft_slo_ms: float | None, unloaded_tpot_s: float | None) -> ResolvedSLO:
    """Turn a request's SLO fields into absolute targets.

    Explicit ``tpot_slo_ms`` / ``ttft_slo_ms`` override the class's values. A TPOT target under
    ``min_tpot_slo_x_baseline`` x the unloaded TPOT is rejected: no speculation can bring a request that far
    below one target step per token on this hardware, so accepting it would only guarantee a miss.
    """
    for param, value in (("tpot_slo_ms", tpot_slo_ms), ("ttft_slo_ms", ttft_slo_ms)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SLOError(f"{param} must be a positive number of milliseconds, got {value}", param)
    if slo_class is not None and slo_class not in settings.slo_classes:
        known = ", ".join(sorted(settings.slo_classes)) or "none configured"
        raise SLOError(f"unknown slo_class {slo_class!r}; known classes: {known}", "slo_class")
    name = slo_class
    if name is None and tpot_slo_ms is None and ttft_slo_ms is None:
        name = settings.default_slo_class
    tpot, ttft, label = tpot_slo_ms, ttft_slo_ms, "custom"
    if name is not None:
        cls = settings.slo_classes[name]
        label = name
        if tpot is None:
            if cls.tpot_slo_ms is not None:
                tpot = cls.tpot_slo_ms
            else:
                if unloaded_tpot_s is None:
                    raise SLOError(f"slo_class {name!r} is relative to the unloaded TPOT, which no replica has "
                                   "reported yet; retry shortly", "slo_class")
                tpot = cls.tpot_slo_x_baseline * unloaded_tpot_s * 1e3
        if ttft is None:
            ttft = cls.ttft_slo_ms
    elif tpot is None and ttft is None:
        label = "none"
    x_prefill, allowance = None, 0.0
    if ttft is None and label != "none":  # every request with an SLO has a TTFT target
        cls = settings.slo_classes.get(name) if name is not None else None
        if cls is not None and cls.ttft_slo_x_prefill is not None:
            x_prefill, allowance = cls.ttft_slo_x_prefill, cls.ttft_allowance_ms
        else:
            x_prefill, allowance = settings.default_ttft_slo_x_prefill, settings.default_ttft_allowance_ms
    if tpot is not None and unloaded_tpot_s is not None:
        floor_ms = settings.min_tpot_slo_x_baseline * unloaded_tpot_s * 1e3
        if tpot < floor_ms:
            raise SLOError(f"tpot_slo_ms {tpot:.3g} is impossible on this deployment: the floor is "
                           f"{settings.min_tpot_slo_x_baseline} x the unloaded TPOT = {floor_ms:.3g} ms",
                           "slo_class" if slo_class is not None and tpot_slo_ms is None else "tpot_slo_ms")
    if ttft is not None and ttft < settings.limits.min_ttft_slo_ms:  # the replica checks the prompt's own floor
        raise SLOError(f"ttft_slo_ms {ttft:.3g} is impossible on this deployment: the floor is "
                       f"{settings.limits.min_ttft_slo_ms:.3g} ms",
                       "slo_class" if slo_class is not None and ttft_slo_ms is None else "ttft_slo_ms")
    return ResolvedSLO(tpot_slo_ms=tpot, ttft_slo_ms=ttft, slo_class=label, ttft_slo_x_prefill=x_prefill,
                       ttft_allowance_ms=allowance)


def load_serve_config(path: str | Path = DEFAULT_CONFIG_PATH) -> dict[str, Any]:
    """The raw YAML as a dict (what `serve run` reads)."""
    return yaml.safe_load(Path(path).read_text())


def app_settings_from_config(config: dict[str, Any], app_name: str = "adaserve") -> AppSettings:
    for app in config.get("applications", []):
        if app.get("name") == app_name:
            return AppSettings.model_validate(app.get("args") or {})
    raise KeyError(f"no application named {app_name!r} in the config")
