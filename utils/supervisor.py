"""Stop a program promptly and cleanly at any moment: Ctrl-C, SIGTERM from a scheduler or mpirun.

A Python signal handler runs only when the main thread executes Python code, and Jittor holds the
interpreter while it runs a step in C++ (a CCNet-R101 CPU step takes ~30 s) or compiles operators
in its own process pool (which inherits the handlers). So the entry points call ``supervise()``
first, before Jittor is imported: the program starts again as a child process (a fresh
interpreter: nothing is inherited, e.g. a CUDA driver initialised while choosing the device) in a
process group of its own (its workers, Jittor's compile pool and their compilers with it), and the
parent does nothing but wait and handle the signals:

* the first SIGINT / SIGTERM goes on to the child when it has said it can stop cleanly
  (``report(stoppable=True)``: the trainer finishes its step, saves and exits); if it has not
  exited ``CCNET_STOP_GRACE`` seconds later (default 5), or at once when it cannot stop cleanly,
  or at a second signal, the parent kills the child's whole process group, removes the temporary
  files it named (``report(temporaries=...)``: an interrupted atomic write), prints the one line
  the child left for this case (``report(if_killed=...)``, e.g. the last checkpoint) and exits;
* the exit status is 130 after SIGINT and 143 after SIGTERM (the shell's 128 + signal), the
  child's own status otherwise;
* when the child exits, whatever it left running in its group is ended too.

Only the parent is ever signalled by a terminal, so no worker prints a traceback. ``CCNET_SUPERVISE=0``
runs the program in one process (e.g. to use ``breakpoint()``: the child cannot read the terminal).
Under mpirun each rank is supervised; only rank 0's parent prints.
"""
import ctypes
import glob
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Iterable

FD_VARIABLE = "CCNET_SUPERVISOR_FD"          # the child's end of the pipe to its parent
DEFAULT_GRACE = 5.0                          # seconds a clean stop may take before the child is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def launch_rank() -> int:
    """The MPI rank this process was started as (0 outside mpirun), known before MPI is initialised."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def stop_grace() -> float:
    """``CCNET_STOP_GRACE``: seconds between the first signal and the end of the process at the latest."""
    text = os.environ.get("CCNET_STOP_GRACE", "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_GRACE
    except ValueError:
        raise SystemExit(f"CCNET_STOP_GRACE must be a number of seconds, got {text!r}") from None


def exit_status(signum: int) -> int:
    return 128 + signum


def supervise(if_killed: str | None = None) -> None:
    """Run this program again as a supervised child and exit with its status; returns at once in
    the child itself, under ``CCNET_SUPERVISE=0`` and under a debugger or tracer. ``if_killed``:
    the end of the line printed if the child is ended, until the child reports another."""
    if FD_VARIABLE in os.environ or os.environ.get("CCNET_SUPERVISE", "1") == "0" or sys.gettrace() is not None:
        return
    grace = stop_grace()
    read_end, write_end = os.pipe()
    env = dict(os.environ, **{FD_VARIABLE: str(write_end)})
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, pass_fds=(write_end,),
                             process_group=0, preexec_fn=_die_with_parent)
    os.close(write_end)
    sys.exit(_Parent(child.pid, read_end, grace, if_killed).run())


def _die_with_parent():
    """In the child before it starts: end it when the parent dies (e.g. SIGKILLed by mpirun)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # Linux's PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def report(**fields: object) -> None:
    """Tell the supervising parent (if any) what it needs when it must end this process:
    ``stoppable`` (bool: a signal is forwarded and a clean stop awaited), ``if_killed`` (the line
    to print), ``temporaries`` (glob patterns of files to remove after a kill)."""
    fd = os.environ.get(FD_VARIABLE)
    if fd is None:
        return
    try:
        os.write(int(fd), (json.dumps(fields) + "\n").encode())
    except OSError:                   # the parent is gone: nothing to tell
        pass


class _Parent:
    def __init__(self, child: int, read_end: int, grace: float, if_killed: str | None) -> None:
        self.child, self.read_end, self.grace = child, read_end, grace
        self.state = {"stoppable": False, "if_killed": if_killed, "temporaries": []}
        self.buffer = b""
        self.first_signal = None
        self.deadline = None
        self.kill_now = None          # why the child is to be ended now, once it is
        os.set_blocking(read_end, False)

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        status = None
        while status is None:
            timeout = 0.5 if self.deadline is None else min(0.5, max(0.0, self.deadline - time.monotonic()))
            if select.select([self.read_end], [], [], timeout)[0]:
                self._read()
            pid, raw = os.waitpid(self.child, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(raw)
            elif self.kill_now:
                return self._kill(self.kill_now)
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                return self._kill(f"no clean stop within {self.grace:g} s, ended")
        self._read()
        self._end_group()
        if status < 0:                # the child was killed by a signal: the shell's convention
            return exit_status(-status)
        return status

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.first_signal is not None:
            self.kill_now = f"{signal.Signals(self.first_signal).name}, then {name}: ended at once"
            return
        self.first_signal = signum
        if self.state["stoppable"]:
            self.deadline = time.monotonic() + self.grace
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass
        else:
            self.kill_now = f"{name}: ended at once"

    def _read(self):
        try:
            chunk = os.read(self.read_end, 65536)
        except (BlockingIOError, InterruptedError):
            return
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                self.state.update(json.loads(line))
            except ValueError:
                continue

    def _end_group(self):
        try:
            os.killpg(self.child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill(self, why: str) -> int:
        self._end_group()
        os.waitpid(self.child, 0)
        self._read()
        for path in _matches(self.state["temporaries"]):
            try:
                os.unlink(path)
            except OSError:
                pass
        if launch_rank() == 0:
            saved = f"; {self.state['if_killed']}" if self.state["if_killed"] else ""
            start = "\n" if sys.stderr.isatty() else ""        # after a progress bar's half line
            print(f"{start}{os.path.basename(sys.argv[0])}: {why}{saved}", file=sys.stderr, flush=True)
        return exit_status(self.first_signal)


def _matches(patterns: Iterable[str]) -> list[str]:
    return sorted({path for pattern in patterns for path in glob.glob(pattern) if os.path.isfile(path)})
