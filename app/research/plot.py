"""Small plotting on Pillow (a dependency of Brax), so the research tools need no matplotlib.

Line charts with error bands and a legend (linear or log2 x axis), heatmap panels with a colour
bar and masked cells, and maze pictures (walls + trajectories) as PNG and SVG. Pillow is imported
inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

Color = Tuple[int, int, int]
PALETTE: List[Color] = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                        (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                        (188, 189, 34), (23, 190, 207)]
WALL: Color = (60, 60, 60)
# Viridis, sampled at 9 points and interpolated linearly.
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                     (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], np.float64)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN allowed) -> uint8 RGB [..., 3] (viridis); NaN -> WALL colour."""
    v = np.asarray(v, np.float64)
    nan = ~np.isfinite(v)
    x = np.clip(np.where(nan, 0.0, v), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    t = (x - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t
    rgb[nan] = WALL
    return np.round(rgb).astype(np.uint8)


def font(size: int = 13):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:          # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 1:
        return f"{v:.4g}"
    return f"{v:.2g}"


def line_chart(series: Sequence[Dict[str, Any]], *, title: str = "", xlabel: str = "",
               ylabel: str = "", xlog: bool = False, size: Tuple[int, int] = (720, 440),
               ylim: Optional[Tuple[float, float]] = None):
    """series: [{"label", "x", "y", optional "err" (same length: error bars/band), optional
    "band": True for a shaded band instead of bars}] -> PIL Image. xlog: log2 x axis with ticks
    at the data's x values."""
    from PIL import Image, ImageDraw
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img, "RGBA")
    f, fs = font(13), font(11)
    left, right, top, bottom = 70, 20 + 170, 36, 56
    x0, x1, y0, y1 = left, W - right, top, H - bottom

    def tx(v):
        return math.log2(v) if xlog else v

    xs = [tx(v) for s in series for v in s["x"]]
    ys = [v for s in series for i, v in enumerate(s["y"]) if np.isfinite(v)]
    ys += [s["y"][i] + sgn * e for s in series if s.get("err") is not None
           for i, e in enumerate(s["err"]) if np.isfinite(e) and np.isfinite(s["y"][i])
           for sgn in (-1, 1)]
    if not xs or not ys:
        d.text((W // 2 - 40, H // 2), "no data", fill="black", font=f)
        return img
    xmin, xmax = min(xs), max(xs)
    if xmax == xmin:
        xmin, xmax = xmin - 1, xmax + 1
    pad = 0.04 * (xmax - xmin)
    xmin, xmax = xmin - pad, xmax + pad
    ymin, ymax = ylim if ylim else (min(0.0, min(ys)), max(ys))
    if ymax <= ymin:
        ymax = ymin + 1.0
    yticks = nice_ticks(ymin, ymax)
    ymin, ymax = min(ymin, yticks[0]), max(ymax, yticks[-1])

    def px(v):
        return x0 + (tx(v) - xmin) / (xmax - xmin) * (x1 - x0)

    def py(v):
        return y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

    # Grid, ticks, frame.
    for t in yticks:
        y = py(t)
        d.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        label = _fmt(t)
        w = d.textlength(label, font=fs)
        d.text((x0 - 6 - w, y - 7), label, fill="black", font=fs)
    if xlog:
        xticks = sorted({v for s in series for v in s["x"]})
    else:
        xticks = nice_ticks(min(v for s in series for v in s["x"]),
                            max(v for s in series for v in s["x"]))
    for t in xticks:
        x = px(t)
        if x < x0 - 1 or x > x1 + 1:
            continue
        d.line([(x, y0), (x, y1)], fill=(240, 240, 240))
        label = _fmt(t)
        w = d.textlength(label, font=fs)
        d.text((x - w / 2, y1 + 5), label, fill="black", font=fs)
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((x0, 8), title, fill="black", font=font(15))
    w = d.textlength(xlabel, font=f)
    d.text(((x0 + x1) / 2 - w / 2, H - 26), xlabel, fill="black", font=f)
    # Rotated y label.
    lab = Image.new("RGBA", (int(d.textlength(ylabel, font=f)) + 4, 18), (255, 255, 255, 0))
    ImageDraw.Draw(lab).text((2, 1), ylabel, fill="black", font=f)
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (6, int((y0 + y1) / 2 - lab.size[1] / 2)), lab)

    # Series.
    for k, s in enumerate(series):
        c = tuple(s.get("color") or PALETTE[k % len(PALETTE)])
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if np.isfinite(y)]
        err = s.get("err")
        if err is not None:
            if s.get("band"):
                upper = [(px(x), py(y + e)) for x, y, e in zip(s["x"], s["y"], err)
                         if np.isfinite(y) and np.isfinite(e)]
                lower = [(px(x), py(y - e)) for x, y, e in zip(s["x"], s["y"], err)
                         if np.isfinite(y) and np.isfinite(e)]
                if len(upper) >= 2:
                    d.polygon(upper + lower[::-1], fill=c + (50,))
            else:
                for x, y, e in zip(s["x"], s["y"], err):
                    if np.isfinite(y) and np.isfinite(e):
                        X = px(x)
                        d.line([(X, py(y - e)), (X, py(y + e))], fill=c, width=2)
                        d.line([(X - 4, py(y - e)), (X + 4, py(y - e))], fill=c, width=2)
                        d.line([(X - 4, py(y + e)), (X + 4, py(y + e))], fill=c, width=2)
        if len(pts) >= 2:
            d.line(pts, fill=c, width=2, joint="curve")
        for (X, Y) in pts:
            d.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=c)
        # Legend.
        ly = y0 + 4 + 18 * k
        d.line([(x1 + 10, ly + 8), (x1 + 30, ly + 8)], fill=c, width=3)
        d.text((x1 + 34, ly), str(s["label"])[:26], fill="black", font=fs)
    return img


