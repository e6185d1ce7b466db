#!/usr/bin/env python3
"""Test accuracy and the learned inverse's PSNR against epsilon, from the current records of
bench/results.jsonl's table privacy_attacks (the runs that have an epsilon), as an SVG.

    python3 scripts/privacy_plot.py            # writes docs/privacy_epsilon.svg
    python3 scripts/privacy_plot.py --check    # fails if the file is not what the records give

No dependencies beyond Python's standard library. The floor (the mean public image's PSNR) is
drawn as a dashed line: an attack below it recovers nothing beyond the prior.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402

OUT = tables.ROOT / "docs" / "privacy_epsilon.svg"
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 360, 70, 70, 30, 60


def points(records):
    rows = [r for r in tables.current(records, "privacy_attacks").values() if r.get("epsilon") is not None]
    pts = []
    for r in rows:
        acc = r["test_accuracy_pct"]
        if isinstance(acc, str):  # "10.0% (collapsed ...)"
            acc = float(acc.split("%")[0])
        pts.append((r["epsilon"], acc, r["inverse_psnr"], r["floor_psnr"], r["run"]))
    return sorted(pts)


def svg(pts):
    eps_lo, eps_hi = math.log10(min(p[0] for p in pts)) - 0.2, math.log10(max(p[0] for p in pts)) + 0.2
    x = lambda e: LEFT + (math.log10(e) - eps_lo) / (eps_hi - eps_lo) * (W - LEFT - RIGHT)
    y_acc = lambda a: TOP + (100 - a) / 100 * (H - TOP - BOTTOM)
    y_db = lambda d: TOP + (40 - d) / 40 * (H - TOP - BOTTOM)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="black"/>',
           f'<line x1="{W - RIGHT}" y1="{TOP}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>']
    for e in (1, 2, 5, 10, 20, 50, 100):
        if eps_lo <= math.log10(e) <= eps_hi:
            out.append(f'<text x="{x(e):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{e}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 15}" text-anchor="middle">epsilon per training sample (log scale; delta 1e-5)</text>')
    for a in (0, 25, 50, 75, 100):
        out.append(f'<text x="{LEFT - 8}" y="{y_acc(a) + 4:.1f}" text-anchor="end" fill="#1f77b4">{a}%</text>')
    for d in (0, 10, 20, 30, 40):
        out.append(f'<text x="{W - RIGHT + 8}" y="{y_db(d) + 4:.1f}" fill="#d62728">{d} dB</text>')
    out.append(f'<text x="15" y="{TOP - 10}" fill="#1f77b4">test accuracy</text>')
    out.append(f'<text x="{W - 15}" y="{TOP - 10}" text-anchor="end" fill="#d62728">learned inverse PSNR</text>')
    floor = sum(p[3] for p in pts) / len(pts)
    out.append(f'<line x1="{LEFT}" y1="{y_db(floor):.1f}" x2="{W - RIGHT}" y2="{y_db(floor):.1f}" stroke="#d62728" stroke-dasharray="4 4"/>')
    out.append(f'<text x="{W - RIGHT - 4}" y="{y_db(floor) - 4:.1f}" text-anchor="end" fill="#d62728">mean public image ({floor:.1f} dB)</text>')
    for series, y, colour in ((1, y_acc, "#1f77b4"), (2, y_db, "#d62728")):
        path = " ".join(f"{x(p[0]):.1f},{y(p[series]):.1f}" for p in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}"/>')
        for p in pts:
            out.append(f'<circle cx="{x(p[0]):.1f}" cy="{y(p[series]):.1f}" r="4" fill="{colour}"><title>{p[4]}</title></circle>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv):
    pts = points(tables.load())
    if len(pts) < 2:
        print("privacy_plot.py: fewer than two runs with an epsilon", file=sys.stderr)
        return 2
    text = svg(pts)
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"stale: {OUT.name}; run python3 scripts/privacy_plot.py")
            return 1
        print(f"{OUT.name} is current")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(tables.ROOT)} ({len(pts)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
