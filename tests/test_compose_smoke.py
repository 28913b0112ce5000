"""docker-compose.yml run for real: the project's compose file on podman, end to end.

The stack is the project's file (postgres, migrate, tokens, coordinator, 3 scaled workers,
prometheus) with `tests/compose_smoke.yml` laid over it (short batches and leases, the
test's input folder, workers allowed to fetch from a private address). The public images
are the local stand-ins `deploy/podman/base-images.sh` builds from Debian packages and PyPI;
the pairfarm images are built from `deploy/docker/Dockerfile` by compose itself.

Compose is Debian's docker-compose 1.29 talking to podman's Docker API (`podman system
service`, started here): podman 4.3 has no `podman compose`, and podman-compose does not
wait on `service_healthy` / `service_completed_successfully` before podman 4.6.
docker-compose 1.29 predates the top-level `name:` key, so the file is given without it,
with the project name on the command line (what `docker compose -p` does).
Podman runs healthchecks from systemd timers; no systemd runs on these machines, so a
thread here runs each container's own healthcheck (`podman healthcheck run`) on the
compose interval, as the timer would.

Candidates point at an image server on the host (the demo plan: a known outcome per URL)
behind a gate the test holds, reached from the containers as `host.containers.internal`.
The run: up; ingest 300 candidates with `pairfarm ingest` in the coordinator container
(`docker compose exec`: docker-compose 1.29's `run` links the one-off container to the
service's own, and podman's API refuses links); a
worker container holding batches is killed with SIGKILL (its restart policy brings it back,
its batches are leased again once their lease expires); some batches finish; `down` (the
workers release what they hold) and `up` again; everything finishes. Checks: every URL in
exactly one shard row of the `shards` volume with the planned outcome, no URL finished
before `down` fetched again, `/api/v1/stats` totals, the killed worker's batches leased
again and downloaded, and Prometheus (in the stack) scraping the coordinator and the 3
workers it finds through compose DNS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from localfarm.demo_server import EXPECTED, AnswerGate, DemoPlan, _Handler, _QuietServer
from pairfarm.client import ClientError, CoordinatorClient
from pairfarm.protocol import FarmStats
from pairfarm.shardformat import outcome_of
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

COUNT = 300
BATCH = 25  # tests/compose_smoke.yml: PAIRFARM_BATCH_SIZE
WORKERS = 3
SERVICES = ["postgres", "migrate", "tokens", "coordinator", "worker", "prometheus"]
HOST_PORTS = (8600, 9090)  # the compose file publishes the coordinator and Prometheus
COORDINATOR = "http://127.0.0.1:8600"
PROMETHEUS = "http://127.0.0.1:9090"
HEALTH_INTERVAL_S = 5.0  # the compose file's healthcheck interval
T = TypeVar("T")


def why_not() -> str | None:
    """Why the stack cannot run here, or None."""
    if os.geteuid() != 0:
        return "the compose smoke test runs rootful podman (CI runs as root)"
    for tool in ("podman", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (deploy/podman/install.sh installs it)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-300:]}"
    return None


REASON = why_not()
if REASON is not None:
    pytestmark.append(pytest.mark.skip(reason=REASON))


def wait_for(what: str, check: Callable[[], T | None], timeout: float,
             interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def podman(*args: str) -> str:
    return subprocess.run(["podman", *args], capture_output=True, text=True,
                          check=True).stdout


# -- the image server on the host ---------------------------------------------------------

class ImageServer:
    """The demo plan on 0.0.0.0 behind ``gate``; remembers which address asked for what."""

    def __init__(self, gate: AnswerGate) -> None:
        self.plan = DemoPlan(seed=15)
        self.gate = gate
        self.asked_by: dict[str, set[int]] = {}
        lock = threading.Lock()
        asked_by = self.asked_by

        class Handler(_Handler):
            def do_GET(self) -> None:
                number = self.path.rsplit("/", 1)[-1].split(".")[0]
                if number.isdigit():
                    with lock:
                        asked_by.setdefault(self.client_address[0], set()).add(int(number))
                super().do_GET()

        handler = type("SmokeHandler", (Handler,),
                       {"plan": self.plan, "delay": (0.0, 0.02), "gate": gate})
        self.server = _QuietServer(("0.0.0.0", 0), handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, n: int) -> str:
        return f"http://host.containers.internal:{self.port}/img/{n}.jpg"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.open()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- podman and compose -------------------------------------------------------------------

class HealthTicker:
    """Runs the healthcheck of the project's containers every interval (systemd's job)."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(HEALTH_INTERVAL_S):
            for health in ("starting", "healthy", "unhealthy"):
                ids = subprocess.run(
                    ["podman", "ps", "-q", "--filter",
                     f"label=com.docker.compose.project={self.project}",
                     "--filter", f"health={health}"],
                    capture_output=True, text=True, check=False).stdout.split()
                for container in ids:
                    subprocess.run(["podman", "healthcheck", "run", container],
                                   capture_output=True, check=False)

    def __enter__(self) -> HealthTicker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