def heatmap_panels(panels: Sequence[Dict[str, Any]], *, cell_px: int = 48,
                   title: str = "", columns: int = 0) -> Any:
    """Side-by-side heatmaps. Each panel: {"values": [R, C] array (NaN = wall / masked),
    "title", optional "subtitle", optional "markers": [(row, col, kind)] in array index units
    (float, cell centre = i + 0.5), kind "goal" (star) or "start" (ring), optional "scale"
    (pixels per array entry; default fits cell_px per maze cell via "per_cell")}.
    Each panel has its own colour range (min..max of its finite values) and colour bar: low =
    dark (near the goal for a distance map). columns: panels per row (0 = all in one row)."""
    from PIL import Image, ImageDraw
    f, fs = font(13), font(11)
    tiles = []
    for p in panels:
        v = np.asarray(p["values"], np.float64)
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
        rgb = colormap(np.where(np.isfinite(v), norm, np.nan))
        scale = max(1, int(round(cell_px / max(1, p.get("per_cell", 1)))))
        hm = Image.fromarray(rgb, "RGB").resize((v.shape[1] * scale, v.shape[0] * scale),
                                                Image.NEAREST)
        hw, hh = hm.size
        header = 40 if p.get("subtitle") else 22
        tile = Image.new("RGB", (hw + 70, hh + header + 10), "white")
        tile.paste(hm, (4, header))
        d = ImageDraw.Draw(tile)
        d.text((4, 3), str(p.get("title", "")), fill="black", font=f)
        if p.get("subtitle"):
            d.text((4, 21), str(p["subtitle"]), fill=(60, 60, 60), font=fs)
        for (r, c, kind) in p.get("markers", ()):
            X, Y = 4 + c * scale, header + r * scale
            rad = max(4, cell_px // 6)
            if kind == "goal":
                star = [(X + rad * math.cos(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45),
                         Y - rad * math.sin(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45))
                        for k in range(10)]
                d.polygon(star, fill=(255, 60, 60), outline="white")
            else:
                d.ellipse([X - rad, Y - rad, X + rad, Y + rad], outline="white", width=3)
        # Colour bar.
        bx, by, bh = hw + 12, header, hh
        bar = colormap(np.linspace(1, 0, max(bh, 2))[:, None].repeat(12, 1))
        tile.paste(Image.fromarray(bar, "RGB"), (bx, by))
        d.text((bx + 15, by - 2), _fmt(hi), fill="black", font=fs)
        d.text((bx + 15, by + bh - 12), _fmt(lo), fill="black", font=fs)
        tiles.append(tile)
    cols = columns if columns > 0 else len(tiles)
    rows = [tiles[i:i + cols] for i in range(0, len(tiles), cols)]
    tw = max(sum(t.size[0] for t in row) + 10 * (len(row) + 1) for row in rows)
    row_h = [max(t.size[1] for t in row) for row in rows]
    top = 30 if title else 5
    img = Image.new("RGB", (tw, top + sum(row_h) + 5 * len(rows) + 5), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((10, 6), title, fill="black", font=font(15))
    y = top
    for row, h in zip(rows, row_h):
        x = 10
        for t in row:
            img.paste(t, (x, y))
            x += t.size[0] + 10
        y += h + 5
    return img


# ----------------------------------------------------------------------------------- mazes
class MazeFrame:
    """Maps world (x, y) of a maze to picture pixels the way the layout is written: layout row i
    (world x) goes down, column j (world y) goes right (crl.envs.mazes)."""

    def __init__(self, grid: np.ndarray, start_cell: Tuple[int, int], cell_size: float,
                 cell_px: int = 60):
        self.grid = np.asarray(grid, bool)
        self.i0, self.j0 = start_cell
        self.cell_size, self.cell_px = float(cell_size), int(cell_px)
        self.width = self.grid.shape[1] * self.cell_px
        self.height = self.grid.shape[0] * self.cell_px

    def to_px(self, x: float, y: float) -> Tuple[float, float]:
        row = x / self.cell_size + self.i0 + 0.5
        col = y / self.cell_size + self.j0 + 0.5
        return col * self.cell_px, row * self.cell_px

    def wall_rects(self) -> List[Tuple[int, int, int, int]]:
        p = self.cell_px
        return [(j * p, i * p, (j + 1) * p, (i + 1) * p) for i, j in np.argwhere(self.grid)]


def maze_trajectories_png(frame: MazeFrame, episodes: Sequence[Dict[str, Any]], title: str = ""):
    """episodes: [{"xy": [T, 2] world positions, "goal": (x, y), "success": bool,
    "goal_radius": float}] -> PIL Image."""
    from PIL import Image, ImageDraw
    header = 8 + 18 * len(title.splitlines()) if title else 0
    img = Image.new("RGB", (frame.width, frame.height + header), "white")
    d = ImageDraw.Draw(img, "RGBA")
    for n, line in enumerate(title.splitlines()):
        d.text((6, 5 + 18 * n), line, fill="black", font=font(13))
    for (a, b, c, e) in frame.wall_rects():
        d.rectangle([a, b + header, c - 1, e - 1 + header], fill=WALL)
    for k, ep in enumerate(episodes):
        col = PALETTE[k % len(PALETTE)]
        pts = [frame.to_px(float(x), float(y)) for x, y in np.asarray(ep["xy"])]
        pts = [(X, Y + header) for X, Y in pts]
        if len(pts) >= 2:
            d.line(pts, fill=col + (220,), width=2)
        sx, sy = pts[0]
        d.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], fill=col, outline="black")
        gx, gy = frame.to_px(*map(float, ep["goal"]))
        gy += header
        r = ep.get("goal_radius", 0.5) / frame.cell_size * frame.cell_px
        d.ellipse([gx - r, gy - r, gx + r, gy + r], outline=col, width=2)
        mark = 6
        d.line([(gx - mark, gy - mark), (gx + mark, gy + mark)], fill=col, width=3)
        d.line([(gx - mark, gy + mark), (gx + mark, gy - mark)], fill=col, width=3)
    return img


