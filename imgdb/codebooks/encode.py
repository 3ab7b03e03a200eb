"""`imgdb encode`: every image's local features through a codebook, stored as a descriptor.

An encoding is stored as an extractor of its own, `<extractor>+cb<N>-<aggregate>[-p<power>]`,
with one dataset `<layer[:mask]>/<method>` and its own per-row state, so `fit pca`,
`index build`, `query` and `eval` treat it like any pooling, and images ingested later are
simply not encoded yet (rerun `imgdb encode`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..store import STATE_COMPUTED, ModelInfo, StoreView, StoreWriter
from .encoder import Encoder
from .fit import plan_batches


def find_codebook(view: StoreView, ref: str, local: str | None = None) -> ModelInfo:
    """`vN`, `latest`, or a full id `codebook/EXTRACTOR/KEY/vN`; `local` narrows `vN`."""
    if ref.startswith("codebook/"):
        desc, _, version = ref[len("codebook/"):].rpartition("/")
        return view.model("codebook", desc, version)
    models = view.models("codebook")
    if local:
        name = view.local(local).name
        models = [m for m in models if m.descriptor == name]
    if not models:
        raise UserError("the store has no codebook; fit one with: imgdb fit codebook --db STORE "
                        "--local EXTRACTOR/LAYER[:MASK] --method vlad|temb|fv")
    if ref in ("latest", ""):
        return models[-1]
    version = ref if ref.startswith("v") else f"v{ref}"
    found = [m for m in models if m.version == version]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no codebook {version}; stored: " + ", ".join(m.id for m in models))
    raise UserError(f"codebook {version} exists for several local features; give {{local}} or "
                    f"the full id: " + ", ".join(m.id for m in found), mentions=("local",))


def encoding_name(model: ModelInfo, aggregate: str, power: float | None) -> tuple[str, str, str]:
    """(extractor group, layer group, dataset) where an encoding is stored."""
    extractor, key = model.descriptor.split("/", 1)
    group = f"{extractor}+cb{model.version[1:]}-{aggregate}"
    default = float(model.attrs["power"]) or None
    if power != default:
        group += f"-p{power:g}" if power else "-pnone"
    return group, key, str(model.attrs["method"])


def load_encoder(view: StoreView, encoding: dict, device: str = "auto") -> Encoder:
    """The encoder an encoded descriptor was made with (its settings' `encoding` part)."""
    from ..features.extract import resolve_device

    desc, _, version = encoding["codebook"][len("codebook/"):].rpartition("/")
    model = view.model("codebook", desc, version)
    return Encoder(view.model_arrays(model), model.attrs, encoding["aggregate"],
                   encoding["power"], resolve_device(device))


@dataclass
class EncodeSummary:
    descriptor: str
    encoded: int
    total: int
    dims: int
    seconds: float

    def line(self) -> str:
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.descriptor}: {self.encoded} images encoded ({self.total} in all), "
                f"{self.dims} dims, {self.seconds:.1f}s ({rate:.0f} images/s)")


def run_encode(db: Path, codebook: str, local: str | None = None, aggregate: str = "sum",
               power: float | None | str = "model", device: str = "auto",
               progress=None) -> EncodeSummary:
    """Encode every image with local features not yet encoded; store as a descriptor."""
    from ..features.extract import resolve_device

    started = time.perf_counter()
    dev = resolve_device(device)
    db = Path(db)
    with StoreWriter(db, create=False) as writer:
        with writer.read() as view:
            model = find_codebook(view, codebook, local)
            info = view.local(model.descriptor)
            encoder = Encoder(view.model_arrays(model), model.attrs, aggregate, power, dev)
            group, key, method = encoding_name(model, aggregate, encoder.power)
            settings = {"encoding": {"codebook": model.id, "local": model.descriptor,
                                     "extractor": info.extractor, "key": key, "method": method,
                                     "aggregate": aggregate, "power": encoder.power,
                                     "dims": encoder.dim}}
        writer.ensure_extractor(group, settings, {(key, method): encoder.dim})
        with writer.read() as view:
            done = view.state(group) == STATE_COMPUTED
            usable = np.zeros(view.rows, bool)
            usable[view.local_usable_rows(info)] = True
            rows = np.flatnonzero(usable & ~done)
            spans = view.local_spans(info)
        total = len(rows)
        if progress:
            progress(0, total)
        encoded = 0
        pending_rows: list[int] = []
        pending_vecs: list[np.ndarray] = []

        def flush() -> int:
            if not pending_rows:
                return 0
            writer.write_vectors(group, pending_rows, {(key, method): np.concatenate(pending_vecs)})
            count = len(pending_rows)
            pending_rows.clear()
            pending_vecs.clear()
            return count

        for batch in plan_batches(spans, rows):
            with writer.read() as view:
                got = [(r, feats) for r, feats, _ in view.iter_local(info, batch)]
            pending_rows.extend(r for r, _ in got)
            pending_vecs.append(encoder.encode([f for _, f in got]))
            if len(pending_rows) >= 1024:
                encoded += flush()
                if progress:
                    progress(encoded, total)
        encoded += flush()
        if progress:
            progress(encoded, total)
        with writer.read() as view:
            count = int((view.state(group) == STATE_COMPUTED).sum())
    return EncodeSummary(f"{group}/{key}/{method}", encoded, count, encoder.dim,
                         time.perf_counter() - started)
