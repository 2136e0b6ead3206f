"""
tests/tiny_families.py — tiny random-weight checkpoints of the VLM families people align, built offline.

  from tiny_families import FAMILIES, build
  out = build("qwen2_5_vl", tmp / "qwen2_5_vl")   # a save_pretrained folder: model + processor
  model, processor = vlm.load_model(out)        # loads offline, as the family's real classes
  python tests/tiny_families.py /tmp/tiny [family ...]   # build from the command line
  def test_x(tiny_dirs): d = tiny_dirs("gemma3")   # pytest fixture: one cached build per family and session

Each checkpoint has the family's REAL model class, processor class and image-processor class
(transformers 5.23), the processor settings and chat template of one released checkpoint
(Family.release), a BPE tokenizer trained here in a fraction of a second with that checkpoint's
tokenizer class and special tokens in the release's order (so token ids are small and differ
from the release), and random weights: hidden 32, 2 layers, 32-64 px base views of 4 visual
tokens each (Gemma 4: about 60-70 per image, the least its processor allows), so a family builds
in a fraction of a second once transformers is imported. What is kept from the release is what
decides WHERE image tokens go and HOW the model attends to them: placeholder strings and their
wrappers, tiling / anyres / merging / pooling mechanics, M-RoPE, sliding-window and
bidirectional-image attention, end-of-turn tokens. Sizes are scaled down; the ratios (merge 2x2,
pool to 2x2, pixel shuffle 2x2, anyres grids in base-size steps) are the release's.

The chat templates at the bottom are facts (the released templates, reproduced); each names
its source. The video processor of a family that has one is written into processor_config.json
(so torchvision users get it) but not built here: see vlm.load_processor. Llama 4's and LFM2-VL's image
processors exist only as torchvision classes in transformers 5.23 (no PIL twin): their settings are
written the same way, so without torchvision those two families' processors do not load. Mistral 3's
does: PixtralProcessor is marked as requiring torchvision, but its image processor has a PIL class, and
vlm.load_processor builds the real processor from its parts.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Family:
    name: str
    release: str  # the checkpoint whose layout, processor settings and template are mirrored
    model_class: str
    processor_class: str
    image_processor_class: str  # the PIL class this CPU machine gets (the torchvision twin drops "Pil")
    make: object = field(repr=False, compare=False)  # () -> _Parts, under build()'s torch seed


@dataclass
class _Parts:
    model: object
    tokenizer: object
    image_processor: object
    template: str | None  # None: the release has no chat template (no chat_template.jinja is written)
    settings: dict  # the processor's own keyword settings, as its processor_config.json holds them
    eos: list  # tokens generation stops at (generation_config.json eos_token_id)
    video: dict | None = None  # the video processor's config (built only where torchvision imports)
    feature_extractor: object = None
    # {attribute: tokenizer} a processor loads from the subfolder of that name (InstructBLIP's qformer_tokenizer)
    sub_tokenizers: dict | None = None


class _SavedSettings(dict):
    """An image processor's saved settings, where its class needs torchvision to be built at all
    (Llama 4's has no PIL twin in transformers 5.23): build() writes them as to_dict() would."""

    def to_dict(self):
        return dict(self)


# ---------------------------------------------------------------------------------------------
# tokenizers: the family's tokenizer class, vocabulary trained here
# ---------------------------------------------------------------------------------------------
_CORPUS = [
    "Image1: a red circle on a blue background.", "Image2: a green square on a white background.",
    "In Image2, what color is the shape?", "In Image1, what color is the background?",
    "The answer is yellow. It is purple, orange, gray, black or brown.",
    "Describe the picture in one word. Yes, no, maybe.", "You are a helpful assistant.",
    "What is shown in this image? There is a cat and a dog.", "0 1 2 3 4 5 6 7 8 9 10 100",
    "user assistant system model Assistant User: ASSISTANT: USER:", "Frame from 00:01: Picture 1: Video 1:",
    "user\nImage1:\nImage2:\n\nIn Image1, what is it?\n\n", "model\nblue\n", "assistant\nred\n\n", "\n\n\n",
]


def _train_bpe(cls, specials, size=420, byte_level=True, byte_fallback=False, **kw):
    """(vocab, merges) trained on _CORPUS with `cls`'s own normalizer and pre-tokenizer.
    byte_fallback: add the <0x00>..<0xFF> pieces a SentencePiece-style BPE falls back to."""
    from tokenizers import Regex, pre_tokenizers, trainers

    backend = cls(**kw)._tokenizer  # an empty tokenizer of the right kind
    if byte_fallback:  # SentencePiece pieces never span a word or a line break: train on words, as it does
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)])
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(specials), initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(_CORPUS * 4, trainer)
    bpe = json.loads(backend.to_str())["model"]
    vocab = dict(bpe["vocab"])
    if byte_fallback:
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    # a blank line is one token in every released vocabulary ("ĊĊ" = 271 in Qwen's): where a prompt
    # ends in "\n" and the answer starts with one, the split at the boundary then differs, as it does
    # for the real tokenizer
    nl = "\u010a" if byte_level else "\n"
    for a, b in ((nl, nl), (nl * 2, nl)):
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    return vocab, merges


def _tokenizer(cls, base, added=(), named=None, byte_level=True, byte_fallback=False, **kw):
    """A `cls` tokenizer: `base` special tokens first (ids 0..), then `added` special tokens in
    the release's order, `named` ones also as attributes (tokenizer.image_token, ...)."""
    vocab, merges = _train_bpe(cls, base, byte_level=byte_level, byte_fallback=byte_fallback)
    if named:  # v5 names model-specific tokens this way: tokenizer.image_token etc., saved in tokenizer_config
        kw["extra_special_tokens"] = dict(named)
    tok = cls(vocab=vocab, merges=merges, **kw)
    new = [t for t in list(added) + list((named or {}).values()) if t not in tok.get_vocab()]
    tok.add_special_tokens({"extra_special_tokens": list(dict.fromkeys(new))}, replace_extra_special_tokens=False)
    return tok


def _qwen_tokens():
    return ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen2_tokenizer(extra=(), named=None, cls_name="Qwen2Tokenizer", vl=True):
    """Qwen's tokenizer: <|endoftext|>, then the chat (and with `vl`, the Qwen-VL) tokens, then `extra`.
    vl=False is the text-only Qwen2 list that LLaVA-OneVision extends with <image> and <video>."""
    import transformers

    cls = getattr(transformers, cls_name)
    added = _qwen_tokens() if vl else _qwen_tokens()[:2]
    return _tokenizer(cls, ["<|endoftext|>"], added + list(extra), named,
                      eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)


def _llama_tokenizer(added=(), named=None, **kw):
    from transformers import LlamaTokenizer

    return _tokenizer(LlamaTokenizer, ["<unk>", "<s>", "</s>"], added, named, byte_level=False, byte_fallback=True,
                      add_bos_token=True, **kw)


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# ---------------------------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------------------------
H, L = 32, 2  # hidden width and layer count of every tower


def _text_kw(tok, **kw):
    base = dict(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    base.update(kw)
    return base


def _siglip(image_size, patch_size):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size)


def _clip(image_size, patch_size):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=H)


def _llava():
    """llava-hf/llava-1.5-7b-hf: CLIP-L/336 (patch 14 -> 576 tokens) here 32 px / patch 16 -> 4."""
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = _llama_tokenizer(["<image>", "<pad>"], {"image_token": "<image>"}, pad_token="<pad>")
    text = LlamaConfig(**_text_kw(tok, pad_token_id=tok.pad_token_id))
    cfg = LlavaConfig(vision_config=_clip(32, 16), text_config=text,
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                               resample=3)
    settings = dict(patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                    image_token="<image>")
    return _Parts(LlavaForConditionalGeneration(cfg), tok, ip, LLAVA15_TEMPLATE, settings, ["</s>"])


