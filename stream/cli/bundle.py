"""``lineguard bundle``: look inside a model bundle and verify it before a line loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lineguard.stream.cli.common import console, friendly_errors

app = typer.Typer(help="Inspect and verify model bundles.", no_args_is_help=True)


@app.command("info")
@friendly_errors
def bundle_info(
    bundle_dir: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory.")],
) -> None:
    """Verify a bundle (schema, files, hashes) and show what it contains."""
    from lineguard.engines.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    cal = bundle.calibration
    table = Table(title=f"bundle {bundle.path}", show_header=False)
    table.add_row("model version", bundle.version)
    table.add_row("backbone / profile", f"{bundle.config.backbone} / {bundle.config.profile}")
    h, w = bundle.config.input_size
    table.add_row("input size", f"{h}×{w} (height × width)")
    table.add_row("frame codec", f"{bundle.config.codec.spec} (what ingest sends by default)")
    table.add_row("classes", ", ".join(bundle.config.class_names))
    for c in bundle.manifest.get("extra", {}).get("components", []):
        table.add_row(
            f"  {c['class']}",
            f"{c['per_image']:.1f} per image, area {100 * c['area']:.2f} %, "
            f"in {c['images']} of {c['of_images']} images",
        )
    sheet = bundle.path / "report" / "components.png"
    if sheet.is_file():
        table.add_row("contact sheet", str(sheet))
    table.add_row("branches", ", ".join(bundle.branches))
    c = bundle.config
    table.add_row(
        "patch bank",
        f"{c.patch_bank} entries, {c.patch_descriptor} descriptor, search {c.patch_search}"
        if c.patch_bank
        else "none",
    )
    left_out = cal.left_out()
    for name, mu, sigma in zip(cal.branches, cal.mu, cal.sigma, strict=True):
        note = f"  left out: {left_out[name]}" if name in left_out else "  fused"
        if name == "lgst" and not bundle.config.student:
            note = "  left out: no student in this model (a surface: --student trains one)"
        table.add_row(f"  {name}", f"μ={mu:.4g} σ={sigma:.4g}{note}")
    table.add_row(
        "fusion",
        f"{cal.method}, {cal.combine} of {', '.join(cal.active)} (recipe {cal.recipe}), "
        f"threshold {cal.threshold:.4g} (target FRR {cal.target_frr})",
    )
    table.add_row("files", ", ".join(bundle.manifest["files"]))
    table.add_row("created", str(bundle.manifest.get("created")))
    console.print(table)
    console.print("[green]verified[/green]: schema, files and sha256 hashes match the manifest")
