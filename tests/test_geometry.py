"""token_geometry.image_token_boxes against independent references, for every family of tiny_families.py.

1. counts: one box row per image-token position the processor emits (2-3 images of other sizes);
2. receptive fields: with every vision-attention output zeroed (a deepcopy), a visual feature
   depends only on its own patches (and merge / pooling / pixel-shuffle neighbours), so when a
   block of original pixels is inverted, exactly the tokens whose box meets the block change —
   read where the model puts them: the language model's inputs_embeds at image-token positions.
   The processors resample NEAREST here, so a box is sharp to a pixel at any scale (the boxes do
   not depend on the filter). This checks boxes AND order;
3. a hand-worked llava-1.5 case, and the LLaVA-only affine map 04 used before, for llava and the toy model.
"""
import copy
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import vlm
import token_geometry
from tiny_families import CROSS_ATTENTION, FAMILIES, NO_GEOMETRY, tiny_dirs  # noqa: F401,F811  (tiny_dirs: a fixture)

FAMILY = pytest.mark.parametrize("family", FAMILIES)
# the two images of tests/test_families.py (64x48, 40x64) and the tokens they become, plus a collage size
SMALL = [(64, 48), (40, 64)]
IMAGE_TOKENS = {
    "llava": [4, 4], "llava_next": [24, 16], "llava_onevision": [5, 5], "qwen2_vl": [4, 2], "qwen2_5_vl": [4, 2],
    "qwen3_vl": [4, 2], "qwen3_5": [4, 2], "internvl": [52, 28], "gemma3": [4, 4], "gemma4": [63, 60],
    "idefics3": [20, 20], "smolvlm": [20, 20], "qwen3_vl_moe": [4, 2], "glm4v": [4, 2], "aya_vision": [52, 28],
    "paligemma2": [4, 4], "lfm2_vl": [24, 2], "mistral3": [9, 6], "llama4": [20, 20],
    "mllama": [20, 20],  # cross-attention keys (image_key_boxes): 2x2 tiles of CLS + 2x2 patches
}
gp = importlib.import_module("04_gen_pairs")


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def loaded(tiny_dirs):  # noqa: F811
    cache = {}

    def get(family):
        if family == "smolvlm":
            pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words (requirements: num2words)")
        if family not in cache:
            cache[family] = vlm.load_model(tiny_dirs(family), dtype="float32")
        return cache[family]

    return get


def emitted(model, proc, images):
    """Image-token positions in `processor(text=..., images=...)` for one prompt of these images
    (a cross-attention family: the keys its vision model gives the text, real tiles x features per tile)."""
    enc = proc(text=[proc.image_token * len(images)], images=[images], return_tensors="pt")
    if cross(model):
        return int(enc["aspect_ratio_mask"].sum()) * model.model.vision_model.num_patches
    return int((enc["input_ids"] == vlm.image_token_id(model)).sum())


def cross(model):
    return bool(gp.cross_attention_layers(model))


def visual_boxes(model, proc, images):
    """token_geometry's boxes as 04 takes them: image_token_boxes, or a cross-attention family's
    image_key_boxes (its visual tokens are its cross-attention layers' keys)."""
    if cross(model):
        return token_geometry.image_key_boxes(proc, images, model.config.vision_config.patch_size)
    return token_geometry.image_token_boxes(proc, images)


# ---- 1. counts -----------------------------------------------------------------------------
@FAMILY
def test_one_box_per_image_token_the_processor_emits(family, loaded):
    model, proc = loaded(family)
    small = [noise(*s) for s in SMALL]
    if family in NO_GEOMETRY:  # refused, so that 04 skips their grid / pip rows with this reason
        with pytest.raises(token_geometry.NoGeometry, match=f"no geometry for {type(proc).__name__}"):
            token_geometry.image_token_boxes(proc, small, vlm.image_token_id(model))
        return
    if family in CROSS_ATTENTION:  # no visual tokens in the text: refused, by name; the keys have boxes
        with pytest.raises(token_geometry.NoGeometry, match=f"no geometry for {type(proc).__name__}"):
            token_geometry.image_token_boxes(proc, small, vlm.image_token_id(model))
    boxes = visual_boxes(model, proc, small)
    assert [len(b) for b in boxes] == IMAGE_TOKENS[family]
    for images in ([*small, noise(936, 488)], [noise(936, 488)], [noise(17, 90), noise(200, 31)]):
        boxes = visual_boxes(model, proc, images)
        assert len(boxes) == len(images)
        assert sum(len(b) for b in boxes) == emitted(model, proc, images)
        for b in boxes:
            assert b.dtype == np.float64 and b.shape[1] == 4
            real = b[~np.isnan(b).any(axis=1)]
            assert len(real) and (real[:, 2] > real[:, 0]).all() and (real[:, 3] > real[:, 1]).all()


