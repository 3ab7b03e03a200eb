"""PCA-whitening models kept, versioned, in the store: fit one, load one, or apply none.

A model is `pca/<EXTRACTOR>/<LAYER>/<POOLING>/v<N>`: written once (an atomic commit), never
overwritten, its number never reused. It records what it was fitted on (store, content hash,
image count, held-out or not) and with which options.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..store import ModelInfo, StoreView, StoreWriter, open_read
from .source import resolve
from .whitening import Identity, PCAWhitening

NO_MODEL = ("", "none", "raw")


def load_pca(view: StoreView, model: ModelInfo) -> PCAWhitening:
    """Rebuild a fitted PCA-whitening model from the store."""
    power = model.attrs.get("power")
    return PCAWhitening.from_arrays(view.model_arrays(model), whiten=bool(model.attrs["whiten"]),
                                    power=None if power in (None, "", 0, 0.0) else float(power))


def post_processor(view: StoreView, descriptor: str, model: str | None
                   ) -> tuple[PCAWhitening | Identity, ModelInfo | None]:
    """The transform a model version names ('none': L2 only) and the model itself."""
    if model is None or model in NO_MODEL:
        return Identity(), None
    m = view.model("pca", descriptor, model)
    return load_pca(view, m), m


def training_vectors(db: Path, name: str) -> tuple[np.ndarray, str]:
    """Valid vectors of a descriptor in a (possibly other) store and that store's content hash
    for its extractor: what a model is fitted on."""
    with open_read(db) as view:
        try:
            source = resolve(view, name)
        except UserError:
            raise UserError(f"{db} has no descriptor {name}; ingest it with the same extractor "
                            f"settings to fit on it") from None
        _, x = source.valid_vectors(view)
        return x, source.content_hash(view)


def fit_pca_model(db: Path, descriptor: str, dims: int | None, whiten: bool,
                  power: float | None, source: Path | None = None) -> ModelInfo:
    """Fit PCA(-whitening) on this store's (or `source`'s) vectors; save it as a new version."""
    from .. import __version__

    db = Path(db)
    src = Path(source) if source else db
    with open_read(db) as view:
        name = resolve(view, descriptor).name
    x, src_hash = training_vectors(src, name)
    if len(x) < 2:
        raise UserError(f"{src} has {len(x)} usable vectors of {name}; PCA needs at least 2")
    model = PCAWhitening(dims=dims, whiten=whiten, power=power).fit(x)
    attrs = {
        "dims": int(model.dims), "whiten": int(whiten), "power": float(power) if power else 0.0,
        "input_dim": int(x.shape[1]), "fitted_on": str(src.resolve()),
        "fitted_on_hash": src_hash, "held_out": int(src.resolve() != db.resolve()),
        "image_count": int(len(x)), "imgdb": __version__, "numpy": np.__version__,
    }
    with StoreWriter(db, create=False) as writer:
        return writer.save_model("pca", name, model.arrays(), attrs)


def model_version(model: ModelInfo | str | None) -> str:
    """`vN` of a model (or of a model id), `none` for no model."""
    if model is None:
        return "none"
    text = model.id if isinstance(model, ModelInfo) else str(model)
    return "none" if text in NO_MODEL else text.rsplit("/", 1)[-1]
