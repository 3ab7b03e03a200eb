"""The local executor's stages (ingest/stages.py, ingest/pipeline.py): pixel-budget batches,
the writer thread, shape buckets, GPU-decode plumbing; values worked out independently."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import COIL, OXFORD_CROPS, OXFORD_IMAGES
from imgdb.errors import StoreError, UserError
from imgdb.ingest import IngestOptions, run_ingest
from imgdb.ingest.stages import CommitThread, PixelBatcher, torch_threads
from imgdb.store import STATUS_FAILED, STATUS_OK, StoreWriter, open_read

POOL = "sum,spoc,mac,mac2x2,crow,gem-p3"


# --------------------------------------------------------------------------- pixel budget


def assert_close(a, b, tol: float = 1e-4) -> None:
    """max|a - b| <= tol * max|b| per vector (batch composition changes float rounding)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    scale = np.maximum(np.abs(b).max(axis=1), 1e-12)
    assert (np.abs(a - b).max(axis=1) <= tol * scale).all(), np.abs(a - b).max(axis=1) / scale


def keys_of(batches):
    return [(b.key, b.items) for b in batches]


def test_pixel_budget_batches_by_hand() -> None:
    b = PixelBatcher(budget=100, max_images=10, window=50)
    out = []
    for i in range(7):  # 30-pixel images: 3 fit in 100 (90), a 4th would make 120
        out += b.add(i, "small", 30)
    assert keys_of(out) == [("small", [0, 1, 2]), ("small", [3, 4, 5])]
    assert keys_of(b.add("big", "large", 250)) == [("large", ["big"])]  # alone over budget
    assert b.add(7, "small", 40) == []  # 30 + 40 = 70: under the budget, it waits
    assert (b.waiting, b.waiting_pixels) == (2, 70)
    assert keys_of(b.drain()) == [("small", [6, 7])]


def test_pixel_budget_exact_fill_and_max_images() -> None:
    b = PixelBatcher(budget=100, max_images=3, window=50)
    assert b.add("a", "k", 50) == []
    assert keys_of(b.add("b", "k", 50)) == [("k", ["a", "b"])]  # 100 reaches the budget
    assert b.add(1, "t", 1) == [] and b.add(2, "t", 1) == []
    assert keys_of(b.add(3, "t", 1)) == [("t", [1, 2, 3])]  # max_images
    assert b.drain() == []


def test_window_sends_the_oldest_group_first() -> None:
    b = PixelBatcher(budget=1000, max_images=64, window=3, window_pixels=10_000)
    assert b.add("x1", "X", 10) == [] and b.add("y1", "Y", 10) == []
    assert b.add("x2", "X", 10) == []
    assert keys_of(b.add("z1", "Z", 10)) == [("X", ["x1", "x2"])]  # 4 waiting > 3: X is oldest
    assert b.waiting == 2
    assert keys_of(b.drain()) == [("Y", ["y1"]), ("Z", ["z1"])]
    b = PixelBatcher(budget=1000, max_images=64, window=100, window_pixels=25)
    assert b.add(1, "A", 10) == [] and b.add(2, "B", 10) == []
    assert keys_of(b.add(3, "C", 10)) == [("A", [1])]  # 30 pixels waiting > 25


# --------------------------------------------------------------------------- writer thread


def test_commit_thread_runs_every_job_in_order() -> None:
    seen, threads = [], set()

    def commit(i):
        seen.append(i)
        threads.add(threading.current_thread().name)

    ct = CommitThread(commit, depth=1)
    for i in range(20):
        ct.put(i)
    ct.close()
    assert seen == list(range(20)) and threads == {"imgdb-writer"} and ct.done == 20


def test_commit_thread_failure_surfaces_and_stops_later_jobs() -> None:
    seen = []

    def commit(i):
        if i == 3:
            raise StoreError("disk full while committing")
        seen.append(i)

    ct = CommitThread(commit, depth=1)
    with pytest.raises(StoreError, match="disk full"):
        for i in range(50):
            ct.put(i)
        ct.close()
    with pytest.raises(StoreError):
        ct.close()
    assert seen == [0, 1, 2]  # nothing after the failed commit


def test_torch_threads_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- the executor


def mixed_folder(tmp: Path) -> Path:
    """12 COIL images (one shape), 4 Oxford crops (4 shapes), a corrupt and a truncated JPEG."""
    d = tmp / "photos"
    d.mkdir()
    for f in sorted(COIL.glob("*.png"))[:12]:
        shutil.copy2(f, d / f.name)
    for f in sorted(OXFORD_CROPS.glob("*.jpg"))[:4]:
        shutil.copy2(f, d / f.name)
    (d / "corrupt.jpg").write_bytes(bytes(range(256)) * 8)
    good = (d / sorted(p.name for p in d.glob("*.jpg"))[0]).read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return d


def store(db: Path):
    with open_read(db) as view:
        table = view.images()
        vecs = {d.name.split("/", 1)[1]: view.vectors(d) for d in view.descriptors()}
        ext = view.extractors()
    return table, vecs, ext


