"""The writer's registries: model versions (PCA, codebooks, graphs, calibrations: written once,
never overwritten, numbers never reused) and index registrations. A part of `StoreWriter`
(`RegistryWrites` is one of its bases); each change is one of its atomic transactions."""

from __future__ import annotations

import json
import re

import numpy as np

from .reader import plain
from .schema import ModelInfo, create_array, index_path, model_group_path, now_iso, set_attr

#: Kinds whose version numbers are unique in the whole store, not per descriptor.
STORE_WIDE_NUMBERS = ("codebook",)


def _attr(value):
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


class RegistryWrites:
    """Model and index registrations of a writer (it provides `transaction()`)."""

    def save_model(self, kind: str, descriptor: str, arrays: dict[str, np.ndarray],
                   attrs: dict) -> ModelInfo:
        """Write a new model version (never overwriting; numbers never reused)."""
        with self.transaction() as fh:
            g = fh.require_group(model_group_path(kind, descriptor))
            existing = [int(k[1:]) for k in g.keys() if re.fullmatch(r"v\d+", k)]
            number = max([int(g.attrs.get("next_version", 1)) - 1, *existing, 0]) + 1
            top = fh["models"][kind]
            if kind in STORE_WIDE_NUMBERS:  # `--codebook vN` alone names one model of the store
                number = max(number, int(top.attrs.get("next_version", 1)))
                top.attrs["next_version"] = number + 1
            version = f"v{number}"
            mg = g.create_group(version)
            for name, arr in arrays.items():
                create_array(mg, name, arr)
            full = dict(attrs, kind=kind, descriptor=descriptor, version=version,
                        created=now_iso())
            for key, value in full.items():
                set_attr(mg, key, value)
            g.attrs["next_version"] = number + 1
        return ModelInfo(kind, descriptor, version, {k: plain(_attr(v)) for k, v in full.items()})

    def remove_model(self, model: ModelInfo) -> None:
        """Delete one version (explicitly asked for; its number is not reused)."""
        with self.transaction() as fh:
            g = fh[model_group_path(model.kind, model.descriptor)]
            g.attrs["next_version"] = max(int(g.attrs.get("next_version", 1)), model.number + 1)
            del g[model.version]

    def register_index(self, name: str, attrs: dict, rows: np.ndarray) -> None:
        """Record an index file (written and renamed into place before this)."""
        with self.transaction() as fh:
            reg = fh.require_group("indexes")
            if name in reg:
                del reg[name]
            g = reg.create_group(name)
            create_array(g, "rows", np.asarray(rows, dtype=np.int64))
            for k, v in attrs.items():
                set_attr(g, k, v)

    def remove_index(self, name: str) -> None:
        with self.transaction() as fh:
            if name in fh["indexes"]:
                del fh[index_path(name)]


__all__ = ["RegistryWrites", "STORE_WIDE_NUMBERS"]
