"""Child processes of the local farm: started, watched, restarted, stopped by their PID.

Resource handling: every child runs in its own session (so a Ctrl-C on the terminal
reaches only ``pairfarm up``, which then stops the children in order), writes its output
to ``logs/<name>.log`` in the farm directory, and is stopped with SIGTERM, then SIGKILL
after a grace period. Its PID is written to the farm's run file so that an operator (or a
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
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pairfarm.up")


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

    def stop(self, names: set[str] | None = None, grace: float = 30.0) -> None:
        """Stop the children named (all by default), in reverse start order, in parallel."""
        chosen = [c for c in reversed(self.children) if names is None or c.name in names]
        for child in chosen:
            child.restart = False
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in chosen:
            if not child.wait(max(0.0, deadline - time.monotonic())):
                log.warning("%s did not stop within %.0f s: killing it", child.name, grace)
                child.signal(signal.SIGKILL)
                child.wait(10)

    def write_run_file(self) -> None:
        data = {"pid": os.getpid(),
                "children": {c.name: c.pid for c in self.children if c.running()}}
        tmp = self.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.run_file)
