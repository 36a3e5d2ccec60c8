"""``ovseg-fast convert MODEL IN OUT``: a published checkpoint of a model's original code -> a
safetensors file of this library's keys, loadable with ``create_model(MODEL, pretrained=OUT)``.

``ovseg-fast convert pixelclip pixelclip_vit_base.pth pixelclip_vit_base.safetensors``: the authors'
detectron2 checkpoint of PixelCLIP (ViT-B/16, or ConvNeXt-B) -> ours. The keys are mapped
(:func:`ovseg_fast.models.pixelclip.convert_pixelclip_state_dict`), the model the checkpoint
describes is built and loaded strictly (every tensor used, none missing, shapes checked), and only
then is OUT written. A checkpoint that does not fit exits with status 1 and a message listing what
does not fit. A ConvNeXt checkpoint is checked against ``pixelclip_convnext_b`` (open_clip's
``convnext_base_w_320``: a timm trunk is built by name, not told from its shapes); ``--clip
CLIP`` checks a checkpoint against another CLIP config than the one inferred.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Optional

# The models whose published checkpoints convert.
_CONVERTERS = ("pixelclip",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert a model's published checkpoint to a safetensors file of ours",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=_CONVERTERS, help="the model whose checkpoint IN is")
    parser.add_argument("input", metavar="IN", help="the published checkpoint (.pth)")
    parser.add_argument("output", metavar="OUT", help="the file to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument(
        "--clip",
        type=_literal_or_str,
        help="open_clip model name or config dict (a Python literal) of the CLIP the checkpoint is checked against "
        "(default: inferred from a ViT's shapes; convnext_base_w_320 for a ConvNeXt)",
    )
    return parser


def _literal_or_str(text: str):
    """A Python literal (e.g. an open_clip config dict), or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def convert(model: str, src, dst, *, force: bool = False, overrides: Optional[dict] = None) -> tuple[str, dict]:
    """Converts checkpoint ``src`` of ``model`` to the safetensors file ``dst``; returns the registered
    model it loads into (``pixelclip`` or ``pixelclip_convnext_b``) and the config overrides the
    checkpoint needs (its architecture, e.g. ``num_concepts``; ``overrides`` over the inferred)."""
    if model not in _CONVERTERS:
        raise ValueError(f"model must be one of {', '.join(_CONVERTERS)}, got {model!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"IN: no such file {src}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"OUT must end in .safetensors, got {dst}")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"OUT: directory {dst.parent} does not exist")
    if dst.exists() and not force:
        raise FileExistsError(f"OUT: {dst} exists (pass --force to overwrite)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("OUT must not be IN")
    from safetensors.torch import save_file

    from ovseg_fast.models.pixelclip import check_pixelclip_state_dict, pixelclip_model_name, read_pixelclip_checkpoint

    state = read_pixelclip_checkpoint(src)
    overrides = check_pixelclip_state_dict(state, str(src), overrides)
    # safetensors refuses tensors sharing storage (a checkpoint may hold views): one copy each.
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model": model, "source": src.name})
    tmp.replace(dst)
    return pixelclip_model_name(state), overrides


def run(args: argparse.Namespace) -> int:
    try:
        extra = {} if args.clip is None else {"clip": args.clip}
        name, overrides = convert(args.model, args.input, args.output, force=args.force, overrides=extra)
    except (OSError, ValueError, TypeError) as exc:
        print(f"ovseg-fast convert: {exc}", file=sys.stderr)
        return 1
    shown = {k: v for k, v in overrides.items() if k != "clip"}
    print(f"wrote {args.output}: create_model({name!r}, pretrained={args.output!r}) loads it ({shown})")
    return 0
