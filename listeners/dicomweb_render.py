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
    """The frame cannot be rendered (no pixel data, unsupported photometric interpretation...)."""


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


def parse_viewport(value: str | None, default: tuple[int, int] | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` (only the size; the source-region form is not supported)."""
    if not value:
        return default
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError("viewport is width,height")
    vw, vh = (int(p) for p in parts)
    if not (0 < vw <= MAX_VIEWPORT and 0 < vh <= MAX_VIEWPORT):
        raise ValueError(f"viewport sides must be 1-{MAX_VIEWPORT}")
    return vw, vh


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
           viewport: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """Frame ``frame`` (1-based) of the instance as ``media_type`` (image/jpeg or image/png)."""
    from PIL import Image
    from pydicom.pixels import pixel_array

    ds = dcmread(io.BytesIO(part10), stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise RenderError("the instance has no image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} does not exist (the instance has {frames})")
    try:
        arr = pixel_array(io.BytesIO(part10), index=frame - 1 if frames > 1 else None)
    except Exception as e:
        raise RenderError(f"pixel data cannot be decoded ({type(e).__name__})") from None
    img = Image.fromarray(_to_8bit(ds, arr, window))
    if viewport is not None:
        img.thumbnail(viewport)
    out = io.BytesIO()
    if media_type == "image/png":
        img.save(out, format="PNG")
    else:
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(out, format="JPEG", quality=quality)
    return out.getvalue()
