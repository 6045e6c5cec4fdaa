"""serve_config*.yaml say what Ray Serve will run (no silently dropped keys), and SLO classes resolve right."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeDeploySchema

from app.autoscaling import SLOHeadroomPolicy
from app.config import AppSettings, SLOClass, SLOError, app_settings_from_config, load_serve_config, resolve_slo

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "serve_config.yaml", ROOT / "serve_config.gpu.yaml", ROOT / "serve_config.autoscale.yaml"]


def _field_names(model) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_key_is_one_ray_serve_knows(path: Path) -> None:
    raw = load_serve_config(path)
    ServeDeploySchema.model_validate(raw)  # what `serve run` does first
    for app in raw["applications"]:
        for dep in app["deployments"]:
            assert set(dep) <= _field_names(DeploymentSchema), dep["name"]
            assert set(dep.get("ray_actor_options", {})) <= _field_names(RayActorOptionsSchema)
            assert set(dep.get("autoscaling_config", {})) <= _field_names(AutoscalingConfig)
            assert set(dep.get("request_router_config", {})) <= _field_names(RequestRouterConfig)
            assert not ("num_replicas" in dep and "autoscaling_config" in dep), "Serve rejects both"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_app_args_validate_strictly_and_replicas_hold_admission(path: Path) -> None:
    raw = load_serve_config(path)
    settings = app_settings_from_config(raw)
    deps = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    replica = deps["LLMReplica"]
    # Serve must let the replica see one request more than it holds, so that it answers 429 instead of Serve
    # queueing the request in the ingress until it times out.
    assert replica["max_ongoing_requests"] > settings.engine["max_num_seqs"] + settings.max_waiting
    assert replica["request_router_config"]["request_router_class"] == "app.router.SLORequestRouter"
    assert deps["OpenAIIngress"]["max_ongoing_requests"] >= replica["max_ongoing_requests"]
    assert set(settings.slo_classes) == {"coding", "chat", "summarization"}


def test_cpu_config_is_the_documented_default() -> None:
    raw = load_serve_config(CONFIGS[0])
    settings = app_settings_from_config(raw)
    assert settings.engine["model"] == "embedded"
    assert settings.slo_classes["coding"].tpot_slo_x_baseline == 1.2
    deps = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    assert deps["LLMReplica"]["num_replicas"] == 1
    assert deps["LLMReplica"]["ray_actor_options"]["num_cpus"] == 0.5


def test_gpu_config_scales_on_gpus() -> None:
    raw = load_serve_config(CONFIGS[1])
    dep = {d["name"]: d for d in raw["applications"][0]["deployments"]}["LLMReplica"]
    assert dep["ray_actor_options"]["num_gpus"] == 1
    assert dep["autoscaling_config"]["min_replicas"] <= dep["autoscaling_config"]["max_replicas"]
    assert app_settings_from_config(raw).engine["draft"]


@pytest.mark.parametrize("path", CONFIGS[1:], ids=lambda p: p.name)
def test_autoscaled_configs_scale_on_slo_headroom(path: Path) -> None:
    """The GPU and autoscale YAMLs use Serve's autoscaler with our policy; its kwargs build it; a removed replica
    may finish its streams for longer than Serve's 20 s default."""
    raw = load_serve_config(path)
    dep = {d["name"]: d for d in raw["applications"][0]["deployments"]}["LLMReplica"]
    config = AutoscalingConfig.model_validate(dep["autoscaling_config"])
    assert config.policy.policy_function == "app.autoscaling:SLOHeadroomPolicy"
    policy = SLOHeadroomPolicy(publish_decisions=False, **config.policy.policy_kwargs)
    assert policy.thresholds == config.policy.policy_kwargs
    assert config.look_back_period_s > config.metrics_interval_s
    assert dep["graceful_shutdown_timeout_s"] >= 60


def test_autoscale_config_is_the_cpu_config_with_1_to_3_replicas() -> None:
    raw = load_serve_config(ROOT / "serve_config.autoscale.yaml")
    dep = {d["name"]: d for d in raw["applications"][0]["deployments"]}["LLMReplica"]
    assert (dep["autoscaling_config"]["min_replicas"], dep["autoscaling_config"]["max_replicas"]) == (1, 3)
    assert dep["ray_actor_options"]["num_cpus"] == 0.5
    assert app_settings_from_config(raw).engine["model"] == "embedded"


def test_misspelled_app_args_fail_loudly() -> None:
    with pytest.raises(ValueError, match="max_waitng"):
        AppSettings.model_validate({"max_waitng": 3})
    with pytest.raises(ValueError, match="max_num_seq\\b"):
        AppSettings.model_validate({"engine": {"max_num_seq": 3}})
    with pytest.raises(ValueError, match="must be positive"):
        AppSettings.model_validate({"engine": {"max_num_seqs": 0}})
    with pytest.raises(ValueError):
        AppSettings.model_validate({"default_slo_class": "nope"})
    with pytest.raises(ValueError, match="exactly one"):
        SLOClass(tpot_slo_ms=50, tpot_slo_x_baseline=1.2)


