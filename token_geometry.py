"""
token_geometry.py — where each image's visual tokens sit, and which original pixels each one sees.

image_token_boxes(processor, images) follows every view a family's processor makes (resize,
pad, crop, anyres tiles, base view, unpadding and newlines, Qwen's merge, InternVL tiles and
thumbnail, Gemma pooling, Idefics3 / SmolVLM tiles and global view) and returns, per image, one
box of original pixels per visual token, in the order the model places them. 04 turns these
boxes into the share of attention that lands on the target image (grid cells, pic-in-pic
insets) and paints them for --viz. image_key_boxes does the same for a model whose visual tokens are
the keys of its cross-attention layers, not positions in the text (Llama 3.2 Vision's tiles).

Either image-processor backend: transformers' torchvision processors (any machine where torchvision
imports: every GPU user's) and its PIL ones (this CPU lane). Where the geometry calls a processor's
own helper, it hands it the backend's own input type and reads the backend's own layout back.
"""
from __future__ import annotations

import math

from vlm import emitted_image_tokens


class NoGeometry(ValueError):
    """No view-following geometry for this processor: 04 skips its grid and pic-in-pic rows,
    counted with this reason, and still runs its sequence rows (they need only token counts)."""


# ---------------------------------------------------------------------------------------------
# image-token geometry
# ---------------------------------------------------------------------------------------------
def image_token_boxes(processor, images, token_id=None):
    """-> one float64 numpy array (n_tokens, 4) per image: for each of that image's visual-token
    positions (the positions where input_ids == the model's image token id, in sequence order,
    i.e. the k-th image owns the next n_k such positions), the box (x0, y0, x1, y1) in ORIGINAL
    image pixels that the token sees; a row of NaN for a token that sees no pixels (LLaVA-NeXT /
    OneVision image_newline, any separator feature placed at an image-token position).
    A box may extend outside the image where the processor pads.

    `images` are the PIL images of ONE prompt (OneVision tiles an image only when it is alone).
    Every view the processor makes is followed with its own settings, size helpers and outputs
    (image_grid_thw, image_sizes, num_patches, rows/cols ...), in the order the model places
    the features; the row count is checked against what `processor(text=..., images=...)` emits
    (token_id: the image token the model fills, vlm.emitted_image_tokens).
      llava-1.5 (shortest edge 336, crop 336, patch 14), one 936x488 image -> [(576, 4)]; row 0 is
      (223.8, 0, 244.2, 20.3): resized to 644x336, 154 px cropped off the left, 14-px cells / 0.688.
    """
    name, ip_name = type(processor).__name__, type(processor.image_processor).__name__.removesuffix("Pil")
    ip_name = ip_name.removesuffix("Fast")
    handler = _GEOMETRY.get(name)
    missing = NoGeometry(f"image_token_boxes: no geometry for {name} with {ip_name} (known: "
                         f"{', '.join(f'{k} + {v[0]}' for k, v in _GEOMETRY.items())}; or by its outputs, as {_BY_OUTPUTS})")
    # a table processor with another image processor, or not a transformers processor (nothing to read views from)
    if (handler is not None and ip_name not in handler[0]) or not hasattr(processor, "_merge_kwargs"):
        raise missing
    images = list(images)
    # the processor's image kwargs, as its __call__ merges them; the image processor fills in the rest
    kwargs = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]
    kwargs.pop("return_tensors", None)
    out = processor.image_processor([images], **kwargs)
    ip = processor.image_processor
    settings = {k: _plain(kwargs[k] if k in kwargs else getattr(ip, k, None)) for k in ip.valid_kwargs.__annotations__}
    emitted = emitted_image_tokens(processor, images, token_id)
    boxes_of = handler[1] if handler else _by_outputs(processor, settings, out, emitted)
    if boxes_of is None:
        raise missing
    boxes = boxes_of(processor, ip, settings, images, out)
    if [len(b) for b in boxes] != emitted:
        raise ValueError(f"image_token_boxes: {name} emits {emitted} image tokens for images of size "
                         f"{[im.size for im in images]}, the geometry gives {[len(b) for b in boxes]}")
    return boxes