def test_key_boxes_of_a_two_tile_image_by_hand(loaded):
    """Mllama (32-px tiles, 16-px patches, 4 tiles at most): a 64x20 image fits 1x2 tiles unresized
    (the smallest canvas that needs no downscaling), padded to 64x32; per tile its CLS (the tile) then
    2x2 patches, row-major. The 2 padded tiles of max_image_tiles get no keys."""
    model, proc = loaded("mllama")
    (b,) = token_geometry.image_key_boxes(proc, [noise(64, 20)], model.config.vision_config.patch_size)
    tile = lambda x: [[x, 0, x + 32, 32], [x, 0, x + 16, 16], [x + 16, 0, x + 32, 16], [x, 16, x + 16, 32],  # noqa: E731
                      [x + 16, 16, x + 32, 32]]
    assert b.tolist() == tile(0) + tile(32)
    with pytest.raises(token_geometry.NoGeometry, match="no key geometry for LlavaProcessor"):
        token_geometry.image_key_boxes(loaded("llava")[1], [noise(8, 8)], 16)

def test_an_unknown_processor_is_refused_by_name(loaded):
    _, proc = loaded("llava")

    class MysteryProcessor:
        image_processor = proc.image_processor

    with pytest.raises(ValueError, match="MysteryProcessor"):
        token_geometry.image_token_boxes(MysteryProcessor(), [noise(8, 8)])
    odd = copy.copy(proc)
    odd.image_processor = loaded("gemma3")[1].image_processor
    with pytest.raises(ValueError, match="LlavaProcessor with Gemma3ImageProcessor"):
        token_geometry.image_token_boxes(odd, [noise(8, 8)])


def test_a_count_the_processor_does_not_emit_is_an_error_naming_it(loaded, monkeypatch):
    _, proc = loaded("qwen2_vl")
    ips, fn = token_geometry._GEOMETRY["Qwen2VLProcessor"]
    monkeypatch.setitem(token_geometry._GEOMETRY, "Qwen2VLProcessor", (ips, lambda *a: [b[1:] for b in fn(*a)]))
    with pytest.raises(ValueError, match="Qwen2VLProcessor emits"):
        token_geometry.image_token_boxes(proc, [noise(64, 48)])


# ---- 2. receptive fields -------------------------------------------------------------------
class _Stop(Exception):
    pass


def local_vision(model):
    """A deepcopy whose vision-attention blocks output zeros: each feature sees only its own patches.
    subtle: Gemma 3 initialises its projector to zeros (every feature 0): all-zero vision-side
    matrices are drawn at random here, or no token could ever change."""
    model = copy.deepcopy(model)
    inner = model.model
    lm = getattr(inner, "language_model", None) or inner.text_model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in inner.named_parameters():
            if not name.startswith(("language_model", "text_model")) and w.ndim >= 2 and not w.any():
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
    n = 0
    for name, mod in inner.named_modules():
        vision = not name.startswith(("language_model", "text_model"))
        if not vision or name.rsplit(".", 1)[-1] not in ("self_attn", "attn", "attention"):
            continue
        mod.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple)
                                  else torch.zeros_like(out))
        n += 1
    assert n, "no vision attention found"

    def grab(module, args, kwargs):  # what the LM gets: its input embeddings, or a cross-attention family's keys
        states = kwargs.get("cross_attention_states")
        raise _Stop(kwargs["inputs_embeds"] if states is None else states)

    lm.register_forward_pre_hook(grab, with_kwargs=True)
    return model


