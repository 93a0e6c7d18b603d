"""deploy/kubernetes/: every kustomization renders, every object is valid for the pinned Kubernetes
version (strictly: no unknown field), the KEDA ScaledObject is valid for KEDA's own CRD schema, and
the manifests agree with the code they deploy (queue names, ports, probe paths, flags, timeouts).

Rendering uses `kubectl kustomize` when kubectl is on PATH, else tests/unit/deploy/kustomize.py;
with kubectl there, the two are also compared."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import click
import fakeredis
import jsonschema
import kubernetes_validate
import pytest
import redis
import rq
import yaml
from flask import Flask

from api import app as api_app
from mmserve import cli
from shared import connection as shared_connection
from shared import defaults, keys, registry
from tests.unit.deploy import kustomize

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy" / "kubernetes"
KEDA_CRD = Path(__file__).parent / "data" / "keda.sh_scaledobjects.yaml"

# The oldest Kubernetes these manifests are meant for; every object validates against its API.
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "mmserve"
IMAGE = "mmserve"
GPU = "nvidia.com/gpu"

# Trigger metadata KEDA's redis (Lists) scaler reads, from pkg/scalers/redis_scaler.go of KEDA
# v2.20.2 (its `keda:"name=..."` tags, with the `<name>FromEnv` forms of those it also takes from
# the target's environment). KEDA's CRD types `metadata` as any map of strings, so this is the
# only check of the keys.
_REDIS_FROM_ENV = ("address", "host", "port", "username", "password")
_REDIS_FROM_ENV += ("sentinelUsername", "sentinelPassword", "sentinelMaster")
KEDA_REDIS_METADATA = {
    *_REDIS_FROM_ENV,
    *(f"{name}FromEnv" for name in _REDIS_FROM_ENV),
    *("addresses", "hosts", "ports", "unsafeSsl", "enableTLS"),
    *("listName", "listLength", "activationListLength", "databaseIndex"),
}

TARGETS = {
    "base": DEPLOY / "base",
    "cpu": DEPLOY / "overlays" / "cpu",
    "gpu": DEPLOY / "overlays" / "gpu",
    "base+ingress": None,  # made in a temporary folder: the base with components/ingress
    "cpu+scale-to-zero": None,  # the cpu overlay with components/scale-to-zero
}


# -- rendering -------------------------------------------------------------------------------------------


def kubectl_kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render(directory: Path) -> list[dict]:
    return kubectl_kustomize(directory) if shutil.which("kubectl") else kustomize.render(directory)


@pytest.fixture(scope="module")
def target_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {
        "base+ingress": with_component(tmp_path_factory, DEPLOY / "base", "ingress"),
        "cpu+scale-to-zero": with_component(tmp_path_factory, DEPLOY / "overlays" / "cpu", "scale-to-zero"),
    }
    return {name: directory or made[name] for name, directory in TARGETS.items()}


def with_component(tmp_path_factory: pytest.TempPathFactory, resource: Path, component: str) -> Path:
    """A kustomization in a temporary folder: `resource` with one of components/."""
    folder = tmp_path_factory.mktemp(f"{resource.name}-with-{component}")
    relative = functools.partial(os.path.relpath, start=folder)  # kustomize refuses absolute paths
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [relative(resource)],
                "components": [relative(DEPLOY / "components" / component)],
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def renders(target_dirs: dict[str, Path]) -> dict[str, list[dict]]:
    return {name: render(directory) for name, directory in target_dirs.items()}


def by_id(objects: list[dict]) -> dict[tuple[str, str], dict]:
    found = {}
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in found, f"{key} twice"
        found[key] = obj
    return found


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def workloads(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in ("Deployment", "StatefulSet")]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def mmserve_containers(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [
        (workload, container)
        for workload in workloads(objects)
        for container in containers(workload)
        if container.get("command", [""])[0] == "mmserve"
    ]


def workers(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(w, c) for w, c in mmserve_containers(objects) if c["command"][1:2] == ["worker"]]


def api_containers(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(w, c) for w, c in mmserve_containers(objects) if c["command"][1:2] == ["api"]]


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def environment(objects: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as the kubelet makes it: envFrom ConfigMaps, then env (which
    wins); a requests/limits resourceFieldRef as its value in whole units, rounded up."""
    config_maps = {obj["metadata"]["name"]: obj.get("data", {}) for obj in of_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"envFrom {source}: only ConfigMaps are resolved here"
        env.update(config_maps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "resourceFieldRef" in variable["valueFrom"]:
            field = variable["valueFrom"]["resourceFieldRef"]
            assert field["containerName"] == container["name"]
            assert str(field.get("divisor", "1")) == "1"
            kind, _, resource = field["resource"].partition(".")
            env[variable["name"]] = str(math.ceil(cpu_cores(container["resources"][kind][resource])))
        else:
            pytest.fail(f"{variable['name']}: a valueFrom this test does not resolve")
    return env


def mmserve_params(objects: list[dict], container: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The settings `mmserve <command>` takes from this container's command, args and environment
    (parsed by the CLI itself; nothing runs)."""
    for name in list(os.environ):
        if name.startswith("MMSERVE_"):
            monkeypatch.delenv(name)
    for name, value in environment(objects, container).items():
        monkeypatch.setenv(name, value)
    command = cli.main.commands[container["command"][1]]
    argv = [*container["command"][2:], *container.get("args", [])]
    return command.make_context(container["command"][1], argv).params


# -- rendering and schemas -------------------------------------------------------------------------------


def test_each_kustomization_renders_the_whole_deployment(renders):
    for name, objects in renders.items():
        ids = set(by_id(objects))
        assert {
            ("Namespace", NAMESPACE),
            ("ConfigMap", "mmserve-config"),
            ("ConfigMap", "mmserve-worker-probe"),
            ("StatefulSet", "redis"),
            ("Service", "redis"),
            ("Deployment", "mmserve-api"),
            ("Service", "mmserve-api"),
            ("Deployment", "mmserve-worker-primary"),
            ("PodDisruptionBudget", "mmserve-worker-primary"),
            ("ScaledObject", "mmserve-worker-primary"),
        } <= ids, name
        assert (("Ingress", "mmserve-api") in ids) == (name == "base+ingress"), name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
@pytest.mark.parametrize("target", list(TARGETS))
def test_the_python_renderer_matches_kubectl(target, target_dirs):
    assert by_id(kustomize.render(target_dirs[target])) == by_id(kubectl_kustomize(target_dirs[target]))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_the_python_renderer_sets_images_as_kubectl_does(tmp_path):
    """`kustomize edit set image` writes newName with newTag, or a digest: both as kubectl does."""
    for image in (
        {"name": IMAGE, "newName": "registry.example.com:5000/team/mmserve", "newTag": "1.2.3"},
        {"name": IMAGE, "newName": "registry.example.com/mmserve", "digest": "sha256:" + "0" * 64},
    ):
        overlay = tmp_path / image["newName"].rpartition("/")[2] / image.get("newTag", "digest")
        overlay.mkdir(parents=True)
        base = os.path.relpath(DEPLOY / "overlays" / "cpu", overlay)
        kustomization = {"resources": [base], "images": [image]}
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        rendered = kustomize.render(overlay)
        assert by_id(rendered) == by_id(kubectl_kustomize(overlay))
        assert {c["image"] for _, c in mmserve_containers(rendered)} == {
            image["newName"] + (f":{image['newTag']}" if "newTag" in image else f"@{image['digest']}")
        }


def test_every_kubernetes_object_is_valid_for_the_pinned_version(renders):
    seen = set()
    for name, objects in renders.items():
        for obj in objects:
            if obj["apiVersion"].startswith("keda.sh/"):
                continue
            text = json.dumps(obj, sort_keys=True)
            if text in seen:
                continue
            seen.add(text)
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")


def strict(schema: object) -> object:
    """The CRD's schema refusing unknown fields where Kubernetes would (the API server drops or,
    with kubectl's strict field validation, refuses fields a structural schema does not list)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def keda_scaled_object_schema() -> dict:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [one for one in crd["spec"]["versions"] if one["name"] == "v1alpha1"]
    return strict(version["schema"]["openAPIV3Schema"])


def test_scaled_objects_are_valid_for_kedas_crd(renders):
    schema = keda_scaled_object_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    for name, objects in renders.items():
        for scaled in of_kind(objects, "ScaledObject"):
            assert scaled["apiVersion"] == "keda.sh/v1alpha1"
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(scaled), key=str)
            assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
            # metadata is ObjectMeta, which the CRD leaves to Kubernetes: check it as a ConfigMap's
            stand_in = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": scaled["metadata"]}
            kubernetes_validate.validate(stand_in, KUBERNETES_VERSION, strict=True)
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["type"] == "redis"
                assert set(trigger["metadata"]) <= KEDA_REDIS_METADATA, name
                for number in ("listLength", "activationListLength", "databaseIndex"):
                    assert re.fullmatch(r"\d+", trigger["metadata"][number]), (name, number)


def test_the_strict_crd_schema_refuses_an_unknown_field(renders):
    scaled = copy.deepcopy(of_kind(renders["base"], "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    assert not jsonschema.Draft7Validator(keda_scaled_object_schema()).is_valid(scaled)


def test_every_namespaced_object_is_in_the_namespace(renders):
    for name, objects in renders.items():
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == NAMESPACE, (
                    name,
                    obj["kind"],
                    obj["metadata"]["name"],
                )


# -- the code's facts ------------------------------------------------------------------------------------


def queue_list_key(group: str) -> str:
    """The Redis list holding a group's RQ queue, as RQ itself names it (no connection is made)."""
    return rq.Queue(keys.queue_name(group), connection=redis.Redis()).key


def test_the_primary_queue_is_the_list_the_readme_names():
    assert queue_list_key(defaults.DEFAULT_CONSUMER_GROUP) == "rq:queue:mmserve.primary"


def test_each_scaled_object_watches_its_workers_group_queue(renders, monkeypatch):
    for name, objects in renders.items():
        deployments = by_id(objects)
        for scaled in of_kind(objects, "ScaledObject"):
            target = scaled["spec"]["scaleTargetRef"]
            assert target.get("kind", "Deployment") == "Deployment"
            worker = deployments[("Deployment", target["name"])]
            (container,) = containers(worker)
            params = mmserve_params(objects, container, monkeypatch)
            (trigger,) = scaled["spec"]["triggers"]
            assert trigger["metadata"]["listName"] == queue_list_key(params["consumer_group"]), name
            # one batch's worth waiting per worker (see worker-primary-scaledobject.yaml)
            assert int(trigger["metadata"]["listLength"]) == params["max_batch_size"], name
            # Unless the API queues for a group without a ready worker (--scale-from-zero), it
            # answers 503 and queues nothing, so a queue-length trigger could not wake it from zero.
            (api,) = containers(deployments[("Deployment", "mmserve-api")])
            waits = mmserve_params(objects, api, monkeypatch)["scale_from_zero"] == "on"
            assert scaled["spec"]["minReplicaCount"] >= (0 if waits else 1), name
            assert waits == (name == "cpu+scale-to-zero"), name
            assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]


def redis_service(objects: list[dict]) -> tuple[dict, dict]:
    (statefulset,) = [w for w in workloads(objects) if containers(w)[0]["name"] == "redis"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    services = [s for s in of_kind(objects, "Service") if s["spec"]["selector"].items() <= labels.items()]
    assert len(services) == 1
    return services[0], statefulset


def test_redis_is_one_persistent_append_only_server(renders):
    for objects in renders.values():
        service, statefulset = redis_service(objects)
        assert statefulset["spec"]["replicas"] == 1
        assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
        (container,) = containers(statefulset)
        assert container["command"] == ["redis-server", "--appendonly", "yes"]
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


def test_every_process_uses_the_redis_service(renders, monkeypatch):
    for name, objects in renders.items():
        service, _ = redis_service(objects)
        ports = [port["port"] for port in service["spec"]["ports"]]
        databases = set()
        for workload, container in mmserve_containers(objects):
            url = urlsplit(mmserve_params(objects, container, monkeypatch)["redis_url"])
            assert url.hostname == service["metadata"]["name"], (name, workload["metadata"]["name"])
            assert (url.port or 6379) in ports
            databases.add(url.path.strip("/") or "0")
        assert len(databases) == 1, name
        for scaled in of_kind(objects, "ScaledObject"):
            (trigger,) = scaled["spec"]["triggers"]
            # KEDA's operator runs in its own namespace: the address names the Service with its namespace
            host, _, port = trigger["metadata"]["address"].rpartition(":")
            assert (
                host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
            )
            assert int(port) in ports
            assert {trigger["metadata"]["databaseIndex"]} == databases


def test_every_port_a_service_targets_is_declared(renders):
    for name, objects in renders.items():
        for service in of_kind(objects, "Service"):
            selected = [
                w
                for w in workloads(objects)
                if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert selected, (name, service["metadata"]["name"])
            for workload in selected:
                declared = [port for c in containers(workload) for port in c.get("ports", [])]
                for port in service["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    key = "name" if isinstance(target, str) else "containerPort"
                    assert any(one.get(key) == target for one in declared), (
                        name,
                        service["metadata"]["name"],
                        target,
                    )


def api_routes() -> tuple[Flask, dict[str, str | None]]:
    """The API's URL map (the blueprints api.app registers) and the port kind of each endpoint."""
    app = Flask("routes")
    port_of_endpoint = {}
    for blueprint, _ in api_app.BLUEPRINTS:
        app.register_blueprint(blueprint)
    for rule in app.url_map.iter_rules():
        blueprint = rule.endpoint.rpartition(".")[0]
        port_of_endpoint[rule.endpoint] = api_app.PORT_OF_BLUEPRINT.get(blueprint) if blueprint else "none"
    return app, port_of_endpoint


def port_kinds(params: dict) -> dict[int, str]:
    return {
        params["port"]: api_app.INFERENCE,
        params["management_port"]: api_app.MANAGEMENT,
        params["openai_port"]: api_app.OPENAI,
    }


def test_the_api_listens_on_the_ports_its_container_declares(renders, monkeypatch):
    for objects in renders.values():
        for _, container in api_containers(objects):
            params = mmserve_params(objects, container, monkeypatch)
            assert params["host"] == "0.0.0.0"
            declared = {port["containerPort"] for port in container["ports"]}
            assert declared == set(port_kinds(params))
            assert declared == {defaults.INFERENCE_PORT, defaults.MANAGEMENT_PORT, defaults.OPENAI_PORT}


def test_api_probes_hit_paths_the_api_serves_on_their_port(renders, monkeypatch):
    app, port_of_endpoint = api_routes()
    urls = app.url_map.bind("probe")
    for name, objects in renders.items():
        for _, container in api_containers(objects):
            params = mmserve_params(objects, container, monkeypatch)
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
            assert probes["livenessProbe"]["path"] == "/healthz"
            assert probes["readinessProbe"]["path"] == "/readyz"
            for probe in probes.values():
                endpoint, _ = urls.match(probe["path"], method="GET")
                number = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
                assert port_of_endpoint[endpoint] in (None, port_kinds(params)[number]), (name, probe)
            # /readyz needs the API key once one is set; kubelet's httpGet would then get 401s
            if params["api_key"]:
                assert "httpHeaders" in probes["readinessProbe"], name
            assert "probes.healthz" in api_app.OPEN_ENDPOINTS


def test_the_ingress_sends_each_route_to_the_port_that_serves_it(renders, monkeypatch):
    objects = renders["base+ingress"]
    app, port_of_endpoint = api_routes()
    services = by_id(objects)
    ((_, container),) = api_containers(objects)
    kinds = port_kinds(mmserve_params(objects, container, monkeypatch))
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (ingress,) = of_kind(objects, "Ingress")
    routes = []  # (path prefix, port kind)
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "Prefix"
            backend = path["backend"]["service"]
            service = services[("Service", backend["name"])]
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
            routes.append((path["path"], kinds[container_ports[port["targetPort"]]]))
    assert api_app.MANAGEMENT not in {kind for _, kind in routes}  # management stays inside the cluster

    def routed(url: str) -> str:
        matching = [
            (prefix, kind)
            for prefix, kind in routes
            if url == prefix or url.startswith(prefix.rstrip("/") + "/")
        ]
        return max(matching, key=lambda route: len(route[0]))[1]

    for url_rule in app.url_map.iter_rules():
        kind = port_of_endpoint[url_rule.endpoint]
        if kind in (api_app.INFERENCE, api_app.OPENAI):
            assert routed(url_rule.rule) == kind, url_rule.rule

    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # SSE token by token
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        # a non-streaming request sends nothing until it ends: its wait plus its whole batch
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) >= defaults.JOB_TIMEOUT_SECONDS
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 >= defaults.DEFAULT_BODY_SIZE_LIMIT_BYTES


def test_every_mmserve_variable_is_one_the_cli_reads(renders):
    known = {
        param.envvar for command in cli.main.commands.values() for param in command.params if param.envvar
    }
    for objects in renders.values():
        for config_map in of_kind(objects, "ConfigMap"):
            for variable in config_map.get("data", {}):
                assert not variable.startswith("MMSERVE_") or variable in known, variable
        for _, container in mmserve_containers(objects):
            for variable in container.get("env", []):
                assert not variable["name"].startswith("MMSERVE_") or variable["name"] in known


def test_no_service_link_variables_reach_mmserve(renders):
    """A Service called `mmserve` would put MMSERVE_PORT=tcp://...:3000 in every pod's
    environment, where `mmserve api` reads its --port."""
    for objects in renders.values():
        for workload in workloads(objects):
            assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False


# Kubernetes' quantity syntax (k8s.io/apimachinery resource.Quantity), which the JSON schemas
# leave as any string or number.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?")


def quantities(workload: dict) -> list[str]:
    found = []
    for container in containers(workload):
        for kind in ("requests", "limits"):
            found += [str(value) for value in container["resources"].get(kind, {}).values()]
    for volume in workload["spec"]["template"]["spec"].get("volumes", []):
        if "sizeLimit" in volume.get("emptyDir", {}):
            found.append(str(volume["emptyDir"]["sizeLimit"]))
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        found += [str(value) for value in claim["spec"]["resources"]["requests"].values()]
    return found


def test_every_container_asks_for_what_it_uses(renders):
    for name, objects in renders.items():
        for workload in workloads(objects):
            for container in containers(workload):
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), (name, container["name"])
                assert "memory" in resources["limits"], (name, container["name"])
            for quantity in quantities(workload):
                assert QUANTITY.fullmatch(quantity), (name, workload["metadata"]["name"], quantity)


def test_mmserve_runs_the_dockerfiles_image(renders):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["mmserve", "serve"]' in dockerfile  # alone, the image runs everything (as Takeoff's does)
    for name, objects in renders.items():
        images = {container["image"] for _, container in mmserve_containers(objects)}
        assert len(images) == 1, name  # one image for the API and the workers
        (image,) = images
        assert image.partition(":")[0] == IMAGE
        assert image == (f"{IMAGE}:cuda" if name == "gpu" else f"{IMAGE}:latest")


# -- workers ---------------------------------------------------------------------------------------------


def test_worker_grace_period_outlasts_the_longest_batch(renders):
    """A scaled-down or evicted worker finishes the rows in flight before it exits (warm
    shutdown). The longest a batch is meant to run is the RQ job timeout each job is queued with
    (JOB_TIMEOUT_SECONDS; the per-request limits, up to MAX_NEW_TOKENS_LIMIT tokens a row, fit in
    it); Kubernetes must not SIGKILL the worker before that."""
    for name, objects in renders.items():
        for worker, _ in workers(objects):
            grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace >= defaults.JOB_TIMEOUT_SECONDS, name
    for name, objects in renders.items():
        for api, container in api_containers(objects):
            # gunicorn's --graceful-timeout (30 s) after the preStop pause
            pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
            assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30 + pause, name


def test_worker_threads_follow_the_cpu_request(renders, monkeypatch):
    for name, objects in renders.items():
        for _, container in workers(objects):
            (threads,) = [v for v in container["env"] if v["name"] == "MMSERVE_THREADS"]
            field = threads["valueFrom"]["resourceFieldRef"]
            assert (field["containerName"], field["resource"]) == (container["name"], "requests.cpu")
            request = cpu_cores(container["resources"]["requests"]["cpu"])
            assert request == int(request), f"{name}: a whole number of CPUs, so threads == the request"
            assert cpu_cores(container["resources"]["limits"]["cpu"]) == request
            assert mmserve_params(objects, container, monkeypatch)["threads"] == request


def test_workers_serve_the_primary_group_on_their_device(renders, monkeypatch):
    for name, objects in renders.items():
        ((worker, container),) = workers(objects)
        params = mmserve_params(objects, container, monkeypatch)
        assert params["consumer_group"] == defaults.DEFAULT_CONSUMER_GROUP
        assert params["cache_dir"] == "/cache"
        assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
        limits = container["resources"]["limits"]
        pod = worker["spec"]["template"]["spec"]
        if name == "gpu":
            assert params["device"] == "cuda"
            assert int(limits[GPU]) >= 1
            assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
            assert pod["nodeSelector"]
        else:
            assert GPU not in limits and "tolerations" not in pod
            assert params["device"] == ("cpu" if name.startswith("cpu") else "auto")


def test_a_pod_disruption_budget_covers_each_worker_group(renders):
    for name, objects in renders.items():
        budgets = of_kind(objects, "PodDisruptionBudget")
        for worker, _ in workers(objects):
            labels = worker["spec"]["template"]["metadata"]["labels"]
            covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert len(covering) == 1, name
            assert covering[0]["spec"].get("maxUnavailable", 0) >= 1  # a node drain can always proceed
            assert worker["spec"]["selector"]["matchLabels"] == covering[0]["spec"]["selector"]["matchLabels"]
        for api, _ in api_containers(objects):
            labels = api["spec"]["template"]["metadata"]["labels"]
            assert not any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets)


def test_workers_have_no_replica_count_for_apply_to_reset(renders):
    for objects in renders.values():
        for worker, _ in workers(objects):
            assert "replicas" not in worker["spec"]  # KEDA's HPA owns it


# -- the workers' readiness probe ------------------------------------------------------------------------


def run_probe(
    script: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, server: fakeredis.FakeServer
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("socket.gethostname", lambda: "mmserve-worker-primary-abc12")
    monkeypatch.setattr(
        shared_connection,
        "connect",
        lambda url, **_: fakeredis.FakeRedis(server=server, decode_responses=False),
    )
    with pytest.raises(SystemExit) as exited:
        exec(compile(script, "worker_ready.py", "exec"), {"__name__": "__main__"})
    return exited.value.code


def test_the_worker_readiness_probe_reads_the_registry(renders, monkeypatch):
    objects = renders["base"]
    ((worker, container),) = workers(objects)
    probe = container["readinessProbe"]["exec"]["command"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in worker["spec"]["template"]["spec"]["volumes"]}
    (volume_name,) = [name for name, path in mounts.items() if probe[-1].startswith(path + "/")]
    config_map = by_id(objects)[("ConfigMap", volumes[volume_name]["configMap"]["name"])]
    script = config_map["data"][Path(probe[-1]).name]
    env = environment(objects, container)

    server = fakeredis.FakeServer()
    connection = fakeredis.FakeRedis(server=server)
    assert run_probe(script, env, monkeypatch, server) == 1  # nothing registered

    def entry(hostname: str, ready: bool) -> registry.ReaderInfo:
        return registry.ReaderInfo(
            reader_id=f"primary-{hostname[-5:]}",
            consumer_group="primary",
            model_name="m",
            pids=[1],
            ready=ready,
            hostname=hostname,
        )

    registry.register(connection, entry("mmserve-worker-primary-zzz99", ready=True))  # another pod
    registry.register(connection, entry("mmserve-worker-primary-abc12", ready=False))  # this one, loading
    assert run_probe(script, env, monkeypatch, server) == 1
    registry.register(connection, entry("mmserve-worker-primary-abc12", ready=True))
    assert run_probe(script, env, monkeypatch, server) == 0
    registry.deregister(connection, entry("mmserve-worker-primary-abc12", ready=True))
    assert run_probe(script, env, monkeypatch, server) == 1


def test_the_readme_names_the_real_queue_and_files():
    readme = (DEPLOY / "README.md").read_text()
    assert queue_list_key("primary") in readme
    for path in re.findall(r"`((?:base|overlays|components)/[\w./-]+)`", readme):
        assert (DEPLOY / path).exists(), path


def test_click_refuses_what_the_manifests_would_get_wrong(renders, monkeypatch):
    """mmserve_params really parses: a bad value in a container would fail these tests."""
    ((_, container),) = workers(renders["cpu"])
    broken = copy.deepcopy(container)
    broken["args"] = ["--device", "tpu"]
    with pytest.raises(click.BadParameter):
        mmserve_params(renders["cpu"], broken, monkeypatch)
