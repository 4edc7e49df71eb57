"""Rendered and thumbnail images (PS3.18 8.3.5.1, 10.4.1.1.4): one frame as JPEG or PNG.

Pixel data is decoded by pydicom (one frame, with the pylibjpeg plugins for
compressed syntaxes), the Modality LUT applied (Rescale Slope/Intercept), then the
VOI window of PS3.3 C.11.2.1.2 (linear, linear exact or sigmoid) from the ``window``
query parameter, else the data set's first WindowCenter/WindowWidth, else the frame's
own min..max; MONOCHROME1 is inverted, PALETTE COLOR mapped through its LUT, colour
images go as RGB. Pillow writes the JPEG/PNG.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread

MAX_VIEWPORT = 4096
THUMBNAIL = 128


class RenderError(ValueError):
    """The frame cannot be rendered (no pixel data, unsupported photometric interpretation...): 406;
    a frame that does not exist is 404, a source region outside the image 400 (``status``)."""

    def __init__(self, text: str, status: int = 406) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"


def parse_window(value: str | None) -> Window | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4)."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError("window is center,width[,linear|linear-exact|sigmoid]")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError("window center and width must be numbers") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ValueError("window width must be a positive number")
    fn = (parts[2] if len(parts) == 3 else "linear").upper().replace("-", "_")
    if fn not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise ValueError("window function must be linear, linear-exact or sigmoid")
    return Window(center, width, fn)


@dataclass(frozen=True)
class Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]`` (PS3.18 8.3.5.1.3): the output size and, optionally, the source
    region: its top left (sx, sy) and size (sw, sh; negative flips that axis), in image pixels."""

    width: int
    height: int
    region: tuple[int | None, int | None, int | None, int | None] | None = None


def _int(part: str, name: str) -> int | None:
    part = part.strip()
    if not part:
        return None
    body = part[1:] if part[:1] == "-" else part
    if not body.isascii() or not body.isdigit() or len(body) > 6:
        raise ValueError(f"viewport {name} must be an integer")
    return int(part)


def parse_viewport(value: str | None, default: tuple[int, int] | None) -> Viewport | None:
    """``viewport=vw,vh`` or ``vw,vh,sx,sy,sw,sh``; the four source values may be left empty
    (``512,512,,,100,100``): the region then starts at 0,0 and reaches the image's edge."""
    if not value:
        return Viewport(*default) if default else None
    parts = value.split(",")
    if len(parts) not in (2, 6):
        raise ValueError("viewport is vw,vh or vw,vh,sx,sy,sw,sh")
    vw, vh = _int(parts[0], "width"), _int(parts[1], "height")
    if vw is None or vh is None or not (0 < vw <= MAX_VIEWPORT and 0 < vh <= MAX_VIEWPORT):
        raise ValueError(f"viewport sides must be 1-{MAX_VIEWPORT}")
    if len(parts) == 2:
        return Viewport(vw, vh)
    sx, sy, sw, sh = (_int(p, n) for p, n in zip(parts[2:], ("sx", "sy", "sw", "sh"), strict=True))
    if (sx is not None and sx < 0) or (sy is not None and sy < 0) or sw == 0 or sh == 0:
        raise ValueError("viewport sx,sy are offsets >= 0 and sw,sh non-zero sizes")
    return Viewport(vw, vh, (sx, sy, sw, sh))