def image_key_boxes(processor, images, patch_size):
    """Llama 3.2 Vision (MllamaProcessor) writes ONE <|image|> per image in the text: its cross-attention
    layers read the vision features as KEYS instead. -> one float64 array (n_keys, 4) per image, in the
    order of its keys: each real tile, row-major, gives its CLS feature (box: the whole tile) then its
    (tile / patch_size)^2 patches row-major. The tiles are the image processor's own: the best canvas of
    up to max_image_tiles tiles (its resize), the image resized into it with its aspect kept and padded
    right / bottom, so a box may extend outside the image. Padded tiles (up to max_image_tiles) get no
    rows: the model's masks drop them.
      tile 32, patch 16, 4 tiles at most: a 64x20 image -> 1x2 tiles, no resize -> 2 x 5 keys; tile 2's
      CLS box is (32, 0, 64, 32), its first patch (32, 0, 48, 16) (rows 20..32: padding)."""
    import numpy as np
    from transformers.image_utils import SizeDict

    name, ip = type(processor).__name__, processor.image_processor
    if name != "MllamaProcessor":
        raise NoGeometry(f"image_key_boxes: no key geometry for {name} (known: MllamaProcessor)")
    size = ip.size if isinstance(ip.size, SizeDict) else SizeDict(**ip.size)
    tile, n = size.height, size.height // patch_size
    boxes = []
    for im in images:
        resized, (rows, cols) = ip.resize(_blank(ip, im.height, im.width), size=size,
                                          max_image_tiles=ip.max_image_tiles, resample=0)
        canvas = _View.of(*im.size).resize(*resized.shape[-2:])
        tiles = [canvas.crop(r * tile, c * tile, tile, tile) for r in range(rows) for c in range(cols)]
        boxes.append(np.concatenate([np.concatenate([t.grid(1, 1).reshape(-1, 4), t.grid(n, n).reshape(-1, 4)])
                                     for t in tiles]))
    return boxes


def _plain(value):
    """A size setting (dict or SizeDict) -> a dict of its set keys; anything else unchanged."""
    from transformers.image_utils import SizeDict

    if isinstance(value, SizeDict):
        return {k: v for k, v in vars(value).items() if v is not None}
    return value



class _View:
    """Where an original image lands in one processed view of h x w pixels:
    original (x, y) -> view (x * sx + ox, y * sy + oy).
      _View.of(936, 488).resize(336, 644).crop(0, 154, 336, 336) -> sx 0.688, sy 0.689, ox -154, oy 0"""

    def __init__(self, h, w, sx=1.0, sy=1.0, ox=0.0, oy=0.0):
        self.h, self.w, self.sx, self.sy, self.ox, self.oy = h, w, sx, sy, ox, oy

    @classmethod
    def of(cls, width, height):
        return cls(height, width)

    def resize(self, h, w):
        fy, fx = h / self.h, w / self.w
        return _View(h, w, self.sx * fx, self.sy * fy, self.ox * fx, self.oy * fy)

    def crop(self, top, left, h, w):
        """Keep rows top..top+h, columns left..left+w (negative top/left, or a larger h/w: padding)."""
        return _View(h, w, self.sx, self.sy, self.ox - left, self.oy - top)

    def grid(self, rows, cols):
        """(rows, cols, 4) original-pixel boxes of a rows x cols grid of equal cells over the view."""
        import numpy as np

        ys, xs = np.arange(rows + 1) * (self.h / rows), np.arange(cols + 1) * (self.w / cols)
        x0, y0 = (xs[:-1] - self.ox) / self.sx, (ys[:-1] - self.oy) / self.sy
        x1, y1 = (xs[1:] - self.ox) / self.sx, (ys[1:] - self.oy) / self.sy
        out = np.empty((rows, cols, 4))
        out[..., 0], out[..., 2] = x0[None, :], x1[None, :]
        out[..., 1], out[..., 3] = y0[:, None], y1[:, None]
        return out


def _torchvision_backend(ip):
    """Is this one of transformers' torchvision image processors (what every machine with a working
    torchvision gets by default) rather than a PIL one? Their helpers take torch tensors, not numpy
    arrays, and a few of them lay out their results differently (padding, centre crop)."""
    return getattr(ip, "backend", None) == "torchvision"


def _blank(ip, h, w):
    """A 1-channel zero image of h x w in the type the image processor's own helpers take:
    a torch tensor for the torchvision backend (its F.resize refuses numpy), numpy for PIL."""
    import numpy as np

    if _torchvision_backend(ip):
        import torch

        return torch.zeros((1, h, w), dtype=torch.uint8)
    return np.zeros((1, h, w), np.uint8)