def prompt(proc, n_images):
    """The family's template around n image items (Qwen's rope index needs <|vision_start|> etc.);
    without one (PaliGemma), the processor's image tokens and the question."""
    if proc.chat_template is None:
        return proc.image_token * n_images + "What is it?"
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": "What is it?"}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def placed_features(model, proc, batch, counts=None):
    """[(n_image_tokens, D)] per prompt of `batch` (a list of image lists, one forward): what the
    model puts at image-token positions, in sequence order. counts: a cross-attention family's keys
    per image (the same images in every prompt): each image's real keys, as 04 reads them (image_keys)."""
    enc = proc(text=[prompt(proc, len(images)) for images in batch], images=batch, return_tensors="pt")
    with torch.no_grad(), pytest.raises(_Stop) as stop:
        model(**enc)
    if counts is not None:  # (B * images * tiles, per tile, D) -> (B, keys, D)
        states = stop.value.args[0].reshape(len(batch), -1, stop.value.args[0].shape[-1])
        keys = gp.image_keys(states.shape[1], [counts] * len(batch))
        return [torch.cat([s[p] for p in pos]) for s, pos in zip(states, keys)]
    mask = enc["input_ids"] == vlm.image_token_id(model)
    return [e[m] for e, m in zip(stop.value.args[0], mask)]


def overlap(boxes, block):
    """(n, 2) overlap widths of each box with block (x0, y0, x1, y1) along x and y (negative: a gap)."""
    x0, y0, x1, y1 = block
    return np.stack([np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0),
                     np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0)], axis=1)


def blocks(w, h, n=3):
    xs, ys = np.linspace(0, w, n + 1).round().astype(int), np.linspace(0, h, n + 1).round().astype(int)
    return [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(n) for j in range(n)]


MARGIN = 2.0  # original pixels: nearest sampling rounds by < 1, Idefics3's two resizes by < 1 more


def invert(im, block):
    x0, y0, x1, y1 = block
    px = np.array(im)
    px[y0:y1, x0:x1] = 255 - px[y0:y1, x0:x1]
    return Image.fromarray(px)


