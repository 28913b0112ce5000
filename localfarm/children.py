"""Child processes of the local farm: started, watched, restarted, stopped by their PID.

Resource handling: every child runs in its own session (so a Ctrl-C on the terminal
reaches only ``pairfarm up``, which then stops the children in order), writes its output
to ``logs/<name>.log`` in the farm directory, and is stopped in stages (a signal, a
wait; a worker gets SIGTERM to finish its batch, then SIGTERM again to release it), then
SIGKILL. Its PID is written to the farm's run file so that an operator (or a
fault drill) can find it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pairfarm.up")
POLL_S = 0.1
Stage = tuple[int, float]  # (signal, seconds to wait for the children to exit)


def pairfarm_argv(*args: str) -> list[str]:
    """The command line that runs ``pairfarm ARGS`` with this interpreter."""
    return [sys.executable, "-m", "pairfarm", *args]


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    restart: bool = True
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        self.starts += 1
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def exit_code(self) -> int | None:
        """None while running (or never started), else its exit status."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> bool:
        """Wait for the child to exit; True if it did within ``timeout``."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


@dataclass
class Supervisor:
    """The farm's children, restarted when they die while the farm runs."""

    run_file: Path
    children: list[Child] = field(default_factory=list)
    restarts: int = 0

    def add(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        self.write_run_file()
        return child

    def revive(self) -> list[str]:
        """Restart every restartable child that exited; the names restarted."""
        revived = []
        for child in self.children:
            if child.restart and child.proc is not None and not child.running():
                log.warning("%s exited with %s: restarting it", child.name, child.exit_code())
                child.start()
                self.restarts += 1
                revived.append(child.name)
        if revived:
            self.write_run_file()
        return revived

    def stop(self, names: set[str] | None = None, grace: float = 30.0, *,
             stages: Sequence[Stage] | None = None,
             hurried: Callable[[], int] = lambda: 0) -> list[str]:
        """Stop the children named (all by default) together; the names that had to be killed.

        Each stage sends its signal to the children still running and waits up to its
        seconds for them to exit (default: one SIGTERM stage of ``grace`` s); whoever is
        left after the last stage gets SIGKILL. ``hurried`` counts the operator's extra
        stop requests (another Ctrl-C): one more ends the current stage at once.
        """
        chosen = [c for c in reversed(self.children) if names is None or c.name in names]
        for child in chosen:
            child.restart = False
        for signum, seconds in stages or ((signal.SIGTERM, grace),):
            alive = [c for c in chosen if c.running()]
            for child in alive:
                child.signal(signum)
            _wait_all(alive, seconds, hurried)
        killed = [c for c in chosen if c.running()]
        for child in killed:
            log.warning("%s did not stop in time: killing it", child.name)
            child.signal(signal.SIGKILL)
            child.wait(10)
        return [c.name for c in killed]

    def write_run_file(self) -> None:
        data = {"pid": os.getpid(),
                "children": {c.name: c.pid for c in self.children if c.running()}}
        tmp = self.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.run_file)


def _wait_all(children: list[Child], seconds: float, hurried: Callable[[], int]) -> None:
    """Until every child exited, ``seconds`` passed, or ``hurried()`` went up."""
    deadline = time.monotonic() + seconds
    start = hurried()
    for child in children:
        while not child.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or hurried() > start:
                return
