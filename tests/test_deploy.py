"""The deployment files agree with each other and with the config they deploy: probe paths and
ports, grace periods, image names, the dependency lock. No image is built here (no registry);
what a file promises that the code decides (port, prefix, shutdown timeout) is read from the
config model, not repeated in the test."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy import __version__
from proxy.config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
IMAGE = f"pollguard:{__version__}"
APP_LABEL = {"app.kubernetes.io/name": "pollguard"}


def shipped_config(path: Path, env: dict[str, str] | None = None) -> Config:
    return parse_config(path.read_text(), env=env or {})


def manifests() -> dict[str, dict[str, Any]]:
    """The kustomization's resources by kind, each file one document."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    by_kind: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        document = yaml.safe_load((KUBERNETES / name).read_text())
        by_kind[document["kind"]] = document
    return by_kind


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def pod_container() -> dict[str, Any]:
    containers = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


# Dockerfile -----------------------------------------------------------------------------------
def test_base_image_is_pinned_to_a_full_version() -> None:
    """FROM names an exact Python patch release and Debian release, never a moving tag."""
    bases = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+", bases[0]), bases[0]


def test_dependencies_come_from_the_hashed_lock_before_the_source() -> None:
    """The lock is installed with --require-hashes in a layer before any source is copied, so a
    source change reuses the dependency layer; the package itself pulls in nothing more."""
    steps = dockerfile_instructions()
    lock_install = next(
        i for i, (k, a) in enumerate(steps) if k == "RUN" and "requirements.lock" in a
    )
    assert "--require-hashes" in steps[lock_install][1]
    copies = [i for i, (k, a) in enumerate(steps) if k == "COPY"]
    source_copy = next(i for i in copies if "proxy" in steps[i][1].split())
    assert all("requirements.lock" in steps[i][1] for i in copies if i < lock_install)
    assert lock_install < source_copy
    package_install = next(
        args for keyword, args in steps[source_copy:] if keyword == "RUN" and "pip install" in args
    )
    assert "--no-deps" in package_install and "--no-build-isolation" in package_install