def parse_region(value: str | None) -> tuple[float, float, float, float] | None:
    """WADO-URI ``region=x1,y1,x2,y2`` (PS3.18 WADO-URI): the part of the image, each 0.0-1.0 of its size."""
    if not value:
        return None
    try:
        x1, y1, x2, y2 = (float(p) for p in value.split(","))
    except ValueError:
        raise ValueError("region is x1,y1,x2,y2, each 0.0-1.0") from None
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError("region is x1,y1,x2,y2 with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    return x1, y1, x2, y2


def _crop(img: Any, viewport: Viewport | None, region: tuple[float, float, float, float] | None) -> Any:
    """The source region of the viewport (or WADO-URI's normalised region), flipped where sw/sh < 0."""
    from PIL import Image

    w, h = img.size
    if region is not None:
        x1, y1, x2, y2 = region
        box = (int(x1 * w), int(y1 * h), max(int(x1 * w) + 1, round(x2 * w)), max(int(y1 * h) + 1, round(y2 * h)))
        img = img.crop(box)
    if viewport is None or viewport.region is None:
        return img
    sx, sy, sw, sh = viewport.region
    w, h = img.size
    x0, y0 = sx or 0, sy or 0
    if x0 >= w or y0 >= h:
        raise RenderError("the viewport's source region lies outside the image", 400)
    x1 = w if sw is None else min(w, x0 + abs(sw))
    y1 = h if sh is None else min(h, y0 + abs(sh))
    img = img.crop((x0, y0, x1, y1))
    if sw is not None and sw < 0:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sh is not None and sh < 0:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return img


def _first(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v[0] if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue" else v)
    except (TypeError, ValueError, IndexError):
        return None


def _window(arr: Any, w: Window) -> Any:
    import numpy as np

    c, width = w.center, w.width
    if w.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (arr - c) / width))
    if w.function == "LINEAR_EXACT":
        return np.clip((arr - (c - width / 2)) / width * 255.0, 0, 255)
    if width <= 1:  # C.11.2.1.2.1: width 1 is a threshold
        return np.where(arr <= c - 0.5, 0.0, 255.0)
    return np.clip(((arr - (c - 0.5)) / (width - 1) + 0.5) * 255.0, 0, 255)


def _to_8bit(ds: Any, arr: Any, window: Window | None) -> Any:
    import numpy as np
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return (rgb / (rgb.max() or 1) * 255.0).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
    if arr.ndim == 3:  # colour: pydicom gives RGB (YBR converted)
        if arr.dtype == np.uint8:
            return arr
        bits = int(ds.get("BitsStored", 8) or 8)
        return np.clip(arr.astype(np.float64) / ((1 << bits) - 1) * 255.0, 0, 255).astype(np.uint8)
    if not pi.startswith("MONOCHROME"):
        raise RenderError(f"photometric interpretation {pi} cannot be rendered")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if window is None:
        c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if c is not None and w is not None and w > 0:
            fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            window = Window(c, w, fn if fn in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR")
    if window is None:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / ((hi - lo) or 1.0) * 255.0
    else:
        out = _window(values, window)
    if pi == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(out, 0, 255).astype(np.uint8)


def render(part10: bytes, *, frame: int = 1, media_type: str = "image/jpeg", window: Window | None = None,
           viewport: Viewport | None = None, quality: int = 90,
           region: tuple[float, float, float, float] | None = None) -> bytes:
    """Frame ``frame`` (1-based) of the instance as ``media_type`` (image/jpeg or image/png)."""
    from PIL import Image
    from pydicom.pixels import pixel_array

    ds = dcmread(io.BytesIO(part10), stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise RenderError("the instance has no image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} does not exist (the instance has {frames})", 404)
    try:
        arr = pixel_array(io.BytesIO(part10), index=frame - 1 if frames > 1 else None)
    except Exception as e:
        raise RenderError(f"pixel data cannot be decoded ({type(e).__name__})") from None
    img = _crop(Image.fromarray(_to_8bit(ds, arr, window)), viewport, region)
    if viewport is not None:  # the region scaled to fit, aspect kept (a region smaller than the viewport grows)
        scale = min(viewport.width / img.size[0], viewport.height / img.size[1])
        if scale < 1 or viewport.region is not None:
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS) if scale != 1 else img
    out = io.BytesIO()
    if media_type == "image/png":
        img.save(out, format="PNG")
    else:
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(out, format="JPEG", quality=quality)
    return out.getvalue()
