"""``ovseg-fast tune pnp_ovss IMAGES --classes-from labels.json``: PnP-OVSS's hyperparameters without
segmentation labels, by the paper's CLIP reward and random search.

``IMAGES`` is a folder of images and ``labels.json`` maps each image's file name (relative to the
folder) to the class names present in it, e.g. ``{"0001.jpg": ["cat", "sofa"], ...}``; images the
file does not list are left out. Each image is resized to ``--size`` x ``--size`` and normalised with
CLIP's mean/std.

Every trial sets the searched config fields of the model (layer, head, threshold, blur sigma, Salience
DropOut passes and fraction), segments every image with its classes, and scores the result with the
reward (:func:`clip_reward`): for each image and class ``c`` with predicted mask ``M_c``, CLIP's cosine
similarity between the class's text embedding and the photo with only ``M_c`` kept, minus the same with
``M_c`` removed (blacked out), summed over the image's classes and averaged over images. A mask that
covers the object and nothing else scores high on both counts.

The search is gradient-free-optimizers' ``RandomSearchOptimizer``, as in the paper (the optional
``tune`` extra: ``pip install 'ovseg-fast[tune]'``), with a progress bar and a seed; the JSON written
to ``--out`` holds the best settings, their reward and every evaluated trial. The maps of one BLIP
setting (layer, head, passes, fraction) are computed once and reused by the trials that only change
the threshold or the blur.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_SPACE", "clip_reward", "load_labelled_images", "random_search", "tune"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: The searched config fields and their candidate values (``layer`` and ``head`` default to every
#: layer but the last and every head of the model's text encoder).
DEFAULT_SPACE: dict[str, list] = {
    "threshold": [round(0.1 + 0.05 * i, 2) for i in range(17)],
    "blur_sigma": [0.0, 0.01, 0.02, 0.03, 0.05, 0.08],
    "passes": [1, 2, 3, 4, 5],
    "drop_fraction": [0.1, 0.2, 0.3, 0.5],
}
# What changes the BLIP maps; the other fields only change the post-processing.
_MAP_FIELDS = ("layer", "head", "passes", "drop_fraction", "template")
_TUNE_EXTRA = "pip install 'ovseg-fast[tune]' (or pip install gradient-free-optimizers)"


def _gfo():
    try:
        import gradient_free_optimizers
    except ImportError as exc:
        raise ImportError(
            f"ovseg-fast tune needs gradient-free-optimizers (the optional 'tune' extra): {_TUNE_EXTRA}; "
            f"importing it failed: {exc}"
        ) from exc
    return gradient_free_optimizers


def random_search(
    objective: Callable[[dict[str, Any]], float],
    search_space: dict[str, Sequence],
    *,
    n_iter: int,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """Maximises ``objective(params)`` over the grid ``search_space`` (field -> candidate values) by
    gradient-free-optimizers' random search, ``n_iter`` iterations from ``seed``.

    Returns the best params, their value and the evaluated trials (``{"params", "reward"}`` in
    order; a point drawn again is not re-evaluated, so there may be fewer than ``n_iter``).
    """
    gfo = _gfo()
    if not isinstance(search_space, dict) or not search_space:
        raise ValueError("search_space must be a non-empty dict of field -> list of values")
    for name, values in search_space.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"search_space[{name!r}] must be a non-empty list of values, got {values!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # The optimiser searches positions in each list, so any value type (None, str) can be a candidate.
    index_space = {name: list(range(len(values))) for name, values in search_space.items()}
    trials: list[dict[str, Any]] = []
    bar = _progress(n_iter, progress)

    def wrapped(para) -> float:
        params = {name: search_space[name][int(para[name])] for name in search_space}
        value = float(objective(params))
        trials.append({"params": params, "reward": value})
        bar.update(1)
        bar.set_postfix(best=f"{max(t['reward'] for t in trials):.4g}")
        return value

    optimizer = gfo.RandomSearchOptimizer(index_space, random_state=seed)
    try:
        optimizer.search(wrapped, n_iter=n_iter, verbosity=False)
    finally:
        bar.close()
    best = max(trials, key=lambda t: t["reward"])
    return dict(best["params"]), best["reward"], trials


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="tune", disable=not enabled, file=sys.stderr)


def _black(images: Tensor) -> Tensor:
    from ovseg_fast.models.pnp_ovss import CLIP_MEAN, CLIP_STD

    return (-images.new_tensor(CLIP_MEAN) / images.new_tensor(CLIP_STD)).view(1, 3, 1, 1)


@torch.no_grad()
def clip_reward(
    clip, images: Tensor, labels: Tensor, class_lists: Sequence[Sequence[str]], *, background: str = "background"
) -> float:
    """The paper's reward of predicted labels.

    Args:
        clip: a :class:`~ovseg_fast.models.CLIPBackbone`.
        images: (B, 3, H, W) CLIP-normalised images.
        labels: (B, H, W) int64 predicted labels, indices into each image's ``class_lists[i]``.
        class_lists: the class names of each image; the ``background`` class (PnP-OVSS's
            ``config.background``) may be among them and is not rewarded.

    Returns:
        ``mean_i sum_c [cos(E(x_i * M_ic), t_c) - cos(E(x_i * (1 - M_ic)), t_c)]``, ``E`` CLIP's image
        embedding of the masked photo (removed pixels black) resized to CLIP's image size, ``t_c``
        the class's text embedding.
    """
    background = background.strip().lower()
    size = (clip.image_size, clip.image_size)
    black = _black(images)
    total = 0.0
    for image, label, names in zip(images, labels, class_lists):
        idx = [i for i, n in enumerate(names) if n.strip().lower() != background]
        if not idx:
            continue
        masks = torch.stack([label == i for i in idx])[:, None]  # (C, 1, H, W)
        kept = torch.where(masks, image[None], black)
        removed = torch.where(masks, black, image[None])
        x = F.interpolate(torch.cat([kept, removed]), size=size, mode="bilinear", align_corners=False)
        emb = clip.encode_image(x, normalize=True)
        text = clip.encode_text([names[i] for i in idx])
        cos = (emb * torch.cat([text, text])).sum(-1)
        total += float(cos[: len(idx)].sum() - cos[len(idx) :].sum())
    return total / len(images)


def tune(
    model,
    images: Tensor,
    class_lists: Sequence[Sequence[str]],
    *,
    clip=None,
    reward_fn: Optional[Callable[[Tensor, Tensor, Sequence[Sequence[str]]], float]] = None,
    search_space: Optional[dict[str, Sequence]] = None,
    n_iter: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Random search of a PnP-OVSS model's config for the highest reward; the model keeps its
    original config afterwards.

    Args:
        model: a :class:`~ovseg_fast.models.pnp_ovss.PnPOVSS`.
        images: (B, 3, H, W) CLIP-normalised images.
        class_lists: B lists of the class names present in each image.
        clip: the CLIP layer of :func:`clip_reward` (when ``reward_fn`` is None).
        reward_fn: ``reward_fn(images, labels, class_lists) -> float`` instead of the CLIP reward.
        search_space: config field -> candidate values; default :data:`DEFAULT_SPACE` plus every
            usable layer and head of the model.
        n_iter, seed, progress: see :func:`random_search`.

    Returns:
        ``{"best": params, "best_reward": float, "trials": [...], "search_space": ...}``.
    """
    from ovseg_fast.models.base import check_class_names, check_images
    from ovseg_fast.models.pnp_ovss import PnPOVSS, _check_config, _check_unique

    if not isinstance(model, PnPOVSS):
        raise TypeError(f"model must be a PnP-OVSS model (PnPOVSS), got {type(model).__name__}")
    check_images("images", images, multiple_of=model.patch_size)
    if isinstance(class_lists, str) or not isinstance(class_lists, Sequence) or len(class_lists) != len(images):
        raise ValueError(f"class_lists must hold one list of class names per image ({len(images)})")
    lists = [list(_check_unique(check_class_names(f"class_lists[{i}]", c))) for i, c in enumerate(class_lists)]
    if reward_fn is None:
        if clip is None:
            raise ValueError("tune needs clip (a CLIPBackbone) for the CLIP reward, or a reward_fn")

        def reward_fn(x: Tensor, labels: Tensor, names: Sequence[Sequence[str]]) -> float:
            return clip_reward(clip, x, labels, names, background=model.config.background)

    space = dict(search_space) if search_space is not None else default_space(model)
    fields = {f.name for f in dataclasses.fields(model.config)}
    unknown = [k for k in space if k not in fields]
    if unknown:
        raise ValueError(f"search_space has fields the model's config lacks: {unknown}; its fields: {sorted(fields)}")
    original = model.config
    maps_cache: dict[tuple, list[Tensor]] = {}

    def objective(params: dict[str, Any]) -> float:
        model.config = dataclasses.replace(original, **params)
        _check_config(model.config, model.text_layers, model.num_heads)
        key = tuple(getattr(model.config, f) for f in _MAP_FIELDS)
        if key not in maps_cache:
            maps_cache[key] = [model.salience_maps(images[i : i + 1], model.foreground(n)) for i, n in enumerate(lists)]
        labels = torch.cat(
            [model.postprocess(maps, images[i : i + 1], lists[i]).argmax(1) for i, maps in enumerate(maps_cache[key])]
        )
        return reward_fn(images, labels, lists)

    try:
        best, best_reward, trials = random_search(objective, space, n_iter=n_iter, seed=seed, progress=progress)
    finally:
        model.config = original
    return {"best": best, "best_reward": best_reward, "trials": trials, "search_space": space}


