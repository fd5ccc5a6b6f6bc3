"""Offline commands: make a synthetic line (``synth``), ``train`` a bundle, ``evaluate`` it,
``refit`` its memory banks, and the few-shot learning curve.

Training code is imported inside each command, so the line's commands never load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from lineguard.stream.cli.common import (
    console,
    err_console,
    friendly_errors,
    split_list,
    write_json,
)
from lineguard.stream.cli.options import (
    Encoding,
    HistoryDirOpt,
    HistoryUrlOpt,
    JsonOpt,
    LogicalCountOpt,
    StructuralCountOpt,
    TestGoodCountOpt,
    TrainCountOpt,
    ValidationCountOpt,
)

app = typer.Typer()

Backbone = Literal["efficientnet_lite0", "wide_resnet50_2"]
Normalisation = Literal["trimmed_z", "loo_max"]
Fusion = Literal["max", "sum"]
PatchSearch = Literal["auto", "graph", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
PatchDescriptor = Literal["auto", "mid", "shallow"]

OutBundleOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="DIR", help="Bundle directory to write.")
]
PatchBankOpt = Annotated[
    int | None,
    typer.Option(
        metavar="N", help="Patch memory bank size (0: none); default: 10 % of the patches, capped."
    ),
]
PatchDescriptorOpt = Annotated[
    PatchDescriptor | None,
    typer.Option(
        help="Patch bank descriptor: mid (PatchCore's strides 8+16), shallow (4+8), or auto "
        "(mid on a surface, shallow on an assembly)."
    ),
]
HistBankOpt = Annotated[
    bool | None, typer.Option(help="PSAD class-histogram bank over the training images.")
]
CompBankOpt = Annotated[
    bool | None, typer.Option(help="PSAD composition-embedding bank over the training images.")
]
FewshotOpt = Annotated[
    int | None,
    typer.Option(metavar="K", help="Training-free few-shot branch from the first K images."),
]
PositionPriorOpt = Annotated[
    bool | None,
    typer.Option(help="Subtract good parts' mean map per position (default: on)."),
]
PositionScaleOpt = Annotated[
    bool | None,
    typer.Option(help="Divide LGST's map by good parts' spread per position (default: on)."),
]
PATCH_SEARCH_HELP = (
    "Patch bank search: auto (in the graph up to 16 384 entries, faiss HNSW above), graph, "
    "or faiss after the engine."
)
NORMALISATION_HELP = "Branch score normalisation: trimmed_z (CSAD) or loo_max (PSAD)."
FUSION_HELP = "Combine normalised branch scores: max or sum (CSAD)."
FUSE_HELP = (
    "Branches in the verdict: auto (surface if no components were found, else assembly), "
    "assembly/all (every branch), surface (the patch bank), or names a,b."
)
TARGET_FRR_HELP = "False-reject rate on good parts that the threshold aims at."
JpegQualityOpt = Annotated[
    int | None, typer.Option(metavar="Q", min=1, max=100, help="JPEG quality (1-100).")
]


def codec_spec(encoding: str | None, jpeg_quality: int | None) -> str | None:
    """``--encoding``/``--jpeg-quality`` as a frame codec spec (``None``: both left out)."""
    if encoding is None and jpeg_quality is None:
        return None
    encoding = encoding or "jpeg"
    if encoding != "jpeg":
        return encoding
    return f"jpeg:{jpeg_quality or 90}"


@app.command()
@friendly_errors
def synth(
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT", help="Folder to write the line into (LOCO layout).")
    ],
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    kind: Annotated[
        Literal["tray", "connectors", "pushpins", "screwbag", "bottle"],
        typer.Option(help="Which synthetic product."),
    ] = "tray",
    size: Annotated[int, typer.Option(metavar="PX", help="Image side in pixels.")] = 256,
    train: TrainCountOpt = 200,
    validation: ValidationCountOpt = 100,
    test_good: TestGoodCountOpt = 100,
    logical: LogicalCountOpt = 100,
    structural: StructuralCountOpt = 100,
) -> None:
    """Write a synthetic product line (good parts, logical and structural anomalies, masks)."""
    from lineguard.offline.synth import make_line

    summary = make_line(
        out_dir,
        seed=seed,
        kind=kind,
        size=size,
        n_train=train,
        n_val=validation,
        n_test_good=test_good,
        n_test_logical=logical,
        n_test_structural=structural,
        progress=True,
    )
    console.print(
        f"wrote {sum(summary.counts.values())} images of '{summary.kind}' to {summary.root} "
        f"in {summary.seconds:.1f} s: {summary.counts}"
    )


@app.command()
@friendly_errors
def train(
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="MVTec LOCO AD, MVTec AD or a folder of goods.")
    ],
    out: OutBundleOpt,
    backbone: Annotated[Backbone, typer.Option(help="ImageNet backbone.")] = ("efficientnet_lite0"),
    profile: Annotated[
        Literal["lite", "paper"], typer.Option(help="lite (CPU) or paper (CSAD's sizes).")
    ] = "lite",
    device: Annotated[str, typer.Option(metavar="cpu|cuda[:N]", help="Where to train.")] = "cpu",
    preset: Annotated[
        Literal["demo", "default", "paper"],
        typer.Option(help="Training schedule (paper: CSAD's, for GPUs)."),
    ] = "default",
    input_size: Annotated[
        str,
        typer.Option(
            metavar="auto|PX|HxW",
            help="Model input, multiples of 32 (auto: 256 px square, or the parts' aspect "
            "from 1.5:1 on, at about as many pixels).",
        ),
    ] = "auto",
    target_frr: Annotated[float, typer.Option(metavar="RATE", help=TARGET_FRR_HELP)] = 0.01,
    normalisation: Annotated[Normalisation, typer.Option(help=NORMALISATION_HELP)] = "trimmed_z",
    fusion: Annotated[Fusion, typer.Option(help=FUSION_HELP)] = "max",
    fuse: Annotated[str, typer.Option(metavar="RECIPE", help=FUSE_HELP)] = "auto",
    labels: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Few-shot mode: folder of <stem>.png label maps."),
    ] = None,
    patch_bank: PatchBankOpt = None,
    hist_bank: HistBankOpt = None,
    comp_bank: CompBankOpt = None,
    fewshot: FewshotOpt = None,
    patch_descriptor: PatchDescriptorOpt = None,
    patch_search: Annotated[PatchSearch, typer.Option(help=PATCH_SEARCH_HELP)] = "auto",
    position_prior: PositionPriorOpt = None,
    position_scale: PositionScaleOpt = None,
    student: Annotated[
        bool | None,
        typer.Option(
            "--student/--no-student",
            help="Train the LGST student (default: unless the fusion recipe leaves it out, "
            "as a surface's does).",
            show_default=False,
        ),
    ] = None,
    encoding: Annotated[
        Encoding,
        typer.Option(help="How the line will send frames; training sees them that way."),
    ] = "jpeg",
    jpeg_quality: JpegQualityOpt = None,
    restart: Annotated[bool, typer.Option(help="Discard finished stages and start over.")] = False,
) -> None:
    """Pseudo-labels → segmentation → LGST → memory banks → calibration → bundle.

    Resumable: run it again after an interruption and finished stages are kept. Every image
    goes through --encoding first (default JPEG at quality 90, what ingest sends), and the
    bundle records it: ingest then sends that way by default.
    """
    from lineguard.engines.allocator import keep_freed_memory
    from lineguard.engines.codec import DEFAULT_FRAME_CODEC
    from lineguard.offline.train import train_bundle

    keep_freed_memory()  # this process is the job: keep its freed tensors for the next step

    bundle = train_bundle(
        data_dir,
        out,
        backbone=backbone,
        profile=profile,
        device=device,
        preset=preset,
        input_size=input_size,
        target_frr=target_frr,
        normalisation=normalisation,
        fusion=fusion,
        fusion_recipe=fuse,
        labels_dir=labels,
        patch_bank=patch_bank,
        hist_bank=hist_bank,
        comp_bank=comp_bank,
        fewshot_shots=fewshot,
        patch_descriptor=patch_descriptor,
        patch_search=patch_search,
        position_prior=position_prior,
        position_scale=position_scale,
        student=student,
        frame_codec=codec_spec(encoding, jpeg_quality) or DEFAULT_FRAME_CODEC,
        restart=restart,
        log=lambda msg: err_console.print(msg, highlight=False),
    )
    console.print(f"bundle {bundle.path} ready: model {bundle.version}")


@app.command()
@friendly_errors
def evaluate(
    bundle_dir: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle to evaluate.")],
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="Dataset with a labelled test split.")
    ],
    runtime: Annotated[
        Literal["onnxruntime", "torch"], typer.Option(help="Runtime to score with.")
    ] = "onnxruntime",
    out_dir: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Report folder.")
    ] = None,
    encoding: Annotated[
        Encoding | None,
        typer.Option(help="Score files as sent this way (default: as the bundle was trained)."),
    ] = None,
    jpeg_quality: JpegQualityOpt = None,
    json_path: JsonOpt = None,
) -> None:
    """Image AUROC (overall, per anomaly type, per branch), F1-max, operating point, report.

    Files are scored as the line scores them: through the frame encoding the bundle was
    trained for (or --encoding). --json also lists every image's raw and fused scores.
    """
    from lineguard.offline.evaluate import evaluate_bundle

    result = evaluate_bundle(
        bundle_dir,
        data_dir,
        runtime=runtime,
        out_dir=out_dir,
        frame_codec=codec_spec(encoding, jpeg_quality),
    )
    m = result.metrics
    branches = list(m["overall"]["branches"])
    table = Table(title=f"lineguard evaluate: {m['bundle']}")
    for col in ("set", "n", "AUROC", "escape rate", *(f"AUROC {b}" for b in branches)):
        table.add_column(col, justify="left" if col == "set" else "right", no_wrap=True)

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    rows = [("all defects", m["overall"]), *m["by_type"].items()]
    rows += [(f"  {k}", v) for k, v in m["by_defect"].items()]
    for name, block in rows:
        table.add_row(
            name,
            str(block["n"]),
            fmt(block["auroc"]),
            fmt(block["escape_rate"]),
            *(fmt(block["branches"][b]) for b in branches),
        )
    console.print(table)
    out = "; ".join(f"{b}: {why}" for b, why in m["left_out"].items())
    console.print(
        f"fused: {m['fusion']} of {', '.join(m['fused_branches'])} (recipe "
        f"{m['fusion_recipe']})" + (f"; left out: {out}" if out else ""),
        highlight=False,
    )
    console.print(
        f"F1-max {fmt(m['overall']['f1_max'])}; at the calibrated threshold "
        f"{m['threshold']:.3f}: false-reject rate {fmt(m['false_reject_rate'])} on "
        f"{m['n_good']} good parts"
    )
    console.print(f"frames scored as {m['frame_codec']}; report: {result.report_dir}/report.html")
    write_json(json_path, m)


@app.command()
@friendly_errors
def refit(
    bundle_dir: Annotated[
        Path, typer.Argument(metavar="BUNDLE", help="Trained bundle to start from.")
    ],
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="The dataset it was trained on.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="New bundle directory.")],
    patch_bank: Annotated[
        str | None,
        typer.Option(
            metavar="N|auto", help="Patch bank size (0: none; auto: 10 % of the patches, capped)."
        ),
    ] = None,
    patch_descriptor: Annotated[
        Literal["mid", "shallow"] | None,
        typer.Option(help="Switch the patch descriptor (recomputed, no retraining)."),
    ] = None,
    hist_bank: HistBankOpt = None,
    comp_bank: CompBankOpt = None,
    fewshot: FewshotOpt = None,
    patch_search: Annotated[PatchSearch | None, typer.Option(help=PATCH_SEARCH_HELP)] = None,
    position_prior: PositionPriorOpt = None,
    position_scale: PositionScaleOpt = None,
    hist_grids: Annotated[
        str | None,
        typer.Option(metavar="G,…", help="Patch Histogram grids, e.g. 1,2,4 (must divide PX)."),
    ] = None,
    normalisation: Annotated[Normalisation | None, typer.Option(help=NORMALISATION_HELP)] = None,
    fusion: Annotated[Fusion | None, typer.Option(help=FUSION_HELP)] = None,
    fuse: Annotated[str | None, typer.Option(metavar="RECIPE", help=FUSE_HELP)] = None,
    target_frr: Annotated[float | None, typer.Option(metavar="RATE", help=TARGET_FRR_HELP)] = None,
    feedback: Annotated[
        bool,
        typer.Option(
            "--feedback", help="Learn frames marked good in the history; check marked defects."
        ),
    ] = False,
    history_url: HistoryUrlOpt = None,
    history_dir: HistoryDirOpt = None,
) -> None:
    """Refill the memory banks and recalibrate a trained bundle, without retraining (minutes).

    Options left out keep the bundle's value. With --feedback, the saved frames that
    operators marked good (false rejects) join the banks; those marked defect are scored by
    the new bundle, which must still reject them. Workers hot-reload a bundle written over
    the path they watch.
    """
    from lineguard.engines.allocator import keep_freed_memory
    from lineguard.offline.refit import refit_bundle

    keep_freed_memory()  # this process is the job: keep its freed tensors for the next step

    bank: int | Literal["auto"] | None = None
    if patch_bank == "auto":
        bank = "auto"
    elif patch_bank is not None:
        try:
            bank = int(patch_bank)
        except ValueError:
            raise typer.BadParameter(
                f"{patch_bank!r} is neither a number nor 'auto'", param_hint="--patch-bank"
            ) from None
    good: list[Path] = []
    bad: list[Path] = []
    if feedback:
        good, bad = _feedback_images(history_url, history_dir)
    bundle = refit_bundle(
        bundle_dir,
        data_dir,
        out,
        extra_good=good,
        check_bad=bad,
        patch_bank=bank,
        patch_descriptor=patch_descriptor,
        hist_bank=hist_bank,
        comp_bank=comp_bank,
        fewshot_shots=fewshot,
        patch_search=patch_search,
        position_prior=position_prior,
        position_scale=position_scale,
        hist_grids=None if hist_grids is None else tuple(split_list(hist_grids, int)),
        normalisation=normalisation,
        fusion=fusion,
        fusion_recipe=fuse,
        target_frr=target_frr,
        progress=True,
        log=lambda msg: err_console.print(msg, highlight=False),
    )
    console.print(
        f"bundle {bundle.path} ready: model {bundle.version}, branches {', '.join(bundle.branches)}"
    )


def _feedback_images(url: str | None, directory: Path | None) -> tuple[list[Path], list[Path]]:
    """The saved pictures of the frames marked good and defect in the configured history."""
    from lineguard.engines.errors import ConfigError
    from lineguard.stream.cli.common import load_settings
    from lineguard.stream.cli.history import open_history
    from lineguard.stream.history.feedback import collect_feedback

    settings = load_settings({"history.url": url, "history.dir": directory}, quiet=True)
    with open_history(url, directory) as store:
        fb = collect_feedback(store, settings.history.dir / "images")
        where = store.where
    for mark, keys in fb.missing.items():
        if keys:
            err_console.print(
                f"{len(keys)} frame(s) marked {mark} have no saved picture (a passed frame, "
                f"pruned, or gone from the stream), e.g. {keys[0]}: not used",
                highlight=False,
            )
    if not fb.good and not fb.defects:
        raise ConfigError(
            f"--feedback: the history at {where} has no marked frame with a saved picture; "
            "mark rejects with 'lineguard feedback KEY --good' or on the dashboard"
        )
    err_console.print(
        f"feedback from {where}: {len(fb.good)} good, {len(fb.defects)} defect", highlight=False
    )
    return fb.good, fb.defects


@app.command("fewshot-curve")
@friendly_errors
def fewshot_curve_command(
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="Dataset with train goods and a test split.")
    ],
    shots: Annotated[str, typer.Option(metavar="K,…", help="Numbers of shots.")] = "1,2,4,8",
    backbone: Annotated[Backbone, typer.Option(help="Backbone for the patch features.")] = (
        "efficientnet_lite0"
    ),
    json_path: JsonOpt = None,
) -> None:
    """AUROC of the training-free few-shot branch from k good images (no training at all)."""
    from lineguard.engines.errors import ConfigError
    from lineguard.offline.fewshot import fewshot_curve

    try:
        ks = [int(v) for v in shots.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--shots takes integers like 1,2,4,8, got {shots!r}") from exc
    result = fewshot_curve(
        data_dir, ks, backbone=backbone, log=lambda msg: err_console.print(msg, highlight=False)
    )
    types = sorted({t for row in result["curve"] for t in row["by_type"]})
    table = Table(title=f"few-shot branch on {data_dir}")
    for col in ("k", "AUROC", *(f"AUROC {t}" for t in types), "F1-max", "masking"):
        table.add_column(col, justify="right")
    for row in result["curve"]:
        table.add_row(
            str(row["shots"]),
            f"{row['auroc']:.3f}",
            *(f"{row['by_type'][t]:.3f}" for t in types),
            f"{row['f1_max']:.3f}",
            "on" if row["masking"] else "off",
        )
    console.print(table)
    write_json(json_path, result)
