"""What both executors resolve before any work: the extractor an ingest builds, the files it
reads, and how it grows an extractor already in the store (the local and the Ray executor
make the same choices, so a store is the same whichever ran)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from .plan import IngestOptions, extractor_id


@dataclass(frozen=True)
class ExtractorSetup:
    """The network, size policy and outputs an ingest asks for, and the extractor's name."""

    backbone: object  # features.backbones.Backbone
    weights: object  # features.backbones.Weights
    layers: tuple[str, ...]
    poolings: tuple[str, ...]
    local_specs: tuple  # features.localfeat.LocalSpec
    policy: object  # features.images.SizePolicy
    scales: tuple[float, ...]
    name: str
    verify: object = None  # features.verifyfeat.VerifySettings, or None
    verify_asked: bool = False  # named by the options (else the default for a new extractor)


def resolve_setup(options: IngestOptions) -> ExtractorSetup:
    """Parse the options' network, layers, poolings, kept local features and size policy
    (an unknown name is a one-line UserError)."""
    from ..features.backbones import get_backbone, parse_layers, parse_weights
    from ..features.images import SizePolicy
    from ..features.localfeat import parse_local_spec
    from ..features.pooling import get_pooling
    from ..features.poolings import DEFAULT_POOLINGS, canonical_pooling_name
    from ..features.verifyfeat import DEFAULT_KIND, VerifySettings, parse_verify_kind

    policy = SizePolicy.parse(options.size)
    backbone = get_backbone(options.backbone)
    weights = parse_weights(options.weights)
    layers = parse_layers(backbone, options.layers)
    requested = (tuple(canonical_pooling_name(p) for p in options.poolings.split(",") if p.strip())
                 if options.poolings else DEFAULT_POOLINGS)
    for p in requested:
        get_pooling(p)
    local_specs = tuple(dict.fromkeys(parse_local_spec(s) for s in options.keep_local))
    if local_specs:
        layers = parse_layers(backbone, ",".join([*layers, *(s.layer for s in local_specs)]))
    scales = tuple(float(s) for s in options.scales)
    name = extractor_id(backbone.name, weights.tag, policy.tag, scales, options.buckets,
                        options.decode)
    kind = parse_verify_kind(options.verify_features)
    if kind is None:
        kind = "none" if options.decode == "gpu" else DEFAULT_KIND
    elif kind != "none" and options.decode == "gpu":
        raise UserError("verification features are detected on the decoded pixels; device "
                        "decoding keeps none (ingest with {verify_features} none, or decode "
                        "on the CPU)", mentions=("verify_features",))
    verify = VerifySettings(kind) if kind != "none" else None
    return ExtractorSetup(backbone, weights, layers, requested, local_specs, policy, scales, name,
                          verify, options.verify_features is not None)


def find_files(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path],
                                                     list[tuple[str, str]]]:
    """(roots, image files in discovery order, problems met while listing); a UserError when
    none of the paths exists."""
    from ..features.images import discover

    roots = [Path(p).expanduser().absolute() for p in paths]
    missing_roots = [str(p) for p in roots if not os.path.lexists(p)]
    if len(missing_roots) == len(roots):
        raise UserError(f"nothing to ingest: {missing_roots[0]} does not exist"
                        + (f" (nor {len(missing_roots) - 1} other path(s))" if len(roots) > 1
                           else ""))
    found = discover(roots)
    files = [Path(os.path.abspath(f)) for f in found.files]
    return roots, files, [(str(p), r) for p, r in found.problems]


@dataclass(frozen=True)
class Outputs:
    """What the run computes: the union of what the store's extractor has and what was asked
    (an extractor keeps every layer and pooling it had, so its datasets stay complete)."""

    layers: tuple[str, ...]
    poolings: tuple[str, ...]
    local_specs: tuple
    adds: bool  # the store's extractor gains a layer, pooling or kept local feature
    verify: object = None  # VerifySettings the extractor keeps after the run, or None


def grow(setup: ExtractorSetup, existing: dict | None) -> Outputs:
    """The outputs of a run on a store whose extractor has `existing` settings (None: new)."""
    from ..features.localfeat import parse_local_spec
    from ..features.verifyfeat import VerifySettings

    if not existing:
        return Outputs(setup.layers, setup.poolings, setup.local_specs, False, setup.verify)
    # kept verification features stay as made; an extractor without them gains them only when
    # asked (they are then filled in for its computed rows without another forward)
    verify = VerifySettings.from_settings(existing) or (setup.verify if setup.verify_asked
                                                        else None)
    names = setup.backbone.layer_names()
    old_local = [parse_local_spec(k) for k in existing.get("keep_local", [])]
    local_specs = tuple(dict.fromkeys([*old_local, *setup.local_specs]))
    layers = tuple(sorted(set(existing["layers"]) | set(setup.layers)
                          | {s.layer for s in local_specs}, key=names.index))
    poolings = tuple(dict.fromkeys([*existing["poolings"], *setup.poolings]))
    adds = bool({(la, p) for la in layers for p in poolings}
                - {(la, p) for la in existing["layers"] for p in existing["poolings"]}
                or {s.key for s in local_specs} - set(existing.get("keep_local", [])))
    adds = adds or (verify is not None and not existing.get("verify"))
    return Outputs(layers, poolings, local_specs, adds, verify)


@dataclass
class Start:
    """A run's first step against the store: the image table, the work, the summary so far."""

    table: object  # store.ImageTable
    work: list  # plan.WorkItem
    summary: object  # plan.IngestSummary


def start_run(writer, setup: ExtractorSetup, files: list[Path], roots: list[Path],
              problems: list[tuple[str, str]], options: IngestOptions,
              on_start: Callable[[int], None] | None) -> Start:
    """Plan the files against the store, mark vanished files missing, start the summary and
    report the amount of work (`on_start`)."""
    from ..store import STATUS_MISSING
    from .plan import IngestSummary, plan

    table = writer.images()
    work, missing, unchanged = plan(table, writer.state(setup.name), files, roots,
                                    options.retry_failed)
    summary = IngestSummary(str(writer.path), setup.name, discovered=len(files),
                            unchanged=unchanged, problems=problems)
    summary.count(work)
    if missing:
        writer.set_status(missing, STATUS_MISSING, "file no longer exists")
        summary.missing = len(missing)
    if on_start:
        on_start(len(work))
    return Start(table, work, summary)


def extractor_settings(setup: ExtractorSetup, outputs: Outputs, poolings: Sequence[str],
                       options: IngestOptions) -> dict:
    """The settings recorded with the extractor: what a query needs to describe an image as
    the store's were, and provenance. Shape buckets and device decoding are recorded only when
    used (they are in the extractor's name too), so stores of either executor compare equal."""
    import torch

    from .. import __version__

    settings = {
        "backbone": setup.backbone.name, "weights": setup.weights.spec,
        "weights_tag": setup.weights.tag, "weights_sha": setup.weights.sha,
        "size": setup.policy.spec, "scales": list(setup.scales),
        "layers": list(outputs.layers), "poolings": list(poolings),
        "keep_local": [s.key for s in outputs.local_specs],
        "max_pixels": options.max_pixels, "imgdb": __version__, "torch": torch.__version__,
    }
    if options.buckets:
        settings["buckets"] = options.buckets
    if options.decode != "cpu":
        settings["decode"] = options.decode
    if outputs.verify is not None:
        settings["verify"] = outputs.verify.as_dict()
    return settings


__all__ = ["ExtractorSetup", "Outputs", "Start", "extractor_settings", "find_files", "grow",
           "resolve_setup", "start_run"]
