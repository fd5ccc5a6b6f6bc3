"""The product families ``lineguard synth --kind`` knows, by name."""

from __future__ import annotations

from lineguard.engines.errors import ConfigError
from lineguard.offline.synth.connectors import connectors_good, connectors_logical
from lineguard.offline.synth.product import Product
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
    ),
    "connectors": Product(
        "connectors",
        connectors_good,
        connectors_logical,
        lambda img, fr, scene: None,
        lambda scene: [],
        (0.2, 0.3, 0.8, 0.7),
        ("block", "cable"),
    ),
}


def product_of(kind: str) -> Product:
    if kind not in PRODUCTS:
        raise ConfigError(
            f"unknown synthetic product kind {kind!r}: use one of {', '.join(PRODUCTS)}"
        )
    return PRODUCTS[kind]