def _llava_next():
    """llava-hf/llava-v1.6-mistral-7b-hf: anyres over 336-px tiles, here 32-px tiles."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              MistralConfig)

    tok = _llama_tokenizer(["<image>", "<pad>"], {"image_token": "<image>"}, pad_token="<pad>")
    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # the release's, in units of 336 -> 32
    text = MistralConfig(**_text_kw(tok, pad_token_id=tok.pad_token_id, sliding_window=None))
    cfg = LlavaNextConfig(vision_config=_clip(32, 16), text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=4)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints, do_center_crop=True, do_pad=True, resample=3)
    settings = dict(patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                    image_token="<image>")
    return _Parts(LlavaNextForConditionalGeneration(cfg), tok, ip, LLAVA_NEXT_MISTRAL_TEMPLATE, settings, ["</s>"])


def _llava_onevision():
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP 384/14 (729 tokens) + anyres_max_9 on a
    6x6 grid of 384-px tiles; here 32 px / patch 16 (4 tokens), the same 6x6 grid of 32-px tiles."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, Qwen2Config)

    tok = _qwen2_tokenizer(["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"}, vl=False)
    pinpoints = [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]
    cfg = LlavaOnevisionConfig(vision_config=_siglip(32, 16), text_config=Qwen2Config(**_text_kw(tok)),
                               image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                               image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True, resample=3)
    settings = dict(num_image_tokens=4, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                    image_token="<image>", video_token="<video>")
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32},
             "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}
    return _Parts(LlavaOnevisionForConditionalGeneration(cfg), tok, ip, ONEVISION_TEMPLATE, settings,
                  ["<|im_end|>"], video)


def _qwen_image_processor(patch, max_tokens=8):
    """Qwen's smart_resize: sides rounded to patch*merge, area within [min, max]_pixels; here at
    most `max_tokens` merged tokens per image (the releases allow up to 16384 / 1280)."""
    from transformers import Qwen2VLImageProcessorPil

    unit = (patch * 2) ** 2
    mean = [0.5] * 3 if patch == 16 else None
    kw = dict(image_mean=mean, image_std=mean) if mean else {}
    return Qwen2VLImageProcessorPil(size={"shortest_edge": unit, "longest_edge": unit * max_tokens},
                                    patch_size=patch, merge_size=2, temporal_patch_size=2, **kw)


def _qwen_video(processor_type, ip):
    return {"video_processor_type": processor_type, "patch_size": ip.patch_size, "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size, "size": dict(ip.size),
            "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}


def _qwen_ids(tok):
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def _qwen_text(tok, **kw):
    # head_dim 8 -> 4 rotary frequencies split over (t, h, w) like the release's [16, 24, 24] of 64
    return _text_kw(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1], **kw},
                    bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                    pad_token_id=tok.pad_token_id)


def _qwen2_vl():
    """Qwen/Qwen2-VL-2B-Instruct: ViT patch 14, 2x2 merge, M-RoPE, dynamic resolution."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = _qwen2_tokenizer()
    vision = dict(depth=L, embed_dim=H, hidden_size=H, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    ip = _qwen_image_processor(14)
    return _Parts(Qwen2VLForConditionalGeneration(cfg), tok, ip, QWEN2_VL_TEMPLATE, {},
                  ["<|im_end|>", "<|endoftext|>"], _qwen_video("Qwen2VLVideoProcessor", ip))


def _qwen2_5_vl():
    """Qwen/Qwen2.5-VL-3B-Instruct: Qwen2-VL plus window attention in the ViT (112 px windows,
    full attention in blocks 7/15/23/31), here a 56-px window and full attention in the last block."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen2_tokenizer()
    vision = dict(depth=L, hidden_size=H, intermediate_size=2 * H, num_heads=2, out_hidden_size=H, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[L - 1],
                  tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    ip = _qwen_image_processor(14)
    return _Parts(Qwen2_5_VLForConditionalGeneration(cfg), tok, ip, QWEN2_VL_TEMPLATE, {},
                  ["<|im_end|>", "<|endoftext|>"], _qwen_video("Qwen2VLVideoProcessor", ip))


def _qwen3_vl():
    """Qwen/Qwen3-VL-8B-Instruct: ViT patch 16, 2x2 merge, interleaved M-RoPE, DeepStack (ViT
    layers 8/16/24 added to the first LM layers), here ViT layer 0 into LM layer 0."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = _qwen2_tokenizer()
    vision = dict(depth=L, hidden_size=H, intermediate_size=2 * H, num_heads=2, out_hidden_size=H, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    text = _qwen_text(tok, mrope_interleaved=True)
    text.update(head_dim=8)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    ip = _qwen_image_processor(16)
    return _Parts(Qwen3VLForConditionalGeneration(cfg), tok, ip, QWEN3_VL_TEMPLATE, {},
                  ["<|im_end|>", "<|endoftext|>"], _qwen_video("Qwen3VLVideoProcessor", ip))


def _qwen3_5():
    """Qwen/Qwen3.5-27B layout (Qwen3_5ForConditionalGeneration): Qwen3-VL's ViT without
    DeepStack, a hybrid LM of Gated-DeltaNet (linear attention) and gated full-attention layers
    (3:1 in the release, 1:1 here), thinking chat template."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tok = _qwen2_tokenizer(["<think>", "</think>"], cls_name="Qwen3_5Tokenizer")
    vision = dict(depth=L, hidden_size=H, intermediate_size=2 * H, num_heads=2, out_hidden_size=H, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    text = _qwen_text(tok, mrope_interleaved=True, partial_rotary_factor=0.25)
    text.update(head_dim=16, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, **_qwen_ids(tok))
    ip = _qwen_image_processor(16)
    return _Parts(Qwen3_5ForConditionalGeneration(cfg), tok, ip, QWEN3_5_TEMPLATE, {},
                  ["<|im_end|>", "<|endoftext|>"], _qwen_video("Qwen3VLVideoProcessor", ip))


def _internvl():
    """OpenGVLab/InternVL3-1B-hf: InternViT 448/14 + pixel shuffle 0.5 (256 tokens per tile),
    up to 12 aspect-ratio tiles + a thumbnail; here 32 px / patch 8 -> 4 tokens per tile."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _qwen2_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                            "</box>"], named)
    vision = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=2 * H,
                  image_size=[32, 32], patch_size=[8, 8])
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text_kw(tok)),
                         image_token_id=tok.context_image_token_id, image_seq_length=4, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False, min_patches=1,
                                  max_patches=12, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    video = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": 32, "width": 32},
             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    return _Parts(InternVLForConditionalGeneration(cfg), tok, ip, INTERNVL_TEMPLATE, {"image_seq_length": 4},
                  ["<|im_end|>"], video)


def _gemma_tokenizer(added, named, add_bos):
    from transformers import GemmaTokenizer

    return _tokenizer(GemmaTokenizer, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], added, named, byte_level=False,
                      byte_fallback=True, add_bos_token=add_bos)


