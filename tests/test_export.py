"""`pairfarm export` on farm-format shards built in the test: numbering from 0 over gaps,
keys unique across the export, incremental runs that rewrite nothing, resharding, a run
interrupted mid-way, and the errors a user meets. The real farm and the real readers are
in ``test_export_readers.py``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export.errors import ExportError, LayoutError, ManifestError, SourceError
from export.layouts import LAYOUTS
from export.run import ExportSettings, export
from localfarm import synthetic
from localfarm.demo_server import DemoPlan, DemoServer
from pairfarm.outcomes import Outcome
from pairfarm.shardformat import KEY_WIDTH, MAX_SHARD_ROWS, embedding_files, key_of, split_key
from tests.conftest import run_cli
from tests.docs_text import docs_text
from tests.gpu_shards import Row, write_shard


def test_keys_are_unique_across_shards_and_give_back_the_row() -> None:
    keys = {key_of(shard, row) for shard in (0, 1, 2, 41, 10**7) for row in (0, 1, 999_999)}
    assert len(keys) == 15 and {len(k) for k in keys} == {KEY_WIDTH}
    assert key_of(42, 7) == "00000042000007"
    assert split_key(key_of(41, 999_999)) == (41, 999_999)
    with pytest.raises(ValueError, match="at most"):
        key_of(1, MAX_SHARD_ROWS)


def _rows(batch: int, n: int) -> list[Row]:
    """``n`` rows, every third a failed download; captions name their batch and row."""
    rng = np.random.default_rng(batch)
    rows = []
    for i in range(n):
        sample = synthetic.matched(rng)
        failed = i % 3 == 2
        rows.append(Row(caption=f"b{batch} r{i} {sample.caption}",
                        image=None if failed else synthetic.jpeg_bytes(sample.image),
                        status=Outcome.HTTP_4XX.value if failed else Outcome.OK.value))
    return rows


def _farm(folder: Path, batches: dict[int, int]) -> list[str]:
    """Download shards for ``batches`` (id -> rows); the captions of their ok rows."""
    captions = []
    for batch, n in sorted(batches.items()):  # an export takes new batches in id order
        rows = _rows(batch, n)
        write_shard(folder, batch, rows)
        captions += [r.caption for r in rows if r.image is not None]
    return captions


def _wds_samples(dest: Path) -> list[tuple[str, str, str]]:
    """(shard stem, key, caption) of every sample, shard by shard, in tar order."""
    found = []
    for tar_path in sorted(dest.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                if name.endswith(".txt"):
                    text = tar.extractfile(name).read().decode()  # type: ignore[union-attr]
                    found.append((tar_path.stem, name.removesuffix(".txt"), text))
    return found


def _digests(dest: Path) -> dict[str, str]:
    return {str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dest.rglob("*")) if p.is_file() and p.name != "pairfarm-export.json"}


def _check_webdataset(dest: Path, captions: list[str], first_batch: int = 1) -> None:
    samples = _wds_samples(dest)
    assert [c for _, _, c in samples] == captions  # each once, in batch then row order
    keys = [k for _, k, _ in samples]
    assert len(set(keys)) == len(keys)
    stems = sorted({s for s, _, _ in samples})
    assert stems == [f"{i:08d}" for i in range(len(stems))]  # consecutive from 0
    for stem in stems:
        in_shard = [k for s, k, _ in samples if s == stem]
        assert in_shard == [key_of(int(stem), row) for row in range(len(in_shard))]
        table = pq.read_table(dest / f"{stem}.parquet").to_pylist()
        assert [r["key"] for r in table] == in_shard
        assert [r["caption"] for r in table] == [c for s, _, c in samples if s == stem]
        assert all(split_key(r["source_key"])[0] >= first_batch for r in table)  # the farm's
        stats = json.loads((dest / f"{stem}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(in_shard)
        assert stats["status_dict"] == {"success": len(in_shard)}


def test_webdataset_numbers_shards_from_zero_over_gaps_and_adds_new_batches(
        tmp_path: Path) -> None:
    farm, dest = tmp_path / "shards", tmp_path / "wds"
    captions = _farm(farm, {1: 7, 2: 5, 4: 6})  # batch 3 failed: a gap
    export(ExportSettings(layout="webdataset", source_url=farm, dest=dest))
    _check_webdataset(dest, captions)
    assert sorted(p.name for p in dest.glob("*.tar")) == [f"{i:08d}.tar" for i in range(3)]
    before = _digests(dest)

    captions += _farm(farm, {6: 4, 5: 3})  # more batches finished
    result = export(ExportSettings(layout="webdataset", source_url=farm, dest=dest))
    assert (result.batches, result.shards) == (2, 5)
    _check_webdataset(dest, captions)
    after = _digests(dest)
    assert {k: after[k] for k in before} == before  # nothing rewritten
    again = export(ExportSettings(layout="webdataset", source_url=farm, dest=dest))
    assert (again.batches, again.samples) == (0, 0) and _digests(dest) == after


def test_resharding_fills_shards_and_rewrites_only_the_short_last_one(tmp_path: Path) -> None:
    farm, dest = tmp_path / "shards", tmp_path / "wds"
    captions = _farm(farm, {1: 9, 3: 6})  # 6 + 4 ok rows
    settings = ExportSettings(layout="webdataset", source_url=farm, dest=dest, samples_per_shard=4)
    export(settings)
    _check_webdataset(dest, captions)
    assert [len(pq.read_table(p)) for p in sorted(dest.glob("*.parquet"))] == [4, 4, 2]
    full = {k: v for k, v in _digests(dest).items() if not k.startswith("00000002")}

    captions += _farm(farm, {4: 12})  # 8 more ok rows
    export(settings)
    _check_webdataset(dest, captions)
    assert [len(pq.read_table(p)) for p in sorted(dest.glob("*.parquet"))] == [4, 4, 4, 4, 2]
    after = _digests(dest)
    assert {k: after[k] for k in full} == full


class Interrupted(Exception):
    pass


def _stop_after(n: int) -> Callable[[int], None]:
    done = [0]

    def advance(k: int) -> None:
        done[0] += k
        if done[0] > n:
            raise Interrupted

    return advance


@pytest.mark.parametrize("per_shard", [None, 3])
def test_an_interrupted_export_resumes_without_a_sample_twice(tmp_path: Path,
                                                               per_shard: int | None) -> None:
    farm = tmp_path / "shards"
    captions = _farm(farm, {1: 8, 2: 8, 5: 8})
    once, twice = tmp_path / "once", tmp_path / "twice"
    export(ExportSettings(layout="webdataset", source_url=farm, dest=once,
                          samples_per_shard=per_shard))
    settings = ExportSettings(layout="webdataset", source_url=farm, dest=twice,
                              samples_per_shard=per_shard)
    with pytest.raises(Interrupted):
        export(settings, advance=_stop_after(7))  # mid-way through batch 2
    assert not [p for p in twice.rglob(".*.tmp")]  # the open shard's files are gone
    export(settings)
    _check_webdataset(twice, captions)
    assert _digests(twice).keys() == _digests(once).keys()


def test_a_killed_runs_temporary_files_are_removed(tmp_path: Path) -> None:
    farm, dest = tmp_path / "shards", tmp_path / "wds"
    captions = _farm(farm, {1: 4})
    dest.mkdir()
    (dest / ".00000000.tar.tmp").write_bytes(b"half a tar")
    export(ExportSettings(layout="webdataset", source_url=farm, dest=dest))
    assert not (dest / ".00000000.tar.tmp").exists()
    _check_webdataset(dest, captions)


def test_other_options_on_an_existing_export_are_refused(tmp_path: Path) -> None:
    farm, dest = tmp_path / "shards", tmp_path / "wds"
    _farm(farm, {1: 4})
    export(ExportSettings(layout="webdataset", source_url=farm, dest=dest))
    with pytest.raises(ManifestError, match="samples_per_shard None"):
        export(ExportSettings(layout="webdataset", source_url=farm, dest=dest, samples_per_shard=2))


def test_another_farm_into_the_same_export_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch ids mean something within one farm only: another farm's batch 1 would be
    taken for the one already exported and silently skipped."""
    dest = tmp_path / "wds"
    captions = _farm(tmp_path / "a" / "shards", {1: 4})
    export(ExportSettings(layout="webdataset", source_url=tmp_path / "a", dest=dest))
    _farm(tmp_path / "b" / "shards", {1: 5, 2: 3})
    with pytest.raises(ManifestError, match=r"holds an export of .*a/shards, not .*b/shards"):
        export(ExportSettings(layout="webdataset", source_url=tmp_path / "b", dest=dest))
    monkeypatch.chdir(tmp_path / "b")  # the same farm under another name is the same
    captions += _farm(tmp_path / "a" / "shards", {3: 4})
    again = export(ExportSettings(layout="webdataset", source_url="../a/./shards/",
                                  dest=dest))
    assert again.batches == 1
    _check_webdataset(dest, captions)


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no farm shards"):
        export(ExportSettings(layout="webdataset", source_url=tmp_path / "empty",
                              dest=tmp_path / "out"))
    _farm(tmp_path / "shards", {1: 4})
    with pytest.raises(LayoutError, match="needs embeddings"):
        export(ExportSettings(layout="clip-retrieval", source_url=tmp_path / "shards",
                              dest=tmp_path / "out"))
    (tmp_path / "shards" / "00000001.tar").write_bytes(b"not a tar")
    with pytest.raises(ExportError, match=r"00000001\.tar"):
        export(ExportSettings(layout="webdataset", source_url=tmp_path / "shards",
                              dest=tmp_path / "out2"))


