"""Option definitions shared by the ``lineguard`` commands, defined once so that a flag means
the same thing, with the same help, default and choices, on every command that takes it.

Options that override a setting name its environment variable in the help as
``[env var: LINEGUARD_…]``, the way click prints variables it reads itself; the value is
applied through :class:`~lineguard.stream.settings.Settings` so flag > environment > ``.env``
> default holds everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

Runtime = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16"]
Encoding = Literal["raw", "jpeg", "png"]
Show = Literal["none", "rejects", "all"]
Workers = Literal["threads", "processes"]
OutputFormat = Literal["text", "json"]

# The same default as lineguard.stream.dashboard.DEFAULT_PORT (kept import-free for --help).
DASHBOARD_PORT = 8470


def env_help(text: str, var: str) -> str:
    """Help for an option that overrides the setting read from ``var``."""
    return f"{text} [env var: {var}]"


BundleOpt = Annotated[
    Path, typer.Option("--bundle", "-b", metavar="DIR", help="Model bundle directory.")
]
SizeBundleOpt = Annotated[
    Path | None,
    typer.Option("--bundle", "-b", metavar="DIR", help="Read the input size from this bundle."),
]
BenchBundleOpt = Annotated[
    Path | None,
    typer.Option(
        "--bundle", "-b", metavar="DIR", help="Bundle to use (default: untrained 256-px lite)."
    ),
]
SourceOpt = Annotated[
    str,
    typer.Option(
        metavar="SOURCE", help="Image folder, video file, recording, camera index or URL."
    ),
]
LineOpt = Annotated[str | None, typer.Option(help=env_help("Line id.", "LINEGUARD_LINE__ID"))]
CameraOpt = Annotated[
    str | None, typer.Option(help=env_help("Camera id.", "LINEGUARD_LINE__CAMERA"))
]
RuntimeOpt = Annotated[Runtime, typer.Option(help="Inference runtime.")]
DeviceOpt = Annotated[str, typer.Option(metavar="cpu|cuda[:N]", help="Where to run the model.")]
PrecisionOpt = Annotated[Precision, typer.Option(help="fp16 needs CUDA.")]
MaxBatchOpt = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help=env_help("Largest inference batch.", "LINEGUARD_INFER__MAX_BATCH"),
    ),
]
MaxDelayOpt = Annotated[
    int | None,
    typer.Option(
        metavar="MS",
        help=env_help(
            "With the model idle, wait this long after a batch's first frame for more "
            "(0: launch at once; batches grow while a forward runs).",
            "LINEGUARD_INFER__MAX_DELAY_MS",
        ),
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        metavar="PORT",
        help=env_help("Serve Prometheus metrics here.", "LINEGUARD_METRICS__PORT"),
    ),
]
RateOpt = Annotated[
    str, typer.Option(metavar="max|FPS", help="Frames per second to send, or 'max'.")
]
EncodingOpt = Annotated[
    Encoding | None,
    typer.Option(help=env_help("Image encoding on the bus.", "LINEGUARD_INGEST__ENCODING")),
]
SizeOpt = Annotated[
    str | None,
    typer.Option(
        metavar="PX|HxW",
        help="Resize frames to PX×PX or H×W (default: the bundle's input size).",
    ),
]
# how many images of each kind a synthetic line gets (`synth`, `bench logical`)
TrainCountOpt = Annotated[int, typer.Option(metavar="N", help="Good training images.")]
ValidationCountOpt = Annotated[int, typer.Option(metavar="N", help="Good validation images.")]
TestGoodCountOpt = Annotated[int, typer.Option(metavar="N", help="Good test images.")]
LogicalCountOpt = Annotated[
    int, typer.Option(metavar="N", help="Test images with a logical anomaly.")
]
StructuralCountOpt = Annotated[
    int, typer.Option(metavar="N", help="Test images with a structural anomaly.")
]
LimitOpt = Annotated[int | None, typer.Option(metavar="N", help="Send at most N frames.")]
LoopOpt = Annotated[bool, typer.Option(help="Loop a folder, video or recording.")]
RecordOpt = Annotated[
    Path | None, typer.Option(metavar="DIR", help="Record what is sent into DIR.")
]
ShowOpt = Annotated[Show, typer.Option(help="Print events as they arrive.")]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", metavar="PATH", help="Also write the result as JSON to PATH."),
]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", help="text for people, json for scripts.")
]
WorkersOpt = Annotated[Workers, typer.Option(help="Run the workers as threads or processes.")]
ConsumerOpt = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Stable consumer name (default host-pid)."),
]
MapsOpt = Annotated[
    bool, typer.Option(help="Publish low-res anomaly maps and segmentations with the scores.")
]
BurstOpt = Annotated[bool, typer.Option(help="Exit once the input stream is drained.")]
DashboardOpt = Annotated[
    bool, typer.Option(help="Also serve the web dashboard (see 'lineguard dashboard').")
]
DashboardPortOpt = Annotated[
    int,
    typer.Option(metavar="PORT", help="Port of the page on 127.0.0.1 (0: any free port)."),
]
HistoryUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--history-url",
        metavar="URL",
        help="postgresql://… or sqlite:///PATH; unset = SQLite in --history-dir.",
        envvar="LINEGUARD_HISTORY__URL",
        show_envvar=True,
    ),
]
HistoryDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--history-dir",
        metavar="DIR",
        help="SQLite file and reject images.",
        envvar="LINEGUARD_HISTORY__DIR",
        show_envvar=True,
    ),
]
