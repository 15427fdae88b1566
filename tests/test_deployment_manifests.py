"""The production deployment files: the image, the KubeRay manifests and the Serve config in them.

The linters and validators run as the real command-line tools of the test's venv; the other tests
check that the files agree with each other, with config/serve.yaml and with the installed Ray.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from pydantic import BaseModel
from ray.serve.schema import ServeDeploySchema

from serve_app.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LOCK = ROOT / "docker" / "requirements.lock"
OVERRIDES = K8S / "production-overrides.yaml"
RAYSERVICE = K8S / "rayservice.yaml"
# KubeRay's RayService CRD schema made strict (unknown fields fail), kept beside the repository.
RAYSERVICE_SCHEMA = ROOT.parent / "shared" / "schemas" / "rayservice_v1.strict.json"
# Every Kubernetes object of the deployment: one YAML document per file, so each is validated.
MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path != OVERRIDES)
# What only a Kubernetes Secret may hold: never in the Serve config.
SECRET_ENV = {
    "FLUX_SERVE_API_KEYS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "HF_TOKEN",
    "FLUX_SERVE_WEBHOOK_SECRET",
}


def load_yaml(path: Path) -> Any:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1, f"{path.name} holds {len(documents)} YAML documents, not one"
    return documents[0]


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs a command-line tool installed in the test's venv, from the repository root."""
    command = [str(Path(sys.executable).with_name(name)), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def apply_overrides(base: Any, overrides: Any, where: str = "config") -> Any:
    """``base`` with ``overrides`` applied, as k8s/production-overrides.yaml describes.

    Mappings merge key by key; lists of named items (applications, deployments) merge item by
    item on ``name``, and an override may only name an item that ``base`` has (a misspelt name
    would otherwise add a stray deployment); any other value replaces the base value.
    """
    if isinstance(base, dict) and isinstance(overrides, dict):
        merged = copy.deepcopy(base)
        for key, value in overrides.items():
            merged[key] = (
                apply_overrides(base[key], value, f"{where}.{key}")
                if key in base
                else copy.deepcopy(value)
            )
        return merged
    if is_named_list(base) and is_named_list(overrides):
        changes = {item["name"]: item for item in overrides}
        unknown = sorted(set(changes) - {item["name"] for item in base})
        if unknown:
            raise KeyError(f"{where} has no item named {unknown}")
        return [
            apply_overrides(item, changes[item["name"]], f"{where}[{item['name']}]")
            if item["name"] in changes
            else copy.deepcopy(item)
            for item in base
        ]
    return copy.deepcopy(overrides)


def is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict) and "name" in item for item in value
    )


