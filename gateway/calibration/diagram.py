"""The reliability diagram as a small standalone SVG (no plotting library at serving time): for
each curve, the mean predicted score of each bin against the observed share of good answers; a
calibrated score lies on the diagonal. Used by the console's stats page and `tellerloop eval`."""

from __future__ import annotations

from html import escape

COLOURS = ("#1f6feb", "#d1242f", "#1a7f37", "#9a6700")


def reliability_svg(curves: dict[str, list[dict]], size: int = 260, title: str = "Reliability") -> str:
    """`curves`: name → bins as `calibrator.reliability` returns them."""
    pad = 34
    inner = size - 2 * pad

    def xy(p: float, o: float) -> tuple[float, float]:
        return pad + p * inner, size - pad - o * inner

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size + 16 * len(curves)}" '
             f'viewBox="0 0 {size} {size + 16 * len(curves)}" role="img" aria-label="{escape(title)}">',
             f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#888"/>',
             f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="#bbb" stroke-dasharray="4 3"/>',
             f'<text x="{size / 2}" y="{pad - 12}" text-anchor="middle" font-size="12">{escape(title)}</text>',
             f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle" font-size="10">predicted P(good)</text>',
             f'<text x="10" y="{size / 2}" font-size="10" transform="rotate(-90 10 {size / 2})" '
             f'text-anchor="middle">observed share good</text>']
    for tick in (0.0, 0.5, 1.0):
        x, y = xy(tick, tick)
        parts.append(f'<text x="{x}" y="{size - pad + 12}" text-anchor="middle" font-size="9">{tick:g}</text>')
        parts.append(f'<text x="{pad - 4}" y="{y + 3}" text-anchor="end" font-size="9">{tick:g}</text>')
    for i, (name, bins) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [xy(b["predicted"], b["observed"]) for b in bins]
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
        for (x, y), b in zip(points, bins):
            radius = 2 + min(4.0, b["n"] ** 0.5 / 2)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{colour}">'
                         f'<title>{escape(name)}: {b["n"]} answers, predicted {b["predicted"]:.2f}, '
                         f'observed {b["observed"]:.2f}</title></circle>')
        parts.append(f'<text x="{pad}" y="{size + 12 + 16 * i}" font-size="11" fill="{colour}">● {escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
