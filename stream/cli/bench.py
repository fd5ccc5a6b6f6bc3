"""``lineguard bench``: benchmarks that print a table and write JSON — the model alone per
runtime and batch (``model``), the patch-bank search (``knn``), the whole line through Redis
(``e2e``), a long run at a fixed rate (``soak``), the verdict sinks (``sinks``), the verdict
history's throughput and outage recovery (``history``), the operators' corrections fed back
(``feedback``) and the prepared GPU check (``gpu``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lineguard.stream.cli.common import (
    console,
    err_console,
    friendly_errors,
    load_settings,
    split_list,
    write_json,
)
from lineguard.stream.cli.options import (
    BenchBundleOpt,
    DeviceOpt,
    EncodingOpt,
    JsonOpt,
    LogicalCountOpt,
    MaxBatchOpt,
    MaxDelayOpt,
    RateOpt,
    RuntimeOpt,
    StructuralCountOpt,
    TestGoodCountOpt,
    TrainCountOpt,
    ValidationCountOpt,
    WorkersOpt,
)

app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)

MinTimeOpt = Annotated[float, typer.Option(metavar="S", help="Seconds to time each configuration.")]


@app.command("model")
@friendly_errors
def bench_model_cmd(
    backbone: Annotated[
        str, typer.Option(metavar="NAME,…", help="Backbones to time.")
    ] = "efficientnet_lite0",
    runtime: Annotated[
        str, typer.Option(metavar="RT,…", help="Runtimes: torch, onnxruntime, tensorrt.")
    ] = "torch,onnxruntime",
    batch: Annotated[str, typer.Option(metavar="N,…", help="Batch sizes.")] = "1,8,32",
    device: DeviceOpt = "cpu",
    precision: Annotated[str, typer.Option(metavar="P,…", help="Precisions: fp32, fp16.")] = "fp32",
    bundle: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Time this bundle instead of a fresh model."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(metavar="lite|paper", help="Default: by backbone.")
    ] = None,
    input_size: Annotated[int, typer.Option(metavar="PX", help="Square input size.")] = 256,
    min_time: MinTimeOpt = 3.0,
    cuda_graphs: Annotated[
        str, typer.Option(metavar="on|off|on,off", help="CUDA graphs for torch on CUDA.")
    ] = "on",
    json_path: JsonOpt = None,
) -> None:
    """Time the fused model per runtime and batch size (images/s, p50/p99 ms per batch)."""
    from lineguard.engines.bench.model import bench_model, rows_to_json

    graphs = [g == "on" for g in split_list(cuda_graphs)]
    rows = bench_model(
        backbones=split_list(backbone),
        runtimes=split_list(runtime),
        batches=split_list(batch, int),
        device=device,
        precisions=split_list(precision),
        bundle=bundle,
        profile=profile,
        input_size=input_size,
        min_time_s=min_time,
        cuda_graphs=graphs,
        progress=lambda msg: err_console.print(f"[dim]timing {msg}…[/dim]"),
    )
    table = Table(title="lineguard bench model")
    columns = ("backbone", "profile", "runtime", "device", "precision", "batch", "images/s")
    for col in (*columns, "p50 ms", "p99 ms", "GFLOP/img", "note"):
        numeric = col in ("batch", "images/s", "p50 ms", "p99 ms", "GFLOP/img")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r.backbone,
            r.profile,
            r.runtime,
            r.device,
            r.precision,
            str(r.batch),
            f"{r.images_per_s:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.gflop_per_image:.2f}",
            r.note,
        )
    console.print(table)
    write_json(json_path, rows_to_json(rows))


@app.command("knn")
@friendly_errors
def bench_knn_cmd(
    sizes: Annotated[str, typer.Option(metavar="N,…", help="Bank sizes.")] = (
        "1024,4096,16384,65536,262144"
    ),
    methods: Annotated[
        str,
        typer.Option(
            metavar="M,…",
            help="graph-torch, graph-onnxruntime, faiss-flat, faiss-ivf, faiss-hnsw.",
        ),
    ] = "graph-torch,graph-onnxruntime,faiss-flat,faiss-ivf,faiss-hnsw",
    dim: Annotated[
        int,
        typer.Option(metavar="D", help="Descriptor size (lite0: mid 152, shallow 64)."),
    ] = 152,
    queries: Annotated[
        int,
        typer.Option(metavar="N", help="Patches per image (256 px: mid 1024, shallow 4096)."),
    ] = 1024,
    min_time: MinTimeOpt = 2.0,
    json_path: JsonOpt = None,
) -> None:
    """Patch-bank search: in-graph matrix product vs faiss, per bank size, and the crossover."""
    from lineguard.engines.bench.knn import bench_knn, crossover, rows_to_json

    rows = bench_knn(
        split_list(sizes, int),
        dim=dim,
        queries=queries,
        methods=tuple(split_list(methods)),
        min_time_s=min_time,
        progress=lambda msg: err_console.print(f"[dim]timing {msg}…[/dim]"),
    )
    table = Table(title=f"lineguard bench knn ({queries} queries of dim {dim} per image)")
    for col in ("method", "bank", "ms/image p50", "p99 ms", "build s", "recall"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.method,
            str(r.bank),
            f"{r.ms_per_image:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.build_s:.2f}",
            f"{r.recall:.3f}",
        )
    console.print(table)
    for method, size in crossover(rows).items():
        console.print(
            f"{method} beats the in-graph search from bank size {size}"
            if size
            else f"{method} never beats the in-graph search at these sizes"
        )
    write_json(json_path, rows_to_json(rows))


@app.command("logical")
@friendly_errors
def bench_logical_cmd(
    families: Annotated[
        str, typer.Option(metavar="all|K,…", help="Synthetic families to run.")
    ] = "all",
    seeds: Annotated[
        str, typer.Option(metavar="report|selection", help="Which seed of each family.")
    ] = "report",
    preset: Annotated[str, typer.Option(metavar="NAME", help="train's preset.")] = "default",
    size: Annotated[int, typer.Option(metavar="PX", help="Image side.")] = 256,
    train: TrainCountOpt = 200,
    validation: ValidationCountOpt = 100,
    test_good: TestGoodCountOpt = 100,
    logical: LogicalCountOpt = 100,
    structural: StructuralCountOpt = 100,
    workdir: Annotated[
        Path, typer.Option("--dir", metavar="DIR", help="Lines, bundles and reports.")
    ] = Path("bench-logical"),
    keep: Annotated[bool, typer.Option(help="Keep each family's line and bundle.")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Synthesise, train and evaluate each family: logical, structural, per branch, FRR."""
    from lineguard.engines.bench.machine import machine_info
    from lineguard.offline.families_bench import (
        LineCounts,
        bench_logical,
        families_of,
        mean,
        seed_for,
    )

    names = families_of(families)
    seed_for(names[0], seeds)  # refuse a bad role before hours of training
    counts = LineCounts(train, validation, test_good, logical, structural, size)
    rows, wall = bench_logical(
        names,
        workdir,
        role=seeds,
        counts=counts,
        preset=preset,
        json_path=json_path,
        keep=keep,
        machine=machine_info(),
        log=lambda msg: err_console.print(f"[dim]{msg}[/dim]", highlight=False),
    )
    branches = sorted({b for r in rows for b in r.branches})
    table = Table(title=f"lineguard bench logical ({seeds} seeds, preset {preset})")
    cols = ["family", "seed", "logical", "structural", *branches, "FRR", "train min"]
    for col in cols:
        table.add_column(col, justify="left" if col == "family" else "right", no_wrap=True)

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    for r in rows:
        per_branch = [
            f"{f(r.branches[b]['logical'])}/{f(r.branches[b]['structural'])}" for b in branches
        ]
        table.add_row(
            r.family,
            str(r.seed),
            f(r.logical),
            f(r.structural),
            *per_branch,
            f(r.false_reject_rate),
            f"{r.train_s / 60:.1f}",
        )
    table.add_row(
        "mean", "", f(mean([r.logical for r in rows])), f(mean([r.structural for r in rows]))
    )
    console.print(table)
    console.print("branch columns: logical/structural AUROC")
    sub = Table(title="AUROC per subtype (against the good test parts)")
    for col in ("family", "subtype", "AUROC"):
        sub.add_column(col, justify="right" if col == "AUROC" else "left", no_wrap=True)
    for r in rows:
        for name, v in r.subtypes.items():
            sub.add_row(r.family, name, f(v))
    console.print(sub)
    console.print(f"wall time {wall / 60:.1f} min")


