"""Slicer's side of the warm worker (:mod:`RefSAM3DLib.session_server`): torch-free.

One server process keeps the model loaded and the open volume's features cached, so a second
prompt or a click on the same volume costs a decoding, not a model load and an encoding::

    with SessionClient(RunOptions(device="auto")) as client:
        client.open(client.write_volume(volume))              # encodes once
        liver = client.segment("liver")                        # {"output": ".../segment-1.seg.nrrd", ...}
        fixed = client.segment("liver", points_ras=[(60, -20, 110)], point_labels=[0])

From a GUI: :meth:`send` returns a request id at once; a timer calls :meth:`poll` (progress
events) and :meth:`reply` (the reply dict once it came, else None); no thread of ours touches the
GUI. :meth:`cancel` ends the server's whole process tree (the cache goes with it); :meth:`close`
ends it and removes the temporary folder in every case. A server that died is reported as a
:class:`RefSAM3DError` naming its last words, for every request still waiting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cli_process import TEMP_PREFIX, ChildProcess, Event, library_environment, wait_for_job
from .errors import Cancelled, RefSAM3DError
from .run_options import RunOptions

if TYPE_CHECKING:
    from .volume import Volume

READY_ID = 0
"""The id of the server's unasked first reply (model loaded)."""
_CLOSE_GRACE_S = 10.0


