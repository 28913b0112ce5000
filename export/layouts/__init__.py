"""The layouts ``pairfarm export`` writes: name -> the module that writes it.

Each module defines ``LAYOUT``, an object with the ``Layout`` protocol (``base``). A new
layout is one module and one line here; modules are imported only when their layout is
asked for.
"""

from __future__ import annotations

import importlib

from export.layouts.base import Layout

#: layout name -> module defining ``LAYOUT``
LAYOUTS: dict[str, str] = {
    "webdataset": "export.layouts.webdataset",
    "tfds-laion400m": "export.layouts.tfds",
    "clip-retrieval": "export.layouts.clip_retrieval",
}


def load_layout(name: str) -> Layout:
    layout = importlib.import_module(LAYOUTS[name]).LAYOUT
    assert isinstance(layout, Layout)
    return layout