class Compose:
    """docker-compose on the project's file (+ the smoke override) against podman's API."""

    def __init__(self, project: str, folder: Path, socket_path: Path, inputs: Path) -> None:
        self.project = project
        spec = (REPO / "docker-compose.yml").read_text()
        # docker-compose 1.29 rejects the compose spec's top-level `name:`; -p gives it
        self.file = folder / "docker-compose.yml"
        self.file.write_text("".join(line for line in spec.splitlines(keepends=True)
                                     if not line.startswith("name: ")))
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket_path}",
                    "PAIRFARM_SMOKE_INPUT": str(inputs), "COMPOSE_HTTP_TIMEOUT": "600"}

    def __call__(self, *args: str, timeout: float = 900) -> str:
        argv = ["docker-compose", "-p", self.project, "--project-directory", str(REPO),
                "-f", str(self.file), "-f", str(REPO / "tests/compose_smoke.yml"), *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                              timeout=timeout, check=False)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def up(self) -> None:
        self("up", "-d", "--build", "--scale", f"worker={WORKERS}", *SERVICES)

    def containers(self, service: str) -> list[dict[str, Any]]:
        ids = podman("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}").split()
        return json.loads(podman("inspect", *ids)) if ids else []

    def volume(self, name: str) -> Path:
        return Path(podman("volume", "inspect", f"{self.project}_{name}",
                           "--format", "{{.Mountpoint}}").strip())

    def sql(self, query: str) -> list[list[str]]:
        out = self("exec", "-T", "postgres", "psql", "-U", "pairfarm", "-d", "pairfarm",
                   "-tA", "-F", "\t", "-c", query)
        return [line.split("\t") for line in out.splitlines() if line]


def free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def podman_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Local base images (cached by the script), then podman's Docker API on a socket."""
    subprocess.run([str(REPO / "deploy/podman/base-images.sh")], check=True,
                   capture_output=True, timeout=1200)
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("podman's API socket", sock.exists, 60, 0.2)
        yield sock
    finally:
        service.terminate()
        service.wait(30)


@pytest.fixture
def compose(podman_api: Path, tmp_path: Path) -> Iterator[Compose]:
    busy = [port for port in HOST_PORTS if not free(port)]
    assert not busy, f"ports the compose file publishes are taken here: {busy}"
    inputs = tmp_path / "input"
    inputs.mkdir()
    inputs.chmod(0o755)  # the coordinator image runs as uid 10001
    stack = Compose(f"pfsmoke{os.getpid()}", tmp_path, podman_api, inputs)
    volumes_before = set(podman("volume", "ls", "-q").split())
    with HealthTicker(stack.project):
        try:
            yield stack
        finally:
            stack("down", "-v", "--remove-orphans", timeout=600)
            # the anonymous volume of the Prometheus container the mid-test `down` removed
            for volume in set(podman("volume", "ls", "-q").split()) - volumes_before:
                subprocess.run(["podman", "volume", "rm", volume], capture_output=True,
                               check=False)