def unknown_keys(model: type[BaseModel], data: dict[str, Any], where: str = "") -> list[str]:
    """Keys of ``data`` that ``model`` and the models nested in it do not define.

    ServeDeploySchema ignores unknown keys, so a misspelt option would silently do nothing.
    """
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(f"{where}{key}")
            continue
        nested = nested_model(field.annotation)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if nested is not None and isinstance(item, dict):
                label = f"[{item['name']}]" if "name" in item else ""
                found += unknown_keys(nested, item, f"{where}{key}{label}.")
    return found


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in an annotation such as ``X``, ``Optional[X]`` or ``List[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        model = nested_model(argument)
        if model is not None:
            return model
    return None


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load_yaml(RAYSERVICE)


def embedded_serve_config() -> Any:
    """The Serve config in the RayService (serveConfigV2 is a YAML string)."""
    return yaml.safe_load(load_yaml(RAYSERVICE)["spec"]["serveConfigV2"])


SERVE_CONFIGS = {
    "config/serve.yaml": lambda: load_yaml(ROOT / "config" / "serve.yaml"),
    "serveConfigV2": embedded_serve_config,
}


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return embedded_serve_config()


@pytest.fixture(scope="module")
def worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [group["groupName"] for group in groups] == ["gpu", "cpu"]
    return node_group(rayservice, "worker")


def node_group(rayservice: dict[str, Any], node: str) -> dict[str, Any]:
    """The head group, the GPU worker group ('worker') or the CPU one ('cpu')."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    if node == "head":
        return cluster["headGroupSpec"]  # type: ignore[no-any-return]
    name = "cpu" if node == "cpu" else "gpu"
    return next(group for group in cluster["workerGroupSpecs"] if group["groupName"] == name)


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a group's pods: KubeRay takes the first one."""
    return group["template"]["spec"]["containers"][0]


def app_env(serve_config: dict[str, Any]) -> dict[str, str]:
    (application,) = serve_config["applications"]
    return application["runtime_env"]["env_vars"]


def deployment(serve_config: dict[str, Any], name: str) -> dict[str, Any]:
    (application,) = serve_config["applications"]
    return next(item for item in application["deployments"] if item["name"] == name)


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(
        "hadolint", "--config", "docker/.hadolint.yaml", "--no-color", "docker/Dockerfile"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rayservice_matches_the_kuberay_schema() -> None:
    if not RAYSERVICE_SCHEMA.is_file():
        pytest.skip(f"no RayService schema at {RAYSERVICE_SCHEMA} (the shared folder is absent)")
    result = run_tool("check-jsonschema", "--schemafile", str(RAYSERVICE_SCHEMA), str(RAYSERVICE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_manifest_is_one_kubernetes_object(path: Path) -> None:
    manifest = load_yaml(path)
    assert {"apiVersion", "kind", "metadata"} <= set(manifest), f"{path.name} is not an object"


BUILTIN_KIND_MANIFESTS = [path for path in MANIFESTS if path != RAYSERVICE]


@pytest.mark.parametrize(
    "path", BUILTIN_KIND_MANIFESTS, ids=[path.name for path in BUILTIN_KIND_MANIFESTS]
)
def test_builtin_kinds_pass_kubernetes_validate(path: Path) -> None:
    # kubernetes-validate only warns on kinds it has no schema for, such as KubeRay's.
    assert not load_yaml(path)["apiVersion"].startswith("ray.io/"), "use the KubeRay schema"
    result = run_tool("kubernetes-validate", "--strict", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_config_is_the_base_config_with_the_production_overrides(
    serve_config: dict[str, Any],
) -> None:
    base = load_yaml(ROOT / "config" / "serve.yaml")
    expected = apply_overrides(base, load_yaml(OVERRIDES))
    assert serve_config == expected, (
        "serveConfigV2 in k8s/rayservice.yaml drifted from config/serve.yaml with "
        "k8s/production-overrides.yaml applied, which is:\n"
        + yaml.safe_dump(expected, sort_keys=False)
    )


def test_overrides_may_not_name_a_deployment_the_base_config_lacks() -> None:
    base = {"deployments": [{"name": "FluxWorker", "num_replicas": 1}]}
    with pytest.raises(KeyError, match="FluxWroker"):
        apply_overrides(base, {"deployments": [{"name": "FluxWroker", "num_replicas": 2}]})


@pytest.mark.parametrize("source", SERVE_CONFIGS)
def test_serve_config_is_a_valid_ray_serve_config(source: str) -> None:
    config = SERVE_CONFIGS[source]()
    ServeDeploySchema.model_validate(config)
    assert unknown_keys(ServeDeploySchema, config) == []


def test_unknown_keys_finds_a_misspelt_option() -> None:
    config = {"applications": [{"name": "flux", "deployments": [{"name": "X", "num_replica": 2}]}]}
    assert unknown_keys(ServeDeploySchema, config) == [
        "applications[flux].deployments[X].num_replica"
    ]


def test_flux_serve_variables_are_valid_service_settings(
    serve_config: dict[str, Any], worker_group: dict[str, Any]
) -> None:
    pod_env = {variable["name"] for variable in ray_container(worker_group)["env"]}
    names = set(app_env(serve_config)) | pod_env
    fields = {
        name.removeprefix("FLUX_SERVE_").lower() for name in names if name.startswith("FLUX_SERVE_")
    }
    assert sorted(fields - set(ServiceSettings.model_fields)) == []
    settings = {
        name.removeprefix("FLUX_SERVE_").lower(): value
        for name, value in app_env(serve_config).items()
        if name.startswith("FLUX_SERVE_")
    }
    ServiceSettings.model_validate(settings)


def test_secrets_reach_the_workers_from_the_secret_only(
    rayservice: dict[str, Any], worker_group: dict[str, Any]
) -> None:
    secret = load_yaml(K8S / "secrets.example.yaml")
    references = {
        variable["name"]: variable["valueFrom"]["secretKeyRef"]
        for variable in ray_container(worker_group)["env"]
        if "secretKeyRef" in variable.get("valueFrom", {})
    }
    assert set(references) == SECRET_ENV
    for reference in references.values():
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["stringData"]
    auth = rayservice["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": secret["metadata"]["name"]}
    assert "auth_token" in secret["stringData"], "KubeRay reads the Ray token from auth_token"
    serve_config_text = rayservice["spec"]["serveConfigV2"]
    assert [name for name in sorted(SECRET_ENV) if name in serve_config_text] == []


def test_example_secret_holds_placeholders_only() -> None:
    secret = load_yaml(K8S / "secrets.example.yaml")
    real = [key for key, value in secret["stringData"].items() if "REPLACE-WITH-" not in value]
    assert real == []


def test_model_caches_live_on_the_weights_volume(
    serve_config: dict[str, Any], worker_group: dict[str, Any]
) -> None:
    claim = load_yaml(K8S / "weights-cache-pvc.yaml")["metadata"]["name"]
    volumes = worker_group["template"]["spec"]["volumes"]
    (volume,) = [
        volume["name"]
        for volume in volumes
        if volume.get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    (mount,) = [
        Path(mount["mountPath"])
        for mount in ray_container(worker_group)["volumeMounts"]
        if mount["name"] == volume
    ]
    env = app_env(serve_config)
    for name in ("HF_HOME", "FLUX_SERVE_CACHE_DIR"):
        assert Path(env[name]).is_relative_to(mount), f"{name}={env[name]} is not under {mount}"


def test_head_runs_no_replicas_and_serves_no_traffic(rayservice: dict[str, Any]) -> None:
    assert node_group(rayservice, "head")["rayStartParams"]["num-cpus"] == "0"
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_gpu_workers_can_host_every_flux_worker_replica(
    serve_config: dict[str, Any], worker_group: dict[str, Any]
) -> None:
    resources = ray_container(worker_group)["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert int(resources["requests"]["nvidia.com/gpu"]) == gpus == 1
    tolerated = {
        toleration["key"] for toleration in worker_group["template"]["spec"]["tolerations"]
    }
    assert "nvidia.com/gpu" in tolerated
    worker = deployment(serve_config, "FluxWorker")
    assert worker["ray_actor_options"]["num_gpus"] == gpus
    needed = worker["autoscaling_config"]["max_replicas"] * worker["ray_actor_options"]["num_gpus"]
    assert worker_group["maxReplicas"] * gpus >= needed, "the autoscaler can't add enough GPUs"


def test_old_cluster_outlives_requests_in_flight_after_an_upgrade(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    # Serve's default graceful_shutdown_timeout_s is 20 seconds.
    (application,) = serve_config["applications"]
    longest = max(
        item.get("graceful_shutdown_timeout_s", 20) for item in application["deployments"]
    )
    assert rayservice["spec"]["rayClusterDeletionDelaySeconds"] >= longest


@pytest.mark.parametrize("node", ["head", "worker", "cpu"])
def test_pods_expose_the_serve_and_metrics_ports(
    rayservice: dict[str, Any], serve_config: dict[str, Any], node: str
) -> None:
    group = node_group(rayservice, node)
    ports = {port["name"]: port["containerPort"] for port in ray_container(group)["ports"]}
    assert ports["serve"] == serve_config["http_options"]["port"]
    metrics_port = int(group["rayStartParams"]["metrics-export-port"])
    assert ports["metrics"] == metrics_port
    annotations = group["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_service_reaches_the_serve_port(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    service = rayservice["spec"]["serveService"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [{"name": "serve", "port": serve_config["http_options"]["port"]}]


def test_ray_and_python_versions_agree_across_project_image_and_manifest(
    rayservice: dict[str, Any],
) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_requirement = next(
        Requirement(line) for line in project["dependencies"] if Requirement(line).name == "ray"
    )
    assert str(ray_requirement.specifier) == f"=={ray.__version__}"
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert SpecifierSet(project["requires-python"]).contains(python)
    bases = [
        line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM ")
    ]
    python_tag = python.replace(".", "")
    assert bases == [f"rayproject/ray:{ray.__version__}-py{python_tag}-gpu"]


def test_head_and_workers_run_the_same_pinned_image(rayservice: dict[str, Any]) -> None:
    nodes = ("head", "worker", "cpu")
    images = {ray_container(node_group(rayservice, node))["image"] for node in nodes}
    assert len(images) == 1, f"head and workers run different images: {sorted(images)}"
    (image,) = images
    tag = re.fullmatch(r"[^\s:]+(?::\d+)?/[^\s:]+:([\w][\w.-]*)", image)
    assert tag is not None, f"{image} has no tag"
    assert tag[1] != "latest", f"{image}: latest is no fixed version"


def test_lock_pins_every_project_dependency_at_an_allowed_version() -> None:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pin = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==(\S+)", line)
        assert pin is not None, f"not a name==version pin: {line!r}"
        name = canonicalize_name(pin[1])
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Version(pin[2])
    # The image takes torch from PyPI, the CUDA build: no local label such as +cpu.
    assert [name for name, version in pins.items() if version.local] == []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in docker/requirements.lock"
        assert requirement.specifier.contains(pin, prereleases=True), f"{pin} breaks {line}"


def test_dockerfile_copies_only_what_the_build_context_keeps() -> None:
    # .dockerignore excludes everything, then lets through exactly what the image needs.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            arguments = [word for word in line.split()[1:] if not word.startswith("--")]
            sources += arguments[:-1]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert f"!{source}" in patterns or f"!{source}/" in patterns, f"{source} is ignored"


@pytest.mark.parametrize("source", SERVE_CONFIGS)
def test_a_request_may_fan_out_over_every_worker_replica_and_no_more(source: str) -> None:
    config = SERVE_CONFIGS[source]()
    env = app_env(config)
    autoscaling = deployment(config, "FluxWorker")["autoscaling_config"]
    assert int(env["FLUX_SERVE_MAX_GPUS_PER_REQUEST"]) == autoscaling["max_replicas"]


@pytest.mark.parametrize("source", SERVE_CONFIGS)
def test_flux_worker_scales_on_the_jobs_queue_of_the_applications_redis(source: str) -> None:
    config = SERVE_CONFIGS[source]()
    env = app_env(config)
    policy = deployment(config, "FluxWorker")["autoscaling_config"]["policy"]
    assert policy["policy_function"].endswith(":AsyncInferenceAutoscalingPolicy")
    assert policy["policy_kwargs"]["broker_url"] == env["FLUX_SERVE_REDIS_URL"]
    assert policy["policy_kwargs"]["queue_name"] == env["FLUX_SERVE_JOBS_QUEUE"]


def test_production_lets_the_gpu_workers_go_to_zero_and_keeps_the_rest_on_cpu(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    worker = deployment(serve_config, "FluxWorker")
    assert worker["autoscaling_config"]["min_replicas"] == 0
    gpu, cpu = node_group(rayservice, "worker"), node_group(rayservice, "cpu")
    assert gpu["minReplicas"] == 0
    assert cpu["minReplicas"] >= 1
    assert cpu["rayStartParams"]["num-gpus"] == "0"
    for name in ("Ingress", "Scorer", "JobRunner", "WebhookSender"):
        assert deployment(serve_config, name)["ray_actor_options"].get("num_gpus", 0) == 0, name
    # The CPU pods run the ingress and the job runners: they need the same secrets.
    assert ray_container(cpu)["env"] == ray_container(gpu)["env"]


def test_production_redis_is_the_flux_serve_redis_service_of_its_statefulset(
    serve_config: dict[str, Any],
) -> None:
    statefulset = load_yaml(K8S / "redis.yaml")
    service = load_yaml(K8S / "redis-service.yaml")
    assert (statefulset["kind"], service["kind"]) == ("StatefulSet", "Service")
    assert service["metadata"]["name"] == statefulset["spec"]["serviceName"] == "flux-serve-redis"
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert "--appendonly" in container["args"]
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": template["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    (port,) = service["spec"]["ports"]
    url = urlsplit(app_env(serve_config)["FLUX_SERVE_REDIS_URL"])
    assert (url.hostname, url.port) == ("flux-serve-redis", port["port"])


def test_the_head_keeps_its_state_in_the_redis_of_the_jobs(
    rayservice: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    options = rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    service = load_yaml(K8S / "redis-service.yaml")
    (port,) = service["spec"]["ports"]
    assert options["redisAddress"] == f"{service['metadata']['name']}:{port['port']}"
    jobs = urlsplit(app_env(serve_config)["FLUX_SERVE_REDIS_URL"])
    assert options["redisAddress"] == f"{jobs.hostname}:{jobs.port}"