class SessionClient:
    """One warm worker: start it, send requests, read replies.

    Args:
        options: the server's run options: the model and its device, and the defaults (overlap,
            threshold, post-processing) of every request.
        python: the interpreter that runs the server (default: this one). In Slicer: ``PythonSlicer``.
        base_env: the environment to start from (default: ``os.environ``).
        threads: torch CPU threads in the server (default: torch's choice).
        temp_root: where the temporary folder goes (default: the system's).
    """

    def __init__(self, options: RunOptions = RunOptions(), python: str | None = None, base_env: dict | None = None,
                 threads: int | None = None, temp_root: str | Path | None = None):
        self.options = options
        self.python = python
        self.base_env = base_env
        self.threads = threads
        self.temp_root = temp_root
        self.folder: Path | None = None
        self.process: ChildProcess | None = None
        self.log_lines: list[str] = []
        self.ready: dict | None = None
        """The server's first reply: ``model``, ``model_version``, ``device`` (or its ``error``)."""
        self._replies: dict = {}
        self._undelivered: list[Event] = []  # events reply() read, for the next poll()
        self._ids = itertools.count(READY_ID + 1)
        self._volumes = itertools.count(1)
        self._volume_file: Path | None = None
        self._open_fingerprint: str | None = None

    def __enter__(self) -> "SessionClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> int:
        """Launch the server; returns at once with the id of its ready reply (the model loaded)."""
        if self.process is not None:
            raise RefSAM3DError("This session was started already; make a new SessionClient for another.")
        self.folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.temp_root))
        command = [self.python or sys.executable, "-m", "RefSAM3DLib.session_server", *self.options.to_cli_args(),
                   f"--folder={self.folder}"]
        if self.threads:
            command.append(f"--threads={self.threads}")
        self.process = ChildProcess(command, env=library_environment(self.base_env), cwd=self.folder)
        self.process.start()
        return READY_ID

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    # ---- non-blocking: for a GUI timer --------------------------------------------------------

    def send(self, op: str, **fields) -> int:
        """Send one request; returns its id at once (the server answers requests in order)."""
        if self.process is None:
            self.start()
        self._check_usable(self.process.returncode is not None)
        request_id = next(self._ids)
        try:
            self.process.send(json.dumps({"id": request_id, "op": op, **fields}))
        except OSError:
            raise RefSAM3DError(self._death_message()) from None
        return request_id

    def poll(self) -> list[Event]:
        """Every event since the last call, never blocking: ``progress`` (``fraction``, ``text``),
        ``reply`` (``text`` the JSON line; the reply itself through :meth:`reply`) and log lines."""
        events, self._undelivered = self._undelivered, []
        for event in self.process.poll() if self.process is not None else []:
            if event.kind == "log" and event.text.startswith("{"):
                try:
                    reply = json.loads(event.text)
                except json.JSONDecodeError:
                    reply = None
                if isinstance(reply, dict) and "id" in reply:
                    self._replies[reply["id"]] = reply
                    if reply["id"] == READY_ID:
                        self.ready = reply
                    event = Event("reply", event.text)
            if event.kind in ("log", "error_log"):
                self.log_lines.append(event.text)
            events.append(event)
        return events

    def reply(self, request_id: int) -> dict | None:
        """The reply to ``request_id`` once it came (None before); RefSAM3DError for an error reply
        or a server that stopped without answering, Cancelled after :meth:`cancel`."""
        finished = self.process is not None and self.process.finished  # before draining: nothing can follow
        self._undelivered = self.poll()
        if request_id in self._replies:
            reply = self._replies.pop(request_id)
            if not reply.get("ok"):
                raise RefSAM3DError(reply.get("error") or "The worker refused the request without a reason; see its log.")
            return reply
        self._check_usable(finished)
        return None

    # ---- blocking: scripts and tests ----------------------------------------------------------

    def wait(self, request_id: int, progress=None, timeout_s: float | None = None, poll_interval_s: float = 0.05) -> dict:
        """Block until the reply to ``request_id``, calling ``progress(fraction, message)``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for event in self.poll():
                if event.kind == "progress" and progress is not None:
                    progress(event.fraction, event.text)
            reply = self.reply(request_id)
            if reply is not None:
                return reply
            if deadline is not None and time.monotonic() > deadline:
                raise RefSAM3DError(f"The worker did not answer within {timeout_s:.0f} s; cancel and start a new session.")
            time.sleep(poll_interval_s)

    def request(self, op: str, progress=None, **fields) -> dict:
        return self.wait(self.send(op, **fields), progress)

    def write_volume(self, volume: "Volume") -> Path:
        """Copy ``volume`` into the session's folder for :meth:`open` (uncompressed: it is read once,
        at once); the previous copy goes, so that one scan at most lies on disk."""
        import SimpleITK as sitk

        from .geometry import sitk_from_volume

        if self.process is None:
            self.start()
        path = self.folder / f"volume-{next(self._volumes)}.nrrd"
        sitk.WriteImage(sitk_from_volume(volume), str(path), False)
        if self._volume_file is not None:
            self._volume_file.unlink(missing_ok=True)
        self._volume_file = path
        return path

    def send_volume(self, volume: "Volume", overlap: float | None = None) -> int | None:
        """Send ``volume`` to be opened (encoded) unless the server holds it already; returns the
        open request's id, or None when the cached features answer (same voxels, geometry,
        modality and overlap). Non-blocking, like :meth:`send`."""
        fingerprint = volume_fingerprint(volume, self.options.overlap if overlap is None else overlap)
        if fingerprint == self._open_fingerprint and self.alive:
            return None
        path = self.write_volume(volume)
        self._open_fingerprint = fingerprint
        return self.send("open", path=str(path), modality=volume.modality, overlap=overlap)

    def forget_volume(self) -> None:
        """The next :meth:`send_volume` opens its volume again (after a failed open)."""
        self._open_fingerprint = None

    def open(self, path: str | Path, modality: str | None = None, frame: int | None = None,
             overlap: float | None = None, progress=None) -> dict:
        """Open (and encode) a volume file; the same unchanged file again is answered from the cache.
        ``overlap`` None: the session's ``options.overlap``."""
        # Absolute: the server's working folder is the session's, not ours.
        return self.request("open", progress, path=str(Path(path).expanduser().absolute()), modality=modality, frame=frame, overlap=overlap)

    def send_segment(self, prompt=None, points_ras=(), point_labels=None, box_ras=None,
                     output: str | Path | None = None, **options) -> int:
        """Send a segment request (see :meth:`segment`); returns its id at once."""
        return self.send("segment", prompt=prompt, points_ras=[list(map(float, p)) for p in points_ras],
                         point_labels=None if point_labels is None else [int(v) for v in point_labels],
                         box_ras=None if box_ras is None else [float(v) for v in box_ras],
                         output=None if output is None else str(Path(output).expanduser().absolute()), **options)

    def segment(self, prompt=None, points_ras=(), point_labels=None, box_ras=None,
                output: str | Path | None = None, progress=None, **options) -> dict:
        """The prompt's structures from the cache (see ``InteractiveSession.segment``; a text or
        a list of texts); ``options``: ``threshold``, ``largest_component``, ``fill_holes``
        (default: the session's ``options``), ``overwrite``. The reply's ``output`` is the
        .seg.nrrd (default: in the session's folder, removed by :meth:`close`)."""
        return self.wait(self.send_segment(prompt, points_ras, point_labels, box_ras, output, **options), progress)

    def close_volume(self) -> dict:
        """Drop the open volume's cache (the model stays loaded)."""
        return self.request("close")

    # ---- ending -------------------------------------------------------------------------------

    def cancel(self) -> None:
        """End the server and everything it started now (a running encoding included)."""
        if self.process is not None:
            self.process.cancel()

    def close(self) -> None:
        """End the server (end-of-file on its stdin; killed if it does not stop) and remove the folder."""
        if self.process is not None:
            self.process.close()
            deadline = time.monotonic() + _CLOSE_GRACE_S
            while self.process.returncode is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.process.returncode is None:
                self.process.cancel()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _check_usable(self, exited: bool) -> None:
        if self.process.cancelled:
            raise Cancelled("The session was cancelled; start a new one.")
        if exited:
            raise RefSAM3DError(self._death_message())

    def _death_message(self) -> str:
        if self.ready is not None and not self.ready.get("ok"):
            return self.ready.get("error", "")
        last = next((line for line in reversed(self.process.stderr_lines) if line.strip()), "")
        status = self.process.returncode
        return (f"The RefSAM3D worker stopped (exit status {status})"
                + (f": {last.strip()}" if last else "") + "; start a new session.")


