"""The scaling plot (PNG): time and peak memory against the number of observations, log-log.

Drawn with Pillow (a dependency already), so that no plotting library is needed here or on the
GPU machine. One line per method and device; a run over the time cap ends its line.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .tables import scaling_exponents, scaling_series, series

COLORS = {"torchsfm (cpu)": (214, 39, 40), "torchsfm (cuda)": (148, 103, 189), "GLOMAP (COLMAP global)": (31, 119, 180),
          "COLMAP incremental": (44, 160, 44)}
_EXTRA = [(255, 127, 14), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def scaling_timeouts(result: dict) -> dict[str, list[tuple[float, float]]]:
    """label -> [(observations, cap seconds)] of the scaling runs killed at their time cap."""
    out: dict[str, list] = {}
    for ds in result["datasets"]:
        x = ds.get("stats", {}).get("observations")
        if "scaling" not in ds.get("groups", []) or ds.get("skipped") or not x:
            continue
        for label, runs in series(ds):
            t = [r for r in runs if r.get("status") == "timeout"]
            if t and not any(r.get("status") == "ok" for r in runs):
                out.setdefault(label, []).append((float(x), float(t[0].get("cap_seconds") or t[0]["process_seconds"])))
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _decades(lo: float, hi: float) -> list[float]:
    """Tick values: 1-2-5 per decade when the range is small, decades otherwise."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mult = (1, 2, 5) if b - a <= 3 else (1,)
    return [m * 10.0**e for e in range(a, b + 1) for m in mult if lo <= m * 10.0**e <= hi]