def _resized_hw(ip, h, w, size):
    """(height, width) the image processor's own resize gives an h x w image for `size` (run on a
    1-channel zero image: the size rules live in resize, and differ per processor)."""
    from transformers.image_utils import SizeDict

    size = size if isinstance(size, SizeDict) else SizeDict(**size)
    return tuple(ip.resize(_blank(ip, h, w), size=size, resample=0).shape[-2:])


def _padding_top_left(ip, hw, target):
    """(top, left) padding of LLaVA-NeXT / OneVision's centred pad to the best pinpoint, read from the
    image processor's own _get_padding_size: the PIL backend returns np.pad's ((top, bottom),
    (left, right)), the torchvision one tvF.pad's [left, top, right, bottom]."""
    pad = ip._get_padding_size(hw, target)
    if _torchvision_backend(ip):
        left, top, _, _ = pad
        return top, left
    (top, _), (left, _) = pad
    return top, left


def _center_crop(ip, view, crop):
    """The image processor's center_crop, zero-padding a side that is too small: top = (h - ch) // 2,
    so a side short by an odd count gets the extra row on top (ceil) in the PIL backend; the
    torchvision one pads floor((ch - h) / 2) on top instead, one pixel off from PIL."""
    ch, cw = crop["height"], crop["width"]

    def start(n, c):
        return -((c - n) // 2) if c > n and _torchvision_backend(ip) else (n - c) // 2

    return view.crop(start(view.h, ch), start(view.w, cw), ch, cw)


def _clip_like_view(ip, kwargs, view):
    """CLIP-style resize then centre crop, as CLIPImageProcessor / each LLaVA-NeXT patch does."""
    if kwargs.get("do_resize"):
        view = view.resize(*_resized_hw(ip, view.h, view.w, kwargs["size"]))
    if kwargs.get("do_center_crop"):
        view = _center_crop(ip, view, kwargs["crop_size"])
    return view


def _check_no_cls(processor):
    """LLaVA-style patch grids only: a CLS token kept at an image-token position ('full' with
    num_additional_image_tokens) sees the whole view, which a box does not describe."""
    if processor.vision_feature_select_strategy != "default" and getattr(processor, "num_additional_image_tokens", 0):
        raise ValueError(f"image_token_boxes: {type(processor).__name__} keeps the CLS token (vision_feature_"
                         f"select_strategy {processor.vision_feature_select_strategy!r}): not supported")


def _boxes_llava(processor, ip, kwargs, images, out):
    """LLaVA-1.5: [pad to square, LlavaImageProcessor] -> resize -> centre crop -> patch grid."""
    _check_no_cls(processor)
    boxes, p = [], processor.patch_size
    for im in images:
        view = _View.of(*im.size)
        if kwargs.get("do_pad"):  # LlavaImageProcessor: centred square pad
            m = max(view.h, view.w)
            view = view.crop(-((m - view.h) // 2), -((m - view.w) // 2), m, m)
        view = _clip_like_view(ip, kwargs, view)
        gh, gw = view.h // p, view.w // p
        boxes.append(view.crop(0, 0, gh * p, gw * p).grid(gh, gw).reshape(-1, 4))
    return boxes


def _anyres_grid(ip, kwargs, image_size, tile, tile_tokens, tile_view):
    """LLaVA-NeXT / OneVision high-res part: best pinpoint, aspect-kept resize, centred pad, tiles
    row-major; -> (rows * tile_tokens, cols * tile_tokens, 4) boxes as the model lays them out
    (tile rows of token rows), before unpadding."""
    import numpy as np
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    H, W = image_size
    best = select_best_resolution((H, W), kwargs["image_grid_pinpoints"])
    nh, nw = get_patch_output_size(np.broadcast_to(np.uint8(0), (1, H, W)), best, input_data_format="channels_first")
    view = _View(H, W).resize(nh, nw)
    top, left = _padding_top_left(ip, (nh, nw), best)
    view = view.crop(-top, -left, best[0], best[1])
    rows, cols = best[0] // tile, best[1] // tile
    grid = np.empty((rows * tile_tokens, cols * tile_tokens, 4))
    for r in range(rows):
        for c in range(cols):
            t = tile_view(view.crop(r * tile, c * tile, tile, tile))
            grid[r * tile_tokens:(r + 1) * tile_tokens, c * tile_tokens:(c + 1) * tile_tokens] = \
                t.grid(tile_tokens, tile_tokens)
    return grid


def _unpad_with_newlines(grid, image_size, max_tiles=None):
    """The model's unpad_image on the tile grid, OneVision's bilinear shrink past anyres_max_N
    (a shrunk token sees the union of the cells it mixes), then one image_newline (NaN) per row."""
    import math

    import numpy as np
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    grid = unpad_image(torch.from_numpy(grid).permute(2, 0, 1), list(image_size)).permute(1, 2, 0).numpy()
    if max_tiles is not None:
        h, w, tile_tokens_sq = grid.shape[0], grid.shape[1], max_tiles[1] ** 2
        ratio = math.sqrt(h * w / (max_tiles[0] * tile_tokens_sq))
        if ratio > 1.1:
            grid = _bilinear_union(grid, int(h // ratio), int(w // ratio))
    newline = np.full((grid.shape[0], 1, 4), np.nan)
    return np.concatenate([grid, newline], axis=1).reshape(-1, 4)


def _bilinear_union(grid, h, w):
    """(H, W, 4) boxes -> (h, w, 4): each output cell of interpolate(mode="bilinear") sees the union
    of the input cells it takes a non-zero weight from (found by interpolating one-hot rows)."""
    import numpy as np
    import torch

    def sources(n, m):  # (m, n) bool: input cells feeding each output cell
        eye = torch.eye(n, dtype=torch.float64)[None]  # (1, n, n): channel i is one-hot cell i
        return (torch.nn.functional.interpolate(eye, size=m, mode="linear")[0] > 0).T.numpy()

    ry, rx = sources(grid.shape[0], h), sources(grid.shape[1], w)
    out = np.empty((h, w, 4))
    for i in range(h):
        for j in range(w):
            cells = grid[ry[i]][:, rx[j]].reshape(-1, 4)
            out[i, j] = cells[:, 0].min(), cells[:, 1].min(), cells[:, 2].max(), cells[:, 3].max()
    return out


def _boxes_llava_next(processor, ip, kwargs, images, out):
    """LLaVA-NeXT: base view (squash to size, resize, crop) first, then the unpadded tile grid with
    a newline after each row."""
    import numpy as np

    _check_no_cls(processor)
    p, crop, size = processor.patch_size, kwargs["crop_size"], kwargs["size"]
    side_h, side_w = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    tile = crop["height"] if crop else side_h  # as the image processor picks its patch size
    boxes = []
    for im, (H, W) in zip(images, out["image_sizes"]):
        base = _clip_like_view(ip, kwargs, _View.of(*im.size).resize(side_h, side_w))
        n = base.h // p
        grid = _anyres_grid(ip, kwargs, (int(H), int(W)), tile, n, lambda v: _clip_like_view(ip, kwargs, v))
        boxes.append(np.concatenate([base.grid(n, n).reshape(-1, 4), _unpad_with_newlines(grid, (int(H), int(W)))]))
    return boxes


def _boxes_llava_onevision(processor, ip, kwargs, images, out):
    """LLaVA-OneVision: an image alone in its prompt -> base view + unpadded tile grid (shrunk past
    anyres_max_N) + newline per row; with other images -> centred pad to square, resize, and one
    newline after the grid."""
    import math

    import numpy as np

    if processor.vision_feature_select_strategy != "full":
        raise ValueError(f"image_token_boxes: {type(processor).__name__} with vision_feature_select_strategy "
                         f"{processor.vision_feature_select_strategy!r}: only 'full' is supported")
    n = math.isqrt(processor.num_image_tokens)
    size = kwargs["size"]
    side_h, side_w = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    tile_view = lambda v: _clip_like_view(ip, kwargs, v)  # noqa: E731
    nan = np.full((1, 4), np.nan)
    boxes = []
    for im, (H, W) in zip(images, out["image_sizes"]):
        view = _View.of(*im.size)
        if len(images) == 1:
            base = tile_view(view.resize(side_h, side_w))
            grid = _anyres_grid(ip, kwargs, (int(H), int(W)), side_h, n, tile_view)
            max_tiles = int(processor.vision_aspect_ratio.removeprefix("anyres_max_"))
            boxes.append(np.concatenate([base.grid(n, n).reshape(-1, 4),
                                         _unpad_with_newlines(grid, (int(H), int(W)), (max_tiles, n))]))
        else:
            m = max(view.h, view.w)
            view = tile_view(view.crop(-((m - view.h) // 2), -((m - view.w) // 2), m, m))
            boxes.append(np.concatenate([view.grid(n, n).reshape(-1, 4), nan]))
    return boxes


def _boxes_qwen(processor, ip, kwargs, images, out):
    """Qwen2/2.5/3-VL, Qwen3.5: smart_resize to image_grid_thw patches, merge_size^2 patches per token,
    row-major (Qwen2.5-VL's window order is undone inside the vision model)."""
    import numpy as np

    p, m = kwargs["patch_size"], kwargs["merge_size"]
    boxes = []
    for im, (t, gh, gw) in zip(images, out["image_grid_thw"].tolist()):
        view = _View.of(*im.size).resize(gh * p, gw * p)
        boxes.append(np.tile(view.grid(gh // m, gw // m).reshape(-1, 4), (t, 1)))
    return boxes


def _boxes_internvl(processor, ip, kwargs, images, out):
    """InternVL: get_optimal_tiled_canvas tiles row-major + a thumbnail last (when there are several
    tiles), each tile image_seq_length tokens after the pixel shuffle, row-major."""
    import math

    import numpy as np
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    size, n = kwargs["size"], math.isqrt(kwargs.get("tokens_per_view") or processor.image_seq_length)
    boxes = []
    for im, n_patches in zip(images, out["num_patches"]):
        view, tiles = _View.of(*im.size), []
        if kwargs.get("crop_to_patches") and kwargs["max_patches"] > 1:
            cols, rows = get_optimal_tiled_canvas((view.h, view.w), (size["height"], size["width"]),
                                                  kwargs["min_patches"], kwargs["max_patches"])
            canvas = view.resize(rows * size["height"], cols * size["width"])
            tiles = [canvas.crop(r * size["height"], c * size["width"], size["height"], size["width"])
                     for r in range(rows) for c in range(cols)]
        if len(tiles) != 1:  # the thumbnail, or the only view without tiling
            tiles.append(view.resize(size["height"], size["width"]))
        if len(tiles) != n_patches:
            raise ValueError(f"image_token_boxes: {type(ip).__name__} made {n_patches} tiles, "
                             f"the geometry {len(tiles)}")
        boxes.append(np.concatenate([t.grid(n, n).reshape(-1, 4) for t in tiles]))
    return boxes


def _boxes_gemma3(processor, ip, kwargs, images, out):
    """Gemma 3: squash to size, the patch grid average-pooled to sqrt(image_seq_length) per side."""
    import math

    if kwargs.get("do_pan_and_scan"):
        raise ValueError(f"image_token_boxes: {type(processor).__name__} with do_pan_and_scan: not supported")
    n, size = math.isqrt(processor.image_seq_length), kwargs["size"]
    return [_View.of(*im.size).resize(size["height"], size["width"]).grid(n, n).reshape(-1, 4) for im in images]


def _boxes_gemma4(processor, ip, kwargs, images, out):
    """Gemma 4: aspect-kept resize to a multiple of patch * pooling per side (read back from
    image_position_ids), pooled k x k, row-major; the padding slots are dropped by the model."""
    import numpy as np

    p, k = kwargs["patch_size"], kwargs["pooling_kernel_size"]
    boxes = []
    for im, pos in zip(images, out["image_position_ids"]):
        pw, ph = (int(v) + 1 for v in np.asarray(pos).max(axis=0))  # (x, y) patch indices; padding is -1
        view = _View.of(*im.size).resize(ph * p, pw * p)
        boxes.append(view.grid(ph // k, pw // k).reshape(-1, 4))
    return boxes


def _boxes_idefics3(processor, ip, kwargs, images, out):
    """Idefics3 / SmolVLM: resized to rows x cols tiles of max_image_size, tiles row-major then the
    global view (the whole image squashed to one tile), image_seq_len tokens each (pixel shuffle)."""
    import math

    import numpy as np

    tile, n = kwargs["max_image_size"]["longest_edge"], math.isqrt(processor.image_seq_len)
    boxes = []
    for im, rows, cols in zip(images, out["rows"][0], out["cols"][0]):
        view = _View.of(*im.size)
        canvas = view.resize(rows * tile, cols * tile)
        views = [canvas.crop(r * tile, c * tile, tile, tile) for r in range(rows) for c in range(cols)]
        views.append(view.resize(tile, tile))
        boxes.append(np.concatenate([v.grid(n, n).reshape(-1, 4) for v in views]))
    return boxes


def _boxes_one_view(processor, ip, kwargs, images, out):
    """One view per image, the whole image squashed to the processed size, its tokens a row-major
    grid of that view in its aspect (PaliGemma's SigLIP: 224 x 224 -> 16 x 16)."""
    h, w = out["pixel_values"][0].shape[-2:]
    n = kwargs["tokens_per_view"]
    rows = math.isqrt(n * h // w)
    return [_View.of(*im.size).resize(h, w).grid(rows, n // rows).reshape(-1, 4) for im in images]


def _boxes_patch_grid(processor, ip, kwargs, images, out):
    """Pixtral (Mistral 3): each image resized to image_sizes, cut in patch_size patches merged
    spatial_merge_size x spatial_merge_size, row-major; a partial last row / column of merged
    tokens covers padding ([IMG_BREAK] between rows is text, not an image token)."""
    unit = processor.patch_size * processor.spatial_merge_size
    boxes = []
    for im, (h, w) in zip(images, out["image_sizes"]):
        rows, cols = -(-int(h) // unit), -(-int(w) // unit)
        view = _View.of(*im.size).resize(int(h), int(w)).crop(0, 0, rows * unit, cols * unit)
        boxes.append(view.grid(rows, cols).reshape(-1, 4))
    return boxes


_BY_OUTPUTS = ("image_grid_thw + merge_size: Qwen's merge (GLM-4.1V); image_sizes + spatial_merge_size: a merged "
               "patch grid (Pixtral); num_patches + crop_to_patches: GOT-OCR2 tiles (Aya Vision); one squashed "
               "view per image, tokens a grid in its aspect (PaliGemma)")


def _by_outputs(processor, settings, out, emitted):
    """A processor not in _GEOMETRY whose image processor works like one that is, told by what it
    returns, its settings and the tokens it emits -> a boxes function, or None. The mechanics are
    the known families'; each family of tests/tiny_families.py is checked against its vision tower
    (tests/test_geometry.py), a family no test names is not: its grid / pip ratios rest on this rule."""
    if "image_grid_thw" in out and settings.get("merge_size") and settings.get("patch_size"):
        return _boxes_qwen
    if "image_sizes" in out and getattr(processor, "spatial_merge_size", None) and getattr(processor, "patch_size", None):
        return _boxes_patch_grid
    views = out.get("num_patches") or [1] * len(emitted)  # views per image (GOT-OCR2 tiles)
    per_view = {e // v for e, v in zip(emitted, views)}
    if len(per_view) != 1 or any(e % v for e, v in zip(emitted, views)):  # one token count per view, or none
        return None
    settings["tokens_per_view"] = n = per_view.pop()
    if "num_patches" in out and settings.get("crop_to_patches") is not None and math.isqrt(n) ** 2 == n:
        return _boxes_internvl
    pv = out.get("pixel_values")
    if set(out.keys()) == {"pixel_values"} and len(pv) == len(emitted) and not settings.get("do_center_crop") \
            and not settings.get("do_pad"):
        h, w = pv[0].shape[-2:]
        rows = math.isqrt(n * h // w)
        return _boxes_one_view if rows and n % rows == 0 and rows * w == (n // rows) * h else None
    return None


_QWEN_IP = ("Qwen2VLImageProcessor",)
# processor class -> (image-processor classes it is known with, boxes function)
_GEOMETRY = {
    "LlavaProcessor": (("CLIPImageProcessor", "LlavaImageProcessor"), _boxes_llava),
    "LlavaNextProcessor": (("LlavaNextImageProcessor",), _boxes_llava_next),
    "LlavaOnevisionProcessor": (("LlavaOnevisionImageProcessor",), _boxes_llava_onevision),
    "Qwen2VLProcessor": (_QWEN_IP, _boxes_qwen),
    "Qwen2_5_VLProcessor": (_QWEN_IP, _boxes_qwen),
    "Qwen3VLProcessor": (_QWEN_IP, _boxes_qwen),
    "InternVLProcessor": (("GotOcr2ImageProcessor",), _boxes_internvl),
    "Gemma3Processor": (("Gemma3ImageProcessor",), _boxes_gemma3),
    "Gemma4Processor": (("Gemma4ImageProcessor",), _boxes_gemma4),
    "Idefics3Processor": (("Idefics3ImageProcessor",), _boxes_idefics3),
    "SmolVLMProcessor": (("SmolVLMImageProcessor",), _boxes_idefics3),
}
