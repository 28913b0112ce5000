"""What a file and a run counted: records, pages, images, kept, dropped by reason, languages.

``FileCounts`` travels from a worker process to the runner (it pickles small); the runner
adds them into ``RunCounts``, which becomes the summary json and the summary table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class FileCounts:
    """Counts of one WAT file, before the run-wide dedup."""

    records: int = 0
    corrupt_records: int = 0
    pages: int = 0
    images: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class FileFailure:
    source: str
    error: str


@dataclass(slots=True)
class RunCounts:
    """Counts of a whole run; ``kept`` rows are the ones written to shards."""

    files: int = 0
    records: int = 0
    corrupt_records: int = 0
    pages: int = 0
    images: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    failures: list[FileFailure] = field(default_factory=list)

    def add_file(self, counts: FileCounts) -> None:
        self.files += 1
        self.records += counts.records
        self.corrupt_records += counts.corrupt_records
        self.pages += counts.pages
        self.images += counts.images
        self.dropped.update(counts.dropped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "files_failed": len(self.failures),
            "records": self.records,
            "corrupt_records": self.corrupt_records,
            "pages": self.pages,
            "images": self.images,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "languages": dict(self.languages.most_common()),
            "failures": [{"source": f.source, "error": f.error} for f in self.failures],
        }
