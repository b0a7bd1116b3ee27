"""A real screenshot of the Slicer module's result, rendered off-screen by slicer-core.

The bundled sample CT is segmented by the `refsam3d` worker (a child process, as the module runs
it), the .seg.nrrd is read with the module's own bridge (`mrml.import_segmentation_file`, Slicer's
C++ reader) into slicer-core's MRML scene (trame-slicer's SlicerApp), and Slicer's displayable
managers draw an axial and a coronal slice view and a 3D view of the segments' closed surfaces.
The three render windows are captured and put side by side, with a caption, into one PNG.

    python scripts/make_screenshot.py                       # segments, then renders docs/screenshot.png
    python scripts/make_screenshot.py --segmentation X.seg.nrrd   # renders an existing result

Needs the test extra (`trame-slicer`) and an off-screen OpenGL (EGL or OSMesa VTK build).
Not a medical device; not for clinical use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CT = ROOT / "RefSAM3DLib" / "samples" / "ts_example_ct_image.nii.gz"
PROMPT = "liver, spleen, right kidney, left kidney, stomach"
VIEW_SIZE = 400  # pixels, each of the three views
CAPTION_HEIGHT = 22
# Slicer's own defaults, so the picture reads as Slicer: 3D background gradient, view bar colours.
SLICER_3D_BACKGROUND = ((193, 195, 232), (255, 255, 255))
VIEW_BARS = {"Red": (243, 74, 51), "Green": (109, 173, 74), "1": (116, 131, 233)}


def segment_sample(image: Path, output: Path) -> None:
    """The worker's command line, exactly as a user (or the module's Logic) runs it."""
    command = [sys.executable, "-m", "RefSAM3DLib.cli", "segment", str(image), "--prompt", PROMPT,
               "--output", str(output), "--overwrite"]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def busiest_index(labels: np.ndarray, axis: int) -> int:
    """The slice along ``axis`` that shows the most segments (then the most segment voxels)."""
    other = tuple(a for a in range(3) if a != axis)
    counts = np.stack([(labels == value).sum(axis=other) for value in np.unique(labels) if value], axis=0)
    score = (counts > 0).sum(axis=0) * labels.size + counts.sum(axis=0)
    return int(np.argmax(score))


def capture(view) -> np.ndarray:
    """The view's render window as an ``(H, W, 3)`` uint8 array, top row first."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    view.render()
    grabber = vtkWindowToImageFilter()
    grabber.SetInput(view.render_window())
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    return np.ascontiguousarray(pixels[::-1])  # VTK's first row is the bottom one


def render_views(ct_path: Path, segmentation_path: Path) -> tuple[list[tuple[str, str, np.ndarray]], str]:
    """``([(bar tag, title, pixels)] for axial, coronal, 3D, model name)``."""
    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from RefSAM3DLib import mrml
    from RefSAM3DLib.volume_reader import nrrd_header_fields

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    red = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    green = app.view_manager.create_view(ViewLayoutDefinition.coronal_view())
    threed = app.view_manager.create_view(ViewLayoutDefinition.threed_view(background_color=tuple(
        "#%02x%02x%02x" % rgb for rgb in SLICER_3D_BACKGROUND)))
    for view in (red, green, threed):
        view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)

    (volume_node,) = app.io_manager.load_volumes(str(ct_path))
    display = volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400, 40)  # abdomen
    app.display_manager.show_volume_in_slice_background(volume_node)

    segmentation_node, _ = mrml.import_segmentation_file(segmentation_path, volume_node)
    segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.GetDisplayNode().SetOpacity3D(1.0)

    # Slices through the most organs, like a user scrolling to them.
    labels = mrml.segmentation_node_to_labelmap_array(segmentation_node, volume_node)
    k = busiest_index(labels, axis=0)
    j = busiest_index(labels, axis=1)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    centre = [(n - 1) / 2.0 for n in volume_node.GetImageData().GetDimensions()]
    axial_ras = ijk_to_ras.MultiplyPoint((centre[0], centre[1], k, 1.0))[:3]
    coronal_ras = ijk_to_ras.MultiplyPoint((centre[0], j, centre[2], 1.0))[:3]

    for view in (red, green):
        view.fit_view_to_content()
    red.set_slice_value(axial_ras[2])
    green.set_slice_value(coronal_ras[1])
    threed.fit_view_to_content()

    header = nrrd_header_fields(segmentation_path)
    model = header.get("RefSAM3D_ModelName", "bundled model")
    version = header.get("RefSAM3D_ModelVersion", "")
    model_name = f"{model} {version}".strip()
    panels = [
        ("Red", f"Axial  S {axial_ras[2]:.0f} mm", capture(red)),
        ("Green", f"Coronal  A {coronal_ras[1]:.0f} mm", capture(green)),
        ("1", "3D  closed surfaces", capture(threed)),
    ]
    return panels, model_name


def compose(panels, caption: str, output: Path) -> None:
    """Views side by side, each under a bar in its Slicer view colour, and a caption line below."""
    from PIL import Image, ImageDraw, ImageFont

    bar = 18
    width = VIEW_SIZE * len(panels)
    canvas = Image.new("RGB", (width, bar + VIEW_SIZE + CAPTION_HEIGHT), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        font = ImageFont.load_default()
    for n, (tag, title, pixels) in enumerate(panels):
        x = n * VIEW_SIZE
        draw.rectangle([x, 0, x + VIEW_SIZE - 1, bar - 1], fill=VIEW_BARS[tag])
        draw.text((x + 6, 2), f"{tag}   {title}", fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(pixels), (x, bar))
    draw.text((6, bar + VIEW_SIZE + 4), caption, fill=(230, 230, 230), font=font)
    output.parent.mkdir(parents=True, exist_ok=True)
    # A palette keeps the PNG small; the views have few distinct colours besides the CT's greys.
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(output, optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--segmentation", type=Path,
                        help="an existing .seg.nrrd of the sample CT (default: segment it now, a few minutes on a CPU)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temp:
        segmentation = args.segmentation
        if segmentation is None:
            segmentation = Path(temp) / "ts_example_ct.seg.nrrd"
            segment_sample(SAMPLE_CT, segmentation)
        panels, model_name = render_views(SAMPLE_CT, segmentation)
    caption = (f"RefSAM3D in 3D Slicer (slicer-core, off-screen): \"{PROMPT}\" on the bundled sample CT, "
               f"model {model_name}. Not for clinical use.")
    compose(panels, caption, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
