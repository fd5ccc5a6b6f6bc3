"""The product families ``lineguard synth --kind`` knows, by name."""

from __future__ import annotations

from lineguard.engines.errors import ConfigError
from lineguard.offline.synth.bottle import BOTTLE_SUBTYPES, bottle_good, bottle_logical
from lineguard.offline.synth.connectors import connectors_good, connectors_logical
from lineguard.offline.synth.product import Product, no_base, no_outline
from lineguard.offline.synth.pushpins import (
    BOX,
    BOX_COLOUR,
    PUSHPIN_SUBTYPES,
    draw_pushpins_box,
    pushpins_good,
    pushpins_logical,
    pushpins_outline,
)
from lineguard.offline.synth.scene import TRAY
from lineguard.offline.synth.screwbag import (
    BAG_COLOUR,
    INSIDE,
    SCREWBAG_SUBTYPES,
    draw_bag,
    screwbag_good,
    screwbag_logical,
    screwbag_outline,
)
from lineguard.offline.synth.tray import draw_tray, tray_good, tray_logical, tray_outline

PRODUCTS: dict[str, Product] = {
    "tray": Product(
        "tray",
        tray_good,
        tray_logical,
        draw_tray,
        tray_outline,
        (0.12, 0.14, 0.88, 0.86),
        ("apple", "banana", "tag", "pill"),
        surface_colour=TRAY,
    ),
    "connectors": Product(
        "connectors",
        connectors_good,
        connectors_logical,
        no_base,
        no_outline,
        (0.2, 0.3, 0.8, 0.7),
        ("block", "cable"),
    ),
    "pushpins": Product(
        "pushpins",
        pushpins_good,
        pushpins_logical,
        draw_pushpins_box,
        pushpins_outline,
        (BOX[0] + 0.03, BOX[1] + 0.03, BOX[2] - 0.03, BOX[3] - 0.03),
        ("pushpin",),
        PUSHPIN_SUBTYPES,
        BOX_COLOUR,
    ),
    "screwbag": Product(
        "screwbag",
        screwbag_good,
        screwbag_logical,
        draw_bag,
        screwbag_outline,
        INSIDE,
        ("long_screw", "short_screw", "nut", "washer"),
        SCREWBAG_SUBTYPES,
        BAG_COLOUR,
    ),
    "bottle": Product(
        "bottle",
        bottle_good,
        bottle_logical,
        no_base,
        no_outline,
        (0.12, 0.2, 0.88, 0.9),
        ("bottle",),  # defects land on the bottle, and scratches and stains may cross its label
        BOTTLE_SUBTYPES,
    ),
}


def product_of(kind: str) -> Product:
    if kind not in PRODUCTS:
        raise ConfigError(
            f"unknown synthetic product kind {kind!r}: use one of {', '.join(PRODUCTS)}"
        )
    return PRODUCTS[kind]