def check_receptive_fields(model, proc, sizes):
    """Invert block k of every image at once, for each of a 3x3 grid of blocks (one batch); a token
    must change when its (in-image) box shares at least half of its or the block's width and height
    with the block, and must not change when its box grown by MARGIN misses the block."""
    images = [noise(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    boxes = visual_boxes(model, proc, images)
    counts = [len(b) for b in boxes] if cross(model) else None
    splits = np.cumsum([len(b) for b in boxes])[:-1]
    grids = [blocks(w, h) for w, h in sizes]  # grids[i][k]: block k of image i
    base, *bent = placed_features(model, proc, [images] + [[invert(im, g[k]) for im, g in zip(images, grids)]
                                                           for k in range(len(grids[0]))], counts)
    assert len(base) == sum(len(b) for b in boxes)
    tol = 1e-4 * float(base.abs().max())
    tested = [np.zeros(len(b), bool) for b in boxes]
    for k, feats in enumerate(bent):
        changed = np.split(((feats - base).abs().amax(dim=1) > tol).numpy(), splits)
        for i, (b, (w, h)) in enumerate(zip(boxes, sizes)):
            block = grids[i][k]
            nan = np.isnan(b).any(axis=1) | _through_attention(model, b)
            assert not changed[i][nan].any(), f"image {i}, block {block}: a no-pixel (newline) token changed"
            inside = np.clip(np.nan_to_num(b), 0, [w, h, w, h])  # the part of each box in the image
            size = np.stack([inside[:, 2] - inside[:, 0], inside[:, 3] - inside[:, 1]], axis=1)
            bw = np.array([block[2] - block[0], block[3] - block[1]])
            must = ~nan & (size >= 2).all(axis=1) & (overlap(inside, block) >= np.minimum(size, bw) / 2).all(axis=1)
            grown = np.nan_to_num(b) + [-MARGIN, -MARGIN, MARGIN, MARGIN]
            never = nan | (overlap(grown, block) <= 0).any(axis=1)
            assert changed[i][must].all(), (f"image {i} {sizes[i]}, block {block}: tokens "
                                            f"{np.flatnonzero(must & ~changed[i]).tolist()} see it but did not change")
            assert not changed[i][never].any(), (f"image {i} {sizes[i]}, block {block}: tokens "
                                                 f"{np.flatnonzero(never & changed[i]).tolist()} changed, boxes "
                                                 f"{b[never & changed[i]][:3].round(1).tolist()} miss it")
            tested[i] |= must
    for i, b in enumerate(boxes):
        inside = np.clip(np.nan_to_num(b), 0, [sizes[i][0], sizes[i][1]] * 2)
        seen = (inside[:, 2] - inside[:, 0] >= 2) & (inside[:, 3] - inside[:, 1] >= 2) & ~_through_attention(model, b)
        assert tested[i][seen].all(), f"image {i}: tokens {np.flatnonzero(seen & ~tested[i]).tolist()} never tested"


def _through_attention(model, boxes):
    """Rows that see their box through vision attention alone, which local_vision zeroes (so they never
    change here): a cross-attention family's per-tile CLS features, the first of each tile's keys."""
    if not cross(model):
        return np.zeros(len(boxes), bool)
    return np.arange(len(boxes)) % model.model.vision_model.num_patches == 0


@FAMILY
def test_a_token_changes_iff_its_box_meets_the_changed_pixels(family, loaded):
    if family in NO_GEOMETRY:
        pytest.skip(f"{family}: no geometry to check (test_one_box_per_image_token_the_processor_emits: refused)")
    model, proc = loaded(family)
    model, proc = local_vision(model), copy.deepcopy(proc)
    proc.image_processor.resample = 0  # NEAREST
    check_receptive_fields(model, proc, [(64, 48), (40, 64), (96, 37)])  # several images (OneVision: base views)
    check_receptive_fields(model, proc, [(190, 100)])  # an image alone (OneVision: anyres tiles, grid shrunk 1.5x)


@pytest.mark.parametrize("hw, crop", [((5, 7), (8, 10)), ((12, 11), (4, 4)), ((5, 12), (8, 9))])
def test_centre_crop_lands_each_pixel_where_the_image_processors_own_crop_does(hw, crop, loaded):
    """_center_crop against the lane's CLIP image processor's own center_crop (PIL: numpy; torchvision:
    tensors), on an image whose pixels are their own indices: a side too small by an odd count is
    padded ceil on top / left by PIL, floor by torchvision, and the view must say which."""
    ip = loaded("llava")[1].image_processor
    from transformers.image_utils import SizeDict

    h, w = hw
    index = np.arange(1, h * w + 1, dtype=np.float32).reshape(1, h, w)
    pixels = torch.from_numpy(index) if getattr(ip, "backend", None) == "torchvision" else index
    out = np.asarray(ip.center_crop(pixels, size=SizeDict(height=crop[0], width=crop[1])))[0]
    view = token_geometry._center_crop(ip, token_geometry._View(h, w), {"height": crop[0], "width": crop[1]})
    assert out.shape == (view.h, view.w) == crop
    rows, cols = np.nonzero(out)
    r, c = np.divmod(out[rows, cols].astype(int) - 1, w)  # the original pixel at each kept position
    np.testing.assert_array_equal(rows, r + view.oy)
    np.testing.assert_array_equal(cols, c + view.ox)


# ---- 3. hand-worked cases and 04's geometry ----------------------------------------------------
def test_llava15_clip_resize_and_centre_crop_of_a_936x488_collage(loaded):
    """CLIP as in llava-1.5: shortest edge 336, centre crop 336, 14-px patches, CLS dropped.
    936x488 -> resized int(336 * 936 / 488) = 644 x 336 (sx = 644/936 = 0.68803, sy = 336/488 = 0.68852),
    crop left (644 - 336) // 2 = 154, top 0 -> 24 x 24 = 576 tokens.
    token 0: x 154/sx = 223.83 .. 168/sx = 244.17, y 0 .. 14/sy = 20.33;
    token 575: x 476/sx = 691.83 .. 490/sx = 712.17, y 322/sy = 467.67 .. 488."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    _, tiny = loaded("llava")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(ip, tiny.tokenizer, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=tiny.chat_template)
    (b,) = token_geometry.image_token_boxes(proc, [noise(936, 488)])
    assert b.shape == (576, 4)
    np.testing.assert_allclose(b[0], [223.83, 0, 244.17, 20.33], atol=0.01)
    np.testing.assert_allclose(b[575], [691.83, 467.67, 712.17, 488], atol=0.01)
    np.testing.assert_allclose(b[1, 0], b[0, 2])  # row-major: token 1 is right of token 0


# ---- an independent reference: the LLaVA-only affine map 04_gen_pairs used before image_token_boxes ----
def _affine_geometry(processor):
    """The CLIP/LLaVA image processor's pad / resize / crop as `geom`, and the patch size."""
    ip = processor.image_processor
    get = lambda d, k: (d.get(k) if isinstance(d, dict) else getattr(d, k, None)) if d is not None else None  # noqa: E731
    size = ip.size
    resize = ("short", int(get(size, "shortest_edge"))) if get(size, "shortest_edge") else \
        ("hw", int(get(size, "height")), int(get(size, "width")))
    crop = getattr(ip, "crop_size", None)
    crop = (int(get(crop, "height")), int(get(crop, "width"))) if getattr(ip, "do_center_crop", False) and crop else None
    return {"pad": bool(getattr(ip, "do_pad", False)), "resize": resize, "crop": crop}, int(processor.patch_size)


def _affine_token_affine(image_size, geom, patch):
    """Original pixel (x, y) -> processed pixel (x * sx + ox, y * sy + oy), and the token grid.

    geom: {"pad": bool, "resize": ("hw", H, W) | ("short", S) | None, "crop": (h, w) | None}, the
    CLIP/LLaVA image processors' pad-to-square (centred), resize, centre crop, in that order.
    returns ((sx, sy, ox, oy), (grid_h, grid_w)).
    toy (squash 64x64, patch 8), 936x488 collage -> ((0.0684, 0.1311, 0, 0), (8, 8))
    llava-1.5 (short 336, crop 336, patch 14), 936x488 -> resized 644x336, crop left 154:
        ((0.688, 0.688, -154, 0), (24, 24))
    """
    W, H = image_size
    ox = oy = 0.0
    if geom["pad"] and W != H:
        M = max(W, H)
        ox, oy, W, H = (M - W) // 2, (M - H) // 2, M, M
    kind = geom["resize"]
    if kind is None:
        nw, nh = W, H
    elif kind[0] == "hw":
        nh, nw = kind[1], kind[2]
    else:  # shortest edge -> S, long edge int(S * long / short), as transformers computes it
        s = kind[1]
        nw, nh = (s, int(s * H / W)) if W <= H else (int(s * W / H), s)
    sx, sy = nw / W, nh / H
    ox, oy = ox * sx, oy * sy
    if geom["crop"] is not None:
        ch, cw = geom["crop"]
        top = (nh - ch) // 2 if nh >= ch else -math.ceil((ch - nh) / 2)
        left = (nw - cw) // 2 if nw >= cw else -math.ceil((cw - nw) / 2)
        ox, oy, nw, nh = ox - left, oy - top, cw, ch
    return (sx, sy, ox, oy), (nh // patch, nw // patch)


def _affine_box_weights(box, image_size, geom, patch):
    """Pixel box of the original image -> (grid_h, grid_w) share of each token's patch inside it.
    toy: the 1x2 collage's left cell (0, 40, 448, 488) of 936x488 -> columns 1, 1, 1, 0.83, 0, ...;
    rows 0.34 (the label strip), then 1."""
    (sx, sy, ox, oy), (gh, gw) = _affine_token_affine(image_size, geom, patch)
    x0, y0, x1, y1 = box

    def cover(a, b, n):  # (n,) overlap of [a, b) with each patch [k p, (k+1) p), as a fraction of p
        k = np.arange(n) * patch
        return np.clip(np.minimum(b, k + patch) - np.maximum(a, k), 0, patch) / patch

    return np.outer(cover(y0 * sy + oy, y1 * sy + oy, gh), cover(x0 * sx + ox, x1 * sx + ox, gw))


def affine_boxes(proc, size):
    """The affine map's token grid as (n, 4) boxes, row-major."""
    geom, patch = _affine_geometry(proc)
    (sx, sy, ox, oy), (gh, gw) = _affine_token_affine(size, geom, patch)
    r, c = np.divmod(np.arange(gh * gw), gw)
    return np.stack([(c * patch - ox) / sx, (r * patch - oy) / sy, ((c + 1) * patch - ox) / sx,
                     ((r + 1) * patch - oy) / sy], axis=1)


@pytest.mark.parametrize("which", ["llava", "toy"])
def test_the_same_boxes_and_weights_as_the_affine_map(which, loaded):
    gp = importlib.import_module("04_gen_pairs")
    toy = Path(common.__file__).parent / "checkpoints" / "toy-llava"
    proc = loaded("llava")[1] if which == "llava" else vlm.load_processor(toy)
    sizes = [(936, 488), (64, 64)]
    boxes = token_geometry.image_token_boxes(proc, [noise(*s) for s in sizes])
    for b, size in zip(boxes, sizes):
        np.testing.assert_allclose(b, affine_boxes(proc, size), atol=1e-9)
    # a token's share inside a pixel box: 04's box_weights on the boxes == the affine map's cover
    geom, patch = _affine_geometry(proc)
    want = _affine_box_weights((0, 40, 448, 488), sizes[0], geom, patch).reshape(-1)
    np.testing.assert_allclose(gp.box_weights(boxes[0], (0, 40, 448, 488)), want, atol=1e-9)
