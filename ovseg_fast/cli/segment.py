"""``ovseg-fast segment IMAGE... --model M --classes "cat,grass,sky" [--weights W]``: segments images.

IMAGE may be files, folders (every image inside, sorted) or glob patterns. For each image, in
``--out`` (default ``segments/``): ``<name>_label.png``, the class index per pixel as a palette PNG
(palette entry i = class i), and ``<name>_overlay.png``, the image blended with the class colours and a
legend of the classes present, both at the image's original size; ``--probs`` adds
``<name>_probs.npz`` (``probs``: float16 (C, H, W) softmax probabilities, ``class_names``). An
unreadable image is reported and skipped (exit status 1 when any was).

The image is resized so that its shorter side is ``--size`` (default: the model's ``image_size``),
segmented whole or with sliding ``--size`` windows (``--mode``), and the probabilities are resized
back. ``--pretrained`` is the CLIP checkpoint the model is built with, ``--weights`` trained weights
(``model.pt``/``checkpoint.pt`` of ``ovseg-fast train``); with neither the weights are random and
the output says so.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import Optional

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment", help="segment images into the given classes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="a registered model (ovseg-fast models lists them)")
    parser.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,grass,sky"')
    parser.add_argument("--weights", help="trained weights (model.pt or checkpoint.pt of ovseg-fast train)")
    parser.add_argument("--pretrained", help="CLIP checkpoint the model is built with (path or name under "
                        "$OVSEG_WEIGHTS_DIR)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="model config override, e.g. --set image_size=448 (repeatable)")
    parser.add_argument("--out", default="segments", help="output folder (default: segments)")
    parser.add_argument("--probs", action="store_true", help="also save the probabilities (npz)")
    parser.add_argument("--mode", choices=("whole", "slide"), default="slide", help="inference mode (default slide)")
    parser.add_argument("--size", type=int, help="shorter side the image is resized to (default: image_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def expand_images(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """(image files, problems): folders give their images (sorted), globs their matches; a path that
    does not exist or a pattern that matches nothing is a problem, reported by the caller."""
    files: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{pattern}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{pattern}: no file matches")
            files.extend(found)
        else:
            problems.append(f"{pattern}: no such file or folder")
    return files, problems


def parse_classes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f'--classes must be comma-separated non-empty names, e.g. "cat,grass,sky", got {text!r}')
    if len(set(names)) != len(names):
        raise ValueError(f"--classes names a class twice: {text!r}")
    return names


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours: PASCAL VOC's bit-interleaved colour map (class i's bits spread over
    the high bits of R, G, B), so colours stay apart for any count up to 256."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i + 1  # skip black, so class 0 is visible on dark images
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


def save_outputs(image, labels, probs, class_names: list[str], out: Path, stem: str, with_probs: bool) -> None:
    """Writes the label PNG, the overlay PNG with its legend and optionally the npz of ``probs``
    (``image``: an RGB PIL image (W, H); ``labels``: int (H, W); ``probs``: float (C, H, W))."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    colours = palette(len(class_names))
    label_img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for c in colours for v in c]
    label_img.putpalette(flat + [0] * (768 - len(flat)))
    label_img.save(out / f"{stem}_label.png")

    rgb = np.asarray(image, dtype=np.float32)
    colour_map = np.asarray(colours, dtype=np.float32)[labels]
    overlay = Image.fromarray((0.5 * rgb + 0.5 * colour_map).astype(np.uint8))
    draw = ImageDraw.Draw(overlay, "RGBA")
    font = ImageFont.load_default()
    present = [i for i in range(len(class_names)) if (labels == i).any()]
    line = 12
    width = max(draw.textlength(class_names[i], font=font) for i in present) + 22 if present else 0
    draw.rectangle([2, 2, 6 + width, 6 + line * len(present)], fill=(0, 0, 0, 160))
    for row, i in enumerate(present):
        y = 4 + row * line
        draw.rectangle([5, y + 1, 13, y + 9], fill=colours[i] + (255,))
        draw.text((18, y - 1), class_names[i], fill=(255, 255, 255, 255), font=font)
    overlay.save(out / f"{stem}_overlay.png")
    if with_probs:
        names = np.array(class_names)
        np.savez_compressed(out / f"{stem}_probs.npz", probs=probs.astype(np.float16), class_names=names)


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ovseg_fast.data import normalize, read_image
    from ovseg_fast.data.common import BadSampleError
    from ovseg_fast.models import create_model
    from ovseg_fast.train.config import parse_override
    from ovseg_fast.train.trainer import load_weights

    try:
        class_names = parse_classes(args.classes)
        overrides = {}
        for text in args.overrides:
            keys, value = parse_override(text)
            if len(keys) != 1:
                raise ValueError(f"--set {text!r}: model overrides are single keys (fields of the model's config)")
            overrides[keys[0]] = value
        if args.size is not None and args.size < 1:
            raise ValueError(f"--size must be a positive int, got {args.size}")
        files, problems = expand_images(args.images)
        if not files:
            raise FileNotFoundError("no image to segment: " + "; ".join(problems))
        if args.weights is None and args.pretrained is None:
            print(f"note: model {args.model!r} has RANDOM weights (neither --weights nor --pretrained): "
                  "the segmentation is meaningless", file=sys.stderr)
        model = create_model(args.model, pretrained=args.pretrained, **overrides)
        if args.weights is not None:
            load_weights(model, args.weights)
        model.eval()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, TypeError) as exc:
        print(f"ovseg-fast segment: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"ovseg-fast segment: skipped {problem}", file=sys.stderr)
    size = args.size or int(getattr(getattr(model, "config", None), "image_size", 512))
    with torch.no_grad():
        text = model.encode(class_names)
    bar: Optional[object] = None
    if len(files) > 1 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="segment", unit="img", dynamic_ncols=True)
    used: set[str] = set()
    failed = len(problems)
    for path in files:
        try:
            pixels = read_image(path)
        except BadSampleError as exc:
            print(f"ovseg-fast segment: skipped {exc}", file=sys.stderr)
            failed += 1
            if bar is not None:
                bar.update(1)
            continue
        h, w = pixels.shape[-2:]
        scale = size / min(h, w)
        resized = F.interpolate(pixels[None].float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                mode="bilinear", align_corners=False, antialias=True)
        image = normalize(resized[0].clamp(0, 255) / 255)[None]
        with torch.no_grad():
            probs = model.predict(image, text, mode=args.mode, crop=size, stride=max(1, size * 2 // 3))
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0]
        labels = probs.argmax(0).numpy()
        original = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        save_outputs(original, labels, probs.numpy(), class_names, out, _unique_stem(path, used), args.probs)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    print(f"segmented {len(files) - (failed - len(problems))} image(s) into {out}" +
          (f"; {failed} skipped" if failed else ""))
    return 1 if failed else 0