def options(**kw) -> IngestOptions:
    base = dict(backbone="efficientnet_lite0", weights="none", layers="head", poolings=POOL,
                size="original")
    base.update(kw)
    return IngestOptions(**base)


def test_executor_matches_exact_per_image_vectors(tmp_path: Path) -> None:
    """Default executor (pixel budget, 2 forward threads, writer thread) vs the query path's
    one-image-at-a-time description: same rows in discovery order, same vectors, failures kept."""
    from imgdb.features.backbones import get_backbone, parse_weights
    from imgdb.features.extract import FeatureExtractor
    from imgdb.features.images import SizePolicy, load_image

    photos = mixed_folder(tmp_path)
    db = tmp_path / "s.h5"
    summary = run_ingest([photos], db, options(commit_seconds=0, batch_pixels=40_000))
    assert (summary.ok, summary.failed) == (16, 2)
    table, vecs, _ = store(db)
    files = sorted(photos.iterdir())
    assert table.path == [str(f) for f in files]
    ok = table.status == STATUS_OK
    assert [Path(p).name for p, s in zip(table.path, table.status) if s == STATUS_FAILED] == \
        ["corrupt.jpg", "truncated.jpg"]
    fe = FeatureExtractor(get_backbone("efficientnet_lite0"), parse_weights("none"), ("head",),
                          tuple(POOL.split(",")), torch.device("cpu"))
    for r, f in enumerate(files):
        if not ok[r]:
            assert all(np.isnan(v[r]).all() for v in vecs.values())
            continue
        exact = fe.describe(load_image(f, SizePolicy.parse("original")).pixels)
        for (layer, pooling), v in exact.items():
            assert_close(vecs[f"{layer}/{pooling}"][r], v)


def test_executor_settings_do_not_change_the_store(tmp_path: Path) -> None:
    """One forward thread, tiny batches, one decode worker, no writer overlap to speak of: the
    same rows and vectors as the defaults."""
    photos = mixed_folder(tmp_path)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run_ingest([photos], a, options())
    run_ingest([photos], b, options(forward_threads=1, torch_threads=1, batch_pixels=1,
                                    workers=0, commit_seconds=0, keep_freed_memory=False))
    ta, va, ea = store(a)
    tb, vb, eb = store(b)
    assert ea == eb and ta.path == tb.path and np.array_equal(ta.sha, tb.sha)
    assert np.array_equal(ta.status, tb.status)
    for k in va:
        assert_close(va[k], vb[k])