def volume_fingerprint(volume: "Volume", overlap: float) -> str:
    """What the server's cached features depend on: voxels, geometry, modality, overlap."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((volume.array.shape, str(volume.array.dtype), volume.modality, float(overlap))).encode())
    digest.update(np.ascontiguousarray(volume.ijk_to_ras, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(volume.array).data)
    return digest.hexdigest()


class SessionJob:
    """One run through a warm :class:`SessionClient`, driven as a :class:`~RefSAM3DLib.cli_process.SegmentationJob`
    is (``start``, ``poll`` until ``finished``, ``output_file``, ``close``; ``wait`` for scripts).

    ``start`` sends the volume (unless the server holds it already: then nothing is read or
    encoded again) and the segment request together; the server answers them in order.

    Args:
        client: the warm worker (started on first use).
        volume: the input.
        prompt: text naming the structures (one only with spatial prompts), or None with a gesture.
        options: the run's options: ``overlap`` for the encoding, ``threshold``,
            ``largest_component``, ``fill_holes`` for this answer. The model and device are the
            client's.
        points_ras, point_labels, box_ras: spatial prompts (see ``InteractiveSession.segment``).
    """

    def __init__(self, client: SessionClient, volume: "Volume", prompt: str | None, options: RunOptions = RunOptions(),
                 points_ras=(), point_labels=None, box_ras=None):
        self.client = client
        self.volume = volume
        self.prompt = prompt
        self.options = options
        self.spatial = dict(points_ras=points_ras, point_labels=point_labels, box_ras=box_ras)
        self.log_lines: list[str] = []
        self._open_id: int | None = None
        self._segment_id: int | None = None
        self._reply: dict | None = None
        self._error: BaseException | None = None
        self._fraction = 0.0

    def __enter__(self) -> "SessionJob":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Send the requests; returns at once."""
        self._open_id = self.client.send_volume(self.volume, self.options.overlap)
        self._segment_id = self.client.send_segment(
            self.prompt, **self.spatial, threshold=self.options.threshold,
            largest_component=self.options.largest_component, fill_holes=self.options.fill_holes)

    @property
    def finished(self) -> bool:
        return self._reply is not None or self._error is not None

    def poll(self) -> list[Event]:
        """New events since the last call (non-blocking): progress of the whole run (model loading
        and encoding up to 0.9, decoding after; never going back) and the server's log lines."""
        events = []
        for event in self.client.poll():
            if event.kind == "progress":
                start, span = (0.0, 0.9) if self._open_id is not None else (0.9, 0.1)
                self._fraction = max(self._fraction, start + span * event.fraction)
                event = Event("progress", event.text, self._fraction)
            events.append(event)
        self.log_lines.extend(e.text for e in events if e.kind in ("log", "error_log"))
        if not self.finished:
            self._collect()
        return events

    def _collect(self) -> None:
        try:
            if self._open_id is not None and self.client.reply(self._open_id) is not None:
                self._open_id = None
            if self._open_id is None:
                self._reply = self.client.reply(self._segment_id)
        except (RefSAM3DError, Cancelled) as error:
            if self._open_id is not None:  # the volume never opened: the next run must send it again
                self.client.forget_volume()
            self._error = error

    def wait(self, on_event=None, between=None, interval_s: float = 0.05) -> None:
        """Block until the answer (:func:`~RefSAM3DLib.cli_process.wait_for_job`)."""
        wait_for_job(self, on_event, between, interval_s)

    def cancel(self) -> None:
        """Stop now: the server ends (the client is then unusable; make a new one)."""
        self.client.cancel()

    @property
    def reply(self) -> dict:
        """The server's segment reply, once ``finished``; raises as :meth:`output_file`."""
        if self._error is not None:
            raise self._error
        if self._reply is None:
            raise RefSAM3DError("The segmentation is still running; wait for it to finish.")
        return self._reply

    def output_file(self) -> Path:
        """The answer's .seg.nrrd (world geometry of the input), once ``finished``; it lives until
        ``close()``. Raises ``Cancelled`` after a cancel, ``RefSAM3DError`` (the server's one-line
        message) when the request failed."""
        return Path(self.reply["output"])

    def close(self) -> None:
        """Remove this answer's files (the server and its cache stay)."""
        if self._reply is not None:
            for path in self._reply.get("files", []):
                Path(path).unlink(missing_ok=True)