def default_space(model) -> dict[str, list]:
    """:data:`DEFAULT_SPACE` with every layer but the last and every head of ``model``'s text encoder."""
    return {"layer": list(range(model.text_layers - 1)), "head": list(range(model.num_heads)), **DEFAULT_SPACE}


def load_labelled_images(folder: Path, labels_json: Path, size: int) -> tuple[Tensor, list[str], list[list[str]]]:
    """The images ``labels_json`` lists, from ``folder``, as CLIP-normalised (B, 3, size, size)
    float32, with their file names and class lists. Errors name the file and what is wrong."""
    from PIL import Image

    from ovseg_fast.models.pnp_ovss import CLIP_MEAN, CLIP_STD

    if not folder.is_dir():
        raise FileNotFoundError(f"IMAGES must be a folder of images, got {str(folder)!r}")
    if not labels_json.is_file():
        raise FileNotFoundError(f"--classes-from: no such file {str(labels_json)!r}")
    try:
        labels = json.loads(labels_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--classes-from {str(labels_json)!r} is not valid JSON: {exc}") from exc
    if not isinstance(labels, dict) or not labels:
        raise ValueError(
            f"--classes-from {str(labels_json)!r} must be a JSON object mapping image file names to lists of "
            'class names, e.g. {"0001.jpg": ["cat", "sofa"]}'
        )
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    tensors, names, lists = [], [], []
    for name, classes in sorted(labels.items()):
        path = folder / name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{str(labels_json)!r}: {name!r} is not an image file name ({', '.join(IMAGE_SUFFIXES)})")
        if not path.is_file():
            raise FileNotFoundError(f"{str(labels_json)!r} lists {name!r}, which is not in {str(folder)!r}")
        if isinstance(classes, str) or not isinstance(classes, list) or not classes:
            raise ValueError(f"{str(labels_json)!r}: the classes of {name!r} must be a non-empty list of names")
        if not all(isinstance(c, str) and c.strip() for c in classes):
            raise ValueError(f"{str(labels_json)!r}: the classes of {name!r} must be non-empty strings, got {classes}")
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
        except OSError as exc:
            raise ValueError(f"cannot read the image {str(path)!r}: {exc}") from exc
        x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        tensors.append((x.float() / 255 - mean) / std)
        names.append(name)
        lists.append(list(classes))
    return torch.stack(tensors), names, lists


def _override(text: str) -> tuple[str, Any]:
    from ovseg_fast.cli.profile import _override as parse

    return parse(text)


def _clip_name(text: str) -> Any:
    import ast

    if text.lstrip().startswith("{"):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise argparse.ArgumentTypeError(f"--clip: not a valid dict literal: {exc}") from exc
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune",
        help="PnP-OVSS hyperparameters by the paper's CLIP reward and random search (needs the 'tune' extra)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a PnP-OVSS model: pnp_ovss or pnp_ovss_base")
    parser.add_argument("images", type=Path, help="folder of images")
    parser.add_argument(
        "--classes-from",
        required=True,
        type=Path,
        metavar="LABELS.json",
        help="JSON object: image file name -> list of the class names present in it",
    )
    parser.add_argument("--pretrained", help="local transformers BLIP ITM checkpoint directory (default: random)")
    parser.add_argument(
        "--clip",
        default="ViT-B-16",
        type=_clip_name,
        help="open_clip model of the reward (default ViT-B-16), or its config as a Python dict literal",
    )
    parser.add_argument("--clip-pretrained", help="its checkpoint file (default: random weights)")
    parser.add_argument("--size", type=int, default=384, help="images are resized to SIZE x SIZE (default 384)")
    parser.add_argument("--n-iter", type=int, default=20, help="random-search iterations (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random-search seed (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_override,
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. --set crf=False (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("pnp_ovss_tune.json"), help="where the JSON goes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from ovseg_fast.cli.profile import write_json_atomic

    try:
        _gfo()
    except ImportError as exc:
        print(f"ovseg-fast tune: {exc}", file=sys.stderr)
        return 2
    try:
        from ovseg_fast.models import CLIPBackbone, create_model, model_config
        from ovseg_fast.models.pnp_ovss import PnPOVSSConfig

        if not isinstance(model_config(args.model), PnPOVSSConfig):
            raise ValueError(f"ovseg-fast tune tunes PnP-OVSS models (pnp_ovss, pnp_ovss_base), not {args.model!r}")
        if args.size < 16 or args.size % 16:
            raise ValueError(f"--size must be a positive multiple of 16 (BLIP's patch), got {args.size}")
        images, files, lists = load_labelled_images(args.images, args.classes_from, args.size)
        model = create_model(args.model, pretrained=args.pretrained, **dict(args.overrides))
        clip = CLIPBackbone(args.clip, args.clip_pretrained, image_size=224).eval()
        result = tune(
            model, images, lists, clip=clip, n_iter=args.n_iter, seed=args.seed, progress=not args.no_progress
        )
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"ovseg-fast tune: {exc}", file=sys.stderr)
        return 2
    out = {
        "model": args.model,
        "pretrained": args.pretrained,
        "clip": args.clip,
        "clip_pretrained": args.clip_pretrained,
        "images": files,
        "size": args.size,
        "seed": args.seed,
        "n_iter": args.n_iter,
        "config": dataclasses.asdict(model.config),
        **result,
    }
    write_json_atomic(args.out, out)
    print(f"best reward {result['best_reward']:.4f}: " + ", ".join(f"{k}={v}" for k, v in result["best"].items()))
    print(f"{len(result['trials'])} trials written to {args.out}")
    return 0
