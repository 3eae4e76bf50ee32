"""deploy/kubernetes validates offline (kubernetes-validate's bundled schemas, strict: an unknown
field fails) and stays consistent with the server: every PARAMSERVE_* variable it sets is one
`paramserve serve --help` lists, with a value the server accepts; probes, ports and grace agree
with the image."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from paramserve.service.cli import build_parser
from paramserve.service.config import LogSettings, server_fields
from paramserve.service.settings import convert, env_of, settings_of

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes" / "base"
GPU = ROOT / "deploy" / "kubernetes" / "gpu"
# The oldest Kubernetes the manifests are for (native gRPC probes are GA since 1.27) and the
# newest schemas kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
AWS_VARIABLES = {"AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # boto3's own


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> list[dict]:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    return [d for name in listed for d in documents(BASE / name)]


def one(resources: list[dict], kind: str, name: str = "paramserve") -> dict:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def apply_json_patch(document: dict, operations: list[dict]) -> dict:
    """The ``add``/``replace`` operations of RFC 6902 the GPU overlay uses."""
    out = copy.deepcopy(document)
    for op in operations:
        assert op["op"] in ("add", "replace"), op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")]
        *parents, last = parts
        node = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = op["value"]
    return out


def gpu_deployment() -> dict:
    overlay = yaml.safe_load((GPU / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base"]
    [patch] = overlay["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "paramserve"}
    return apply_json_patch(one(base_resources(), "Deployment"),
                            yaml.safe_load((GPU / patch["path"]).read_text()))


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def environment(resources: list[dict], deployment: dict) -> dict[str, str]:
    """What the container's environment holds: the ConfigMap, the Secret, then ``env``."""
    env: dict[str, str] = {}
    for source in container(deployment)["envFrom"]:
        kind, ref = ("ConfigMap", "configMapRef") if "configMapRef" in source else (
            "Secret", "secretRef")
        resource = one(resources, kind, source[ref]["name"])
        env.update(resource.get("data") or resource.get("stringData"))
    env.update({e["name"]: e["value"] for e in container(deployment).get("env", [])})
    return env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates(version):
    resources = base_resources() + [gpu_deployment()]
    assert {r["kind"] for r in resources} >= {"Deployment", "Service", "ConfigMap", "Secret"}
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_a_misspelt_field_does_not_validate():
    deployment = one(base_resources(), "Deployment")
    container(deployment)["livenesProbe"] = container(deployment).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest():
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not here")
@pytest.mark.parametrize("overlay", [BASE, GPU], ids=["base", "gpu"])
def test_kubectl_kustomize_builds_what_validates(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    assert len(built) == len(base_resources())
    for resource in built:
        kubernetes_validate.validate(resource, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = one(built, "Deployment")
    limits = container(deployment)["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (overlay == GPU)
    assert container(deployment)["image"] == ("paramserve:0.1.0-cuda" if overlay == GPU
                                              else "paramserve:0.1.0")


@pytest.mark.parametrize("deployment", ["base", "gpu"])
def test_every_paramserve_variable_is_a_serve_setting_with_a_valid_value(deployment):
    resources = base_resources()
    chosen = one(resources, "Deployment") if deployment == "base" else gpu_deployment()
    env = environment(resources, chosen)
    fields = {env_of(f): f for f in server_fields() + settings_of(LogSettings)}
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    help_text = " ".join(serve.format_help().split())
    for name, value in env.items():
        if name in AWS_VARIABLES:
            continue
        assert name in fields, f"{name} is not a `paramserve serve` setting"
        assert name in help_text
        convert(fields[name], value)  # raises ValueError for a value the server refuses
    assert env["PARAMSERVE_REGISTRY_URL"].startswith("postgresql+psycopg://")
    assert env["PARAMSERVE_BLOB_URL"].startswith("s3://")


def test_probes_ports_grace_and_user_agree_with_the_server_and_image():
    resources = base_resources()
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]
    main = container(deployment)
    env = environment(resources, deployment)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    for name, variable in (("grpc", "PARAMSERVE_LISTEN"), ("http", "PARAMSERVE_HTTP_LISTEN"),
                           ("metrics", "PARAMSERVE_METRICS_LISTEN")):
        assert env[variable] == f"0.0.0.0:{ports[name]}"  # on the pod's address, not loopback
    assert main["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": ""}
    assert main["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    assert main["startupProbe"]["grpc"]["port"] == ports["grpc"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["PARAMSERVE_GRACE_S"])
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    assert pod["spec"]["securityContext"]["runAsUser"] == uid
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert main["resources"]["requests"] and main["resources"]["limits"]
    # the Secret holds the credentials, the ConfigMap none
    configmap = one(resources, "ConfigMap")["data"]
    assert not {"PARAMSERVE_REGISTRY_URL", "AWS_SECRET_ACCESS_KEY"} & set(configmap)
    services = [r for r in resources if r["kind"] == "Service"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    for service in services:
        assert service["spec"]["selector"] == selector
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert {p["port"] for p in one(resources, "Service")["spec"]["ports"]} == {8000, 8001, 8002}
    assert container(gpu_deployment())["resources"]["limits"]["nvidia.com/gpu"] == 1
