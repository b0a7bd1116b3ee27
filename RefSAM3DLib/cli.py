"""The ``refsam3d`` command: segment, evaluate, train, info.

User errors print one line (``refsam3d: error: ...``) and exit with status 2; ``--debug`` shows
the traceback instead. Not for clinical use.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

from .cli_process import done_line, error_line, progress_line, run_as_worker, sigterm_as_exit
from .errors import Cancelled, RefSAM3DError
from .monai_import import import_monai_for_segmentation
from .overlay import write_overlay_png
from .result_files import LABELMAP_SUFFIXES, SEG_NRRD_SUFFIX, check_output_path, output_files, write_result
from .run_options import RunOptions, add_cli_arguments
from .vocabulary import parse_prompts
from .volume_reader import VOLUME_SUFFIXES, check_file_name, display_name, read_volume

SEGMENT_EPILOG = """examples:
  refsam3d segment ct.nii.gz --prompt "perform liver segmentation" --output liver.nii.gz
  refsam3d segment ct.nii.gz --prompt "liver, spleen, left kidney" --output ct.seg.nrrd --overlay ct.png
  refsam3d segment dicom_folder/ --prompt aorta --output out/ --device cuda
  refsam3d segment studies/*.nii.gz --prompt liver --prompt spleen --output results/
  refsam3d segment ct.nii.gz --prompt spleen --point 60,-20,110 --negative-point 80,-5,120 --output spleen.nii.gz
  refsam3d segment ct.nii.gz --box 40,-60,90,110,10,160 --output structure.nii.gz

Points and boxes are RAS millimetres (Slicer's world coordinates). They refine the ONE structure
of --prompt; without --prompt they segment the structure at the points / in the box.

Outputs: a label map (values 1..N in prompt order) + a JSON summary next to it, or a Slicer
.seg.nrrd (segments may overlap). Not a medical device; not for clinical use.
"""

OUTPUT_SUFFIXES = (SEG_NRRD_SUFFIX, *LABELMAP_SUFFIXES)


def ras_numbers(count: int):
    """argparse type: ``count`` comma-separated millimetre values (``R,A,S``)."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or not all(abs(v) < float("inf") for v in values):
            shape = "R,A,S" if count == 3 else "R1,A1,S1,R2,A2,S2"
            raise argparse.ArgumentTypeError(f"'{text}' is not {count} numbers {shape} (RAS mm, comma-separated)")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refsam3d", description="Text-prompted 3D segmentation of CT and MRI.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser(
        "segment",
        help="segment volumes from text prompts",
        epilog=SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument("inputs", nargs="+", help="NIfTI/NRRD/MHA files, DICOM series folders, or folders of volumes")
    seg.add_argument("--prompt", "-p", action="append", help="text naming one or more structures")
    seg.add_argument("--point", action="append", type=ras_numbers(3), default=[], metavar="R,A,S",
                     help="a click inside the structure, RAS mm (repeatable)")
    seg.add_argument("--negative-point", action="append", type=ras_numbers(3), default=[], metavar="R,A,S",
                     help="a click on something that is NOT the structure, RAS mm (repeatable)")
    seg.add_argument("--box", type=ras_numbers(6), metavar="R1,A1,S1,R2,A2,S2",
                     help="two opposite corners of a box around the structure, RAS mm")
    seg.add_argument("--output", "-o", required=True, help="output file (.nii.gz, .seg.nrrd) or folder")
    seg.add_argument("--format", choices=["nii.gz", "seg.nrrd"], default="nii.gz", help="file type when --output is a folder")
    seg.add_argument("--overlay", help="PNG overlay file (single input) or folder (batch)")
    add_cli_arguments(seg)
    seg.add_argument("--modality", choices=["CT", "MR"],
                     help="input modality (default: the DICOM tag, else CT for Hounsfield units, else MR)")
    seg.add_argument("--frame", type=int, help="frame to use from a 4D image")
    seg.add_argument("--series-uid", help="series to use from a DICOM folder holding several")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    seg.add_argument("--progress-lines", action="store_true", help="print 'PROGRESS <fraction> <message>' lines (for Slicer)")
    seg.add_argument("--worker-folder", help=argparse.SUPPRESS)  # run as SegmentationJob's child (cli_process.run_as_worker)

    evaluate = commands.add_parser("evaluate", help="Dice, NSD and HD95 of a model on labelled cases")
    add_cli_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help="folder of *_image/*_label pairs with labelmaps.json, or an MSD dataset.json")
    evaluate.add_argument("--output", required=True, help="report folder")
    evaluate.add_argument("--cases", nargs="*", help="only these case names")
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    evaluate.add_argument("--modality", choices=["CT", "MR"], help="modality of cases that do not state one")

    # its options are parsed by the training entry point itself (see main)
    commands.add_parser(
        "train",
        add_help=False,
        help="train or fine-tune a model from a config file (options: refsam3d train --help)",
    )

    info = commands.add_parser("info", help="parameter counts of a model config")
    info.add_argument("--config", default="small", help="config name (small, vit_b)")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


COORDINATE_OPTIONS = ("--point", "--negative-point", "--box")


def coordinates_attached(argv: list[str]) -> list[str]:
    """``--point -5,3,2`` as ``--point=-5,3,2``: argparse takes a value that starts with '-' and is
    not one plain number for an option, and RAS coordinates are often negative."""
    attached, index = [], 0
    while index < len(argv):
        if argv[index] in COORDINATE_OPTIONS and index + 1 < len(argv):
            attached.append(f"{argv[index]}={argv[index + 1]}")
            index += 2
        else:
            attached.append(argv[index])
            index += 1
    return attached


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(coordinates_attached(list(sys.argv[1:] if argv is None else argv)))
    if args.command == "train":  # its options belong to the training entry point
        args.training_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    as_command = argv is None  # this process is the `refsam3d` command: it ends when main returns
    if as_command and args.command == "segment":
        import_monai_for_segmentation()
    try:
        if getattr(args, "worker_folder", None):
            return run_as_worker(args.worker_folder, lambda: COMMANDS[args.command](args))
        if args.command == "train":  # the training loop saves a checkpoint on SIGTERM itself
            return COMMANDS[args.command](args)
        with sigterm_as_exit():
            return COMMANDS[args.command](args)
    except Cancelled as error:
        print(f"refsam3d: cancelled: {error}", file=sys.stderr)
        return 130
    except RefSAM3DError as error:
        if args.debug:
            traceback.print_exc()
        print(error_line(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refsam3d: interrupted", file=sys.stderr)
        return 130
    finally:
        if as_command:
            # Python's shutdown collects every object the imports made (torch, MONAI: over 1 s on
            # 2 cores); it skips frozen ones, and the process's memory goes back to the system anyway.
            gc.freeze()


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files stay; a folder of volumes is expanded; any other folder is taken as a DICOM series."""
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise RefSAM3DError(f"Input not found: {path}. Check the path.")
        if path.is_dir():
            volumes = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(tuple(VOLUME_SUFFIXES)))
            paths.extend(volumes if volumes else [path])
        else:
            paths.append(path)
    return paths


def case_stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_paths(inputs: list[Path], output: str, file_format: str) -> list[Path]:
    """One output file per input: ``output`` itself for one input with a file suffix, else a folder."""
    target = Path(output)
    if len(inputs) == 1 and target.name.lower().endswith(OUTPUT_SUFFIXES):
        return [target]
    if target.exists() and not target.is_dir():
        raise RefSAM3DError(f"--output {target} is a file but several inputs were given: pass a folder.")
    return [target / f"{case_stem(path)}.{file_format}" for path in inputs]


def overlay_path(overlay: str | None, input_path: Path, n_inputs: int) -> Path | None:
    if overlay is None:
        return None
    if n_inputs == 1 and overlay.lower().endswith(".png"):
        return Path(overlay)
    return Path(overlay) / f"{case_stem(input_path)}.png"


def plan_outputs(inputs: list[Path], output: str, file_format: str, overlay: str | None,
                 overwrite: bool) -> list[tuple[Path, Path, Path | None]]:
    """``(input, output, overlay PNG or None)`` per input, every file checked before any work.

    Refused here, so that nothing is computed or written: two inputs that would write the same
    file (``b1/ct.nii.gz`` and ``b2/ct.nii.gz``, or ``a.nii`` and ``a.nii.gz``, into one folder;
    the later would silently replace the earlier), an output that is an input, an existing file
    without --overwrite, a name ITK cannot take, and a folder that cannot be written.
    """
    plan = [(path, target, overlay_path(overlay, path, len(inputs)))
            for path, target in zip(inputs, output_paths(inputs, output, file_format))]
    writer_of: dict[Path, int] = {}  # every file the run writes -> the plan entry writing it
    for number, (input_path, output_path, png) in enumerate(plan):
        try:
            check_file_name(input_path)
        except RefSAM3DError:
            continue  # fails alone when it is read (a batch goes on); its outputs are never written
        for path in output_files(output_path) + ([png] if png else []):
            check_output_path(path, overwrite, inputs)
            other = writer_of.setdefault(path.resolve(), number)
            if other != number:
                raise RefSAM3DError(
                    f"{display_name(plan[other][0])} and {display_name(input_path)} would both write "
                    f"{display_name(path)}; give the inputs different names or segment them "
                    "into separate --output folders."
                )
    return plan


class ProgressReporter:
    """tqdm bar for people, or ``PROGRESS`` lines for the Slicer module reading our stdout."""

    def __init__(self, machine_lines: bool, label: str):
        self.machine_lines = machine_lines
        self.bar = None
        if not machine_lines:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=label, unit="‰", leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        if self.machine_lines:
            print(progress_line(fraction, message), flush=True)
        else:
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix_str(message, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_segment(args) -> int:
    # torch and MONAI come only with a run: `refsam3d --help` stays fast without them
    from .inference import resolve_device, run_model, segment
    from . import preprocess
    from .interactive import InteractiveSession, spatial_prompts_on_grid

    options = RunOptions.from_cli_args(args)
    spatial = spatial_prompts(args)
    inputs = expand_inputs(args.inputs)
    if spatial is not None and len(inputs) > 1:
        raise RefSAM3DError("Points and boxes are places in ONE volume; give one input with --point/--box.")
    plan = plan_outputs(inputs, args.output, args.format, args.overlay, args.overwrite)
    device = resolve_device(options.device)
    if device.type == "cpu" and options.device == "auto" and not args.progress_lines:
        print("refsam3d: no CUDA GPU found, running on the CPU", file=sys.stderr)
    model = None  # loaded once, after the first input proved readable: bad input fails fast

    failures: list[tuple[Path, str]] = []
    summary: list[tuple[Path, Path, float]] = []

    def fail(input_path: Path, error: Exception) -> None:
        if len(inputs) == 1:
            raise RefSAM3DError(str(error)) from error
        failures.append((input_path, str(error)))
        print(f"refsam3d: {display_name(input_path)}: {error}", file=sys.stderr)

    for input_path, output_path, png in plan:
        try:
            volume = read_volume(input_path, modality=args.modality, frame=args.frame, series_uid=args.series_uid)
        except RefSAM3DError as error:
            fail(input_path, error)
            continue
        if args.worker_folder and input_path.parent.resolve() == Path(args.worker_folder).resolve():
            input_path.unlink(missing_ok=True)  # the job's copy of the scan: no longer needed on disk
        if model is None:
            model = run_model(options)  # a bad model stops the whole batch
        reporter = ProgressReporter(args.progress_lines, input_path.name)
        try:
            if spatial is not None:  # a point off the volume is refused before the encoding
                spatial_prompts_on_grid(volume, preprocess.model_grid(volume, model.config.spacing_mm).model,
                                        spatial["points_ras"], spatial["box_ras"])
                reporter(0.0, "Encoding the volume")
                session = InteractiveSession(volume, model=model, options=options)
                result = session.segment(args.prompt[0] if args.prompt else None, **spatial)
                result.elapsed_s += session.encode_s
                reporter(1.0, "Done")
            else:
                result = segment(volume, "\n".join(args.prompt),  # every --prompt a line of one text: a repeat collapses
                                 model=model, options=options, progress=reporter)
            write_outputs(result, output_path, png, args.overwrite)
        except (RefSAM3DError, OSError) as error:
            if isinstance(error, Cancelled):
                raise
            fail(input_path, error)
            continue
        finally:
            reporter.close()
        for warning in result.warnings:
            print(f"refsam3d: warning: {warning}", file=sys.stderr)
        summary.append((input_path, output_path, result.elapsed_s))
        print_volumes(result, output_path, quiet=args.progress_lines)
        if args.progress_lines:
            print(done_line(output_path), flush=True)

    if len(inputs) > 1:
        print(f"\n{len(summary)} of {len(inputs)} volumes segmented, {len(failures)} failed.")
        for path, message in failures:
            print(f"  failed: {display_name(path)}: {message}")
    return 1 if failures else 0


def spatial_prompts(args) -> dict | None:
    """The ``InteractiveSession.segment`` arguments of --point/--negative-point/--box, or None
    without them; a text prompt is then required. Several text prompts with them are refused."""
    if not (args.point or args.negative_point or args.box):
        if not args.prompt:
            raise RefSAM3DError("No prompt given: name a structure with --prompt, or place --point/--box.")
        return None
    structures = [p for text in args.prompt or [] for p in parse_prompts(text)]
    if len(structures) > 1:
        raise RefSAM3DError(
            f"Points and boxes refine ONE structure, but the prompts name {len(structures)} "
            f"({', '.join(p.text for p in structures)}); give a single --prompt with them.")
    return {"points_ras": list(args.point) + list(args.negative_point),
            "point_labels": [1] * len(args.point) + [0] * len(args.negative_point),
            "box_ras": args.box}


def write_outputs(result, output_path: Path, png: Path | None, overwrite: bool) -> None:
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RefSAM3DError(f"Cannot create the output folder for {output_path} ({error.strerror}); choose a writable --output.") from None
    write_result(result, output_path, overwrite=overwrite)
    if png is not None:
        write_overlay_png(result, png, overwrite=overwrite)


def print_volumes(result, output_path: Path, quiet: bool = False) -> None:
    if quiet:
        return
    print(f"{result.reference.name or 'volume'} -> {output_path}  ({result.elapsed_s:.1f} s, model {result.model_name} {result.model_version})")
    for segment in result.segments:
        print(f"  {segment.name:<28} {result.volume_ml(segment):10.1f} mL   ('{segment.prompt}')")


def run_info(args) -> int:
    from .model.build import parameter_report  # the model package imports torch

    report = parameter_report(args.config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"config         {report['config']}")
    print(f"image encoder  {report['image_encoder']}")
    print(f"text encoder   {report['text_encoder']}")
    print(f"\n{'component':<22}{'total':>14}{'trainable':>14}{'frozen':>14}")
    for component, counts in [*report["components"].items(), ("total", report["total"])]:
        print(f"{component:<22}" + "".join(f"{counts[key]:>14,}" for key in ("total", "trainable", "frozen")))
    print(f"\ntrainable fraction {report['trainable_fraction']:.1%}")
    return 0


def run_train(args) -> int:
    """``refsam3d train ...`` is ``python -m RefSAM3DLib.training train ...`` (one parser, one place)."""
    from .training.__main__ import main as training_main  # torch and MONAI

    return training_main(["train", *args.training_args])


def run_evaluate(args) -> int:
    from .evaluation import evaluate_command  # torch and MONAI

    report = evaluate_command(
        data=args.data,
        output_dir=args.output,
        options=RunOptions.from_cli_args(args),
        case_names=args.cases,
        tolerance_mm=args.tolerance_mm,
        modality=args.modality,
    )
    print(f"report written: {report}")
    return 0


COMMANDS = {"segment": run_segment, "info": run_info, "train": run_train, "evaluate": run_evaluate}

if __name__ == "__main__":
    sys.exit(main())
