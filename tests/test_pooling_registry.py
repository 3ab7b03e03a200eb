"""Adding a pooling is one function plus one registry line: ingest and eval then use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgdb.features import pooling
from imgdb.features.pooling import Pooling, register


@pytest.fixture
def rms_pooling():
    """Root mean square over H, W: a pooling the library does not ship."""
    register(Pooling("rms", lambda m, _: m.x.pow(2).mean(dim=(2, 3)).sqrt(),
                     doc="root mean square over H, W"))
    yield "rms"
    pooling.unregister("rms")


def _photos(folder: Path) -> list[Path]:
    """Three groups of two images: a random texture and its mirror image."""
    folder.mkdir()
    rng = np.random.default_rng(4)
    out = []
    for g in range(3):
        arr = (rng.random((72, 96, 3)) * 255).astype(np.uint8)
        for v, im in enumerate((arr, arr[:, ::-1])):
            path = folder / f"g{g}_{v}.png"
            Image.fromarray(np.ascontiguousarray(im)).save(path)
            out.append(path)
    return out


def test_a_registered_pooling_is_ingested_and_evaluated(rms_pooling, tmp_path: Path) -> None:
    from imgdb.evaluation.evaluate import EvalOptions, run_eval
    from imgdb.features.backbones import get_backbone, parse_weights
    from imgdb.features.extract import FeatureExtractor
    from imgdb.features.images import SizePolicy, load_image
    from imgdb.ingest import IngestOptions, run_ingest
    from imgdb.store import open_read

    _photos(tmp_path / "photos")
    db = tmp_path / "s.h5"
    summary = run_ingest([tmp_path / "photos"], db, IngestOptions(
        backbone="efficientnet_lite0", weights="none", layers="head", poolings="sum,rms",
        size="original", workers=0))
    assert summary.ok == 6
    with open_read(db) as view:
        info = view.descriptor("head/rms")
        stored = view.vectors(info)
        paths = view.paths()
    # the same network, run apart from ingest; RMS computed here with numpy
    net = FeatureExtractor(get_backbone("efficientnet_lite0"), parse_weights("none"), ("head",),
                           ("sum",), torch.device("cpu"))
    for row, path in enumerate(paths):
        img = load_image(Path(path), SizePolicy.parse("original"))
        fmap = net.feature_maps(torch.from_numpy(img.pixels[0])[None])["head"][0].double().numpy()
        expected = np.sqrt((fmap ** 2).mean(axis=(1, 2)))
        np.testing.assert_allclose(stored[row], expected, rtol=1e-4, atol=1e-5)
    result = run_eval(db, None, EvalOptions(descriptors=["head/rms", "head/sum"],
                                            group_regex=r"(g\d)_"))
    names = {c.descriptor.split("/", 1)[1] for c in result.cells}
    assert names == {"head/rms", "head/sum"} and result.n_queries == 6
    assert all(0 < c.summary.mAP <= 1 for c in result.cells)
