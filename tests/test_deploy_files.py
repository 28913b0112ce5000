"""docker-compose.yml, the Dockerfile and the VM files, checked without a Docker engine:
every command a service runs is a real `pairfarm` command with real options, and every
file the deployment references exists."""

from __future__ import annotations

import re
import shlex
from typing import Any

import click
import pytest
import yaml

from pairfarm.cli import cli
from tests.conftest import REPO
from tests.docs_text import docs_text

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PAIRFARM_IMAGES = {"pairfarm-coordinator", "pairfarm-worker", "pairfarm-postprocess",
                   "pairfarm-postprocess-gpu"}


def pairfarm_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The argv of every `pairfarm ...` the service runs (entrypoint pairfarm, or sh -c)."""
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else list(command)
    if service.get("entrypoint") == ["sh", "-c"]:
        script = re.sub(r"\$\$\(cat [^)]*\)", "TOKEN", " ".join(command))
        script = re.sub(r">\s*\S+", "", script)  # output redirections
        parts = (re.sub(r"^[^a-z]*(exec )?", "", p.strip()).rstrip(")")
                 for p in re.split(r";|&&|\|\|", script))
        return [shlex.split(p)[1:] for p in parts if p.startswith("pairfarm ")]
    return [command]


def resolve(argv: list[str]) -> click.Context:
    """Parse ``pairfarm ARGV`` the way click would, without running it."""
    command: click.Command = cli
    parent: click.Context | None = None
    args = list(argv)
    while isinstance(command, click.Group):
        assert args, "a group needs a subcommand"
        ctx = click.Context(command, info_name=command.name, parent=parent)
        name, *args = args
        sub = command.get_command(ctx, name)
        assert sub is not None, f"unknown command {name!r}"
        command, parent = sub, ctx
    return command.make_context(command.name, args, parent=parent)


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items()
                                        if s.get("image") in PAIRFARM_IMAGES))
def test_every_pairfarm_service_runs_a_real_command(name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SERVICES[name].get("environment", {}).items():
        monkeypatch.setenv(key, str(value))
    invocations = pairfarm_invocations(SERVICES[name])
    assert invocations, f"{name} runs no pairfarm command"
    for argv in invocations:
        resolve(argv)  # raises on an unknown command or option


def test_the_command_parser_rejects_what_click_rejects() -> None:
    with pytest.raises(click.UsageError):
        resolve(["worker", "--no-such-flag"])
    with pytest.raises(AssertionError):
        resolve(["no-such-command"])


def test_files_the_deployment_references_exist() -> None:
    for service in SERVICES.values():
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy"):
                assert (REPO / source).exists(), source
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (REPO / source).exists(), source


def test_dockerfile_targets_install_only_their_extra() -> None:
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile,
                             flags=re.M | re.S))
    assert "'.[worker]'" in stages["worker"] and "torch" not in stages["worker"]
    assert "'.[coordinator]'" in stages["coordinator"]
    assert "'.[gpu]'" in stages["postprocess"]
    for service in SERVICES.values():
        build = service.get("build")
        if build:
            assert build["target"] in stages


def test_compose_farm_shape() -> None:
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    assert "healthcheck" in SERVICES["postgres"]
    assert SERVICES["migrate"]["command"] == ["db", "upgrade"]
    assert "deploy" not in SERVICES["worker"] or "replicas" not in SERVICES["worker"]["deploy"]
    assert "container_name" not in SERVICES["worker"], "a fixed name prevents --scale"
    gpu = SERVICES["postprocess-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # workers and post-processing see the shards at the same path
    assert "shards:/data/shards" in SERVICES["worker"]["volumes"]
    assert "shards:/data/shards:ro" in SERVICES["postprocess"]["volumes"]


def _unit_body(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_cloud_init_carries_the_same_systemd_unit() -> None:
    unit = (REPO / "deploy/vm/pairfarm-worker.service").read_text()
    init = yaml.safe_load((REPO / "deploy/vm/cloud-init.yaml").read_text())
    files = {f["path"]: f for f in init["write_files"]}
    embedded = files["/etc/systemd/system/pairfarm-worker.service"]["content"]
    skip = {"Documentation"}
    assert [ln for ln in _unit_body(unit) if ln.split("=")[0] not in skip] == \
        _unit_body(embedded)
    assert files["/etc/pairfarm/worker.env"]["permissions"] == "0600"
    assert any("pairfarm[worker" in " ".join(map(str, c)) for c in init["runcmd"])


def test_vm_environment_names_are_worker_settings() -> None:
    worker = resolve(["worker", "--coordinator", "http://x", "--token", "t"]).command
    envvars = {p.envvar for p in worker.params if isinstance(p, click.Option)}
    env_lines = [ln for ln in _unit_body((REPO / "deploy/vm/worker.env.example").read_text())]
    for line in env_lines:
        name = line.split("=")[0]
        if name.startswith("PAIRFARM_"):
            assert name in envvars, f"{name} is not a `pairfarm worker` setting"


def test_readme_names_what_was_verified_without_docker() -> None:
    readme = docs_text()
    assert "docker compose up" in readme
    assert "tests/test_deploy_files.py" in readme


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    """An allow list: the build context is the Dockerfile's COPY sources and nothing else
    (a deny list of .venv missed .venv-i2d/.venv-tf beside it, 3 GB sent on every build)."""
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    copied = {source for sources in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M)
              for source in sources.split()}
    assert allowed == copied


def test_compose_waits_out_the_worker_drain_before_killing_it() -> None:
    """`docker compose stop/down` gives a worker longer than its drain to finish or release
    its batch; the SIGKILL after compose's default 10 s leaves the lease held."""
    grace = SERVICES["worker"].get("stop_grace_period", "10s")
    assert grace.endswith("s"), grace
    drain = resolve(["worker", "--coordinator", "http://c", "--token", "t"]).params[
        "drain_timeout"]
    assert float(grace[:-1]) > drain