def test_cli_exports_and_says_what_it_did(tmp_path: Path) -> None:
    farm = tmp_path / "shards"
    captions = _farm(farm, {2: 4, 7: 3})
    out = run_cli("export", "webdataset", str(farm), str(tmp_path / "wds"), "--no-progress")
    assert "exported 5 samples of 2 new batches" in out.stdout
    _check_webdataset(tmp_path / "wds", captions)
    bad = run_cli("export", "clip-retrieval", str(farm), str(tmp_path / "cr"), check=False)
    assert bad.returncode == 1 and "needs embeddings" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_readme_documents_the_command_its_flags_and_layouts() -> None:
    readme = docs_text()
    help_text = run_cli("export", "--help").stdout
    for flag in ("--samples-per-shard", "--embeddings/--no-embeddings", "--progress",
                 "--layout-option", "PAIRFARM_EXPORT_SAMPLES_PER_SHARD",
                 "PAIRFARM_EXPORT_EMBEDDINGS"):
        assert flag in readme
    for flag in ("--samples-per-shard", "--no-embeddings", "--no-progress", "--layout-option"):
        assert flag in help_text
    for name in LAYOUTS:
        assert f"`{name}`" in readme


def test_pairfarm_download_keys_are_unique_across_its_shards_and_export(tmp_path: Path) -> None:
    server = DemoServer(DemoPlan(seed=5), hosts=1, delay=(0.0, 0.0)).start()
    try:
        items = [server.plan.item(n) for n in range(14)]
        pq.write_table(pa.table({"url": [server.url(i.n) for i in items],
                                 "caption": [i.caption for i in items]}),
                       tmp_path / "urls.parquet")
        run_cli("download", str(tmp_path / "urls.parquet"), "--output", str(tmp_path / "dl"),
                "--shard-size", "5", "--allow-cidr", "127.0.0.0/8", "--no-progress",
                timeout=300)
    finally:
        server.stop()
    rows = [(p.stem, r) for p in sorted((tmp_path / "dl").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    assert [stem for stem, _ in rows][::5] == ["00000000", "00000001", "00000002"]
    assert [r["key"] for _, r in rows] == [key_of(n // 5, n % 5) for n in range(14)]
    ok = [r["caption"] for _, r in rows if r["status"] == "success"]
    export(ExportSettings(layout="webdataset", source_url=tmp_path / "dl", dest=tmp_path / "wds"))
    _check_webdataset(tmp_path / "wds", ok, first_batch=0)


def _postprocessed(folder: Path, batches: dict[int, int], width: int) -> list[dict[str, Any]]:
    """Post-processed shards in the farm's layout (``gpu_postprocess.outputs``): the kept
    samples' tar, the parquet with ``keep``, the kept rows' unit float16 embeddings, the
    done marker. Returns the kept rows (caption, embedding) in export order."""
    kept = []
    for batch, n in sorted(batches.items()):
        rows = _rows(batch, n)
        files = write_shard(folder, batch, rows)
        table = pq.read_table(files.parquet)
        keep = [r.image is not None and i % 4 != 1 for i, r in enumerate(rows)]
        pq.write_table(table.append_column("keep", pa.array(keep)), files.parquet)
        keys = {k for k, kk in zip(table.column("key").to_pylist(), keep, strict=True) if kk}
        with tarfile.open(files.tar) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()  # type: ignore[union-attr]
                       if m.name.split(".")[0] in keys]
        with tarfile.open(files.tar, "w") as tar:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
        rng = np.random.default_rng(batch)
        emb = rng.normal(size=(sum(keep), width))
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
        stem = f"{batch:08d}"
        for name, array in (("img_emb", emb), ("text_emb", -emb)):
            path = folder / "embeddings" / embedding_files(stem)[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, array)
        (folder / f"{stem}_postprocess.json").write_text("{}")
        kept += [{"caption": r.caption, "img_emb": e}
                 for r, e in zip([r for r, k in zip(rows, keep, strict=True) if k], emb,
                                 strict=True)]
    return kept


def test_clip_retrieval_keeps_embeddings_aligned_with_metadata_across_reshards(
        tmp_path: Path) -> None:
    farm, dest = tmp_path / "post", tmp_path / "cr"
    kept = _postprocessed(farm, {2: 9, 5: 7}, width=16)
    export(ExportSettings(layout="clip-retrieval", source_url=farm, dest=dest, samples_per_shard=3))
    kept += _postprocessed(farm, {6: 6}, width=16)
    export(ExportSettings(layout="clip-retrieval", source_url=farm, dest=dest, samples_per_shard=3))
    got_meta, got_emb = [], []
    shards = len(list((dest / "img_emb").glob("*.npy")))
    for i in range(shards):
        files = embedding_files(str(i))
        meta = pq.read_table(dest / files["metadata"]).to_pylist()
        img, txt = np.load(dest / files["img_emb"]), np.load(dest / files["text_emb"])
        assert len(meta) == len(img) == len(txt) and img.dtype == np.float16
        np.testing.assert_array_equal(txt, -img)
        assert [m["key"] for m in meta] == [key_of(i, r) for r in range(len(meta))]
        got_meta += meta
        got_emb += list(img)
    assert [m["caption"] for m in got_meta] == [k["caption"] for k in kept]
    np.testing.assert_array_equal(np.stack(got_emb), np.stack([k["img_emb"] for k in kept]))


def test_tfds_layout_names_members_by_row_and_refuses_other_widths(tmp_path: Path) -> None:
    farm = tmp_path / "post"
    kept = _postprocessed(farm, {1: 8, 3: 8}, width=32)
    with pytest.raises(LayoutError, match="512-wide embeddings; these are 32 wide"):
        export(ExportSettings(layout="tfds-laion400m", source_url=farm, dest=tmp_path / "t32"))
    assert not (tmp_path / "t32" / "00000.tar").exists()  # refused before writing
    dest = tmp_path / "tfds"
    export(ExportSettings(layout="tfds-laion400m", source_url=farm, dest=dest, embeddings=False))
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith("pairfarm")) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar"]
    captions = []
    for i in range(2):
        table = pq.read_table(dest / f"{i:05d}.parquet").to_pylist()
        with tarfile.open(dest / f"{i:05d}.tar") as tar:
            for name in tar.getnames():
                stem, ext = name.split(".")
                if ext == "txt":
                    row = table[int(stem)]  # TFDS: the member's integer is its row (iloc)
                    text = tar.extractfile(name).read().decode()  # type: ignore[union-attr]
                    assert row["caption"] == text and row["key"] == key_of(i, int(stem))
                    assert row["similarity"] == -1.0 and row["NSFW"] == "UNTAGGED"
                    captions.append(text)
    assert captions == [k["caption"] for k in kept]


def test_per_shard_layouts_refuse_layout_options(tmp_path: Path) -> None:
    _farm(tmp_path / "shards", {1: 3})
    bad = run_cli("export", "webdataset", str(tmp_path / "shards"), str(tmp_path / "w"),
                  "-O", "queries=10", check=False)
    assert bad.returncode == 1 and "takes no --layout-option" in bad.stderr
    bad = run_cli("export", "webdataset", str(tmp_path / "shards"), str(tmp_path / "w"),
                  "-O", "queries", check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_replacing_keeps_the_old_file_until_the_new_one_is_whole(tmp_path: Path) -> None:
    """``pairfarm.staging.replacing``, which the export's manifest and post-processing's
    outputs write through: a failed block leaves the old file and no temporary name."""
    from pairfarm.staging import replacing, temporary_beside

    target = tmp_path / "sub" / "manifest.json"
    with replacing(target) as tmp:
        assert tmp == temporary_beside(target) == tmp_path / "sub" / ".manifest.json.tmp"
        tmp.write_text("one")
    assert target.read_text() == "one"

    class Boom(Exception):
        pass

    with pytest.raises(Boom), replacing(target) as tmp:
        tmp.write_text("half")
        raise Boom
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == [
        "manifest.json"]