# -- what the test reads ------------------------------------------------------------------

def stats(admin: str) -> FarmStats | None:
    try:
        with CoordinatorClient(COORDINATOR, admin) as client:
            return client.stats()
    except ClientError:
        return None


def all_downloaded(admin: str) -> FarmStats | None:
    now = stats(admin)
    busy = now is not None and {s for s, n in now.batches.items() if n} != {"downloaded"}
    return None if now is None or busy or now.candidates_pending else now


def shard_rows(folder: Path) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return []
    return pa.concat_tables(pq.read_table(f, columns=["url", "status", "error_class"])
                            for f in files).to_pylist()


def url_number(url: str) -> int:
    return int(url.rsplit("/", 1)[-1].split(".", maxsplit=1)[0])


def prometheus_up() -> dict[str, dict[str, float]]:
    """``up`` by job and instance, as the stack's Prometheus has it now."""
    query = urllib.parse.urlencode({"query": "up"})
    with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/query?{query}", timeout=10) as answer:
        result = json.load(answer)["data"]["result"]
    found: dict[str, dict[str, float]] = {}
    for series in result:
        labels = series["metric"]
        found.setdefault(labels["job"], {})[labels["instance"]] = float(series["value"][1])
    return found


def worker_addresses(compose: Compose) -> set[str]:
    found = set()
    for container in compose.containers("worker"):
        assert container["State"]["Running"], container["Name"]
        for network in container["NetworkSettings"]["Networks"].values():
            found.add(network["IPAddress"])
    return found


# -- the test -----------------------------------------------------------------------------

def test_compose_farm_runs_kills_a_worker_and_resumes_after_down(compose: Compose) -> None:
    gate = AnswerGate(is_open=False)
    with ImageServer(gate) as images:
        started = time.monotonic()
        compose("build", "migrate", "worker", timeout=1200)  # the two pairfarm images
        built = time.monotonic()
        compose.up()
        up_s = time.monotonic() - built
        check_services_came_up(compose)
        admin = compose("exec", "-T", "coordinator", "pairfarm", "token", "create", "--role",
                        "admin", "--name", "smoke-admin").strip().splitlines()[-1]
        ingest(compose, images)

        victim, victim_urls = kill_a_worker_holding_batches(compose, images)
        gate.open()  # let some batches finish, then hold the rest again for `down`
        wait_for("3 batches downloaded",
                 lambda: (s := stats(admin)) is not None and s.batches.get("downloaded", 0) >= 3,
                 240, 0.1)
        gate.close()
        shards = compose.volume("shards")
        done_before = {url_number(r["url"]) for r in shard_rows(shards)}
        assert done_before and len(done_before) < COUNT
        compose("down", timeout=600)
        asked_before = Counter(gate.requested)

        compose.up()
        gate.open()
        final = wait_for("every batch downloaded", lambda: all_downloaded(admin), 600)
        done_s = time.monotonic() - built

        check_shards(shards, images)
        check_stats(compose, final)
        for n in done_before:
            assert gate.requested[n] == asked_before[n], f"URL {n} fetched again after up"
        check_victim_batches(compose, images, victim_urls)
        check_prometheus(compose)
        print(f"compose smoke: build {built - started:.0f} s, first up {up_s:.0f} s, every "
              f"batch done {done_s:.0f} s after up began (victim {victim}, "
              f"{len(done_before)} URLs done before down)")


def check_services_came_up(compose: Compose) -> None:
    for service in ("postgres", "coordinator"):
        (container,) = compose.containers(service)
        assert container["State"]["Health"]["Status"] == "healthy", service
    for service in ("migrate", "tokens"):
        (container,) = compose.containers(service)
        assert container["State"]["ExitCode"] == 0, service
    assert len(compose.containers("worker")) == WORKERS
    (prometheus,) = compose.containers("prometheus")
    assert prometheus["State"]["Running"]


