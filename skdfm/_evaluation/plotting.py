"""Anomaly maps over images: a numpy overlay (no extra needed), a matplotlib figure."""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "anomaly_map_grid",
    "colour_bar",
    "overlay_anomaly_map",
    "plot_anomaly_maps",
]


def _heat(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map of values in [0, 1]: (..., 3) floats in [0, 1]."""
    t = np.clip(values, 0, 1)[..., None] * 4
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks
    return np.clip(1.5 - np.abs(t - centres), 0, 1)


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):  # a file, as anomaly_maps reads it
        from .._imaging.decode import decode_image_file

        image = decode_image_file(image)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # (C, H, W)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype == np.uint8:
        image = image / 255.0
    elif image.dtype.kind == "u" and image.dtype.itemsize == 2:  # 16-bit, any order
        image = image / 65535.0
    image = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    return np.broadcast_to(image, (*image.shape[:2], 3))


def overlay_anomaly_map(image, anomaly_map, *, vmin=None, vmax=None, alpha=0.5):
    """Blend a colour-coded anomaly map over an image.

    Parameters
    ----------
    image : array of shape (H, W), (H, W, 3) or (3, H, W), PIL image, or path
        uint8, uint16, or floats in [0, 1]; a file is decoded as
        :func:`~skdfm.anomaly_maps` decodes it.
    anomaly_map : array of shape (H, W)
        Higher = more anomalous, at the image's size (see
        :func:`~skdfm.anomaly_maps`).
    vmin, vmax : float, default=None
        Map values shown as the coldest and hottest colour; default the map's own
        range. Pass the same values for several images to compare them.
    alpha : float, default=0.5
        Weight of the colour map.

    Returns
    -------
    overlay : ndarray of shape (H, W, 3), uint8

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import overlay_anomaly_map
    >>> overlay_anomaly_map(np.zeros((4, 4, 3), np.uint8), np.eye(4)).shape
    (4, 4, 3)
    """
    rgb = _as_rgb(image)
    amap = np.asarray(anomaly_map, dtype=np.float64)
    if amap.shape != rgb.shape[:2]:
        raise ValueError(
            f"The anomaly map has shape {amap.shape} but the image is "
            f"{rgb.shape[:2]}; compute maps at the image size (size='image')."
        )
    low = amap.min() if vmin is None else vmin
    high = amap.max() if vmax is None else vmax
    scaled = (amap - low) / (high - low) if high > low else np.zeros_like(amap)
    blended = (1 - alpha) * rgb + alpha * _heat(scaled)
    return np.round(blended * 255).astype(np.uint8)


#: Smallest font size text is shrunk to before long words are broken across lines.
MIN_FONT_SIZE = 7
_MARGIN = 4  # pixels of white left and right of every text


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _length(font, text: str) -> float:
    return font.getlength(text) if text else 0.0


def legend_font_size(width: int) -> int:
    """The font size of a legend under a picture ``width`` pixels wide: readable
    on small pictures, growing with large ones (11 px up to 704 px wide, 16 at
    1024, 64 at 4096)."""
    return max(11, min(64, int(width) // 64))


def _break(font, word: str, room: float) -> list[str]:
    """A word too long for a line, in pieces that fit (at least one character)."""
    pieces, piece = [], ""
    for character in word:
        if piece and _length(font, piece + character) > room:
            pieces.append(piece)
            piece = ""
        piece += character
    return [*pieces, piece]


def text_lines(text: str, width: int, size: int):
    """``text`` laid out to fit ``width`` pixels (a margin kept on each side).

    Lines are broken at spaces (and at the text's own line breaks). When a word
    is wider than a line, the font shrinks until the longest word fits, down to
    :data:`MIN_FONT_SIZE`; below it, the word is broken across lines. Every
    character of ``text`` but the spaces at breaks is on a line.

    Returns
    -------
    font : PIL font
        The font the lines fit in (at most ``size``).
    lines : list of str
        Each at most ``width - 8`` pixels long in ``font``.
    """
    room = max(1, width - 2 * _MARGIN)
    paragraphs = [p.split() for p in str(text).split("\n")]
    words = [w for p in paragraphs for w in p]
    font = _font(size)
    longest = max((_length(font, w) for w in words), default=0.0)
    while longest > room and size > MIN_FONT_SIZE:
        size = max(MIN_FONT_SIZE, min(size - 1, int(size * room / longest)))
        smaller = _font(size)
        shorter = max(_length(smaller, w) for w in words)
        if shorter >= longest:  # a bitmap font: one size only
            break
        font, longest = smaller, shorter
    lines = []
    for paragraph in paragraphs:
        line = ""
        for word in paragraph:
            for piece in (
                [word] if _length(font, word) <= room else _break(font, word, room)
            ):
                joined = f"{line} {piece}" if line else piece
                if line and _length(font, joined) > room:
                    lines.append(line)
                    joined = piece
                line = joined
        lines.append(line)
    return font, lines


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag|")[1::2]
    return int(bottom) + max(2, int(bottom - top) // 4)


def _draw_lines(draw, lines, font, x: int, y: int) -> int:
    """Draw ``lines`` from ``(x, y)`` down; the y under the last one."""
    step = _line_height(font)
    for line in lines:
        draw.text((x, y), line, fill="black", font=font)
        y += step
    return y


def colour_bar(width: int, scale, caption: str | None = None, *, font_size=None):
    """A legend strip ``width`` pixels wide (a PIL image): ``caption``, and the
    colour bar of ``scale`` = ``(low, high, threshold)`` with those values marked
    (``threshold``, a pixel threshold in map units, may be None), or a note that
    each image has its own scale when ``scale`` is None.

    Every text fits the width whatever it is (see :func:`text_lines`): the
    caption wraps, and tick labels that would not fit side by side are written
    as a line of text under the bar instead. ``font_size`` defaults to
    :func:`legend_font_size` of ``width``.
    """
    from PIL import Image, ImageDraw

    size = legend_font_size(width) if font_size is None else int(font_size)
    font, caption_lines = text_lines(caption or "", width, size)
    caption_lines = [line for line in caption_lines if line]
    bar_height = max(6, min(size, 32))
    ticks = []
    if scale is None:
        below = "colours: this image's own range"
    else:
        low, high, threshold = scale
        ticks = [(low, f"{low:.4g}"), (high, f"{high:.4g}")]
        if threshold is not None:
            ticks.insert(1, (threshold, f"pixel threshold {threshold:.4g}"))
        below = None
    tick_font = _font(size)
    places = []
    for value, text in ticks:
        x = int(round((value - low) / (high - low) * (width - 1))) if high > low else 0
        length = _length(tick_font, text)
        places.append((x, min(max(0.0, x - length / 2), width - length), length))
    fits = all(left >= 0 for _, left, _ in places) and all(
        a[1] + a[2] + 4 <= b[1] for a, b in zip(places, places[1:], strict=False)
    )
    if ticks and not fits:
        below = " | ".join(text for _, text in ticks)
    below_font, below_lines = text_lines(below, width, size) if below else (None, [])
    caption_height = len(caption_lines) * _line_height(font)
    below_height = (
        len(below_lines) * _line_height(below_font)
        if below
        else _line_height(tick_font)
    )
    top = 2 + caption_height + 2
    strip = Image.new("RGB", (width, top + bar_height + 1 + below_height + 2), "white")
    draw = ImageDraw.Draw(strip)
    _draw_lines(draw, caption_lines, font, _MARGIN, 2)
    gradient = np.tile(np.linspace(0.0, 1.0, width), (bar_height, 1))
    colours = overlay_anomaly_map(
        np.ones((bar_height, width, 3)), gradient, vmin=0.0, vmax=1.0, alpha=1.0
    )
    strip.paste(Image.fromarray(colours), (0, top))
    y = top + bar_height + 1
    for x, _, _ in places:
        draw.line([(x, top), (x, top + bar_height)], fill="black", width=1)
    if below:
        _draw_lines(draw, below_lines, below_font, _MARGIN, y)
    else:
        for (_, text), (_, left, _) in zip(ticks, places, strict=True):
            draw.text((left, y), text, fill="black", font=tick_font)
    return strip


def _shared_range(maps, vmin, vmax) -> tuple[float, float]:
    """One colour scale for all maps: the given limits, else the range of all."""
    low = min(m.min() for m in maps) if vmin is None else vmin
    high = max(m.max() for m in maps) if vmax is None else vmax
    return low, high


def mask_outline(mask) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (the image's border
    counts as outside): ``mask`` less its binary erosion by a cross, in numpy."""
    mask = np.asarray(mask, bool)
    inner = np.zeros_like(mask)
    if mask.ndim == 2 and min(mask.shape) > 2:
        inner[1:-1, 1:-1] = (
            mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
            & mask[1:-1, :-2] & mask[1:-1, 2:]
        )  # fmt: skip
    return mask & ~inner


def anomaly_map_grid(
    images,
    maps,
    *,
    masks=None,
    vmin=None,
    vmax=None,
    titles=None,
    threshold=None,
    legend=None,
):
    """One picture of images (top row) over their map overlays (bottom row).

    Defect masks, when given, are outlined in green on the overlays. All maps
    share one colour scale (``vmin``/``vmax``, default the range of all maps), so
    a hot normal image and a hot defect look alike. Images must share one size.
    With ``titles``, each column gets its title above it (a line break splits it;
    long lines wrap to the column) and a colour bar of the map values goes under
    the picture, ``threshold`` (the *pixel* threshold, in map units) marked on it
    and ``legend`` (default: a line saying the colours are per-pixel map values)
    written above it.

    Returns
    -------
    grid : ndarray of shape (2 * H, n * W, 3), uint8
        Taller by the title band and the colour bar with ``titles``.
    """
    from PIL import Image, ImageDraw

    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    low, high = _shared_range(maps, vmin, vmax)
    top, bottom = [], []
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        rgb = np.round(_as_rgb(image) * 255).astype(np.uint8)
        overlay = overlay_anomaly_map(image, amap, vmin=low, vmax=high)
        if masks is not None:
            overlay[mask_outline(masks[i])] = (0, 255, 0)
        top.append(rgb)
        bottom.append(overlay)
    grid = np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)
    if titles is None:
        return grid
    width, column = grid.shape[1], top[0].shape[1]
    size = max(10, min(20, column // 14))  # one size for titles and legend
    laid = [text_lines(str(title), column, size) for title in titles]
    height = max(len(lines) * _line_height(font) for font, lines in laid)
    band = Image.new("RGB", (width, height + 6), "white")
    draw = ImageDraw.Draw(band)
    for i, (font, lines) in enumerate(laid):
        _draw_lines(draw, lines, font, i * column + _MARGIN, 3)
    if legend is None:
        legend = "colours: anomaly map value of each pixel" + (
            "; the mark: the pixel threshold" if threshold is not None else ""
        )
    strip = colour_bar(width, (low, high, threshold), legend, font_size=size)
    return np.concatenate([np.asarray(band), grid, np.asarray(strip)], 0)


def plot_anomaly_maps(
    images,
    maps,
    *,
    masks=None,
    titles=None,
    vmin=None,
    vmax=None,
    ncols=4,
    threshold=None,
):
    """A matplotlib figure of images with their anomaly maps overlaid.

    Needs matplotlib (``pip install "skdfm[plot]"``). One panel per image: the map
    blended over the image on a shared colour scale, the defect mask outlined in
    green when given, and a title (e.g. the score).

    Parameters
    ----------
    images : sequence of images (H, W[, 3]) or of image file paths
    maps : sequence of 2-D arrays
        Maps at each image's size (``anomaly_maps(model, X).maps``).
    masks : sequence of 2-D bool arrays, default=None
    titles : sequence of str, default=None
    vmin, vmax : float, default=None
        Shared colour scale; default the range of all maps.
    ncols : int, default=4
    threshold : float, default=None
        A *pixel* threshold (map units, e.g. ``pixel_threshold_``): with it, a
        colour bar of the map values goes under the panels, the threshold marked
        and named on it (an image's verdict compares its image score with the
        image threshold, another scale: say it in ``titles``).

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            'plot_anomaly_maps needs matplotlib: pip install "skdfm[plot]" (or '
            "use overlay_anomaly_map, which needs nothing extra)."
        ) from None
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    low, high = _shared_range(maps, vmin, vmax)
    n = len(maps)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    figure, axes = plt.subplots(
        nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        ax = axes.ravel()[i]
        ax.imshow(overlay_anomaly_map(image, amap, vmin=low, vmax=high))
        if masks is not None:
            ax.contour(np.asarray(masks[i], float), levels=[0.5], colors="lime")
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    figure.tight_layout()
    if threshold is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import ListedColormap, Normalize

        colours = ListedColormap(_heat(np.linspace(0.0, 1.0, 256)))
        bar = figure.colorbar(
            ScalarMappable(Normalize(low, high), colours),
            ax=axes.ravel().tolist(), orientation="horizontal", fraction=0.05,
            pad=0.04, label=f"anomaly map value per pixel (line: pixel threshold "
            f"{threshold:.3g})",
        )  # fmt: skip
        bar.ax.axvline(threshold, color="black", linewidth=2)
    return figure