def _gemma3():
    """google/gemma-3-4b-it: SigLIP 896/14 (64x64 patches) average-pooled 4x4 -> 256 tokens; LM
    with 5 sliding-window (1024) layers per global one and bidirectional attention inside images.
    Here 32 px / patch 4 (8x8 patches) pooled 4x4 -> 4 tokens; window 16, 1:1."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3TextConfig

    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = _gemma_tokenizer(["<start_of_turn>", "<end_of_turn>"], named, add_bos=True)
    text = Gemma3TextConfig(**_text_kw(tok, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                       sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                       pad_token_id=tok.pad_token_id, eos_token_id=_ids(tok, "<eos>", "<end_of_turn>"),
                                       bos_token_id=tok.bos_token_id))
    cfg = Gemma3Config(text_config=text, vision_config=_siglip(32, 4), mm_tokens_per_image=4,
                       boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                       image_token_index=tok.image_token_id)
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 resample=2, do_pan_and_scan=None)
    return _Parts(Gemma3ForConditionalGeneration(cfg), tok, ip, GEMMA3_TEMPLATE, {"image_seq_length": 4},
                  ["<eos>", "<end_of_turn>"])


def _gemma4():
    """google/gemma-4-31B-it layout (no audio tower): variable-resolution ViT (patch 16, pooled
    3x3; every image resized to fill a budget of 280 soft tokens, 70 the smallest the processor
    accepts), LM with sliding-window and global layers and bidirectional attention over vision
    tokens. Here patch 8, pooled 3x3, 70 soft tokens per image: the one family above 4 per view."""
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ForConditionalGeneration,
                              Gemma4ImageProcessorPil, Gemma4TextConfig, Gemma4VisionConfig)

    named = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
             "boa_token": "<|audio>", "eoa_token": "<audio|>", "sot_token": "<|turn>", "eot_token": "<turn|>",
             "soc_token": "<|channel>", "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": '<|"|>',
             "str_token": "<|tool_response>", "etr_token": "<tool_response|>", "stc_token": "<|tool_call>",
             "etc_token": "<tool_call|>", "std_token": "<|tool>", "etd_token": "<tool|>"}
    tok = _gemma_tokenizer(["<|video|>"], named, add_bos=False)
    text = Gemma4TextConfig(**_text_kw(tok, num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention"],
                                       hidden_size_per_layer_input=0, use_bidirectional_attention="vision",
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                       eos_token_id=_ids(tok, "<eos>", "<turn|>"),
                                       final_logit_softcapping=30.0))
    vision = Gemma4VisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=3,
                                position_embedding_size=256)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=tok.image_token_id,
                       boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
                       video_token_id=tok.convert_tokens_to_ids("<|video|>"), audio_token_id=tok.audio_token_id,
                       boa_token_id=tok.boa_token_id, eoa_token_index=tok.eoa_token_id)
    ip = Gemma4ImageProcessorPil(patch_size=8, max_soft_tokens=70, pooling_kernel_size=3, do_normalize=False)
    video = {"video_processor_type": "Gemma4VideoProcessor", "patch_size": 8, "max_soft_tokens": 70,
             "pooling_kernel_size": 3, "do_normalize": False}
    return _Parts(Gemma4ForConditionalGeneration(cfg), tok, ip, GEMMA4_TEMPLATE, {"image_seq_length": 70},
                  ["<eos>", "<turn|>", "<|tool_response>"], video, Gemma4AudioFeatureExtractor())


def _idefics_tokens():
    return ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _idefics3():
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP 364/14 + pixel shuffle 2x2 -> 169 tokens per
    tile, the image resized to <= 4x364 and cut into 364-px tiles plus a global view, each tile
    framed by <fake_token_around_image><row_i_col_j>. Here 32-px tiles, 4 tokens each, <= 64 px."""
    from tokenizers import processors
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, LlamaConfig,
                              PreTrainedTokenizerFast, Qwen2Tokenizer)

    # Llama 3's tokenizer: byte-level BPE after a regex split (Qwen2's is the same but for digit runs),
    # saved as a plain PreTrainedTokenizerFast whose post-processor writes <|begin_of_text|>
    vocab, merges = _train_bpe(Qwen2Tokenizer, ["<|begin_of_text|>", "<|end_of_text|>"])
    backend = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)._tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>")
    tok.add_special_tokens({"extra_special_tokens": _idefics_tokens()}, replace_extra_special_tokens=False)
    vision = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_text_kw(tok, pad_token_id=tok.pad_token_id)),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _Parts(Idefics3ForConditionalGeneration(cfg), tok, ip, IDEFICS3_TEMPLATE, {"image_seq_len": 4},
                  ["<end_of_utterance>", "<|end_of_text|>"])