def maze_animation_gif(frame: MazeFrame, episodes: Sequence[Dict[str, Any]], path: str,
                       title: str = "", frames: int = 60, frame_ms: int = 80) -> str:
    """An animated GIF of the episodes seen from above (a file any browser or image viewer
    opens, no server): frame k draws every trajectory up to its k-th point, the agent as a dot.
    episodes as for maze_trajectories_png, all of the same length."""
    from PIL import ImageDraw
    length = min(len(np.asarray(ep["xy"])) for ep in episodes)
    ts = sorted(set(np.linspace(1, length - 1, max(2, min(frames, length - 1))).astype(int)))
    header = 8 + 18 * len(title.splitlines()) if title else 0
    images = []
    for t in ts:
        cut = [dict(ep, xy=np.asarray(ep["xy"])[: t + 1]) for ep in episodes]
        img = maze_trajectories_png(frame, cut, f"{title}\nstep {t}" if title else f"step {t}")
        d = ImageDraw.Draw(img)
        extra = 18 if title else 8 + 18    # the step line added to the title
        for k, ep in enumerate(cut):
            x, y = frame.to_px(*map(float, ep["xy"][-1]))
            y += header + extra if title else extra
            d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=PALETTE[k % len(PALETTE)],
                      outline="black", width=2)
        images.append(img.convert("P", palette=1, colors=64))
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0,
                   optimize=True)
    return path


def maze_trajectories_svg(frame: MazeFrame, episodes: Sequence[Dict[str, Any]],
                          title: str = "") -> str:
    header = 8 + 18 * len(title.splitlines()) if title else 0
    h = frame.height + header
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{frame.width}" height="{h}" '
           f'viewBox="0 0 {frame.width} {h}">',
           f'<rect width="{frame.width}" height="{h}" fill="white"/>']
    for n, line in enumerate(title.splitlines()):
        out.append(f'<text x="6" y="{18 + 18 * n}" font-family="sans-serif" font-size="13">'
                   f'{_xml(line)}</text>')
    wall = "#%02x%02x%02x" % WALL
    for (a, b, c, e) in frame.wall_rects():
        out.append(f'<rect x="{a}" y="{b + header}" width="{c - a}" height="{e - b}" fill="{wall}"/>')
    for k, ep in enumerate(episodes):
        col = "#%02x%02x%02x" % PALETTE[k % len(PALETTE)]
        pts = [frame.to_px(float(x), float(y)) for x, y in np.asarray(ep["xy"])]
        path = " ".join(f"{X:.1f},{Y + header:.1f}" for X, Y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2" '
                   f'stroke-opacity="0.85"/>')
        sx, sy = pts[0]
        out.append(f'<circle cx="{sx:.1f}" cy="{sy + header:.1f}" r="4" fill="{col}" stroke="black"/>')
        gx, gy = frame.to_px(*map(float, ep["goal"]))
        r = ep.get("goal_radius", 0.5) / frame.cell_size * frame.cell_px
        out.append(f'<circle cx="{gx:.1f}" cy="{gy + header:.1f}" r="{r:.1f}" fill="none" '
                   f'stroke="{col}" stroke-width="2"><title>goal {k}: '
                   f'{"reached" if ep.get("success") else "not reached"}</title></circle>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
