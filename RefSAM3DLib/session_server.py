"""The warm worker: the model loaded once, the last volume's window features kept between requests.

    python -m RefSAM3DLib.session_server [run options: --model M --device D --overlap ...] [--folder F] [--threads N]

Started by :class:`RefSAM3DLib.session_client.SessionClient` (Slicer's side). Requests come one
JSON object per line on stdin; each gets exactly one JSON reply line on stdout, in order, with the
request's ``id`` echoed. Before a reply the server may print ``PROGRESS <fraction> <message>``
lines (the CLI's format, :func:`RefSAM3DLib.cli_process.parse_line`). Nothing else reaches stdout:
anything a library prints goes to stderr.

First line, unasked: ``{"id": 0, "op": "ready", "ok": true, "model", "model_version", "device",
"pid", "folder"}`` once the model is loaded (``"ok": false`` and exit status 2 when it cannot be).

Requests (``"id"`` any JSON value, echoed):

* ``{"op": "open", "path", "modality": null, "frame": null, "overlap": null}``: read the volume
  file and encode it (:class:`InteractiveSession`); the same path with the same modification time,
  size and options reuses the cached session. Reply: ``windows``, ``encode_s``, ``reused``,
  ``shape_kji``, ``warnings``.
* ``{"op": "segment", "prompt": null (a text or a list of texts), "points_ras": [], "point_labels": null, "box_ras": null,
  "threshold": null, "largest_component": null, "fill_holes": null, "output": null,
  "overwrite": false}``: the prompt's structures from the cache (several only without points or a
  box), written atomically on the input grid (``.seg.nrrd`` by default in the server's folder; a
  label map suffix writes a label map and its JSON). Reply: ``output``, ``files``, ``segments``
  (one ``{prompt, structure, volume_ml}`` per structure), ``warnings``, ``elapsed_s``.
* ``{"op": "close"}``: drop the session and its cache. Reply: ``closed`` (whether one was open).

A null or absent ``overlap``, ``threshold``, ``largest_component`` or ``fill_holes`` is the
server's own run option (its command line). Every successful reply carries ``"ok": true`` and ``encodes`` (volumes encoded since start). A
failed request gets ``{"id", "ok": false, "error": "<one line>"}`` and the server goes on.

The server's folder (``--folder``, a ``refsam3d-`` folder made by the client, or its own) holds the
parent's copies of scans and the default outputs; it is removed on every exit. End-of-file on stdin
(the parent closed it, or died) stops the server at once, even inside an encoding, as does SIGTERM;
both end with status ``128 + SIGTERM``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .cli_process import TEMP_PREFIX, progress_line, sigterm_as_exit, watch_parent
from .errors import RefSAM3DError
from .inference import model_name, model_version, run_model
from .interactive import InteractiveSession
from .result_files import SEG_NRRD_SUFFIX, check_output_path, output_files, write_result
from .run_options import RunOptions, add_cli_arguments
from .session_client import READY_ID
from .volume_reader import read_volume


class SessionServer:
    """Answers requests (dicts) with replies (dicts) for one loaded model and at most one volume.

    Args:
        model: a loaded RefSAM3D.
        options: the server's run options (its device and model; the defaults of every request).
        folder: where default outputs go.
        progress: called with ``(fraction, message)`` before long steps.
    """

    def __init__(self, model, options: RunOptions, folder: Path, progress) -> None:
        self.model = model
        self.options = options
        self.device = next(model.parameters()).device
        self.folder = folder
        self.progress = progress
        self.session: InteractiveSession | None = None
        self.session_key: tuple | None = None
        self.encodes = 0
        self.outputs = 0

    def answer(self, request) -> dict:
        if not isinstance(request, dict):
            raise RefSAM3DError("A request must be a JSON object such as {\"op\": \"open\", \"path\": ...}.")
        handler = {"open": self.open, "segment": self.segment, "close": self.close}.get(request.get("op"))
        if handler is None:
            raise RefSAM3DError(f"Unknown request op {request.get('op')!r}; use open, segment or close.")
        return {**handler(request), "encodes": self.encodes}

    def open(self, request: dict) -> dict:
        path = Path(_field(request, "path", str)).expanduser().resolve()
        modality = _field(request, "modality", str, None)
        frame = _field(request, "frame", int, None)
        overlap = float(_field(request, "overlap", (int, float), self.options.overlap))
        # The file's identity as it was before reading: a file replaced during the read is read again next time.
        stat = path.stat() if path.is_file() else None
        key = None if stat is None else (str(path), stat.st_mtime_ns, stat.st_size, modality, frame, overlap)
        reused = key is not None and key == self.session_key
        if not reused:
            volume = read_volume(path, modality=modality, frame=frame)  # a file that fails keeps the old cache
            self.close(request)  # the old cache goes before the new one is built
            self.progress(0.0, f"Encoding {volume.name}")
            options = dataclasses.replace(self.options, overlap=overlap)
            self.session = InteractiveSession(volume, model=self.model, options=options, progress=self.progress)
            self.session_key = key
            self.encodes += 1
        session = self.session
        return {"windows": session.window_count, "encode_s": round(session.encode_s, 3), "reused": reused,
                "shape_kji": list(session.volume.shape_kji), "warnings": session.warnings}

    def segment(self, request: dict) -> dict:
        if self.session is None:
            raise RefSAM3DError("No volume is open in this session; send an open request first.")
        started = time.perf_counter()
        self.outputs += 1
        output = Path(_field(request, "output", str, None) or self.folder / f"segment-{self.outputs}{SEG_NRRD_SUFFIX}")
        overwrite = _field(request, "overwrite", bool, False)
        for path in output_files(output):  # refused before any work, as the CLI does
            check_output_path(path, overwrite)
        points = _ras_numbers(request, "points_ras", [], lambda shape: shape == (0,) or (len(shape) == 2 and shape[1] == 3),
                              "a list of [R, A, S] points in mm, e.g. [[60, -20, 110]]")
        box = _ras_numbers(request, "box_ras", None, lambda shape: shape == (6,),
                           "6 numbers [R1, A1, S1, R2, A2, S2] in mm (two opposite corners)")
        # Post-processing options may change per request: they act after decoding, so the cached
        # features (which depend on the session's device and overlap only) stay valid.
        self.session.options = dataclasses.replace(
            self.session.options, threshold=float(_field(request, "threshold", (int, float), self.options.threshold)),
            largest_component=_field(request, "largest_component", bool, self.options.largest_component),
            fill_holes=_field(request, "fill_holes", bool, self.options.fill_holes))
        self.progress(0.0, "Decoding from the cached features")
        prompt = _field(request, "prompt", (str, list), None)
        if isinstance(prompt, list) and not all(isinstance(text, str) for text in prompt):
            raise RefSAM3DError(f"'prompt' must be a text or a list of texts; got {_one_line(json.dumps(prompt))[:200]}.")
        result = self.session.segment(
            prompt, points_ras=points.reshape(-1, 3),
            point_labels=_field(request, "point_labels", list, None), box_ras=box)
        files = write_result(result, output, overwrite)
        segments = [{"prompt": segment.prompt, "structure": segment.structure.key if segment.structure else None,
                     "volume_ml": round(result.volume_ml(segment), 3)} for segment in result.segments]
        return {"output": str(files[0]), "files": [str(f) for f in files], "segments": segments,
                "warnings": result.warnings, "elapsed_s": round(time.perf_counter() - started, 3)}

    def close(self, request: dict) -> dict:
        closed = self.session is not None
        self.session = self.session_key = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"closed": closed}


_MISSING = object()


def _field(request: dict, name: str, kinds, default=_MISSING):
    """``request[name]`` checked against ``kinds``; ``default`` when absent or null."""
    value = request.get(name)
    if value is None:
        if default is _MISSING:
            raise RefSAM3DError(f"The {request.get('op')} request needs '{name}'.")
        return default
    # bool is an int in Python: a threshold of true is refused, not taken for 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise RefSAM3DError(f"'{name}' of the {request.get('op')} request has the wrong type "
                            f"({type(value).__name__}: {value!r}); see the request formats in session_server.")
    return value


def _ras_numbers(request: dict, name: str, default, valid_shape, expected: str):
    """``request[name]`` as a float array of a shape ``valid_shape`` accepts, all finite."""
    value = _field(request, name, list, default)
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):  # ragged lists, text
        array = None
    if array is None or not valid_shape(array.shape) or not np.isfinite(array).all():
        raise RefSAM3DError(f"'{name}' must be {expected}; got {_one_line(json.dumps(value))[:200]}.")
    return array


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _protocol_stream():
    """The real stdout, for protocol lines only; file descriptor 1 then points at stderr, so that
    whatever a library prints (Python or C) cannot break a reply."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return stream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m RefSAM3DLib.session_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_arguments(parser)  # the run options: the model, its device, and every request's defaults
    parser.add_argument("--folder", help="a refsam3d- temporary folder to work in and remove at exit (default: a new one)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    if not folder.name.startswith(TEMP_PREFIX) or not folder.is_dir():  # it is deleted at exit: never a user's folder
        print(f"session_server: error: --folder {folder} is not a {TEMP_PREFIX}* folder; leave the option out.",
              file=sys.stderr)
        return 2
    protocol = _protocol_stream()

    def send(reply: dict) -> None:
        protocol.write(json.dumps(reply) + "\n")

    def progress(fraction: float, message: str) -> None:
        protocol.write(progress_line(fraction, _one_line(message)) + "\n")

    requests: queue.Queue[str] = queue.Queue()
    terminated = threading.Event()
    try:
        with sigterm_as_exit(terminated):
            # Started once SIGTERM has our handler: the reader's interrupt at end-of-file is lost without one.
            threading.Thread(target=watch_parent, args=(folder, requests.put), daemon=True,
                             name="refsam3d-requests").start()
            try:
                if args.threads:
                    torch.set_num_threads(args.threads)
                options = RunOptions.from_cli_args(args)
                progress(0.0, "Loading the model")
                model = run_model(options)
            except RefSAM3DError as error:
                send({"id": READY_ID, "op": "ready", "ok": False, "error": _one_line(error)})
                return 2
            server = SessionServer(model, options, folder, progress)
            send({"id": READY_ID, "op": "ready", "ok": True, "model": model_name(model),
                  "model_version": model_version(model), "device": str(server.device), "pid": os.getpid(),
                  "folder": str(folder)})
            while True:
                try:  # a timeout, so that a signal is handled within a second while idle
                    line = requests.get(timeout=1.0)
                except queue.Empty:
                    continue
                send(_answer(server, line, terminated))
    except SystemExit:
        if not terminated.is_set():
            raise
        return 128 + signal.SIGTERM
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _answer(server: SessionServer, line: str, terminated: threading.Event) -> dict:
    """One request line -> its reply; only SIGTERM (or end-of-file) ends the loop."""
    request_id = None
    try:
        request = json.loads(line)
        request_id = request.get("id") if isinstance(request, dict) else None
        return {"id": request_id, "ok": True, **server.answer(request)}
    except json.JSONDecodeError as error:
        return {"id": None, "ok": False, "error": f"Not a JSON request ({error.msg}); send one JSON object per line."}
    except RefSAM3DError as error:
        return {"id": request_id, "ok": False, "error": _one_line(error)}
    except Exception as error:
        if terminated.is_set():  # a library turned our SystemExit into its own error
            raise SystemExit(128 + signal.SIGTERM) from error
        traceback.print_exc()
        return {"id": request_id, "ok": False,
                "error": _one_line(f"Internal error ({type(error).__name__}: {error}); see the worker's log.")}


if __name__ == "__main__":
    sys.exit(main())