def _fmt(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _panel(draw: ImageDraw.ImageDraw, box, data: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
           colors: dict, font, small, dashed: set[str] = frozenset(), limits: dict | None = None) -> None:
    """A log-log panel; `limits` (label -> [(x, cap)]) are drawn as crosses marked '> cap'."""
    x0, y0, x1, y1 = box
    limits = limits or {}
    pts = [p for v in [*data.values(), *limits.values()] for p in v if p[1] is not None and p[1] > 0]
    draw.rectangle(box, outline=(0, 0, 0), width=2)
    if not pts:
        draw.text((x0 + 10, y0 + 10), "no data", fill=(0, 0, 0), font=font)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lx0, lx1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    ly0, ly1 = math.log10(min(ys)) - 0.15, math.log10(max(ys)) + 0.15
    px = lambda v: x0 + (math.log10(v) - lx0) / (lx1 - lx0) * (x1 - x0)  # noqa: E731
    py = lambda v: y1 - (math.log10(v) - ly0) / (ly1 - ly0) * (y1 - y0)  # noqa: E731
    for t in _decades(10**lx0, 10**lx1):
        X = px(t)
        draw.line([(X, y0), (X, y1)], fill=(225, 225, 225))
        draw.text((X, y1 + 6), _fmt(t), fill=(0, 0, 0), font=small, anchor="ma")
    for t in _decades(10**ly0, 10**ly1):
        Y = py(t)
        draw.line([(x0, Y), (x1, Y)], fill=(225, 225, 225))
        draw.text((x0 - 6, Y), _fmt(t), fill=(0, 0, 0), font=small, anchor="rm")
    draw.rectangle(box, outline=(0, 0, 0), width=2)
    draw.text(((x0 + x1) / 2, y1 + 30), xlabel, fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((x0, y0 - 8), ylabel, fill=(0, 0, 0), font=font, anchor="ld")
    for label, v in data.items():
        v = [p for p in v if p[1] is not None and p[1] > 0]
        c = colors[label]
        xy = [(px(a), py(b)) for a, b in v]
        for (ax, ay), (bx, by) in zip(xy, xy[1:]):
            if label in dashed:
                n = max(1, int(math.hypot(bx - ax, by - ay) / 12))
                for k in range(0, n, 2):
                    draw.line([(ax + (bx - ax) * k / n, ay + (by - ay) * k / n),
                               (ax + (bx - ax) * (k + 1) / n, ay + (by - ay) * (k + 1) / n)], fill=c, width=3)
            else:
                draw.line([(ax, ay), (bx, by)], fill=c, width=3)
        for X, Y in xy:
            draw.ellipse([X - 5, Y - 5, X + 5, Y + 5], fill=c, outline=(0, 0, 0))
    for label, v in limits.items():
        c = colors[label]
        last = [p for p in data.get(label, []) if p[1]]
        for a, b in v:
            X, Y = px(a), py(b)
            if last:
                lx, ly = px(last[-1][0]), py(last[-1][1])
                n = max(1, int(math.hypot(X - lx, Y - ly) / 6))
                for k in range(0, n, 2):
                    draw.point([(lx + (X - lx) * k / n, ly + (Y - ly) * k / n)], fill=c)
            draw.line([(X - 7, Y - 7), (X + 7, Y + 7)], fill=c, width=3)
            draw.line([(X - 7, Y + 7), (X + 7, Y - 7)], fill=c, width=3)
            draw.text((X - 10, Y + 10), f"> {b:.0f} s (cap)", fill=c, font=small, anchor="ra")


def plot_scaling(results: list[dict], path: str | Path, title: str | None = None) -> Path | None:
    """Write the PNG; None (nothing written) when no result has a scaling point."""
    data: dict[str, list] = {}
    capped: dict[str, list] = {}
    colors, extra = {}, iter(_EXTRA)
    for res in results:
        m = res.get("machine", {})
        where = f" on {m.get('cores')} cores" + (f" + {m['gpu']}" if m.get("gpu") else "") if len(results) > 1 else ""
        for label, pts in scaling_series(res).items():
            name = label + where
            data.setdefault(name, []).extend(pts)
        for label, pts in scaling_timeouts(res).items():
            capped.setdefault(label + where, []).extend(pts)
    if not data:
        return None
    data = {k: sorted(v) for k, v in data.items()}
    for label in capped:
        data.setdefault(label, [])
    for label in data:  # a method's own colour once, then the spare ones
        c = COLORS.get(label.split(" on ")[0].split(", ")[0])
        colors[label] = c if c is not None and c not in colors.values() else next(extra, (0, 0, 0))
    if title is None:
        from .tables import scaling_families

        title = "Scaling: " + scaling_families(results[0])
    W, H = 1400, 660
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(18), _font(15)
    d.text((W / 2, 14), title, fill=(0, 0, 0), font=_font(22), anchor="ma")
    times = {k: [(x, t) for x, t, _, _ in v] for k, v in data.items()}
    mem = {k: [(x, m) for x, _, m, _ in v] for k, v in data.items()}
    dashed = set()
    for k, v in data.items():
        g = [(x, gm) for x, _, _, gm in v if gm is not None]
        if g:
            name = f"{k} GPU"
            mem[name], colors[name] = g, colors[k]
            dashed.add(name)
    _panel(d, (110, 80, 660, 520), times, "observations (keypoints in verified matches)", "mapping time (s)", colors,
           font, small, limits=capped)
    _panel(d, (820, 80, 1370, 520), mem, "observations (keypoints in verified matches)",
           "peak memory (MB): RSS solid, GPU dashed" if dashed else "peak resident memory (MB)", colors, font, small,
           dashed)
    x = 110
    fits = scaling_exponents(data)
    y = H - 70
    for label in list(times) + sorted(dashed):
        c = colors[label]
        f = fits.get(label, {})
        text = label + ("" if f.get("time") is None else
                        f"  (time ~ n^{f['time']:.2f}, memory ~ n^{f['memory']:.2f})" if f.get("memory") is not None
                        else f"  (time ~ n^{f['time']:.2f})")
        if x > 110 and x + 60 + d.textlength(text, font=small) > W - 20:  # next legend row
            x, y = 110, y + 26
        if label in dashed:
            for k in range(0, 30, 10):
                d.line([(x + k, y), (x + k + 5, y)], fill=c, width=3)
        else:
            d.line([(x, y), (x + 30, y)], fill=c, width=3)
        d.text((x + 38, y), text, fill=(0, 0, 0), font=small, anchor="lm")
        x += 60 + int(d.textlength(text, font=small))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