def _smolvlm():
    """HuggingFaceTB/SmolVLM2-2.2B-Instruct: Idefics3's tiling (384-px tiles, 81 tokens each after
    a 3x3 pixel shuffle) on a SmolLM2 LM. Here 32-px tiles, pixel shuffle 2x2 -> 4 tokens."""
    from transformers import GPT2Tokenizer, LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers import SmolVLMImageProcessorPil

    tok = _tokenizer(GPT2Tokenizer, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], _idefics_tokens(),
                     bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                     unk_token="<|endoftext|>")
    vision = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = SmolVLMConfig(vision_config=vision, text_config=LlamaConfig(**_text_kw(tok, pad_token_id=tok.pad_token_id)),
                        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video = {"video_processor_type": "SmolVLMVideoProcessor", "size": {"longest_edge": 32},
             "max_image_size": {"longest_edge": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "fps": 1, "num_frames": 64, "do_sample_frames": True}
    return _Parts(SmolVLMForConditionalGeneration(cfg), tok, ip, SMOLVLM_TEMPLATE, {"image_seq_len": 4},
                  ["<end_of_utterance>"], video)


# Mistral's Tekken split (tekken.json "pattern"; transformers' integrations/mistral keeps it, and
# tokenization_utils_tokenizers._patch_mistral_regex restores it where an old tokenizer.json lost it)
_TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                   r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+")
# Tekken's 20 control tokens, ids 0..19 (mistral_common's frozen list; [IMG] = 10, [IMG_BREAK] = 12, [IMG_END] = 13)
_TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]


def _byte_level_fast(specials, pattern, bos, **kw):
    """A plain TokenizersBackend (PreTrainedTokenizerFast) over a byte-level BPE after the regex
    split `pattern`, `bos` written first by its post-processor: how transformers converts a
    tiktoken-style vocabulary (Mistral's Tekken, Llama 4's o200k). `specials` get ids 0.. and
    are registered as special tokens."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    vocab, merges = _train_bpe(Qwen2Tokenizer, specials)
    backend = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)._tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, vocab[bos])])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, **kw)
    tok.add_special_tokens({"extra_special_tokens": [t for t in specials if t not in tok.all_special_tokens]},
                           replace_extra_special_tokens=False)
    return tok


def _mistral3():
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral ViT (patch 14, 2D RoPE, images up to
    1540 px on the longest edge, sides rounded up to 28 px), a 2x2 patch merger, so one [IMG] per
    28x28 px, a row of them ended by [IMG_BREAK], the last by [IMG_END]. Here patch 8, merge 2
    (16 px per token), at most 48 px: a 64x48 image is 3x3 [IMG], a 40x64 one 2 wide, 3 high."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig,
                              PixtralImageProcessorPil, PixtralVisionConfig)

    tok = _byte_level_fast(_TEKKEN_SPECIALS, _TEKKEN_PATTERN, "<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>")
    text = MistralConfig(**_text_kw(tok, head_dim=8, sliding_window=None, pad_token_id=tok.pad_token_id,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e9}))
    vision = PixtralVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2,
                                 head_dim=16, image_size=48, patch_size=8,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                         spatial_merge_size=2, projector_hidden_act="gelu", vision_feature_layer=-1,
                         multimodal_projector_bias=False, tie_word_embeddings=False)
    ip = PixtralImageProcessorPil(size={"longest_edge": 48}, patch_size=8, resample=3,
                                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711])
    settings = dict(patch_size=8, spatial_merge_size=2, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                    image_end_token="[IMG_END]")
    return _Parts(Mistral3ForConditionalGeneration(cfg), tok, ip, MISTRAL3_TEMPLATE, settings, ["</s>"])


def _aya_vision():
    """CohereForAI/aya-vision-8b: SigLIP2 364/14 + pixel shuffle 2x2 (169 tokens per tile), GotOcr2
    tiling (up to 12 tiles of 364 px + a global view), each tile's <|IMG_PATCH|> run after
    TILE_k, the global view's after TILE_GLOBAL, all between <|START_OF_IMG|> ... <|END_OF_IMG|>;
    Command R7B LM (Cohere2: 3 sliding-window layers per global one). Here 32 px / patch 8, pixel
    shuffle 2x2 -> 4 tokens per tile, window 16, 1:1."""
    from transformers import (AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config, CohereTokenizer,
                              GotOcr2ImageProcessorPil)

    turn = ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
            "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>"]
    image = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<|IMG_PATCH|>"]
    tok = _tokenizer(CohereTokenizer, ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>",
                                       "<EOS_TOKEN>", "<EOP_TOKEN>"], turn + image,
                     eos_token="<|END_OF_TURN_TOKEN|>", add_bos_token=True)  # Cohere tokenizer_configs: add_bos_token true
    text = Cohere2Config(**_text_kw(tok, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id))
    vision = _siglip(32, 8)
    vision.vision_use_head = False
    cfg = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                          image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), vision_feature_layer=-1,
                          vision_feature_select_strategy="full", adapter_layer_norm_eps=1e-6)
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False, min_patches=1,
                                  max_patches=12, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    # the release's processor_config.json (patch_size 28 = ViT patch 14 x pixel shuffle 2), scaled
    settings = dict(patch_size=16, img_size=32, image_token="<image>", start_of_img_token="<|START_OF_IMG|>",
                    end_of_img_token="<|END_OF_IMG|>", img_patch_token="<|IMG_PATCH|>",
                    img_line_break_token="<|IMG_LINE_BREAK|>", tile_token="TILE", tile_global_token="TILE_GLOBAL",
                    vision_feature_select_strategy="full")
    return _Parts(AyaVisionForConditionalGeneration(cfg), tok, ip, AYA_VISION_TEMPLATE, settings,
                  ["<|END_OF_TURN_TOKEN|>"])


# Llama 4's split regex (o200k), as transformers' models/llama4/convert_llama4_weights_to_hf.py writes it
_O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                  r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama4():
    """meta-llama/Llama-4-Scout-17B-16E-Instruct: ViT 336/14 + pixel shuffle 0.5 (144 tokens per
    tile), the image fitted to a canvas of up to 16 tiles of 336 px (no upscaling past it) and,
    with more than one tile, a global view; each tile's <|patch|> run followed by
    <|tile_x_separator|> within a row and <|tile_y_separator|> after it, the global view's after
    <|image|>, all between <|image_start|> ... <|image_end|>. The text holds one <|image|> per
    image, the model fills <|patch|>. LM: MoE in every layer (16 experts, top 1, plus a shared
    expert), chunked attention (8192) in RoPE layers, every 4th layer NoPE. Here 32-px tiles /
    patch 8 -> 4 tokens per tile, 4 experts, chunks of 16, the 2nd layer NoPE."""
    from transformers import (Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig,
                              Llama4VisionConfig)

    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    # the converter's LLAMA4_TEXT_POST_TRAIN / LLAMA4_VISION special tokens in order, reserved ones left out
    text_tokens = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", "<|python_start|>",
                   "<|python_end|>", "<|finetune_right_pad|>"]
    vision_tokens = ["<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|image|>",
                     "<|patch|>"]
    tok = _byte_level_fast(basic + text_tokens + vision_tokens, _O200K_PATTERN, "<|begin_of_text|>",
                           eos_token="<|eot|>", pad_token="<|finetune_right_pad|>")
    text = Llama4TextConfig(**_text_kw(tok, head_dim=8, intermediate_size=2 * H, intermediate_size_mlp=4 * H,
                                       num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                                       no_rope_layers=[1, 0], attention_chunk_size=16, use_qk_norm=True,
                                       max_position_embeddings=16384,
                                       attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                       eos_token_id=_ids(tok, "<|end_of_text|>", "<|eom|>", "<|eot|>"),
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                                        "original_max_position_embeddings": 8192}))
    # intermediate = hidden x 4 (1408 -> 5632): the pixel-shuffle MLP takes the 2x2-shuffled patches at that width
    vision = Llama4VisionConfig(hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L, num_attention_heads=2,
                                vision_output_dim=H, image_size=32, patch_size=8, pixel_shuffle_ratio=0.5,
                                projector_input_dim=H, projector_output_dim=H, vision_feature_layer=-1,
                                vision_feature_select_strategy="default",
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = Llama4Config(vision_config=vision, text_config=text, boi_token_index=tok.convert_tokens_to_ids("<|image_start|>"),
                       eoi_token_index=tok.convert_tokens_to_ids("<|image_end|>"),
                       image_token_index=tok.convert_tokens_to_ids("<|patch|>"))
    # the release's preprocessor_config.json, scaled: Llama4ImageProcessor is torchvision-only in 5.23
    ip = _SavedSettings(image_processor_type="Llama4ImageProcessor", size={"height": 32, "width": 32}, max_patches=16,
                        resize_to_max_canvas=False, resample=2, do_resize=True, do_rescale=True,
                        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                        do_convert_rgb=True)
    settings = dict(fake_image_token="<|image|>", image_token="<|image|>", patch_size=8)
    return _Parts(Llama4ForConditionalGeneration(cfg), tok, ip, LLAMA4_TEMPLATE, settings,
                  ["<|end_of_text|>", "<|eom|>", "<|eot|>"])


def _qwen3_vl_moe():
    """Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-VL's ViT (patch 16, 2x2 merge, DeepStack) on a MoE LM
    (128 experts, top 8, in every layer). Here 4 experts, top 2; the rest as _qwen3_vl."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    tok = _qwen2_tokenizer()
    vision = dict(depth=L, hidden_size=H, intermediate_size=2 * H, num_heads=2, out_hidden_size=H, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    text = _qwen_text(tok, mrope_interleaved=True)
    text.update(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=H, decoder_sparse_step=1,
                mlp_only_layers=[])
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    ip = _qwen_image_processor(16)
    return _Parts(Qwen3VLMoeForConditionalGeneration(cfg), tok, ip, QWEN3_VL_TEMPLATE, {},
                  ["<|im_end|>", "<|endoftext|>"], _qwen_video("Qwen3VLVideoProcessor", ip))


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
def build(family, out_dir, seed=0):
    """Write a tiny checkpoint of `family` (one of FAMILIES) to `out_dir` -> out_dir.

    The folder is what `save_pretrained` leaves (config.json, model.safetensors,
    generation_config.json, tokenizer files, processor_config.json, chat_template.jinja) and
    loads with `vlm.load_model(out_dir)` offline. Same family and seed -> same weights.
      build("gemma3", "/tmp/g3")  ->  Path("/tmp/g3")
    """
    import torch
    from transformers import GenerationConfig

    if family not in _BY_NAME:
        raise ValueError(f"unknown family {family!r}; one of: {', '.join(FAMILIES)}")
    fam, out = _BY_NAME[family], Path(out_dir)
    torch.manual_seed(seed)
    try:
        parts = fam.make()
    except Exception as e:  # name the family: a transformers error alone does not say which builder broke
        raise RuntimeError(f"tiny {family} ({fam.release} layout): {type(e).__name__}: {e}") from e
    model, tok = parts.model.eval(), parts.tokenizer
    eos = _ids(tok, *parts.eos)
    if None in eos or tok.unk_token_id in eos:
        raise RuntimeError(f"tiny {family}: an end-of-turn token of {parts.eos} is not in its tokenizer")
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=eos if len(eos) > 1 else eos[0])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name, sub in (parts.sub_tokenizers or {}).items():  # ProcessorMixin saves an extra tokenizer in its own subfolder
        sub.save_pretrained(out / name)
    # processor_config.json is written here, as ProcessorMixin.save_pretrained would write it: building the
    # processor object itself would need the video processor, i.e. torchvision (vlm.load_processor reads it)
    ip = parts.image_processor  # a dict: the settings of a class that cannot be built here (LFM2-VL's needs torchvision)
    proc = {"processor_class": fam.processor_class, "image_processor": ip if isinstance(ip, dict) else ip.to_dict(),
            **parts.settings}
    if parts.video is not None:
        proc["video_processor"] = parts.video
    if parts.feature_extractor is not None:  # numpy scalars -> numbers, as ProcessorMixin.to_dict does
        proc["feature_extractor"] = {k: v.tolist() if hasattr(v, "tolist") else v
                                     for k, v in parts.feature_extractor.to_dict().items()}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if parts.template is not None:
        (out / "chat_template.jinja").write_text(parts.template, encoding="utf-8")
    # the tokenizer names its processor, as a released tokenizer_config.json does
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["processor_class"] = fam.processor_class
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def write_mia_rows(root):
    """One sequence, one 1x2 grid and one pic-in-pic row on coloured images, as 01-03 write them, into
    `root` -> ({format: jsonl path}, {format: row}) (tests/test_families.py, bench/check_unnamed_families.py)."""
    import common
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    red, blue = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 64), (30, 30, 200))
    red.save(root / "red.png"), blue.save(root / "blue.png")
    grid = Image.new("RGB", (200, 120), "white")
    grid.paste(red.resize((90, 90)), (5, 25)), grid.paste(blue.resize((90, 90)), (105, 25))
    grid.save(root / "grid.png")
    pip = blue.resize((96, 72))
    pip.paste(red.resize((48, 36)), (24, 18))
    pip.save(root / "pip.png")
    q = "what color is the shape?"
    rows = {
        "sequence": {"id": "s", "image": ["red.png", "blue.png"], "mia": {"format": "sequence", "n_images": 2, "target": 2},
                     "conversations": [{"from": "human", "value": f"Image1:<image>\nImage2:<image>\nIn Image2, {q}"},
                                       {"from": "gpt", "value": "blue"}]},
        "grid": {"id": "g", "image": ["grid.png"], "mia": {"format": "grid", "n_images": 2, "target": 1, "size": [200, 120],
                                                           "cells": [[5, 25, 95, 115], [105, 25, 195, 115]]},
                 "conversations": [{"from": "human", "value": f"<image>\nIn Image1, {q}"}, {"from": "gpt", "value": "red"}]},
        "pip": {"id": "p", "image": ["pip.png"], "mia": {"format": "pip", "n_images": 2, "target": 1, "size": [96, 72],
                                                         "inset": [24, 18, 72, 54]},
                "conversations": [{"from": "human", "value": f"<image>\nFor the image in the center, {q}"},
                                  {"from": "gpt", "value": "red"}]},
    }
    files = {}
    for name, row in rows.items():
        common.write_jsonl(root / f"{name}.jsonl", [row])
        files[name] = root / f"{name}.jsonl"
    return files, rows