@app.command("e2e")
@friendly_errors
def bench_e2e_cmd(
    frames: Annotated[
        int, typer.Option(metavar="N", help="Frames to time (after the warm-up).")
    ] = 300,
    rate: RateOpt = "max",
    bundle: BenchBundleOpt = None,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    max_batch: MaxBatchOpt = None,
    max_delay_ms: MaxDelayOpt = None,
    workers: WorkersOpt = "threads",
    encoding: EncodingOpt = None,
    warmup: Annotated[int, typer.Option(metavar="N", help="Untimed frames sent first.")] = 16,
    dashboard: Annotated[
        bool,
        typer.Option(
            help="Serve the dashboard (with anomaly maps) and keep a simulated viewer on it, "
            "to measure what an open page costs."
        ),
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """Throughput and capture→event latency through Redis, with a per-stage breakdown."""
    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.tools.bench_e2e import bench_e2e, result_table

    settings = load_settings(
        {
            "ingest.encoding": encoding,
            "infer.max_batch": max_batch,
            "infer.max_delay_ms": max_delay_ms,
        },
        quiet=True,
    )
    result = bench_e2e(
        settings,
        frames=frames,
        rate=parse_rate(rate),
        bundle=bundle,
        runtime=runtime,
        device=device,
        mode=workers,
        warmup=warmup,
        progress=lambda msg: err_console.print(f"[dim]{msg}[/dim]"),
        dashboard=dashboard,
    )
    console.print(result_table(result))
    write_json(json_path, result)


@app.command("gpu")
@friendly_errors
def bench_gpu_cmd(
    device: Annotated[
        str, typer.Option(metavar="cuda[:N]|cpu", help="cpu: a quick dry run on tiny settings.")
    ] = "cuda",
    max_batch: Annotated[
        int | None, typer.Option(metavar="N", help="Largest batch of the sweep (cuda: 256).")
    ] = None,
    e2e_frames: Annotated[
        int | None, typer.Option(metavar="N", help="Frames of the e2e part (cuda: 2000).")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """The GPU infer path in one command (< 8 min): parity of torch-CUDA fp32/fp16, graphs on
    and off, against the CPU; a batch sweep of the lite and paper profiles; bench e2e with a
    GPU infer worker."""
    from lineguard.stream.tools.gpu_check import GpuCheckPlan, run_check, summary_lines

    plan = GpuCheckPlan.for_device(device, max_batch=max_batch, e2e_frames=e2e_frames)
    result = run_check(plan, say=lambda msg: err_console.print(f"[dim]{msg}…[/dim]"))
    table = Table(title=f"lineguard bench gpu ({result['machine'].get('gpu', device)})")
    table.add_column("result", no_wrap=True)
    for line in summary_lines(result):
        table.add_row(line)
    console.print(table)
    write_json(json_path, result)
    if not result["ok"]:
        raise typer.Exit(code=1)


@app.command("soak")
@friendly_errors
def bench_soak_cmd(
    minutes: Annotated[float, typer.Option(metavar="MIN", help="How long to run the line.")] = 20.0,
    rate: Annotated[
        float, typer.Option(metavar="FPS", help="Frames per second sent by ingest.")
    ] = 5.0,
    bundle: BenchBundleOpt = None,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    report_s: Annotated[
        float, typer.Option(metavar="S", help="Seconds between progress lines.")
    ] = 60.0,
    sample_s: Annotated[
        float, typer.Option(metavar="S", help="Seconds between memory samples.")
    ] = 5.0,
    max_growth: Annotated[
        float,
        typer.Option(metavar="MIB", help="Fail above this RSS growth (MiB/min, second half)."),
    ] = 1.0,
    json_path: JsonOpt = None,
) -> None:
    """The whole line as processes at a fixed rate: memory, queues, p99 and verdict
    accounting once a minute; exit 1 if memory grows without bound or the counts do not add
    up."""
    from lineguard.stream.tools.soak import soak

    settings = load_settings({}, quiet=True)
    result = soak(
        settings,
        minutes=minutes,
        rate=rate,
        bundle=bundle,
        runtime=runtime,
        device=device,
        sample_s=sample_s,
        report_s=report_s,
        max_growth_mib_per_min=max_growth,
        say=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
    )
    write_json(json_path, result)
    v, rss = result["verdicts"], result["rss_mib"]
    console.print(
        f"soak: {result['minutes']:g} min at {result['rate']:g} frames/s, sent {result['sent']} = "
        f"pass {v['pass']} + fail {v['fail']} + uninspected {v['uninspected']} + error "
        f"{v['error']}; missing {result['missing']}, duplicates {result['duplicates']}; "
        f"p99 {result['latency_ms']['p99']} ms; RSS MiB "
        + ", ".join(
            f"{w} {r['start']} → {r['end']} ({r['growth_mib_per_min']} MiB/min)"
            for w, r in rss.items()
        ),
        highlight=False,
        soft_wrap=True,
    )
    if not result["ok"]:
        for problem in result["problems"]:
            err_console.print(f"[red]soak failed:[/red] {problem}", highlight=False)
        raise typer.Exit(code=1)


@app.command("chaos")
@friendly_errors
def bench_chaos_cmd(
    minutes: Annotated[float, typer.Option(metavar="MIN", help="How long to inject faults.")] = 3.0,
    rate: Annotated[
        float, typer.Option(metavar="FPS", help="Frames per second sent by ingest.")
    ] = 10.0,
    interval: Annotated[
        float, typer.Option(metavar="S", help="Mean seconds between SIGKILLs.")
    ] = 8.0,
    bundle: BenchBundleOpt = None,
    seed: Annotated[int, typer.Option(help="Which faults, in which order.")] = 0,
    json_path: JsonOpt = None,
) -> None:
    """SIGKILL ingest, infer, decide and the server at random while frames flow, then check
    that every frame got exactly one verdict; exit 1 if one was lost or doubled."""
    from lineguard.stream.tools.chaos import chaos

    settings = load_settings({}, quiet=True)
    result = chaos(
        settings,
        minutes=minutes,
        rate=rate,
        interval_s=interval,
        bundle=bundle,
        seed=seed,
        say=lambda msg: err_console.print(f"[dim]{msg}[/dim]", highlight=False),
    )
    write_json(json_path, result)
    v, lat = result["verdicts"], result["latency_s"]
    console.print(
        f"chaos: {result['sent']} frames, {result['faults_total']} faults {result['faults']}; "
        f"verdicts {v}; lost {result['lost']}, duplicates {result['duplicates']}, phantoms "
        f"{result['phantoms']}; capture→verdict p50 {lat['p50']} s, p99 {lat['p99']} s, "
        f"max {lat['max']} s",
        highlight=False,
        soft_wrap=True,
    )
    if not result["ok"]:
        for problem in result["problems"]:
            err_console.print(f"[red]chaos:[/red] {problem}", highlight=False)
        raise typer.Exit(code=1)


@app.command("sinks")
@friendly_errors
def bench_sinks_cmd(
    sinks: Annotated[
        str, typer.Option(metavar="KIND,…", help="Sinks: mqtt, opcua, webhook.")
    ] = "mqtt,opcua,webhook",
    events: Annotated[int, typer.Option(metavar="N", help="Backlog for the throughput.")] = 3000,
    outage: Annotated[
        float, typer.Option(metavar="S", help="Receivers down this long (0: skip).")
    ] = 60.0,
    rate: Annotated[
        float, typer.Option(metavar="N", help="Verdicts per second in the outage phase.")
    ] = 50.0,
    cameras: Annotated[int, typer.Option(metavar="N", help="Cameras to spread over.")] = 2,
    json_path: JsonOpt = None,
) -> None:
    """Verdicts/s each sink delivers, and its lag and catch-up after an outage.

    Starts its own Mosquitto and HTTP receiver on loopback; Redis as for 'bench e2e'.
    """
    from lineguard.stream.tools.bench_sinks import bench_sinks, result_table

    settings = load_settings({}, quiet=True)
    result = bench_sinks(
        settings,
        kinds=tuple(split_list(sinks)),
        events=events,
        outage_s=outage,
        rate=rate,
        cameras=cameras,
        progress=lambda m: err_console.print(f"[dim]{m}[/dim]", highlight=False),
    )
    console.print(result_table(result))
    write_json(json_path, result)


@app.command("feedback")
@friendly_errors
def bench_feedback_cmd(
    data_dir: Annotated[Path, typer.Argument(metavar="DATA", help="The bundle's dataset.")],
    bundle_dir: Annotated[Path, typer.Argument(metavar="BUNDLE", help="The first bundle.")],
    work: Annotated[
        Path, typer.Option(metavar="DIR", help="Where the variant, history and new bundle go.")
    ] = Path(".lineguard/bench-feedback"),
    n: Annotated[
        str, typer.Option(metavar="N,…", help="False rejects marked good, one refit each.")
    ] = "4,8,16",
    defects: Annotated[int, typer.Option(metavar="N", help="Rejects marked defect.")] = 10,
    shift: Annotated[
        int, typer.Option(metavar="GREY", help="The new lighting: brighter by this much.")
    ] = 35,
    json_path: JsonOpt = None,
) -> None:
    """False-reject rate on a new kind of good part before and after feeding back N marked
    frames through the history and 'refit --feedback'; confirmed defects still rejected."""
    from lineguard.stream.tools.bench_feedback import feedback_bench

    load_settings({}, quiet=True)
    result = feedback_bench(
        data_dir,
        bundle_dir,
        work,
        n_feedback=tuple(split_list(n, int)),
        n_defects=defects,
        shift=shift,
        say=lambda msg: err_console.print(f"[dim]{msg}[/dim]", highlight=False),
    )
    before = result["rejected_before"]
    table = Table(title=f"feedback from the line (new lighting: +{shift} grey levels)")
    for col in (
        "marked good",
        "FRR new lighting (held out)",
        "FRR usual goods",
        "defects rejected",
        "new-lighting defects rejected",
        "confirmed defects kept",
    ):
        table.add_column(col, justify="right")  # fmt: skip

    def pct(v: float) -> str:
        return f"{100 * v:.1f} %"

    table.add_row(
        "0 (first bundle)",
        pct(before["new_lighting_goods_held_out"]),
        pct(before["usual_goods"]),
        pct(before["defects"]),
        pct(before["new_lighting_defects"]),
        "-",
    )
    for r in result["rounds"]:
        a = r["rejected_after"]
        table.add_row(
            str(r["n_feedback_good"]),
            pct(a["new_lighting_goods_held_out"]),
            pct(a["usual_goods"]),
            pct(a["defects"]),
            pct(a["new_lighting_defects"]),
            f"{r['confirmed_defects_rejected_after']} of {r['n_feedback_defects']}",
        )
    console.print(table)
    write_json(json_path, result)


@app.command("history")
@friendly_errors
def bench_history_cmd(
    backend: Annotated[
        str, typer.Option(metavar="sqlite|postgresql", help="Where the history is kept.")
    ] = "sqlite",
    rows: Annotated[int, typer.Option(metavar="N", help="Events for the throughput run.")] = 20_000,
    rate: Annotated[
        float, typer.Option(metavar="EPS", help="Events per second during the outage run.")
    ] = 50.0,
    outage: Annotated[float, typer.Option(metavar="S", help="Seconds the DB is down.")] = 60.0,
    pg_url: Annotated[
        str | None,
        typer.Option(metavar="URL", help="PostgreSQL for the throughput run (default: throwaway)."),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Rows per second the verdict history sustains, then the lag after a database outage,
    the catch-up time, and whether history and stream still hold the same verdicts."""
    from lineguard.stream.tools.bench_history import history_bench

    if backend not in ("sqlite", "postgresql"):
        raise typer.BadParameter("use sqlite or postgresql", param_hint="--backend")
    settings = load_settings({}, quiet=True)
    r = history_bench(
        settings,
        backend=backend,
        pg_url=pg_url,
        rows=rows,
        rate=rate,
        outage_s=outage,
        say=lambda msg: err_console.print(f"[dim]{msg}[/dim]", highlight=False),
    )
    t, o = r["throughput"], r["outage"]
    console.print(
        f"history at {t['history']}: {t['rows_per_s']:.0f} rows/s ({t['stored']} rows in "
        f"{t['seconds']:.1f} s, batches of {t['batch']})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"outage of {o['outage_s']:g} s at {o['rate_per_s']:g} events/s, {o['history']} "
        f"({o['method']}): lag "
        f"{o['lag_when_back']} when back, caught up in {o['catch_up_s']} s; {o['events']} "
        f"events, missing {o['missing']}, extra {o['extra']}, counts equal: {o['ok']}",
        highlight=False,
        soft_wrap=True,
    )
    write_json(json_path, r)
    if not (t["ok"] and o["ok"]):
        raise typer.Exit(code=1)
