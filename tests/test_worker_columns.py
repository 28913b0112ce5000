"""img2dataset's optional columns: ``exif``, ``compute_hash`` and ``verify_hash``.

Unit checks on the image pipeline, one batch into a real shard, and a farm run: a
``--verify-hash`` column ingested by the coordinator reaches the worker in its lease,
and the ``hash_mismatch`` outcome passes the coordinator's report validation.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import exifread
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trio
from PIL import Image

from pairfarm.client import CoordinatorClient
from pairfarm.outcomes import RESIZE_FAILURES, TRANSIENT, Outcome
from pairfarm.protocol import Candidate
from pairfarm.shardformat import status_of
from tests import hostile_server as hs
from tests.conftest import RunningCoordinator, run_cli
from worker.batch import Network, download_batch
from worker.errors import ImageRejected
from worker.imaging import RowInput, process_image
from worker.settings import FetchSettings, ImageSettings, PipelineSettings


def _jpeg_with_exif() -> bytes:
    image = Image.effect_noise((320, 240), 80).convert("RGB")  # over the 5 KB rule
    exif = Image.Exif()
    exif[0x010F] = "PairfarmCam"  # Make
    exif[0x0110] = "Model 7"  # Model
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


EXIF_JPEG = _jpeg_with_exif()
PLAIN_JPEG = hs.jpeg_bytes(300, 200, seed=3)


def test_exif_is_img2datasets_json_of_exifread_tags() -> None:
    out = process_image(EXIF_JPEG, ImageSettings(image_size=64))
    assert out.exif is not None
    tags = json.loads(out.exif)
    expected = {k: str(v).strip() for k, v in
                exifread.process_file(io.BytesIO(EXIF_JPEG), details=False).items()}
    assert tags == expected
    assert tags["Image Make"] == "PairfarmCam" and tags["Image Model"] == "Model 7"
    assert json.loads(process_image(PLAIN_JPEG, ImageSettings()).exif or "null") == {}
    assert process_image(EXIF_JPEG, ImageSettings(extract_exif=False)).exif is None


@pytest.mark.parametrize("name", ["md5", "sha256", "sha512"])
def test_compute_hash_is_of_the_downloaded_bytes(name: str) -> None:
    out = process_image(EXIF_JPEG, ImageSettings(image_size=64, compute_hash=name))
    assert dict(out.digests) == {name: hashlib.new(name, EXIF_JPEG).hexdigest()}
    assert out.data != EXIF_JPEG  # resized: the digest is not the output's


def test_verify_hash_names_a_mismatch_and_passes_a_match() -> None:
    settings = ImageSettings(compute_hash="md5", verify_hash="md5")
    good = hashlib.md5(PLAIN_JPEG).hexdigest()
    assert process_image(PLAIN_JPEG, settings, RowInput(expected_hash=good.upper())).width
    for wrong in ("0" * 32, None, ""):
        with pytest.raises(ImageRejected) as caught:
            process_image(PLAIN_JPEG, settings, RowInput(expected_hash=wrong))
        assert caught.value.outcome is Outcome.HASH_MISMATCH
    # img2dataset counts it as a download failure, and it is no reason to try again
    assert status_of(Outcome.HASH_MISMATCH) == "failed_to_download"
    assert Outcome.HASH_MISMATCH not in RESIZE_FAILURES | TRANSIENT


def test_a_shard_has_the_exif_and_hash_columns_and_the_mismatch(tmp_path: Path) -> None:
    routes = {"/exif.jpg": hs.route_ok(EXIF_JPEG), "/plain.jpg": hs.route_ok(PLAIN_JPEG)}
    rows = [("/exif.jpg", hashlib.md5(EXIF_JPEG).hexdigest()), ("/plain.jpg", "f" * 32),
            ("/plain.jpg", hashlib.md5(PLAIN_JPEG).hexdigest())]
    settings = PipelineSettings(
        fetch=FetchSettings(deadline=10),
        image=ImageSettings(image_size=64, compute_hash="md5", verify_hash="expected_md5"),
        decode_threads=1)

    async def main() -> None:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, routes)
            candidates = [Candidate(id=i, url=server.url(path), caption=f"c{i}",
                                    extra={"expected_md5": md5})
                          for i, (path, md5) in enumerate(rows)]
            prepared = await download_batch(
                7, candidates, settings=settings, fs=fsspec.filesystem("file"),
                directory=str(tmp_path),
                network=Network(resolver=dns, dialer=dialer))
            await prepared.commit()
            nursery.cancel_scope.cancel()

    trio.run(main)
    table = pq.read_table(tmp_path / "00000007.parquet")
    assert {"exif", "md5", "sha256"} <= set(table.column_names)
    got = table.to_pylist()
    assert [r["error_class"] for r in got] == [None, "hash_mismatch", None]
    assert [r["status"] for r in got] == ["success", "failed_to_download", "success"]
    assert got[0]["md5"] == hashlib.md5(EXIF_JPEG).hexdigest()
    assert json.loads(got[0]["exif"])["Image Make"] == "PairfarmCam"
    assert got[1]["md5"] is None and got[1]["exif"] is None
    stats = json.loads((tmp_path / "00000007_stats.json").read_text())
    assert stats["status_dict"] == {"success": 2, "hash_mismatch": 1}
    assert (stats["successes"], stats["failed_to_download"]) == (2, 1)


def test_the_farm_carries_the_verify_column_and_counts_the_mismatch(
        coordinator: RunningCoordinator, tmp_path: Path) -> None:
    bodies = [hs.jpeg_bytes(200 + i, 150, seed=i) for i in range(4)]
    routes = {f"/{i}.jpg": hs.route_ok(body) for i, body in enumerate(bodies)}
    with hs.server_thread(routes) as server:
        urls = [f"http://127.0.0.1:{server.port}/{i}.jpg" for i in range(4)]
        md5s = [hashlib.md5(body).hexdigest() for body in bodies]
        md5s[2] = "0" * 32
        listing = tmp_path / "candidates.parquet"
        captions = [f"a picture number {i}" for i in range(4)]
        pq.write_table(pa.table({"url": urls, "caption": captions, "want_md5": md5s}), listing)
        run_cli("ingest", str(listing), env=coordinator.env())
        out = tmp_path / "shards"
        run_cli("worker", "--coordinator", coordinator.url, "--token",
                coordinator.token("worker"), "-o", str(out), "--allow-cidr", "127.0.0.0/8",
                "--exit-when-idle", "--no-progress", "--no-robots", "--compute-hash", "md5",
                "--verify-hash", "want_md5", "--decode-threads", "1", timeout=120)
    with CoordinatorClient(coordinator.url, coordinator.token("admin")) as admin:
        stats = admin.stats()
    assert stats.outcomes == {"ok": 3, "hash_mismatch": 1}
    table = pq.read_table(next(out.glob("*.parquet"))).to_pylist()
    by_url = {row["url"]: row for row in table}
    assert by_url[urls[2]]["error_class"] == "hash_mismatch"
    assert [by_url[u]["md5"] for u in urls if u != urls[2]] == [m for m in md5s if m != "0" * 32]