def test_runs_as_a_numeric_non_root_user_with_healthcheck_and_drain() -> None:
    steps = dict(dockerfile_instructions())  # the last of each instruction is the one in force
    user = steps["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can verify it
    assert '"pollguard", "healthcheck"' in steps["HEALTHCHECK"]
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert steps["ENTRYPOINT"] == '["pollguard"]'
    assert steps["CMD"] == '["serve", "--host", "0.0.0.0"]'
    assert steps["ENV"] == "POLLGUARD_CONFIG=/etc/pollguard/config.yaml"
    assert steps["EXPOSE"] == str(shipped_config(REPO / "config.yaml").server.port)


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """Each dependency in pyproject.toml is in the lock at a version its specifier allows, and
    every pinned package carries at least one hash (pip --require-hashes refuses otherwise)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = (REPO / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", re.sub(r"(?m)^\s*#.*\n", "", lock).strip())
    pinned: dict[str, str] = {}
    for entry in entries:
        match = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s\\;]+)", entry)
        assert match, entry
        assert "--hash=sha256:" in entry, f"{match.group(1)} has no hash"
        pinned[canonicalize_name(match.group(1))] = match.group(2)
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version}"
    assert "setuptools" in pinned  # the build backend, installed without build isolation


def test_the_image_install_steps_work_with_hashes_enforced(tmp_path: Path) -> None:
    """The Dockerfile's two pip steps, in a fresh virtualenv: the lock installs with
    --require-hashes, pollguard builds from source on top of it without fetching anything
    unpinned, and the result is consistent (pip check) and runs."""
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    locked = run(*pip, "--require-hashes", "--no-deps", "-r", str(REPO / "requirements.lock"))
    assert locked.returncode == 0, locked.stderr
    # The source as the image has it: what the Dockerfile's COPY steps into /src bring.
    source = tmp_path / "src"
    source.mkdir()
    for keyword, args in dockerfile_instructions():
        *names, destination = args.split()
        if keyword == "COPY" and destination.startswith("./"):
            for name in names:
                # A directory's contents go to the destination, as Docker copies them.
                target = source / destination if destination != "./" else source / name
                if (REPO / name).is_dir():
                    shutil.copytree(REPO / name, target, dirs_exist_ok=True)
                else:
                    shutil.copy(REPO / name, target)
    built = run(*pip, "--no-deps", "--no-build-isolation", str(source))
    assert built.returncode == 0, built.stderr
    assert run(python, "-m", "pip", "check").returncode == 0
    version = run(str(tmp_path / "venv" / "bin" / "pollguard"), "--version")
    assert version.stdout.strip() == f"pollguard {__version__}", version.stderr


# Compose --------------------------------------------------------------------------------------
def test_compose_runs_the_demo_through_pollguard_with_redis() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    pollguard, backend = services["pollguard"], services["backend"]
    assert pollguard["image"] == backend["image"] == IMAGE
    assert backend["build"]["context"] == ".."
    assert (DEPLOY / backend["build"]["context"] / backend["build"]["dockerfile"]).is_file()
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", services["redis"]["image"])
    env = pollguard["environment"]
    mount_source, mount_target, _ = pollguard["volumes"][0].split(":")
    assert mount_target == env["POLLGUARD_CONFIG"]
    config = shipped_config(DEPLOY / mount_source, env)
    command = backend["command"]
    assert command[0] == "simulate-backend"
    backend_port = command[command.index("--port") + 1]
    assert str(config.upstream.url) == f"http://backend:{backend_port}"
    assert config.state.redis_url == "redis://redis:6379/0"
    assert pollguard["ports"] == [f"{config.server.port}:{config.server.port}"]
    assert "stall-first" in command  # the stuck job pollguard recovers
    grace = float(pollguard["stop_grace_period"].removesuffix("s"))
    assert grace > config.server.shutdown_timeout


# Kubernetes -----------------------------------------------------------------------------------
def test_kubernetes_probes_and_ports_agree_with_the_config() -> None:
    config = shipped_config(REPO / "config.yaml")
    container = pod_container()
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == config.server.port
    prefix = config.admin.prefix
    for probe, endpoint in (
        ("startupProbe", "health"),
        ("livenessProbe", "health"),
        ("readinessProbe", "ready"),
    ):
        assert container[probe]["httpGet"] == {"path": prefix + endpoint, "port": "http"}
    service = manifests()["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == APP_LABEL


def test_kubernetes_grace_period_outlasts_the_drain() -> None:
    """The kubelet waits for the preStop pause and then the whole shutdown drain."""
    config = shipped_config(REPO / "config.yaml")
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    pause = pod_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    needed = config.server.shutdown_timeout + float(pause[1])
    assert pod["terminationGracePeriodSeconds"] > needed


def test_kubernetes_pod_is_locked_down_and_bounded() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = pod_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_kubernetes_objects_name_each_other() -> None:
    objects = manifests()
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == APP_LABEL
    assert deployment["spec"]["template"]["metadata"]["labels"] == APP_LABEL
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == APP_LABEL
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    config_volume = next(v for v in volumes if "configMap" in v)
    assert config_volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    container = pod_container()
    assert container["image"] == IMAGE
    env = {item["name"]: item for item in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    assert env["POLLGUARD_CONFIG"]["value"] == mount["mountPath"] + "/config.yaml"
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "pollguard", "newTag": __version__}]


def test_kubernetes_configmap_is_the_shipped_config() -> None:
    """The ConfigMap carries config.yaml byte for byte (regenerate it with the command in
    kustomization.yaml), and with the Deployment's environment that config is valid with Redis."""
    configmap = manifests()["ConfigMap"]
    assert configmap["data"] == {"config.yaml": (REPO / "config.yaml").read_text()}
    env = {item["name"]: item["value"] for item in pod_container()["env"] if "value" in item}
    config = parse_config(configmap["data"]["config.yaml"], env=env)
    assert config.state.redis_url == env["REDIS_URL"]
    assert str(config.upstream.url) == env["POLLGUARD_UPSTREAM"]


@pytest.mark.parametrize("path", sorted(p.name for p in KUBERNETES.glob("*.yaml")))
def test_every_manifest_is_one_yaml_document(path: str) -> None:
    documents = list(yaml.safe_load_all((KUBERNETES / path).read_text()))
    assert len(documents) == 1 and isinstance(documents[0], dict)