def test_writer_failure_is_a_clean_error_and_keeps_earlier_commits(tmp_path: Path,
                                                                   monkeypatch) -> None:
    photos = mixed_folder(tmp_path)
    db = tmp_path / "s.h5"
    real = StoreWriter.commit
    calls = []

    def failing(self, *a, **k):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise StoreError(f"cannot write {db}: no space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "commit", failing)
    with pytest.raises(StoreError, match="no space left"):
        run_ingest([photos], db, options(commit_seconds=0, batch_pixels=20_000))
    assert set(calls) == {"imgdb-writer"}
    monkeypatch.setattr(StoreWriter, "commit", real)
    with open_read(db) as view:
        kept = view.rows
    assert 0 < kept < 18  # the two commits before the failure
    again = run_ingest([photos], db, options())
    assert again.unchanged == kept and again.ok + again.failed == 18 - kept


def test_interrupt_commits_what_is_complete(tmp_path: Path) -> None:
    photos = mixed_folder(tmp_path)
    db = tmp_path / "s.h5"
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ingest([photos], db, options(commit_seconds=0, batch_pixels=20_000),
                   progress=progress)
    with open_read(db) as view:
        assert view.rows >= 4
        done = view.state(view.extractors()[0]) != 0
        assert (done | (view.images().status == STATUS_FAILED)).all()  # every row is complete


# --------------------------------------------------------------------------- shape buckets


@pytest.mark.parametrize("name,layers", [
    ("efficientnet_lite0", ("block3", "head")),
    pytest.param("vgg16", ("conv3_1", "pool4"), marks=pytest.mark.slow),
    pytest.param("resnet50", ("layer2",), marks=pytest.mark.slow),
    pytest.param("googlenet", ("inception4a",), marks=pytest.mark.slow)])
def test_valid_cells_equal_the_real_map_sizes(name: str, layers: tuple[str, ...]) -> None:
    """Layer arithmetic (no forward) vs the shapes a real forward gives, odd sizes included."""
    from imgdb.features.backbones import get_backbone, parse_weights
    from imgdb.features.extract import FeatureExtractor

    fe = FeatureExtractor(get_backbone(name), parse_weights("none"), layers, ("sum",),
                          torch.device("cpu"))
    for h, w in ((33, 47), (64, 65), (97, 130)):
        maps = fe.feature_maps(torch.zeros((1, h, w, 3), dtype=torch.uint8))
        for layer in layers:
            assert fe.valid_cells(layer, h, w) == tuple(maps[layer].shape[2:]), (name, h, w)


def test_padded_batch_pools_only_each_images_cells() -> None:
    """A padded batch of two images vs each image padded alone to the same shape and pooled on
    its own cells by hand: equal (padding content and neighbours do not leak)."""
    from imgdb.features import pooling
    from imgdb.features.backbones import get_backbone, parse_weights
    from imgdb.features.extract import FeatureExtractor

    fe = FeatureExtractor(get_backbone("efficientnet_lite0"), parse_weights("none"), ("head",),
                          tuple(POOL.split(",")), torch.device("cpu"), bucket=64)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (100, 70, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert fe.pad_to(100, 70) == (128, 128) and fe.pad_to(128, 128) == (128, 128)
    x = torch.full((2, 128, 128, 3), 200, dtype=torch.uint8)  # junk in the padding
    x[0, :100, :70] = torch.from_numpy(a)
    x[1] = torch.from_numpy(b)
    got = fe.pool_batch(x, [(100, 70), (128, 128)]).result()
    # by hand: a zero-padded (after normalisation) input, forward alone, crop, pool
    xa = torch.zeros((1, 3, 128, 128))
    xa[0, :, :100, :70] = (torch.from_numpy(a).permute(2, 0, 1).float() - 127.5) / 127.5
    with torch.inference_mode():
        y = xa
        for stage in fe.stages:
            y = stage(y)
    ch, cw = -(-100 // 32), -(-70 // 32)  # EfficientNet's five SAME stride-2 layers
    want_a = pooling.pool_all(y[:, :, :ch, :cw], POOL.split(","))
    want_b = {k: v for k, v in fe(torch.from_numpy(b)[None]).items()}
    for p in POOL.split(","):
        assert_close(got[("head", p)][0], want_a[p][0].numpy())
        assert_close(got[("head", p)][1], want_b[("head", p)][0])


def test_buckets_name_the_extractor_and_queries_match(tmp_path: Path) -> None:
    """Bucketed vectors belong to their own extractor, and a query is described padded too."""
    from imgdb.retrieval.describe import QueryDescriber

    photos = mixed_folder(tmp_path)
    db = tmp_path / "s.h5"
    run_ingest([photos], db, options(buckets=64, size="max:200"))
    table, vecs, ext = store(db)
    assert ext == ["efficientnet_lite0-none-max200-pad64"]
    crop = sorted(photos.glob("*_query.jpg"))[1]
    r = table.path.index(str(crop))
    with open_read(db) as view:
        q = QueryDescriber(view, ext[0], device="cpu")
        got = q.describe(q.load(crop))
    for (layer, pooling), v in got.items():
        assert_close(vecs[f"{layer}/{pooling}"][r], v)
    with pytest.raises(UserError, match="keep_local"):
        run_ingest([photos], tmp_path / "x.h5", options(buckets=64, keep_local=("head",)))


# --------------------------------------------------------------------------- GPU decoding


def test_gpu_decode_without_cuda_is_a_one_line_user_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(UserError) as e:
        run_ingest([OXFORD_CROPS], tmp_path / "s.h5", options(decode="gpu"))
    from imgdb.cli.app import flag  # the command line spells the library's fields

    assert "\n" not in str(e.value) and "--decode cpu" in e.value.render(flag)
    assert not (tmp_path / "s.h5").exists()


def test_device_decode_path_on_the_cpu_decoder(tmp_path: Path) -> None:
    """load_deferred + decode_on_device (torchvision's decoder, here on the CPU): the upright
    image at the policy's target, close to Pillow's pixels; EXIF orientation applied."""
    from imgdb.features.gpu_decode import DEVICE_JPEG, decode_on_device, load_deferred
    from imgdb.features.images import SizePolicy, load_image

    photo = sorted(OXFORD_IMAGES.glob("*.jpg"))[0]
    rotated = tmp_path / "rotated.jpg"
    im = Image.open(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the upright image is the stored one turned 90 cw
    im.transpose(Image.Transpose.ROTATE_90).save(rotated, quality=95, exif=exif)
    policy = SizePolicy.parse("max:256")
    for f in (photo, rotated):
        deferred = load_deferred(f, policy)
        job = deferred.extras[DEVICE_JPEG]
        assert deferred.pixels == [] and (deferred.width, deferred.height) == im.size
        ref = load_image(f, policy)
        assert deferred.sha == ref.sha
        (px,) = decode_on_device([job], [0], torch.device("cpu"))
        assert tuple(px.shape) == ref.pixels[0].shape
        diff = np.abs(px.numpy().astype(int) - ref.pixels[0].astype(int))
        assert diff.mean() < 4.0, f.name  # another resampler, the same picture
    png = tmp_path / "x.png"
    Image.open(photo).save(png)
    assert load_deferred(png, policy).pixels[0].shape[:2] == (256, 171)  # CPU fallback
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(io.BytesIO(photo.read_bytes()[:200]).getvalue())
    with pytest.raises(Exception):
        load_image(bad, policy)