SETTINGS = AppSettings(slo_classes={"coding": SLOClass(tpot_slo_x_baseline=1.2),
                                    "chat": SLOClass(tpot_slo_ms=50, ttft_slo_ms=800)})


def test_relative_and_absolute_classes_resolve() -> None:
    coding = resolve_slo(SETTINGS, slo_class="coding", tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=0.030)
    assert coding.tpot_slo_ms == pytest.approx(36.0) and coding.slo_class == "coding"
    chat = resolve_slo(SETTINGS, slo_class="chat", tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=None)
    assert (chat.tpot_slo_ms, chat.ttft_slo_ms) == (50, 800)
    override = resolve_slo(SETTINGS, slo_class="chat", tpot_slo_ms=70, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert (override.tpot_slo_ms, override.ttft_slo_ms, override.slo_class) == (70, 800, "chat")
    custom = resolve_slo(SETTINGS, slo_class=None, tpot_slo_ms=40, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert custom.slo_class == "custom"
    none = resolve_slo(SETTINGS, slo_class=None, tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=None)
    assert (none.tpot_slo_ms, none.slo_class) == (None, "none")


def test_every_request_with_an_slo_gets_a_ttft_target() -> None:
    s = AppSettings(slo_classes={"coding": SLOClass(tpot_slo_x_baseline=1.2),
                                 "chat": SLOClass(tpot_slo_ms=50, ttft_slo_ms=800),
                                 "batch": SLOClass(tpot_slo_ms=500, ttft_slo_x_prefill=20, ttft_allowance_ms=5000)},
                    default_ttft_slo_x_prefill=8, default_ttft_allowance_ms=300)
    chat = resolve_slo(s, slo_class="chat", tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert (chat.ttft_slo_ms, chat.ttft_slo_x_prefill) == (800, None)  # absolute
    batch = resolve_slo(s, slo_class="batch", tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert (batch.ttft_slo_ms, batch.ttft_slo_x_prefill, batch.ttft_allowance_ms) == (None, 20, 5000)  # relative
    coding = resolve_slo(s, slo_class="coding", tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert (coding.ttft_slo_x_prefill, coding.ttft_allowance_ms) == (8, 300)  # the class names none: the default
    custom = resolve_slo(s, slo_class=None, tpot_slo_ms=40, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert custom.ttft_slo_x_prefill == 8
    explicit = resolve_slo(s, slo_class="batch", tpot_slo_ms=None, ttft_slo_ms=900, unloaded_tpot_s=0.03)
    assert (explicit.ttft_slo_ms, explicit.ttft_slo_x_prefill) == (900, None)  # the request's own target wins
    none = resolve_slo(s, slo_class=None, tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=None)
    assert (none.ttft_slo_ms, none.ttft_slo_x_prefill) == (None, None)  # no SLO at all
    with pytest.raises(ValueError, match="at most one"):
        SLOClass(tpot_slo_ms=50, ttft_slo_ms=800, ttft_slo_x_prefill=3)


def test_default_class_applies_only_without_slo_fields() -> None:
    s = SETTINGS.model_copy(update={"default_slo_class": "chat"})
    assert resolve_slo(s, slo_class=None, tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=None).slo_class == "chat"


@pytest.mark.parametrize("kwargs, param", [
    ({"slo_class": "gaming"}, "slo_class"),
    ({"tpot_slo_ms": 0.0}, "tpot_slo_ms"),
    ({"tpot_slo_ms": float("nan")}, "tpot_slo_ms"),
    ({"ttft_slo_ms": -1.0}, "ttft_slo_ms"),
    ({"tpot_slo_ms": 10.0}, "tpot_slo_ms"),  # below 0.5 x 30 ms: impossible
])
def test_bad_slos_are_rejected_with_their_param(kwargs: dict, param: str) -> None:
    args = {"slo_class": None, "tpot_slo_ms": None, "ttft_slo_ms": None, "unloaded_tpot_s": 0.030} | kwargs
    with pytest.raises(SLOError) as info:
        resolve_slo(SETTINGS, **args)
    assert info.value.param == param


def test_relative_class_below_floor_blames_the_class() -> None:
    s = AppSettings(slo_classes={"insane": SLOClass(tpot_slo_x_baseline=0.1)})
    with pytest.raises(SLOError, match="impossible") as info:
        resolve_slo(s, slo_class="insane", tpot_slo_ms=None, ttft_slo_ms=None, unloaded_tpot_s=0.03)
    assert info.value.param == "slo_class"
