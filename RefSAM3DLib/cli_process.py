"""Run ``refsam3d segment`` in a child process, so that a GUI (3D Slicer) never freezes.

The child is the library's own CLI run by the caller's Python (Slicer's ``PythonSlicer``), with
the run's :class:`~RefSAM3DLib.run_options.RunOptions` on its command line. It prints
``PROGRESS <fraction> <message>`` lines and a ``DONE <path>`` line per output on stdout; errors
end it with a non-zero status and a one-line message on stderr (the protocol: :func:`progress_line`,
:func:`done_line`, :func:`error_line` and their readers :func:`parse_line`, :func:`error_message`).
Two reader threads put every line into a queue; the caller drains it with
:meth:`SegmentationJob.poll` (from a GUI timer) or :meth:`SegmentationJob.wait` (which polls until
the end: batch scripts, Slicer's ``Logic.process``). Cancel ends the whole process tree.
Temporary files live in one folder that :meth:`SegmentationJob.close` removes in every outcome.

The child's half (:func:`run_as_worker`, ``refsam3d segment --worker-folder``) makes sure that a
copy of a patient's scan never outlives the run: the child deletes its input once read, stops at
once when its parent dies (it holds our stdin's only write end: end-of-file means we are gone),
and on any exit but success, SIGTERM included, removes the whole folder itself.

Qt-free and Slicer-free: the Slicer module adds only the timer and the MRML bridge.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Cancelled, RefSAM3DError
from .run_options import RunOptions
from .volume import Volume

if TYPE_CHECKING:
    from .result import LabelResult

LIBRARY_PARENT = Path(__file__).resolve().parent.parent
"""The folder holding the ``RefSAM3DLib`` package; the child needs it on ``PYTHONPATH``."""

_TERMINATE_GRACE_S = 3.0
TEMP_PREFIX = "refsam3d-"
_ORPHAN_GRACE_S = 10.0
"""How long an orphaned worker waits for its main thread (inside one long torch call) to stop."""


# The worker's line protocol: both ends (``refsam3d segment --progress-lines`` writes, the
# readers below parse) use these functions only.

PROGRESS_PREFIX = "PROGRESS "
DONE_PREFIX = "DONE "
ERROR_PREFIX = "refsam3d: error: "


def progress_line(fraction: float, message: str) -> str:
    """stdout: how far the run is (``fraction`` in [0, 1])."""
    return f"{PROGRESS_PREFIX}{fraction:.4f} {message}"


def done_line(output_path) -> str:
    """stdout: one output file is complete."""
    return f"{DONE_PREFIX}{output_path}"


def error_line(message) -> str:
    """stderr, last line of a failed run: the one-line message a user reads."""
    return f"{ERROR_PREFIX}{message}"


@dataclass(frozen=True)
class Event:
    """One line from the child, classified.

    Args:
        kind: ``"progress"`` (``fraction`` in [0, 1] and ``text`` the message), ``"done"``
            (``text`` the output path), ``"log"`` (stdout) or ``"error_log"`` (stderr).
        text: the line without its prefix.
        fraction: progress fraction for ``"progress"`` events, else ``None``.
    """

    kind: str
    text: str
    fraction: float | None = None


def parse_line(line: str, from_stderr: bool = False) -> Event:
    """Classify one output line of the child (:func:`progress_line`, :func:`done_line`, others)."""
    line = line.rstrip("\r\n")
    if from_stderr:
        return Event("error_log", line)
    if line.startswith(PROGRESS_PREFIX):
        fraction_text, _, message = line[len(PROGRESS_PREFIX):].partition(" ")
        try:
            fraction = min(max(float(fraction_text), 0.0), 1.0)
        except ValueError:
            return Event("log", line)
        return Event("progress", message, fraction)
    if line.startswith(DONE_PREFIX):
        return Event("done", line[len(DONE_PREFIX):])
    return Event("log", line)


def error_message(stderr_lines: list[str]) -> str:
    """The failed child's message: its last non-empty stderr line (:func:`error_line`) without the prefix."""
    message = next((line for line in reversed(stderr_lines) if line.strip()), "")
    return message.removeprefix(ERROR_PREFIX).strip()