def ingest(compose: Compose, images: ImageServer) -> None:
    table = pa.table({"url": [images.url(n) for n in range(COUNT)],
                      "caption": [images.plan.item(n).caption for n in range(COUNT)]})
    path = Path(compose.env["PAIRFARM_SMOKE_INPUT"]) / "candidates.parquet"
    pq.write_table(table, path)
    path.chmod(0o644)
    compose("exec", "-T", "coordinator", "pairfarm", "ingest",
            "/data/input/candidates.parquet")


def kill_a_worker_holding_batches(compose: Compose, images: ImageServer
                                  ) -> tuple[str, set[int]]:
    """SIGKILL the main process of a worker container whose requests wait at the gate;
    its restart policy must bring it back. Returns its name and the URLs it asked for."""
    addresses = {next(iter(c["NetworkSettings"]["Networks"].values()))["IPAddress"]: c
                 for c in compose.containers("worker")}
    address = wait_for("every worker asking for images",
                       lambda: next((a for a in addresses if a in images.asked_by), None)
                       if len(set(addresses) & images.asked_by.keys()) == WORKERS else None,
                       240)
    container = addresses[address]
    urls = set(images.asked_by[address])
    os.kill(container["State"]["Pid"], signal.SIGKILL)

    def restarted() -> bool:
        (now,) = json.loads(podman("inspect", container["Id"]))
        return bool(now["State"]["Running"] and now["State"]["Pid"] != container["State"]["Pid"])

    wait_for(f"{container['Name']} restarted", restarted, 120)
    return container["Name"], urls


def check_shards(shards: Path, images: ImageServer) -> None:
    rows = shard_rows(shards)
    numbers = Counter(url_number(r["url"]) for r in rows)
    assert sorted(numbers) == list(range(COUNT)), "every URL has a shard row"
    assert max(numbers.values()) == 1, f"URLs doubled: {[n for n, c in numbers.items() if c > 1]}"
    wrong = [(url_number(r["url"]), outcome_of(r["status"], r["error_class"]).value)
             for r in rows
             if outcome_of(r["status"], r["error_class"])
             is not EXPECTED[images.plan.item(url_number(r["url"])).kind]]
    assert wrong == [], "every URL ends in the outcome the server planned"


def check_stats(compose: Compose, final: FarmStats) -> None:
    assert final.candidates_total == COUNT
    assert sum(final.outcomes.values()) == COUNT
    assert {state for state, n in final.batches.items() if n} == {"downloaded"}
    ((batches, candidates),) = compose.sql("SELECT count(*), sum(size) FROM batches")
    assert final.batches["downloaded"] == int(batches) >= COUNT // BATCH
    assert int(candidates) == COUNT


def check_victim_batches(compose: Compose, images: ImageServer, urls: set[int]) -> None:
    """The batches the killed worker held were leased again and downloaded."""
    rows = compose.sql("SELECT c.url, b.id, b.attempts, b.status FROM batch_members m "
                       "JOIN batches b ON b.id = m.batch_id JOIN candidates c ON c.id = ANY(m.ids)")
    held = {(int(batch), int(attempts), status) for url, batch, attempts, status in rows
            if url_number(url) in urls}
    assert held, "the killed worker held batches"
    for batch, attempts, status in held:
        assert attempts >= 2 and status == "downloaded", (batch, attempts, status)


def check_prometheus(compose: Compose) -> None:
    """Prometheus scrapes the coordinator and every worker replica, found through DNS."""
    workers = {f"{address}:9700" for address in worker_addresses(compose)}
    assert len(workers) == WORKERS

    def all_up() -> dict[str, dict[str, float]] | None:
        found = prometheus_up()
        ok = (found.get("coordinator") == {"coordinator:8600": 1.0}
              and found.get("worker") == dict.fromkeys(workers, 1.0))
        return found if ok else None

    wait_for(f"Prometheus scraping the coordinator and {sorted(workers)}", all_up, 180, 2)
