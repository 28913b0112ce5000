"""The layouts ``pairfarm export`` writes: name -> the module that writes it.

Each module defines ``LAYOUT``: a ``Layout`` (``base``: a writer of numbered shards, which
``export.run`` feeds sample by sample, keeping the manifest) or a ``DatasetLayout`` (one
``export`` call that writes the whole folder itself, with its own ``--layout-option``s). A
new layout is one module and one line here; modules are imported only when their layout is
asked for.
"""

from __future__ import annotations

import importlib

from export.layouts.base import DatasetLayout, Layout

#: layout name -> module defining ``LAYOUT``
LAYOUTS: dict[str, str] = {
    "webdataset": "export.layouts.webdataset",
    "tfds-laion400m": "export.layouts.tfds",
    "clip-retrieval": "export.layouts.clip_retrieval",
    "sisap": "knn.sisap_layout",  # LAION2B / SISAP HDF5 files (needs pairfarm[knn])
}


def load_layout(name: str) -> Layout | DatasetLayout:
    layout = importlib.import_module(LAYOUTS[name]).LAYOUT
    assert isinstance(layout, Layout | DatasetLayout), name
    return layout
