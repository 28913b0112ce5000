"""`pairfarm export` reads its SOURCE through fsspec: a farm whose workers wrote their
shards to S3 (``pairfarm worker --output s3://...``) is exported from there.

A real S3 API (moto's server on loopback) holds the farm folders; the command runs as a
user runs it, with the endpoint in ``AWS_ENDPOINT_URL``. What it writes must be what the
same export of a local copy writes, and a second run after more batches reached the
bucket adds them without rewriting the first run's files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from export.run import ExportSettings, export
from pairfarm.shardformat import embedding_files
from tests.conftest import run_cli
from tests.moto_s3 import moto_server
from tests.test_export import _check_webdataset, _farm, _postprocessed
from tests.test_s3_handover import s3_env

s3fs = pytest.importorskip("s3fs", reason="S3 sources need pairfarm[s3] (s3fs)")
pytest.importorskip("moto", reason="the loopback S3 server is moto[server] (dev extra)")

BUCKET = "farm"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    """The endpoint of a loopback S3 server with a bucket ``farm``, and an s3fs on it
    (one server for the module: each test uses its own prefix)."""
    with moto_server(tmp_path_factory.mktemp("moto"), BUCKET) as endpoint:
        fs = s3fs.S3FileSystem(key="farm", secret="farm",
                               client_kwargs={"endpoint_url": endpoint,
                                              "region_name": "us-east-1"})
        yield endpoint, fs


def _upload(fs: object, local: Path, url: str) -> None:
    """Copy every file under ``local`` to ``url`` (what a worker's fsspec output holds)."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{url}/{path.relative_to(local).as_posix()}")  # type: ignore[attr-defined]
    fs.invalidate_cache()  # type: ignore[attr-defined]


def _files(dest: Path, skip: tuple[str, ...] = ("_stats.json", "pairfarm-export.json")
           ) -> dict[str, str]:
    """relative path -> sha256 of the export's files (the stats json hold times)."""
    return {str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dest.rglob("*")) if p.is_file() and not p.name.endswith(skip)}


def test_webdataset_export_of_shards_on_s3_equals_the_local_one_and_grows(
        s3: tuple[str, object], tmp_path: Path) -> None:
    endpoint, fs = s3
    farm = tmp_path / "shards"
    captions = _farm(farm, {1: 7, 2: 5, 4: 6})  # batch 3 failed: a gap
    _upload(fs, farm, f"{BUCKET}/run/shards")
    remote, local = tmp_path / "from-s3", tmp_path / "from-disk"
    out = run_cli("export", "webdataset", f"s3://{BUCKET}/run", str(remote), "--no-progress",
                  env=s3_env(endpoint))
    assert f"exported {len(captions)} samples of 3 new batches" in out.stdout
    _check_webdataset(remote, captions)
    export(ExportSettings(layout="webdataset", source_url=farm, dest=local))
    assert _files(remote) == _files(local) and len(_files(remote)) == 6
    first = _files(remote)

    more = _farm(tmp_path / "later", {6: 4, 5: 3})  # more batches reach the bucket
    _upload(fs, tmp_path / "later", f"{BUCKET}/run/shards")
    again = run_cli("export", "webdataset", f"s3://{BUCKET}/run/shards/", str(remote),
                    "--no-progress", env=s3_env(endpoint))
    assert f"exported {len(more)} samples of 2 new batches" in again.stdout
    _check_webdataset(remote, captions + more)
    after = _files(remote)
    assert {k: after[k] for k in first} == first  # nothing rewritten


def test_clip_retrieval_export_of_a_post_processed_folder_on_s3(
        s3: tuple[str, object], tmp_path: Path) -> None:
    endpoint, fs = s3
    post = tmp_path / "postprocessed"
    kept = _postprocessed(post, {2: 9, 5: 7}, width=16)
    _upload(fs, post, f"{BUCKET}/out/postprocessed")  # a farm --out folder
    _upload(fs, tmp_path / "postprocessed", f"{BUCKET}/out/shards")  # ignored beside it
    dest = tmp_path / "cr"
    run_cli("export", "clip-retrieval", f"s3://{BUCKET}/out", str(dest), "--no-progress",
            "--samples-per-shard", "4", env=s3_env(endpoint))
    shards = len(list((dest / "img_emb").glob("*.npy")))
    img = np.concatenate([np.load(dest / embedding_files(str(i))["img_emb"])
                          for i in range(shards)])
    np.testing.assert_array_equal(img, np.stack([k["img_emb"] for k in kept]))
    local = tmp_path / "cr-local"
    export(ExportSettings(layout="clip-retrieval", source_url=post, dest=local,
                          samples_per_shard=4))
    assert _files(dest) == _files(local)


def test_s3_errors_and_a_remote_dest_are_one_line_errors(
        s3: tuple[str, object], tmp_path: Path) -> None:
    endpoint, _ = s3
    env = s3_env(endpoint)
    missing = run_cli("export", "webdataset", f"s3://{BUCKET}/nothing", str(tmp_path / "w"),
                      env=env, check=False)
    assert missing.returncode == 1 and "is not a folder" in missing.stderr
    to_s3 = run_cli("export", "webdataset", str(tmp_path), f"s3://{BUCKET}/dest", env=env,
                    check=False)
    assert to_s3.returncode == 2 and "DEST is a local folder" in to_s3.stderr
    for bad in (missing, to_s3):
        assert "Traceback" not in bad.stderr
    assert not (Path.cwd() / "s3:").exists()