# ---------------------------------------------------------------------------------------------
# pytest: one build per family per session
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A session cache: tiny_dirs(family) -> the folder of its tiny checkpoint, built on first use."""
    root, cache, skip = tmp_path_factory.mktemp("tiny_families"), {}, {}

    def get(family):
        if family not in cache:
            cache[family] = build(family, root / family)
            try:  # a family whose image processing needs torchvision (Llama 4, LFM2-VL) runs in the GPU-user lane only
                import vlm

                vlm.load_processor(cache[family])
            except ValueError as e:
                if "needs torchvision" not in str(e):
                    raise
                skip[family] = str(e).split(": ", 1)[1]
        if family in skip:
            pytest.skip(f"{family}: {skip[family]}")
        return cache[family]

    return get


# ---------------------------------------------------------------------------------------------
# chat templates of the releases (facts, reproduced)
# ---------------------------------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf chat_template.json (also tests/test_common.py: REAL_LLAVA15_TEMPLATE)
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json (no generation-prompt branch: a prompt ends at " [/INST]")
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf chat_template.json (as in transformers'
# tests/models/llava_onevision/test_processing_llava_onevision.py). Turns open with
# '<|im_start|>' + role + ' ', the generation prompt is '<|im_start|>assistant\n'.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct chat_template.json = Qwen/Qwen2.5-VL-*-Instruct's (as in transformers'
# tests/models/qwen2_vl/test_processor_qwen2_vl.py): default system prompt, each image item ->
# <|vision_start|><|image_pad|><|vision_end|> (optionally "Picture k: " first, add_vision_id).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# Qwen/Qwen3-VL-8B-Instruct chat_template.json (no default system prompt)
QWEN3_VL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen/Qwen3.5-27B chat template (tokenizer_config.json): thinking by default, so the generation
# prompt ends '<|im_start|>assistant\n<think>\n' and an answer after the last user turn is
# rendered '<think>\n\n</think>\n\n' + answer.
QWEN3_5_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\\n' }}
    {{- "# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>" }}
    {{- '\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n<parameter=example_parameter_2>\\nThis is the value for the second parameter\\nthat can span\\nmultiple lines\\n</parameter>\\n</function>\\n</tool_call>\\n\\n<IMPORTANT>\\nReminder:\\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\\n- Required parameters MUST be specified\\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\\n\\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\\n\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                    {%- else %}
                        {{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\\n</parameter>\\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""

# OpenGVLab/InternVL3-1B-hf, as transformers' models/internvl/convert_internvl_weights_to_hf.py writes it. An
# image item renders '<IMG_CONTEXT>\n' (early revisions of that script wrote '<image>\n', which
# InternVLProcessor, whose image_token is <IMG_CONTEXT>, refuses: "0 <IMG_CONTEXT> tokens and 2 images").
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-3-4b-it chat_template.json
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# HuggingFaceM4/Idefics3-8B-Llama3 chat_template.json
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM2-2.2B-Instruct (= DEFAULT_CHAT_TEMPLATE of transformers' models/smolvlm/processing_smolvlm.py)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Gemma 4's chat_template.jinja as ggml-org/llama.cpp keeps it (models/templates/gemma4.jinja; its copy of the
# 31B's, google-gemma-4-31B-it-interleaved.jinja, renders images, turns and the generation prompt identically).
# An image item renders "\n\n<|image|>\n\n"; the generation prompt is '<|turn>model\n' plus, unless
# enable_thinking, an empty thought channel '<|channel>thought\n<channel|>' that a rendered answer lacks.
GEMMA4_TEMPLATE = r"""{%- macro format_parameters(properties, required) -%}
    {%- set standard_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
    {%- set ns = namespace(found_first=false) -%}
    {%- for key, value in properties | dictsort -%}
        {%- set add_comma = false -%}
        {%- if key not in standard_keys -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {{ key }}:{
            {%- if value['description'] -%}
                description:<|"|>{{ value['description'] }}<|"|>
                {%- set add_comma = true -%}
            {%- endif -%}
            {%- if value['nullable'] %}
                {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                nullable:true
            {%- endif -%}
            {%- set value_type = value['type'] if value['type'] is string else value['type'][0] -%}
            {%- if value_type | upper == 'STRING' -%}
                {%- if value['enum'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    enum:{{ format_argument(value['enum']) }}
                {%- endif -%}
            {%- elif value_type | upper == 'OBJECT' -%}
                ,properties:{
                {%- if value['properties'] is defined and value['properties'] is mapping -%}
                    {{- format_parameters(value['properties'], value['required'] | default([])) -}}
                {%- elif value is mapping -%}
                    {{- format_parameters(value, value['required'] | default([])) -}}
                {%- endif -%}
                }
                {%- if value['required'] -%}
                    ,required:[
                    {%- for item in value['required'] | default([]) -%}
                        <|"|>{{- item -}}<|"|>
                        {%- if not loop.last %},{% endif -%}
                    {%- endfor -%}
                    ]
                {%- endif -%}
            {%- elif value_type | upper == 'ARRAY' -%}
                {%- if value['items'] is mapping and value['items'] -%}
                    ,items:{
                    {%- set ns_items = namespace(found_first=false) -%}
                    {%- for item_key, item_value in value['items'] | dictsort -%}
                        {%- if item_value is not none -%}
                            {%- if ns_items.found_first %},{% endif -%}
                            {%- set ns_items.found_first = true -%}
                            {%- if item_key == 'properties' -%}
                                properties:{
                                {%- if item_value is mapping -%}
                                    {{- format_parameters(item_value, value['items']['required'] | default([])) -}}
                                {%- endif -%}
                                }
                            {%- elif item_key == 'required' -%}
                                required:[
                                {%- for req_item in item_value -%}
                                    <|"|>{{- req_item -}}<|"|>
                                    {%- if not loop.last %},{% endif -%}
                                {%- endfor -%}
                                ]
                            {%- elif item_key == 'type' -%}
                                {%- if item_value is string -%}
                                    type:{{ format_argument(item_value | upper) }}
                                {%- else -%}
                                    type:{{ format_argument(item_value | map('upper') | list) }}
                                {%- endif -%}
                            {%- else -%}
                                {{ item_key }}:{{ format_argument(item_value) }}
                            {%- endif -%}
                        {%- endif -%}
                    {%- endfor -%}
                    }
                {%- endif -%}
            {%- endif -%}
            {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
            type:<|"|>{{ value_type | upper }}<|"|>}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool_data) -%}
    declaration:{{- tool_data['function']['name'] -}}{description:<|"|>{{- tool_data['function']['description'] -}}<|"|>
    {%- set params = tool_data['function']['parameters'] -%}
    {%- if params -%}
        ,parameters:{
        {%- if params['properties'] -%}
            properties:{ {{- format_parameters(params['properties'], params['required']) -}} },
        {%- endif -%}
        {%- if params['required'] -%}
            required:[
            {%- for item in params['required'] -%}
                <|"|>{{- item -}}<|"|>
                {{- ',' if not loop.last -}}
            {%- endfor -%}
            ],
        {%- endif -%}
        {%- if params['type'] -%}
            type:<|"|>{{- params['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    {%- if 'response' in tool_data['function'] -%}
        {%- set response_declaration = tool_data['function']['response'] -%}
        ,response:{
        {%- if response_declaration['description'] -%}
            description:<|"|>{{- response_declaration['description'] -}}<|"|>,
        {%- endif -%}
        {%- if response_declaration['type'] | upper == 'OBJECT' -%}
            type:<|"|>{{- response_declaration['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    }
{%- endmacro -%}
{%- macro format_argument(argument, escape_keys=True) -%}
    {%- if argument is string -%}
        {{- '<|"|>' + argument + '<|"|>' -}}
    {%- elif argument is boolean -%}
        {{- 'true' if argument else 'false' -}}
    {%- elif argument is mapping -%}
        {{- '{' -}}
        {%- set ns = namespace(found_first=false) -%}
        {%- for key, value in argument | dictsort -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {%- if escape_keys -%}
                {{- '<|"|>' + key + '<|"|>' -}}
            {%- else -%}
                {{- key -}}
            {%- endif -%}
            :{{- format_argument(value, escape_keys=escape_keys) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif argument is sequence -%}
        {{- '[' -}}
        {%- for item in argument -%}
            {{- format_argument(item, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- argument -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- set ns = namespace(prev_message_type=None) -%}
{%- set loop_messages = messages -%}
{{ bos_token }}
{#- Handle System/Tool Definitions Block -#}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}

    {#- Inject Thinking token at the very top of the FIRST system turn -#}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>' -}}
        {%- set ns.prev_message_type = 'think' -%}
    {%- endif -%}

    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}

    {%- if tools -%}
        {%- for tool in tools %}
            {{- '<|tool>' -}}
            {{- format_function_declaration(tool) | trim -}}
            {{- '<tool|>' -}}
        {%- endfor %}
        {%- set ns.prev_message_type = 'tool' -%}
    {%- endif -%}

    {{- '<turn|>\n' -}}
{%- endif %}

{#- Loop through messages -#}
{%- for message in loop_messages -%}
    {%- set ns.prev_message_type = None -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
        {{- '<|turn>' + role + '\n' }}

            {%- if message['tool_calls'] -%}
                {%- for tool_call in message['tool_calls'] -%}
                    {%- set function = tool_call['function'] -%}
                    {{- '<|tool_call>call:' + function['name'] + '{' -}}
                    {%- if function['arguments'] is mapping -%}
                        {%- set ns_args = namespace(found_first=false) -%}
                        {%- for key, value in function['arguments'] | dictsort -%}
                            {%- if ns_args.found_first %},{% endif -%}
                            {%- set ns_args.found_first = true -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                        {%- endfor -%}
                    {%- elif function['arguments'] is string -%}
                        {{- function['arguments'] -}}
                    {%- endif -%}
                    {{- '}<tool_call|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_call' -%}
            {%- endif -%}

            {%- if message['tool_responses'] -%}
                {#- Tool Response handling -#}
                {%- for tool_response in message['tool_responses'] -%}
                    {{- '<|tool_response>' -}}
                    {%- if tool_response['response'] is mapping -%}
                        {{- 'response:' + tool_response['name'] | default('unknown') + '{' -}}
                        {%- for key, value in tool_response['response'] | dictsort -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                            {%- if not loop.last %},{% endif -%}
                        {%- endfor -%}
                        {{- '}' -}}
                    {%- else -%}
                        {{- 'response:' + tool_response['name'] | default('unknown') + '{value:' + format_argument(tool_response['response'], escape_keys=False) + '}' -}}
                    {%- endif -%}
                    {{- '<tool_response|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_response' -%}
            {%- endif -%}

            {%- if message['content'] is string -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(message['content']) -}}
                {%- else -%}
                    {{- message['content'] | trim -}}
                {%- endif -%}
            {%- elif message['content'] is sequence -%}
                {%- for item in message['content'] -%}
                    {%- if item['type'] == 'text' -%}
                        {%- if role == 'model' -%}
                            {{- strip_thinking(item['text']) -}}
                        {%- else -%}
                            {{- item['text'] | trim -}}
                        {%- endif -%}
                    {%- elif item['type'] == 'image' -%}
                        {{- '\n\n<|image|>\n\n' -}}
                        {%- set ns.prev_message_type = 'image' -%}
                    {%- elif item['type'] == 'audio' -%}
                        {{- '<|audio|>' -}}
                        {%- set ns.prev_message_type = 'audio' -%}
                    {%- elif item['type'] == 'video' -%}
                        {{- '\n\n<|video|>\n\n' -}}
                        {%- set ns.prev_message_type = 'video' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

        {%- if not (message['tool_responses'] and not message['content']) -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {%- if ns.prev_message_type != 'tool_response' -%}
        {{- '<|turn>model\n' -}}
    {%- endif -%}
    {%- if not enable_thinking | default(false) -%}
        {{- '<|channel>thought\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""

# mistralai/Mistral-Small-3.1-24B-Instruct-2503 chat_template.json, as transformers' tests/models/mistral3/
# test_processing_mistral3.py (prepare_processor_dict) and hf-internal-testing/tiny-processor-mistral3 copy it from
# the release (its default system prompt still says "Mistral Small 3"). The default system prompt holds today's date
# (strftime_now), so a rendered prompt changes with the day; no generation-prompt branch: a prompt ends at "[/INST]",
# an answer is its text + eos_token. Only a messages[0] whose *content* is a list works as a system message.
MISTRAL3_TEMPLATE = r"""{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0] is string %}
        {%- set system_message = messages[0]['content'] %}
        {%- set loop_messages = messages[1:] %}
    {%- else %} 
        {%- set system_message = messages[0]['content'][0]['text'] %}
        {%- set loop_messages = messages[1:] %}
    {%- endif %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
            {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
            {%- else %}
                    {{- '[INST]' }}
                    {%- for block in message['content'] %}
                            {%- if block['type'] == 'text' %}
                                    {{- block['text'] }}
                            {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}
                                    {{- '[IMG]' }}
                                {%- else %}
                                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                                {%- endif %}
                        {%- endfor %}
                    {{- '[/INST]' }}
                {%- endif %}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

# Aya Vision: CohereForAI/aya-vision-8b's own chat_template.json (4.2 kB: a longer "# System Preamble ..." system
# turn) could not be retrieved whole here. This is CohereForAI/aya-vision-32b's (1.77 kB), as mirrored in
# unsloth/aya-vision-32b and mlx-community/aya-vision-32b-6bit chat_template.json, the same release family and
# turn format; its tail after the message.message branch (END_RESPONSE for assistant turns, END_OF_TURN, the
# generation prompt) is reconstructed from the same template as Cohere's Cohere2Vision development copy writes
# it. Every image item of a message is rendered first ("<image>" each), then its text items: images do not
# stay where they stood in an interleaved message.
AYA_VISION_TEMPLATE = """{{ bos_token }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are Aya Vision, a brilliant, sophisticated, AI-assistant chatbot trained to assist human users by providing thorough responses. You are a large vision language model built by the Cohere For AI. You are capable of interpreting images, including describing them, answering questions about their contents, extracting textual information, and analyzing visual context.<|END_OF_TURN_TOKEN|>
{%- for message in messages -%}
    <|START_OF_TURN_TOKEN|>{{ message.role | replace("user", "<|USER_TOKEN|>") | replace("assistant", "<|CHATBOT_TOKEN|><|START_RESPONSE|>") | replace("system", "<|SYSTEM_TOKEN|>") }}
    {%- if message.content is defined -%}
        {%- if message.content is string -%}
{{ message.content }}
        {%- else -%}
            {%- for item in message.content | selectattr('type', 'equalto', 'image') -%}
<image>
            {%- endfor -%}
            {%- for item in message.content | selectattr('type', 'equalto', 'text') -%}
{{ item.text }}
            {%- endfor -%}
        {%- endif -%}
    {%- elif message.message is defined -%}
        {%- if message.message is string -%}
{{ message.message }}
        {%- else -%}
            {%- for item in message.message | selectattr('type', 'equalto', 'image') -%}
<image>
            {%- endfor -%}
            {%- for item in message.message | selectattr('type', 'equalto', 'text') -%}
{{ item.text }}
            {%- endfor -%}
        {%- endif -%}
    {%- endif -%}
    {%- if message.role == "assistant" -%}
<|END_RESPONSE|>
    {%- endif -%}
<|END_OF_TURN_TOKEN|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>
{%- endif -%}
"""

# meta-llama/Llama-4-Scout-17B-16E-Instruct: the template transformers' models/llama4/convert_llama4_weights_to_hf.py
# (write_tokenizer) wrote into the release, the same text as processing_llama4.chat_template. An image item renders
# "<|image|>"; turns are '<|header_start|>' + role + '<|header_end|>\n\n' ... '<|eot|>'; date_string (strftime_now)
# is computed but never written.
LLAMA4_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}    
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- else %}
        {#- FIXME: The processor requires an array, always. #}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
    {%- set user_supplied_system_message = true %}
{%- else %}
    {%- set system_message = "" %}
    {%- set user_supplied_system_message = false %}
{%- endif %}

{#- System message if the user supplied one #}
{%- if user_supplied_system_message %}
    {{- "<|header_start|>system<|header_end|>

" }}
    {%- if tools is not none %}
        {{- "Environment: ipython
" }}
    {%- endif %}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.

" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "

" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|header_start|>user<|header_end|>

' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.

" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.

" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "

" }}
    {%- endfor %}
    {{- first_user_message + "<|eot|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>

' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}
       {{- '<|header_start|>assistant<|header_end|>

' -}}
       {{- '<|python_start|>' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
       {{- '<|python_end|>' }}
        {%- for tool_call in message.tool_calls %}
           {{- '{"name": "' + tool_call.function.name + '", ' }}
           {{- '"parameters": ' }}
           {{- tool_call.function.arguments | tojson }}
           {{- "}" }}
        {%- endfor %}
       {{- "<|eot|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|header_start|>ipython<|header_end|>

" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>

' }}
{%- endif %}
"""
# ---- lfm2_vl, glm4v, paligemma2 ----
def _byte_bpe_fast(specials, added=(), named=None, bos_template=None, **kw):
    """A plain PreTrainedTokenizerFast over a byte-level BPE trained here (the tokenizer class the
    LFM2-VL and GLM-4.1V releases name in tokenizer_config.json): `specials` first (ids 0..), then
    `added`, `named` ones also as attributes. bos_template: a token the post-processor writes
    in front of every encoded text, as the release's tokenizer.json does (None: nothing)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    vocab, merges = _train_bpe(Qwen2Tokenizer, specials)
    backend = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)._tokenizer
    backend.add_special_tokens(list(specials))  # whole tokens, never split (ids unchanged: already in the vocab)
    if bos_template is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_template} $A", pair=f"{bos_template} $A $B",
            special_tokens=[(bos_template, vocab[bos_template])])
    if named:
        kw["extra_special_tokens"] = dict(named)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kw)
    new = [t for t in list(added) + list((named or {}).values()) if t not in tok.get_vocab()]
    tok.add_special_tokens({"extra_special_tokens": list(dict.fromkeys(new))}, replace_extra_special_tokens=False)
    return tok


def _lfm2_vl():
    """LiquidAI/LFM2-VL-450M: SigLIP2 NaFlex (patch 16) at native resolution up to 512x512, pixel
    unshuffle 2x2 -> up to 256 tokens; an image over 2x that budget (max_pixels_tolerance) is cut
    into 512-px tiles (2..10 of them, the grid closest to its aspect ratio), each tile
    <|img_row_r_col_c|> + 256 <image>, the whole wrapped in <|image_start|>..<|image_end|>; no
    thumbnail in the 450M release (use_thumbnail false; the 1.6B adds one after <|img_thumbnail|>).
    LM: LFM2, a hybrid of short gated convolutions (10 of 16 layers) and GQA attention (6 of 16).
    Here patch 8, 32-px tiles -> 4 tokens per tile, budget 1..4 tokens; LM one conv + one attention layer.

    Lfm2VlImageProcessor is a torchvision-only class (there is no PIL twin in transformers 5.23),
    so its settings are written as the release's dict and nothing here instantiates it."""
    from transformers import Lfm2Config, Lfm2VlConfig, Lfm2VlForConditionalGeneration, Siglip2VisionConfig

    named = {"image_token": "<image>", "image_start_token": "<|image_start|>", "image_end_token": "<|image_end|>",
             "image_thumbnail": "<|img_thumbnail|>"}  # the release's names (special_tokens_map.json)
    base = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>", "<|im_start|>",
            "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>", "<|tool_call_end|>",
            "<|tool_response_start|>", "<|tool_response_end|>"]
    image = (["<image>"] + [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]
             + ["<|img_thumbnail|>", "<|image_start|>", "<|image_end|>", "<|image_split|>"])
    tok = _byte_bpe_fast(base, image, named, bos_template="<|startoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|im_end|>", pad_token="<|pad|>")
    # release: 16 layers (6 full_attention), heads 16, kv 8, block_multiple_of 256 of hidden 1024
    text = Lfm2Config(vocab_size=len(tok), hidden_size=H, intermediate_size=3 * H, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      layer_types=["conv", "full_attention"], conv_L_cache=3, block_multiple_of=8,
                      block_auto_adjust_ff_dim=True, norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 1e6},
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    # release vision: 12 layers, patch 16, num_patches 256 (a 16x16 position grid for 32x32-patch tiles)
    vision = Siglip2VisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2,
                                 patch_size=8, num_patches=4, vision_use_head=False)
    cfg = Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                       downsample_factor=2, projector_hidden_size=80, projector_hidden_act="gelu",
                       projector_bias=True)  # release projector 2560 for text hidden 1024
    # release (processor_config.json of LiquidAI/LFM2-VL-450M): tile 512, patch 16, tokens 64..256,
    # min_tiles 2, max_tiles 10, max_pixels_tolerance 2.0, use_thumbnail false, resample 2, mean/std 0.5
    ip = {"image_processor_type": "Lfm2VlImageProcessor", "do_image_splitting": True, "downsample_factor": 2,
          "encoder_patch_size": 8, "tile_size": 32, "min_image_tokens": 1, "max_image_tokens": 4, "min_tiles": 2,
          "max_tiles": 10, "max_pixels_tolerance": 2.0, "use_thumbnail": False, "max_num_patches": 16,
          "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_pad": True, "return_row_col_info": True}
    return _Parts(Lfm2VlForConditionalGeneration(cfg), tok, ip, LFM2_VL_TEMPLATE, {"use_image_special_tokens": True},
                  ["<|im_end|>"])


def _glm4v():
    """zai-org/GLM-4.1V-9B-Thinking: ViT patch 14, 2x2 merge (Qwen2-VL-like smart resize, the pixel
    budget counted over 2 frames), 2D-RoPE + bicubic-interpolated learned positions in the ViT,
    M-RoPE in the LM (partial rotary 0.5, sections 8/12/12); each image item is
    <|begin_of_image|><|image|><|end_of_image|>, <|image|> expanded per merged patch. A turn
    ends at <|user|> / <|observation|> / <|endoftext|> (the template writes no end-of-turn token).
    Here at most 8 merged tokens per image, 2 heads of 16 (4 rotary frequencies, sections 2/1/1)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil

    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                "<|end_of_video|>", "<|image|>", "<|video|>"]
    tok = _byte_bpe_fast(specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = dict(zip(("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id",
                    "image_token_id", "video_token_id"), _ids(tok, *specials[10:])))
    text = dict(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "partial_rotary_factor": 0.5},
                pad_token_id=tok.pad_token_id, eos_token_id=_ids(tok, "<|endoftext|>", "<|user|>", "<|observation|>"))
    vision = dict(depth=L, hidden_size=H, intermediate_size=2 * H, num_heads=2, out_hidden_size=H, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=56)  # release 336 -> a 24x24 position grid
    cfg = Glm4vConfig(text_config=text, vision_config=vision, **ids)
    # release preprocessor_config.json: shortest_edge 12544, longest_edge 47040000 (both over t=2 frames),
    # patch 14, merge 2, OpenAI-CLIP mean/std; here 1..8 merged tokens per image
    unit = 2 * (14 * 2) ** 2
    ip = Glm4vImageProcessorPil(size={"shortest_edge": unit, "longest_edge": unit * 8}, patch_size=14, merge_size=2,
                                temporal_patch_size=2)
    video = _qwen_video("Glm4vVideoProcessor", ip)
    return _Parts(Glm4vForConditionalGeneration(cfg), tok, ip, GLM4V_TEMPLATE, {},
                  ["<|endoftext|>", "<|user|>", "<|observation|>"], video)


def _paligemma2():
    """google/paligemma2-3b-mix-224: SigLIP-So400m 224/14 -> 256 tokens, a linear projector, a Gemma 2
    LM (sliding-window/global layers, attention-logit softcapping 50, final-logit softcapping 30)
    run as a prefix-LM: the processor writes image_seq_length <image> per image, then <bos>, the
    prompt and "\\n"; token_type_ids 0 mark the prefix (bidirectional), 1 the suffix (causal).
    No chat template (task prefixes such as "answer en ..."). Here 32 px / patch 16 -> 4 tokens."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipImageProcessorPil
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    tok = _gemma_tokenizer(["<start_of_turn>", "<end_of_turn>"], {"image_token": "<image>"}, add_bos=True)
    tok.add_tokens(EXTRA_TOKENS)  # <loc0000>..<loc1023>, <seg000>..<seg127>: in the release vocabulary
    text = Gemma2Config(**_text_kw(tok, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                   hidden_activation="gelu_pytorch_tanh", pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=_ids(tok, "<eos>", "<end_of_turn>")))
    vision = _siglip(32, 16)
    vision.vision_use_head = False
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                          projection_dim=H)
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=4, resample=3,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _Parts(PaliGemmaForConditionalGeneration(cfg), tok, ip, None, {}, ["<eos>"])


# LiquidAI/LFM2-VL-450M chat_template.jinja (the release's file as of its transformers-4.55 upload, copied
# in github.com/varun00391/local-finetuned-model "LiquidAI:LFM2-VL-450M/lfm2-450m/chat_template.jinja";
# the same string is transformers' tests/models/lfm2_vl/test_processing_lfm2_vl.py chat_template).
# An image item renders '<image>', which the processor expands; the prompt starts with bos_token.
LFM2_VL_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# zai-org/GLM-4.1V-9B-Thinking chat_template.jinja at revision 3c1471e51dc811b589d4d12b1c1c7c1c941267c2, as quoted
# (with its sha256 over the JSON-encoded string, 5232dbe7...) in a public renderer-validation record; the same
# template (less one blank line) is in sglang's test_jinja_template_utils.py. Kept as released: an assistant
# message's list content is printed with {{ msg.content }} (a Python repr), and no token ends a turn: the
# model stops at the next <|user|> (generation_config eos: <|endoftext|>, <|user|>, <|observation|>).
GLM4V_TEMPLATE = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n<|system|>\n{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n<|user|>{{ '\\n' }}\n\n        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n        {%- else %}\n            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n{{ item.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n<|assistant|>{{ msg.metadata }}\n{{ msg.content }}\n        {%- else %}\n"
    "<|assistant|>\n{{ msg.content }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---- mllama: the images reach the LM through cross-attention layers ----
def _mllama():
    """meta-llama/Llama-3.2-11B-Vision-Instruct: a ViT over up to 4 tiles of 560 px (patch 14),
    features of several layers concatenated; the LM (Llama 3.1) reads them through gated
    CROSS-attention layers (every 5th, from layer 3); in the text each image is ONE <|image|> token
    (128256, outside the LM head's vocabulary), which the cross-attention mask ties to the text after it.
    Here 32-px tiles, patch 16; 3 LM layers, the middle one cross-attention."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil

    # Llama 3's byte-level BPE: <|begin_of_text|> written in front of every text, the first reserved
    # specials of 128000.. in their order, then <|image|> (128256)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    tok = _byte_bpe_fast(specials, added=["<|image|>"], bos_template="<|begin_of_text|>",
                         bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tok) - 1
    # release text: 40 layers, cross_attention_layers [3, 8, ..., 38]; vocab 128256 (+8 embedding rows for <|image|>)
    text = dict(vocab_size=image_id, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=131072, cross_attention_layers=[1],
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=_ids(tok, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
    # release vision: 32 + 8 global layers, intermediate layers [3, 7, 15, 23, 30] -> output 7680 = 1280 x 6
    vision = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=32, patch_size=16, max_num_tiles=4, intermediate_layers_indices=[0],
                  vision_output_dim=2 * H)
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    # release preprocessor_config.json: 560x560 tiles, max_image_tiles 4, bilinear, CLIP mean/std
    ip = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4, resample=2,
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])
    return _Parts(MllamaForConditionalGeneration(cfg), tok, ip, MLLAMA_TEMPLATE, {},
                  ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])  # generation_config.json eos_token_id


# meta-llama/Llama-3.2-11B-Vision-Instruct chat_template.json, as reproduced verbatim in public code (e.g. a
# fine-tuning script's tokenizer.chat_template, and vLLM's examples/tool_chat_template_llama3.2_json.jinja
# image block): a system block with today's date only when no message has an image item; an image item -> <|image|>
MLLAMA_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}      
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\\n" }}
    {{- "Today Date: " + date_string + "\\n\\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\\n\\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\\n\\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


FAMILIES_SPEC = [
    Family("llava", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", "LlavaProcessor",
           "CLIPImageProcessorPil", _llava),
    Family("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf", "LlavaNextForConditionalGeneration",
           "LlavaNextProcessor", "LlavaNextImageProcessorPil", _llava_next),
    Family("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "LlavaOnevisionForConditionalGeneration",
           "LlavaOnevisionProcessor", "LlavaOnevisionImageProcessorPil", _llava_onevision),
    Family("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
           "Qwen2VLImageProcessorPil", _qwen2_vl),
    Family("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
           "Qwen2VLImageProcessorPil", _qwen2_5_vl),
    Family("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
           "Qwen2VLImageProcessorPil", _qwen3_vl),
    Family("qwen3_5", "Qwen/Qwen3.5-27B", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor",
           "Qwen2VLImageProcessorPil", _qwen3_5),
    Family("internvl", "OpenGVLab/InternVL3-1B-hf", "InternVLForConditionalGeneration", "InternVLProcessor",
           "GotOcr2ImageProcessorPil", _internvl),
    Family("gemma3", "google/gemma-3-4b-it", "Gemma3ForConditionalGeneration", "Gemma3Processor",
           "Gemma3ImageProcessorPil", _gemma3),
    Family("gemma4", "google/gemma-4-31B-it", "Gemma4ForConditionalGeneration", "Gemma4Processor",
           "Gemma4ImageProcessorPil", _gemma4),
    Family("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3", "Idefics3ForConditionalGeneration", "Idefics3Processor",
           "Idefics3ImageProcessorPil", _idefics3),
    Family("smolvlm", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "SmolVLMForConditionalGeneration", "SmolVLMProcessor",
           "SmolVLMImageProcessorPil", _smolvlm),
    Family("mistral3", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "Mistral3ForConditionalGeneration",
           "PixtralProcessor", "PixtralImageProcessorPil", _mistral3),
    Family("aya_vision", "CohereForAI/aya-vision-8b", "AyaVisionForConditionalGeneration", "AyaVisionProcessor",
           "GotOcr2ImageProcessorPil", _aya_vision),
    # no PIL image processor exists for Llama 4 in transformers 5.23: its only one needs torchvision
    Family("llama4", "meta-llama/Llama-4-Scout-17B-16E-Instruct", "Llama4ForConditionalGeneration", "Llama4Processor",
           "Llama4ImageProcessor", _llama4),
    Family("qwen3_vl_moe", "Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor",
           "Qwen2VLImageProcessorPil", _qwen3_vl_moe),
    Family("lfm2_vl", "LiquidAI/LFM2-VL-450M", "Lfm2VlForConditionalGeneration", "Lfm2VlProcessor",
           "Lfm2VlImageProcessor", _lfm2_vl),
    Family("glm4v", "zai-org/GLM-4.1V-9B-Thinking", "Glm4vForConditionalGeneration", "Glm4vProcessor",
           "Glm4vImageProcessorPil", _glm4v),
    Family("paligemma2", "google/paligemma2-3b-mix-224", "PaliGemmaForConditionalGeneration", "PaliGemmaProcessor",
           "SiglipImageProcessorPil", _paligemma2),
    Family("mllama", "meta-llama/Llama-3.2-11B-Vision-Instruct", "MllamaForConditionalGeneration", "MllamaProcessor",
           "MllamaImageProcessorPil", _mllama),
]
_BY_NAME = {f.name: f for f in FAMILIES_SPEC}
FAMILIES = [f.name for f in FAMILIES_SPEC]
# the families whose release has no chat template: vlm.render_prompt writes vlm.FALLBACK_TEMPLATE around
# the question, with the processor's image token for each <image> (PaliGemma's task prefixes are plain text)
NO_TEMPLATE = {"paligemma2"}
# the families whose image views token_geometry does not follow (04 runs their sequence rows and
# skips their grid / pic-in-pic rows, counted, with the reason); tests/test_geometry.py checks both ways
NO_GEOMETRY = {"llama4", "lfm2_vl"}
# the families whose language model reads the images through cross-attention layers, the text holding one
# placeholder token per image: their visual tokens are those layers' keys (token_geometry.image_key_boxes)
CROSS_ATTENTION = {"mllama"}


if __name__ == "__main__":
    import time

    if len(sys.argv) < 2:
        sys.exit(f"usage: python {Path(__file__).name} OUT_DIR [family ...]   (families: {' '.join(FAMILIES)})")
    for name in sys.argv[2:] or FAMILIES:
        t0 = time.time()
        print(f"{name}: {build(name, Path(sys.argv[1]) / name)} ({time.time() - t0:.1f} s)", flush=True)