def library_environment(base_env: dict | None = None) -> dict:
    """``base_env`` (default ``os.environ``) with ``RefSAM3DLib`` importable and unbuffered output."""
    env = dict(os.environ if base_env is None else base_env)
    paths = [str(LIBRARY_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # Progress must arrive line by line, not when a pipe buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def segment_command(
    input_path: str | Path,
    prompts: list[str],
    output_path: str | Path,
    options: RunOptions,
    python: str | None = None,
    modality: str | None = None,
    worker_folder: str | Path | None = None,
) -> list[str]:
    """The ``python -m RefSAM3DLib.cli segment ...`` command line for one volume.

    ``modality``: the volume's own, when known. ``worker_folder``: the temporary folder the child
    cleans up itself (see :func:`run_as_worker`).
    """
    if not prompts or not any(p.strip() for p in prompts):
        raise RefSAM3DError("No prompt given: type at least one structure name, e.g. 'liver'.")
    # --option=value throughout: a value starting with '-' ("-liver", a path) is never taken for an
    # option of its own.
    command = [python or sys.executable, "-m", "RefSAM3DLib.cli", "segment", str(input_path)]
    for prompt in prompts:
        if prompt.strip():
            command.append(f"--prompt={prompt.strip()}")
    command += [f"--output={output_path}", *options.to_cli_args(), "--progress-lines"]
    if modality:
        command.append(f"--modality={modality}")
    if worker_folder:
        command.append(f"--worker-folder={worker_folder}")
    return command


@contextlib.contextmanager
def sigterm_as_exit(received: threading.Event | None = None):
    """SIGTERM (a cancel, a logout) ends the run through every ``finally``, so partial outputs
    and temporary files are deleted (Python's default dies on the spot). Main thread only.

    ``received`` is set when the signal came, so a caller still knows it if some library on the
    way swallowed the ``SystemExit`` or turned it into another error.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum, frame):
        if received is not None:
            received.set()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch_parent(folder: Path, on_line=None, on_gone=None) -> None:
    """Read stdin, which only the parent holds, handing each line to ``on_line`` (if given), until
    end-of-file: the parent closed it, exited or was killed. Then call ``on_gone``, stop the main
    thread as SIGTERM would, and if it is stuck in one long call, remove ``folder`` and end the
    process with ``128 + SIGTERM``. Run it in a daemon thread.
    """
    pending = b""
    # os.read, not sys.stdin: a thread blocked inside the buffered reader holds its lock, and the
    # interpreter aborts when it finds it held at exit.
    with contextlib.suppress(OSError, ValueError):
        while chunk := os.read(sys.stdin.fileno(), 1 << 16):
            if on_line is not None:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
    if on_gone is not None:
        on_gone()
    _thread.interrupt_main(signal.SIGTERM)
    time.sleep(_ORPHAN_GRACE_S)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(128 + signal.SIGTERM)


def run_as_worker(folder: str | Path, body) -> int:
    """Run ``body()`` (the segment command) as the child of a :class:`SegmentationJob`.

    ``folder`` is the job's temporary folder (a copy of the scan, the result). It is removed on
    every exit but success, and always when the parent died or sent SIGTERM: then nobody will
    read the result. The parent is watched through stdin: it holds the only write end and never
    writes, so end-of-file comes the moment it exits or is killed; the main thread is then
    stopped as by SIGTERM, and if it is stuck in one long call the watcher removes the folder and
    ends the process itself. A terminated worker always exits with ``128 + SIGTERM``.
    """
    folder = Path(folder)
    if not folder.name.startswith(TEMP_PREFIX) or not folder.is_dir():
        raise RefSAM3DError(f"--worker-folder {folder} is not a folder made by SegmentationJob; leave the option out.")
    parent_gone = threading.Event()
    terminated = threading.Event()

    threading.Thread(target=watch_parent, args=(folder,), kwargs={"on_gone": parent_gone.set}, daemon=True,
                     name="refsam3d-parent-watch").start()
    status = 1
    try:
        with sigterm_as_exit(terminated):
            status = body()
    except Exception:
        if not terminated.is_set():
            raise
    finally:
        if status != 0 or parent_gone.is_set() or terminated.is_set():
            shutil.rmtree(folder, ignore_errors=True)
    return 128 + signal.SIGTERM if terminated.is_set() else status


class ChildProcess:
    """A command in its own process group, its stdout and stderr streamed line by line into a queue.

    Args:
        command: program and arguments.
        env: the child's environment (default: inherit).
        cwd: the child's working folder.
    """

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | Path | None = None):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.cancelled = False
        self.stderr_lines: list[str] = []
        self._events: queue.Queue[Event] = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches the grandchildren
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.PIPE,  # its end-of-file tells the child that we died (a server also reads requests)
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        for stream, from_stderr in ((self._process.stdout, False), (self._process.stderr, True)):
            reader = threading.Thread(target=self._read, args=(stream, from_stderr), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream, from_stderr: bool) -> None:
        with stream:
            for line in stream:
                if from_stderr:
                    self.stderr_lines.append(line.rstrip("\r\n"))
                self._events.put(parse_line(line, from_stderr))

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def finished(self) -> bool:
        """The child has exited and all its output has been read (``poll`` may still hold events)."""
        return self.returncode is not None and not any(reader.is_alive() for reader in self._readers)

    def poll(self) -> list[Event]:
        """Every event that arrived since the last call; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, on_event=None, poll_interval_s: float = 0.1) -> int:
        """Block until the child exits, passing each event to ``on_event``; returns the exit status."""
        while True:
            try:
                event = self._events.get(timeout=poll_interval_s)
            except queue.Empty:
                if self.finished and self._events.empty():
                    return self.returncode
                continue
            if on_event is not None:
                on_event(event)

    def cancel(self) -> None:
        """End the child and everything it started; safe to call twice or after exit."""
        self.cancelled = True
        if self._process is None:
            return
        self.close()  # a worker takes the end-of-file for our death and stops by itself too
        if self._process.poll() is not None:
            return
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            self._kill_tree_psutil(psutil)
        elif os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True, check=False)
        else:
            self._kill_group(signal.SIGTERM)
            try:
                self._process.wait(timeout=_TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            # Even after the leader exits, its workers may linger in the group.
            self._kill_group(signal.SIGKILL)
        self._process.wait()

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (a server's request). OSError when the child is gone."""
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except ValueError:  # our end was closed already (close, cancel)
            raise BrokenPipeError("the child's stdin is closed") from None

    def close(self) -> None:
        """Let go of the child's stdin once it is no longer needed (a finished or cancelled child)."""
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self._process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_tree_psutil(self, psutil) -> None:
        try:
            parent = psutil.Process(self._process.pid)
            members = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for member in members:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(members, timeout=_TERMINATE_GRACE_S)


def wait_for_job(job, on_event=None, between=None, interval_s: float = 0.05) -> None:
    """Block until ``job`` (anything with ``finished`` and ``poll()``) is finished, passing every
    event of its ``poll`` to ``on_event``; ``between()`` runs between polls (Slicer's
    ``processEvents``, so the GUI stays alive)."""
    while True:
        finished = job.finished  # read before the last poll: the final events come with it
        for event in job.poll():
            if on_event is not None:
                on_event(event)
        if finished:
            return
        if between is not None:
            between()
        time.sleep(interval_s)


class SegmentationJob:
    """Segment one :class:`Volume` with ``refsam3d segment`` in a child process.

    Usage::

        with SegmentationJob(volume, ["liver", "spleen"], RunOptions(device="cpu")) as job:
            job.start()
            job.wait(on_event=lambda event: print(event.kind, event.fraction, event.text))
            result = job.result()

    From a GUI timer: ``start()``, then ``poll()`` until ``finished``; ``wait(between=...)`` keeps
    an event loop turning instead. Then ``result()`` (or ``output_file()``), and ``close()`` in
    every case (``cancel()`` to stop early).

    Args:
        volume: the input; written to a temporary NRRD file (world geometry, original voxels).
        prompts: one or more texts; each becomes one ``--prompt``.
        options: the run's :class:`RunOptions`.
        python: the interpreter that runs the CLI (default: this one). In Slicer: ``PythonSlicer``.
        base_env: environment to start from (default: ``os.environ``). In Slicer: its startup environment.
        temp_root: where the temporary folder goes (default: the system's).
    """

    def __init__(
        self,
        volume: Volume,
        prompts: list[str],
        options: RunOptions = RunOptions(),
        python: str | None = None,
        base_env: dict | None = None,
        temp_root: str | Path | None = None,
    ):
        self.volume = volume
        self.prompts = [p.strip() for p in prompts if p.strip()]
        self.options = options
        self.python = python
        self.base_env = base_env
        self.temp_root = temp_root
        self.temp_dir: Path | None = None
        self.output_path: Path | None = None
        self.process: ChildProcess | None = None
        self.log_lines: list[str] = []

    def __enter__(self) -> "SegmentationJob":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Write the input to a temporary folder and launch the child; returns at once."""
        from .geometry import sitk_from_volume
        import SimpleITK as sitk

        self.temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.temp_root))
        input_path = self.temp_dir / "input.nrrd"
        self.output_path = self.temp_dir / "result.seg.nrrd"
        command = segment_command(input_path, self.prompts, self.output_path, self.options, python=self.python,
                                  modality=self.volume.modality, worker_folder=self.temp_dir)
        # Uncompressed: the file lives for seconds (the child deletes it once read) and compression
        # would cost more than the write.
        sitk.WriteImage(sitk_from_volume(self.volume), str(input_path), False)
        self.process = ChildProcess(command, env=library_environment(self.base_env), cwd=self.temp_dir)
        self.process.start()

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.finished

    def poll(self) -> list[Event]:
        """New events since the last call (non-blocking); every line is also kept in ``log_lines``."""
        events = self.process.poll()
        self.log_lines.extend(e.text for e in events if e.kind in ("log", "error_log"))
        return events

    def wait(self, on_event=None, between=None, interval_s: float = 0.05) -> None:
        """Block until the child ends (:func:`wait_for_job`)."""
        wait_for_job(self, on_event, between, interval_s)

    def cancel(self) -> None:
        if self.process is not None:
            self.process.cancel()

    def result(self) -> LabelResult:
        """The :class:`~RefSAM3DLib.result.LabelResult` on the input's grid, once ``finished``.

        Raises :class:`Cancelled` after ``cancel()``, :class:`RefSAM3DError` with the child's
        one-line message when it failed.
        """
        from .result_files import read_seg_nrrd

        return read_seg_nrrd(self.output_file(), reference=self.volume)

    def output_file(self) -> Path:
        """The worker's .seg.nrrd (world geometry of the input), once ``finished``; it lives until
        ``close()``. Slicer reads it with its own reader. Raises as :meth:`result`."""
        if self.process is None or not self.process.finished:
            raise RefSAM3DError("The segmentation is still running; wait for it to finish.")
        if self.process.cancelled:
            raise Cancelled("Segmentation cancelled; nothing was changed.")
        status = self.process.returncode
        if status != 0 or not self.output_path.exists():
            message = error_message(self.process.stderr_lines)
            raise RefSAM3DError(message or f"The segmentation process stopped with exit status {status}; see the log.")
        return self.output_path

    def close(self) -> None:
        """Stop the child if it still runs and delete the temporary folder."""
        if self.process is not None:
            if self.process.returncode is None:
                self.process.cancel()
            self.process.close()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
