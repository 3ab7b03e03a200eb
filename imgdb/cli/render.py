"""Text rendering of results for people (JSON goes out as it is)."""

from __future__ import annotations

def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_report(report: dict, max_failures: int = 20) -> str:
    """Plain text for a terminal or a pipe (no colours, no box drawing)."""
    im = report["images"]
    lines = [
        f"store       {report['store']}  ({_size(report['file_bytes'])})",
        f"images      {im['total']} total: {im['ok']} ok, {im['failed']} failed, {im['missing']} missing",
    ]
    lines.append("")
    lines.append("extractors")
    if not report["extractors"]:
        lines.append("  (none yet: run imgdb ingest)")
    for e in report["extractors"]:
        s = e["settings"]
        if "encoding" in s:
            c = s["encoding"]
            lines.append(f"  {e['name']}  {c['method']} of {c['local']} with {c['codebook']}, "
                         f"{c['aggregate']} aggregation, power={c['power'] or 'none'} "
                         f"images={e['computed']}")
            continue
        lines.append(f"  {e['name']}  backbone={s['backbone']} weights={s['weights']} "
                     f"size={s['size']} scales={','.join(f'{x:g}' for x in s['scales'])} "
                     f"images={e['computed']}")
    lines.append("")
    lines.append("descriptors")
    if report["descriptors"]:
        width = max(len(d["name"]) for d in report["descriptors"])
        for d in report["descriptors"]:
            lines.append(f"  {d['name']:<{width}}  {d['rows']} x {d['dim']} {d['dtype']}  "
                         f"{_size(d['bytes'])}")
    else:
        lines.append("  (none)")
    lines.append("")
    lines.append("local features")
    for li in report["local"]:
        lines.append(f"  {li['name']}  {li['images']} images x {li['features_per_image']:g} cells x "
                     f"{li['channels']} float16 = {_size(li['bytes'])} "
                     f"({_size(li['bytes_per_image'])} per image)")
    if not report["local"]:
        lines.append("  (none: ingest --keep-local LAYER[:MASK] for codebook methods)")
    lines.append("")
    lines.append("models")
    for m in report["models"]:
        lines.append(f"  {m['name']}  " + " ".join(f"{k}={v}" for k, v in m.items()
                                                   if k in ("kind", "method", "k", "dims", "whiten",
                                                            "held_out", "created")))
    if not report["models"]:
        lines.append("  (none)")
    lines.append("")
    lines.append("indexes")
    for i in report["indexes"]:
        state = "current" if i["current"] else f"STALE: {i['stale_reason']}"
        lines.append(f"  {i['name']}  " + " ".join(f"{k}={v}" for k, v in i.items()
                                                   if k in ("descriptor", "model", "items"))
                     + f"  {state}")
    if not report["indexes"]:
        lines.append("  (none)")
    failed = report["failed"]
    if failed:
        lines.append("")
        shown = failed if max_failures < 0 else failed[:max_failures]
        lines.append(f"failed files ({len(failed)})")
        for f in shown:
            lines.append(f"  {f['path']}: {f['error']}")
        if len(shown) < len(failed):
            lines.append(f"  ... {len(failed) - len(shown)} more (imgdb info --failures -1)")
    return "\n".join(lines)
