"""Versioned models inside the store: `/models/<kind>/<EXTRACTOR>/<LAYER>/<POOLING>/v<N>`.

A version is written once and never overwritten; numbers are never reused, even after a removal
(the descriptor's group keeps `next_version`). A version is visible only once its `complete`
attribute is set, which is written last, so an interrupted fit leaves nothing half-usable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import UserError
from .store import StoreWriter, now_iso
from .whitening import PCAWhitening


@dataclass(frozen=True)
class ModelInfo:
    """One stored model version and its provenance attributes."""

    kind: str
    descriptor: str
    version: str
    attrs: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.descriptor}/{self.version}"


#: Kinds whose version numbers are unique in the whole store, not per descriptor.
STORE_WIDE_NUMBERS = ("codebook",)


def _group_path(kind: str, descriptor: str) -> str:
    return f"models/{kind}/{descriptor}"


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def list_models(fh: h5py.File, kind: str | None = None, descriptor: str | None = None
                ) -> list[ModelInfo]:
    """Every complete model version, sorted by kind, descriptor and version number."""
    out: list[ModelInfo] = []
    if "models" not in fh:
        return out

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Group) and obj.attrs.get("complete", 0) == 1:
            parts = name.split("/")
            k, ver, desc = parts[0], parts[-1], "/".join(parts[1:-1])
            if (kind is None or k == kind) and (descriptor is None or desc == descriptor):
                out.append(ModelInfo(k, desc, ver, {a: _plain(v) for a, v in obj.attrs.items()}))

    fh["models"].visititems(visit)
    return sorted(out, key=lambda m: (m.kind, m.descriptor, int(m.version[1:])))


def resolve_model(fh: h5py.File, kind: str, descriptor: str, version: str | None) -> ModelInfo:
    """Find `vN` (or the latest when None/'latest') of a kind of model for a descriptor."""
    models = list_models(fh, kind, descriptor)
    if not models:
        raise UserError(f"no {kind} model for {descriptor}; fit one with: imgdb fit {kind} "
                        f"--db STORE --descriptor {descriptor}")
    if version in (None, "latest"):
        return models[-1]
    version = version if version.startswith("v") else f"v{version}"
    for m in models:
        if m.version == version:
            return m
    raise UserError(f"no {kind} model {version} for {descriptor}; stored versions: "
                    + ", ".join(m.version for m in models))


def save_model(writer: StoreWriter, kind: str, descriptor: str, arrays: dict[str, np.ndarray],
               attrs: dict[str, Any]) -> str:
    """Write a new version; returns its name (`v1`, `v2`, ...)."""
    with writer.file() as fh:
        g = fh.require_group(_group_path(kind, descriptor))
        for name in list(g.keys()):  # leftovers of an interrupted fit
            if g[name].attrs.get("complete", 0) != 1:
                del g[name]
        existing = [int(k[1:]) for k in g.keys() if re.fullmatch(r"v\d+", k)]
        number = max([int(g.attrs.get("next_version", 1)) - 1, *existing, 0]) + 1
        top = fh["models"][kind]
        if kind in STORE_WIDE_NUMBERS:  # `--codebook vN` alone names one model of the store
            taken = [int(m.version[1:]) for m in list_models(fh, kind)]
            number = max([number - 1, int(top.attrs.get("next_version", 1)) - 1, *taken]) + 1
            top.attrs["next_version"] = number + 1
        version = f"v{number}"
        mg = g.create_group(version)
        for name, arr in arrays.items():
            mg.create_dataset(name, data=arr)
        for key, value in attrs.items():
            mg.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        mg.attrs["kind"] = kind
        mg.attrs["descriptor"] = descriptor
        mg.attrs["version"] = version
        mg.attrs["created"] = now_iso()
        g.attrs["next_version"] = number + 1
        mg.attrs["complete"] = 1
    return version


def remove_model(writer: StoreWriter, kind: str, descriptor: str, version: str) -> None:
    """Delete one version (explicitly asked for; its number is not reused)."""
    with writer.file() as fh:
        m = resolve_model(fh, kind, descriptor, version)
        g = fh[_group_path(kind, descriptor)]
        number = int(m.version[1:])
        g.attrs["next_version"] = max(int(g.attrs.get("next_version", 1)), number + 1)
        del g[m.version]


def load_arrays(fh: h5py.File, model: ModelInfo) -> dict[str, np.ndarray]:
    g = fh[_group_path(model.kind, model.descriptor)][model.version]
    return {name: g[name][()] for name in g.keys()}


def load_pca(fh: h5py.File, model: ModelInfo) -> PCAWhitening:
    """Rebuild a fitted PCA-whitening model from the store."""
    power = model.attrs.get("power")
    return PCAWhitening.from_arrays(load_arrays(fh, model), whiten=bool(model.attrs["whiten"]),
                                    power=None if power in (None, "", 0, 0.0) else float(power))


def fit_pca_model(db: Path, descriptor: str, dims: int | None, whiten: bool, power: float | None,
                  source: Path | None = None) -> ModelInfo:
    """Fit PCA(-whitening) on this store's (or `source`'s) vectors; save it as a new version."""
    import sklearn

    from . import __version__
    from .store import open_read, resolve_descriptor, training_vectors

    src = Path(source) if source else Path(db)
    with open_read(db) as fh:
        name = resolve_descriptor(fh, descriptor).name
    x, src_hash = training_vectors(src, name)
    if len(x) < 2:
        raise UserError(f"{src} has {len(x)} usable vectors of {name}; PCA needs at least 2")
    model = PCAWhitening(dims=dims, whiten=whiten, power=power).fit(x)
    attrs = {
        "dims": int(model.dims), "whiten": int(whiten), "power": float(power) if power else 0.0,
        "input_dim": int(x.shape[1]), "fitted_on": str(src.resolve()),
        "fitted_on_hash": src_hash, "held_out": int(src.resolve() != Path(db).resolve()),
        "image_count": int(len(x)), "imgdb": __version__, "numpy": np.__version__,
        "sklearn": sklearn.__version__,
    }
    with StoreWriter(db, create=False) as writer:
        version = save_model(writer, "pca", name, model.arrays(), attrs)
        with writer.file() as fh:
            return resolve_model(fh, "pca", name, version)
