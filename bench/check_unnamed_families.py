"""
check_unnamed_families.py — stages 04, 06 and 07 on VLM families the tests do not name.

  python bench/check_unnamed_families.py                       # every family below, in a temp folder
  python bench/check_unnamed_families.py idefics2 ovis2        # some of them
  python bench/check_unnamed_families.py --out /tmp/unnamed --keep   # keep checkpoints, data and logs

The toolkit claims "any Hugging Face image-text-to-text checkpoint". tests/tiny_families.py builds
the families the tests name; this script builds, THE SAME WAY (its helpers and its build()), tiny
random-weight checkpoints of families that neither the issue nor the tests name, and runs the
stages on them as a user would (in-process, through each script's get_args + main, like
tests/test_families.py):

  04  per format (one run each, so one format's failure does not hide another's), on one sequence
      row (2 images), one 1x2 grid row and one pic-in-pic row (tests/test_families.py: mia_rows),
      --max-new-tokens 4 --min-ppl 0 and every threshold at inf;
  06  2 steps (LoRA r 4, batch 2) on 04's pairs — where 04 selected none (a random model's answers
      run to --max-new-tokens, and a cut answer is never a pair), on pairs made from 04's
      candidates instead (chosen = the ground truth, rejected = the model's answer), said in the table;
  07  the base checkpoint and 06's output on the same three rows.

A stage passes, is skipped with the reason 04 counts (grid/pip: "no token geometry: ..."), is refused
(the stage ended with its one-line SystemExit: a checkpoint it says it does not support), or FAILS
with its error (any other exception) and the innermost toolkit frame. The table is printed at the end;
the exit status is 1 if any stage FAILED (a counted skip or a refusal is not a failure: read its reason).

Each family mirrors one released checkpoint (Family.release): its model, processor and PIL
image-processor classes (transformers 5.23, no torchvision), the processor settings and chat
template of that release, its tokenizer class and special tokens in the release's order, and
random weights: hidden 32, 2 layers, 4 visual tokens per view. Each template names its source.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import tiny_families as tf  # noqa: E402
from tiny_families import (H, L, Family, _byte_bpe_fast, _ids, _llama_tokenizer, _Parts, _qwen2_tokenizer,  # noqa: E402
                           _siglip, _text_kw)

STAGES = ("04 sequence", "04 grid", "04 pip", "06", "07")


# ---------------------------------------------------------------------------------------------
# the families (none of them in tiny_families.FAMILIES)
# ---------------------------------------------------------------------------------------------
def _idefics2():
    """HuggingFaceM4/idefics2-8b: SigLIP-So400m (980 px, patch 14) at native aspect ratio (shortest
    edge >= 378, longest <= 980, padded in the batch, a patch mask), image splitting (4 crops + the
    whole image: 5 views), a perceiver resampler to 64 latents per view; each image is 5 x
    (<fake_token_around_image> + 64 <image>) + <fake_token_around_image>. Mistral-7B LM.
    Here longest edge 64 / shortest 24, patch 8, 4 latents per view."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil, MistralConfig

    # Mistral's SentencePiece BPE (<unk> <s> </s>), then the three tokens idefics2 adds (32000..32002)
    tok = _llama_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>"], pad_token="<unk>")
    text = MistralConfig(**_text_kw(tok, sliding_window=4096, pad_token_id=tok.pad_token_id,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    vision = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2, image_size=64,
                  patch_size=8)
    # release perceiver: 64 latents, depth 3, 16 heads of 96, 4 kv heads
    perceiver = dict(hidden_size=H, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=16, num_key_value_heads=1)
    cfg = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    # release preprocessor_config.json (as duplicated in huz-relay/idefics2-8b-ocr): do_image_splitting true,
    # longest 980 / shortest 378, mean/std 0.5, resample 2; processor_config.json: image_seq_len 64
    ip = Idefics2ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64, "shortest_edge": 24},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)
    return _Parts(Idefics2ForConditionalGeneration(cfg), tok, ip, IDEFICS2_TEMPLATE, {"image_seq_len": 4},
                  ["</s>", "<end_of_utterance>"])  # generation_config.json eos_token_id [2, 32002]


def _ovis2():
    """thisisiron/Ovis2-1B-hf (AIDC-AI/Ovis2-1B converted): AIMv2 ViT 448/14 with hidden_stride 2
    (2x2 patches -> one token: 256 per view) and a visual tokenizer (softmax over a visual vocabulary,
    embedded through a table); crop_to_patches: the covering-area tile grid (<= 12 tiles) plus a
    thumbnail first. An image is <IMG_START> + thumbnail atoms + <IMG_GRID> + tile atoms separated
    by <IMG_COL>/<IMG_ROW> + <IMG_END>, each view image_seq_length <IMG_ATOM>; the indicator tokens
    get visual-table embeddings. LM: Qwen2.5-0.5B-Instruct. Here 32-px views, patch 8, 4 atoms each."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2ImageProcessorPil, Qwen2Config

    # Qwen2.5's added tokens (151643..151664: the tool / FIM ones are not special), then the converter's
    # SPECIAL_TOKENS (<IMG_ATOM> = 151665, indicators 151666..151670)
    tok = _qwen2_tokenizer()
    tok.add_tokens(["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"])
    img = ["<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]
    tok.add_special_tokens({"extra_special_tokens": img}, replace_extra_special_tokens=False)
    # the converter also does setattr(tokenizer, "image_token", "<IMG_ATOM>"): a plain attribute, which
    # save_pretrained does not write, so the loaded tokenizer has no image_token (nor has this one)
    vision = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_stride=2, vocab_size=64, num_visual_indicator_tokens=5)
    cfg = Ovis2Config(vision_config=vision, text_config=Qwen2Config(**_text_kw(tok, tie_word_embeddings=True)),
                      image_token_id=tok.convert_tokens_to_ids("<IMG_ATOM>"),
                      visual_indicator_token_ids=_ids(tok, *img[1:]), vocab_size=len(tok), hidden_size=H)
    # the converter: Ovis2ImageProcessor(crop_to_patches=True, size 448x448), other settings the class's
    # (min 1 / max 12 patches, covering-area grid, bicubic, CLIP mean/std); processor image_seq_length 256
    ip = Ovis2ImageProcessorPil(crop_to_patches=True, size={"height": 32, "width": 32})
    return _Parts(Ovis2ForConditionalGeneration(cfg), tok, ip, OVIS2_TEMPLATE,
                  {"image_seq_length": 4, "image_token": "<image>"}, ["<|im_end|>", "<|endoftext|>"])


def _deepseek_vl():
    """deepseek-community/deepseek-vl-1.3b-chat: SigLIP-L 384/16 -> 576 tokens per image (resized to
    384 on the long side, padded square with the mean colour), a 2-layer MLP aligner; DeepSeek-LLM
    1.3B (Llama layout). Each <image_placeholder> expands to num_image_tokens of itself.
    Here 32 px / patch 16 -> 4 tokens."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLImageProcessorPil
    from transformers import LlamaConfig

    # DeepSeek-LLM's byte-level BPE, <｜begin▁of▁sentence｜> written in front of every text (add_bos_token),
    # <image_placeholder> the image token (config image_token_id 100015, after the BOS/EOS specials)
    bos, eos = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
    tok = _byte_bpe_fast([bos, eos], named={"image_token": "<image_placeholder>"}, bos_template=bos,
                         bos_token=bos, eos_token=eos, pad_token=eos)
    text = LlamaConfig(**_text_kw(tok, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id))
    vision = _siglip(32, 16)
    vision.vision_use_head = False
    cfg = DeepseekVLConfig(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)
    # release: size 384x384, min_size 14, bicubic, CLIP mean/std, pad to square
    ip = DeepseekVLImageProcessorPil(size={"height": 32, "width": 32})
    return _Parts(DeepseekVLForConditionalGeneration(cfg), tok, ip, DEEPSEEK_VL_TEMPLATE, {"num_image_tokens": 4}, [eos])


def _blip2():
    """Salesforce/blip2-opt-2.7b: EVA ViT-g 224/14, a Q-Former whose 32 learned queries cross-attend
    to the patch features (every other layer) -> 32 tokens per image, projected into OPT-2.7B. The
    processor writes num_query_tokens <image> BEFORE the text (before OPT's </s> BOS), whatever the
    text says: one image per prompt. No chat template. Here 32 px / patch 16, 4 queries."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              BlipImageProcessorPil, GPT2Tokenizer, OPTConfig)

    # OPT's byte-level BPE (GPT2Tokenizer): <s> <pad> </s> <unk> first, </s> written in front of every text
    # (add_bos_token), then <image> (50265), which the BLIP-2 converter added as a special token. The release's
    # unk_token is "</s>" too; here "<unk>", as build() refuses an EOS that is the unk (a byte-level BPE never emits it)
    tok = tf._tokenizer(GPT2Tokenizer, ["<s>", "<pad>", "</s>", "<unk>"], ["<image>"], None,
                        bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", add_bos_token=True)
    text = OPTConfig(vocab_size=len(tok), hidden_size=H, ffn_dim=2 * H, num_hidden_layers=L, num_attention_heads=4,
                     word_embed_proj_dim=H, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = Blip2VisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2,
                               image_size=32, patch_size=16)
    # release Q-Former: BERT-base width, 12 layers, cross-attention every 2nd layer
    qformer = Blip2QFormerConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=2 * H,
                                 encoder_hidden_size=H, cross_attention_frequency=2)
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    # release preprocessor_config.json: BlipImageProcessor 224x224, bicubic, OpenAI-CLIP mean/std;
    # processor_config.json: num_query_tokens 32
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32}, resample=3,
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    return _Parts(Blip2ForConditionalGeneration(cfg), tok, ip, None, {"num_query_tokens": 4}, ["</s>"])


def _chameleon():
    """facebook/chameleon-7b: no vision encoder in the LM's input path: a VQ-GAN turns each 512-px
    image (shortest edge 512, centre crop) into 32x32 = 1024 DISCRETE codes, mapped to image BPE
    tokens (IMGIMG...) of the LM's own vocabulary and embedded by its token embedding; each image is
    <racm3:break> + 1024 <image> + <eoss>, the <image> positions replaced by those codes. The processor
    appends sep_token (<reserved08706>) to a prompt (chat mode). No chat template.
    Here 8-px crops, two VQ downsamplings -> 2x2 = 4 codes of a 16-code book."""
    from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, ChameleonImageProcessorPil,
                              ChameleonVQVAEConfig)

    # Chameleon's byte-level BPE (tokenizer.json): <s> <pad> </s> <unk>, the image wrappers and sep among the
    # reserved specials, <s> written in front of every text; the VQ codes are BPE tokens IMGIMG<digits as A-J>Z
    codes = [f"IMGIMG{''.join(chr(ord('A') + int(d)) for d in str(i))}Z" for i in range(16)]
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<racm3:break>", "<eoss>", "<reserved08706>", "<image>", *codes]
    tok = _byte_bpe_fast(specials, bos_template="<s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         unk_token="<unk>", sep_token="<reserved08706>")
    # release VQ-GAN: 512 px, base 128 channels x (1, 1, 2, 2, 4), 8192 codes of 256
    vq = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=8, base_channels=32,
                              channel_multiplier=[1, 2, 2], num_res_blocks=1)
    cfg = ChameleonConfig(**_text_kw(tok, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                          vq_config=vq.to_dict(), vocabulary_map=tok.get_vocab())
    # release preprocessor_config.json: shortest edge 512, crop 512, LANCZOS, rescale 0.0078, mean/std 1.0
    # (the class defaults); processor_config.json: image_seq_length 1024
    ip = ChameleonImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return _Parts(ChameleonForConditionalGeneration(cfg), tok, ip, None,
                  {"image_seq_length": 4, "image_token": "<image>"}, ["</s>"])


def _fuyu():
    """adept/fuyu-8b: NO vision encoder: each image (scaled to fit 1080x1920, padded to it) is cut
    into raw 30x30 patches, each patch's pixels put into the LM's input space by one linear layer.
    The processor writes, IN FRONT of the text, one |SPEAKER| per patch with a |NEWLINE| after each
    row, then <s>; then the text and <0x04> (beginning of answer): one image per prompt, whatever the
    text says. Persimmon-8B LM. No chat template. Here a 32x32 canvas of 16-px patches: 2 rows of 2."""
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessorPil, PersimmonConfig

    # Fuyu's SentencePiece-style BPE with byte fallback (<0x04> is a byte piece); |SPEAKER| and |NEWLINE| are
    # ordinary vocabulary entries of the release, here added after its specials
    tok = _llama_tokenizer(["|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|"], eos_token="|ENDOFTEXT|")
    text = PersimmonConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                           num_attention_heads=4, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.convert_tokens_to_ids("|ENDOFTEXT|"))
    cfg = FuyuConfig(text_config=text.to_dict(), patch_size=16, image_size=32,
                     image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"))
    # release preprocessor_config.json: target 1080x1920, patch 30x30, bilinear, pad with 1.0, mean/std 0.5
    ip = FuyuImageProcessorPil(size={"height": 32, "width": 32}, patch_size={"height": 16, "width": 16})
    return _Parts(FuyuForCausalLM(cfg), tok, ip, None, {}, ["|ENDOFTEXT|"])


def _florence2():
    """florence-community/Florence-2-base (microsoft/Florence-2-base converted): a DaViT image
    encoder (4 stages) -> 577 tokens (576 + a pooled one), put IN FRONT of the text by the processor
    (<image> x image_seq_length, then <s> text </s>), all read by a BART ENCODER; the answer is
    generated by BART's DECODER: an encoder-decoder model. Task prompts (<CAPTION>, <OD> ...),
    no chat template. Here one 32-px DaViT stage of stride 16 -> 4 tokens (+1 pooled)."""
    from transformers import BartConfig, BartTokenizer, CLIPImageProcessorPil, Florence2Config
    from transformers import Florence2ForConditionalGeneration

    # BART's byte-level BPE (<s> text </s>), then <image> and the release's location tokens
    tok = tf._tokenizer(BartTokenizer, ["<s>", "<pad>", "</s>", "<unk>"], [f"<loc_{i}>" for i in range(1000)],
                        {"image_token": "<image>"})
    text = BartConfig(vocab_size=len(tok), d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=2 * H, decoder_ffn_dim=2 * H,
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
    # release DaViT: depths (1, 1, 9, 1), embed (128, 256, 512, 1024), strides (4, 2, 2, 2), 768-px input
    vision = dict(depths=[1], patch_size=[7], patch_stride=[16], patch_padding=[3], patch_prenorm=[False],
                  embed_dim=[H], num_heads=[2], num_groups=[2], window_size=2, projection_dim=H, drop_path_rate=0.0)
    cfg = Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=tok.image_token_id)
    # release preprocessor_config.json: CLIPImageProcessor 768x768, bicubic, ImageNet mean/std, image_seq_length 577
    ip = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, resample=3,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ip.image_seq_length = 5
    return _Parts(Florence2ForConditionalGeneration(cfg), tok, ip, None, {"num_additional_image_tokens": 1}, ["</s>"])


def _bert_tokenizer(**kw):
    """bert-base-uncased's tokenizer class (WordPiece, lower-cased): [PAD] [UNK] [CLS] [SEP] [MASK], then a
    WordPiece vocabulary trained here on tiny_families' corpus."""
    from tokenizers import trainers
    from transformers import BertTokenizer

    backend = BertTokenizer()._tokenizer
    backend.train_from_iterator(tf._CORPUS * 4, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    return BertTokenizer(vocab=backend.get_vocab(), **kw)


def _instructblip():
    """Salesforce/instructblip-vicuna-7b: BLIP-2's layout (EVA ViT-g 224/14, a Q-Former of 32 queries ->
    32 tokens per image) whose Q-Former also reads the instruction (tokenized by its own BERT
    tokenizer, qformer_input_ids); Vicuna-7B LM. The processor writes num_query_tokens <image> BEFORE the
    text (before the BOS), whatever the text says: one image per prompt. No chat template.
    Here 32 px / patch 16, 4 queries."""
    from transformers import (BlipImageProcessorPil, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig)

    # the converter (convert_instructblip_original_to_pytorch.py): LlamaTokenizerFast of huggyllama/llama-7b with
    # truncation_side left, bos "</s>", unk "</s>", then [PAD] (32000); the release later added <image> (32001).
    # unk "<unk>" here, as build() refuses an EOS that is the unk (blip-2's note)
    tok = _llama_tokenizer(["[PAD]", "<image>"], bos_token="</s>", pad_token="[PAD]", truncation_side="left")
    # the Q-Former's: bert-base-uncased, truncation_side left, bos [DEC] added (30522: its vocab_size 30523)
    qtok = _bert_tokenizer(truncation_side="left")
    qtok.add_special_tokens({"bos_token": "[DEC]"})
    text = LlamaConfig(**_text_kw(tok, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    vision = InstructBlipVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                                      num_attention_heads=2, image_size=32, patch_size=16)
    # release Q-Former: BERT-base width, 12 layers, cross-attention every 2nd layer
    qformer = InstructBlipQFormerConfig(vocab_size=len(qtok), hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                                        intermediate_size=2 * H, encoder_hidden_size=H, cross_attention_frequency=2,
                                        pad_token_id=qtok.pad_token_id)
    cfg = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=4,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    # the converter: BlipImageProcessor 224x224 (bicubic: the class's), OpenAI-CLIP mean/std;
    # processor_config.json: num_query_tokens 32
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32}, resample=3,
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    return _Parts(InstructBlipForConditionalGeneration(cfg), tok, ip, None, {"num_query_tokens": 4}, ["</s>"],
                  sub_tokenizers={"qformer_tokenizer": qtok})


def _xlmr_tokenizer():
    """XLMRobertaTokenizer (SentencePiece Unigram, fairseq order <s> <pad> </s> <unk>, <mask> after the
    pieces), pieces trained here on tiny_families' corpus."""
    from tokenizers import trainers
    from transformers import XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    backend = XLMRobertaTokenizer()._tokenizer
    backend.train_from_iterator(tf._CORPUS * 4, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False))
    pieces = [tuple(p) for p in json.loads(backend.to_str())["model"]["vocab"]]
    assert [p for p, _ in pieces[:4]] == specials
    return XLMRobertaTokenizer(vocab=pieces + [("<mask>", 0.0)])


def _kosmos2():
    """microsoft/kosmos-2-patch14-224: CLIP ViT-L/14 at 224 px, a resampler of latent_query_num (64)
    learned queries -> 64 image embeddings, MAGNETO decoder LM. No image token: the processor writes
    `<image>` + 64 ordinary vocabulary ids (unk_id + 1 ..) + `</image>` IN FRONT of the text, whatever the
    text says, and image_embeds_position_mask marks where the embeddings go: one image per prompt.
    Grounding tags and 1024 <patch_index_xxxx> tokens added by the processor. No chat template.
    Here 32 px / patch 16; the 64 latents kept (the processor's num_image_tokens is a class setting)."""
    from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2ForConditionalGeneration

    tok = _xlmr_tokenizer()
    # release tokenizer.json: the processor's tags (</doc> <image> </image> ...) and patch-index tokens after
    # the pieces; Kosmos2Processor.__init__ adds them (non-special, lstrip) where missing: here, as it does
    from transformers import Kosmos2Processor
    Kosmos2Processor(CLIPImageProcessorPil(), tok)
    text = dict(vocab_size=len(tok), embed_dim=H, layers=L, ffn_dim=2 * H, attention_heads=4,
                max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=2, image_size=32,
                  patch_size=16)
    cfg = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=64)
    # release preprocessor_config.json: CLIPImageProcessor to 224x224, bicubic, OpenAI-CLIP mean/std (the class
    # defaults); 224x224 out for any aspect ratio (test_processing_kosmos2.py test_full_processor), no centre crop
    ip = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    return _Parts(Kosmos2ForConditionalGeneration(cfg), tok, ip, None, {}, ["</s>"])


def _janus():
    """deepseek-community/Janus-Pro-1B (deepseek-ai/Janus-Pro-1B converted): understanding path SigLIP-L
    384/16 -> 576 tokens per image (resized to 384 on the long side, padded square with the mean colour),
    a 2-layer MLP aligner; generation path a VQ-GAN (image_token_size 16384) with its own aligner and head;
    DeepSeek-LLM 1.5B (Llama layout). Each <image_placeholder> becomes <begin_of_image> + num_image_tokens
    <image_placeholder> + <end_of_image>; use_default_system_prompt: the processor writes the DeepSeek-VL
    system prompt in front of every text (text mode). Here 32 px / patch 16 -> 4 tokens, a 2-level VQ-GAN."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusVisionConfig,
                              JanusVQVAEConfig, LlamaConfig)

    # DeepSeek-LLM's byte-level BPE (as deepseek_vl's), <｜begin▁of▁sentence｜> written in front of every text; the
    # release's additional specials (image placeholder, grounding tags, the chat roles), then the converter's
    # extra_special_tokens image_token / boi_token / eoi_token
    bos, eos, pad = ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                     "<\uff5c\u2581pad\u2581\uff5c>")
    added = ["<image_placeholder>", "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
             "<|User|>", "<|Assistant|>", pad]
    tok = _byte_bpe_fast([bos, eos], added, named={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                                   "eoi_token": "<end_of_image>"},
                         bos_template=bos, bos_token=bos, eos_token=eos, pad_token=pad)
    text = LlamaConfig(**_text_kw(tok, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id))
    # release: SigLIP-L 384/16 (576 tokens), aligner depth 2 to n_embed 2048
    vision = JanusVisionConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, image_size=32, patch_size=16,
                               mlp_ratio=2, projection_dim=H, num_image_tokens=4)
    # release VQ-GAN: 16384 codes of 8, base 128 channels x (1, 1, 2, 2, 4), 24x24 patches of a 384-px image
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32, channel_multiplier=[1, 2],
                          num_res_blocks=1, num_patches=2, projection_dim=H, image_token_embed_dim=H)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                      image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    # the converter: JanusImageProcessor from the original preprocessor_config.json (image_size 384 -> size 384x384,
    # min_size 14, mean/std 0.5, rescale 1/255); JanusProcessor(use_default_system_prompt=True), num_image_tokens 576
    ip = JanusImageProcessorPil(size={"height": 32, "width": 32}, min_size=14, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _Parts(JanusForConditionalGeneration(cfg), tok, ip, JANUS_TEMPLATE,
                  {"num_image_tokens": 4, "use_default_system_prompt": True}, [eos])


# HuggingFaceM4/idefics2-8b processor_config.json "chat_template" (as quoted from that file in public
# code, e.g. a comment citing huggingface.co/HuggingFaceM4/idefics2-8b/blob/main/processor_config.json;
# the same string is the idefics2-8b-chatty template in mistral.rs' chat-template tests)
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# thisisiron/Ovis2-1B-hf: CHAT_TEMPLATE of transformers' src/transformers/models/ovis2/convert_ovis2_weights_to_hf.py
# (the converter that wrote the release); the same string is tests/models/ovis2/test_processing_ovis2.py's, whose
# test_chat_template checks it against the hub checkpoint's rendering
OVIS2_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# deepseek-community/deepseek-vl-1.3b-chat: transformers' tests/models/deepseek_vl/test_processing_deepseek_vl.py
# prepare_processor_dict()["chat_template"] (with num_image_tokens 576: the release's processor settings)
DEEPSEEK_VL_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}{% set i = 0 %}You are a helpful language "
    "and vision assistant. You are able to understand the visual content that the user provides, and assist the "
    "user with a variety of tasks using natural language.\n\n{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}User: {% elif message['role']|lower == 'assistant' %}Assistant:"
    "{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='') %} {% endif %}{% else %}{{ message['role'].capitalize() }}: {% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image_placeholder>"
    "{% elif content['type'] == 'text' %}{% set text = content['text'] %}{% if loop.first %}"
    "{% set text = text.lstrip() %}{% endif %}{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}{{ ' ' + text }}"
    "{% else %}{{ text }}{% endif %}{% endif %}{% endfor %}{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# deepseek-community/Janus-Pro-1B: CHAT_TEMPLATE of transformers'
# src/transformers/models/janus/convert_janus_weights_to_hf.py (the converter that wrote the release);
# tests/models/janus/test_processing_janus.py checks the hub processor's renderings against it
# ("<|User|>: What is shown in this image?\n<image_placeholder>\n\n<|Assistant|>:")
JANUS_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%set i=0%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: {%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='')%} {%endif%}{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}{%elif content['type']=='text'%}"
    "{%set text=content['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}{%endif%}"
    "{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}{%if message['role']|lower=='user'%}{{seps[0]}}"
    "{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

EXTRA = [
    Family("idefics2", "HuggingFaceM4/idefics2-8b", "Idefics2ForConditionalGeneration", "Idefics2Processor",
           "Idefics2ImageProcessorPil", _idefics2),
    Family("ovis2", "thisisiron/Ovis2-1B-hf", "Ovis2ForConditionalGeneration", "Ovis2Processor",
           "Ovis2ImageProcessorPil", _ovis2),
    Family("deepseek_vl", "deepseek-community/deepseek-vl-1.3b-chat", "DeepseekVLForConditionalGeneration",
           "DeepseekVLProcessor", "DeepseekVLImageProcessorPil", _deepseek_vl),
    Family("blip-2", "Salesforce/blip2-opt-2.7b", "Blip2ForConditionalGeneration", "Blip2Processor",
           "BlipImageProcessorPil", _blip2),
    Family("chameleon", "facebook/chameleon-7b", "ChameleonForConditionalGeneration", "ChameleonProcessor",
           "ChameleonImageProcessorPil", _chameleon),
    Family("fuyu", "adept/fuyu-8b", "FuyuForCausalLM", "FuyuProcessor", "FuyuImageProcessorPil", _fuyu),
    Family("florence2", "florence-community/Florence-2-base", "Florence2ForConditionalGeneration",
           "Florence2Processor", "CLIPImageProcessorPil", _florence2),
    Family("instructblip", "Salesforce/instructblip-vicuna-7b", "InstructBlipForConditionalGeneration",
           "InstructBlipProcessor", "BlipImageProcessorPil", _instructblip),
    Family("kosmos-2", "microsoft/kosmos-2-patch14-224", "Kosmos2ForConditionalGeneration", "Kosmos2Processor",
           "CLIPImageProcessorPil", _kosmos2),
    Family("janus", "deepseek-community/Janus-Pro-1B", "JanusForConditionalGeneration", "JanusProcessor",
           "JanusImageProcessorPil", _janus),
]
assert not {f.name for f in EXTRA} & set(tf.FAMILIES), "a family here is named by the tests"


@contextlib.contextmanager
def registered(families):
    """tiny_families.build() on these families too, for the duration (its registry restored after)."""
    saved = dict(tf._BY_NAME)
    tf._BY_NAME.update({f.name: f for f in families})
    try:
        yield
    finally:
        tf._BY_NAME.clear()
        tf._BY_NAME.update(saved)


def build_extra(name, out_dir, seed=0):
    """A tiny checkpoint of one EXTRA family, written exactly as tiny_families.build writes its own."""
    with registered(EXTRA):
        return tf.build(name, out_dir, seed=seed)


# ---------------------------------------------------------------------------------------------
# the data: tests/test_families.py's mia_rows, written here
# ---------------------------------------------------------------------------------------------
def write_rows(root):
    """-> ({format: jsonl path}, rows): tiny_families.write_mia_rows, the rows tests/test_families.py runs."""
    return tf.write_mia_rows(root)


# ---------------------------------------------------------------------------------------------
# running the stages
# ---------------------------------------------------------------------------------------------
class Result:
    def __init__(self, status, note=""):
        self.status, self.note = status, note  # "pass" | "skip" | "refused" | "FAIL" | "-" (not run: an earlier stage failed)

    def __str__(self):
        return self.status if not self.note else f"{self.status}: {self.note}"


def _root_error(e):
    """One line: the exception, the innermost frame in this repository's code (not this script),
    and the frame that raised it where that is elsewhere (transformers, torch)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [fr for fr in frames if Path(fr.filename).is_relative_to(ROOT) and Path(fr.filename).name != Path(__file__).name]
    out = f"{type(e).__name__}: {msg[:300]}"
    if ours:
        out += f" [at {Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].name}:{ours[-1].lineno}]"
    if frames and (not ours or frames[-1] is not ours[-1]):
        out += f" (raised in {Path(frames[-1].filename).name}:{frames[-1].name})"
    return out


def _failed(err):
    """A stage that ended in a one-line refusal (SystemExit: what the stage says of a checkpoint it does
    not support) is "refused"; any other exception is a FAIL."""
    return Result("refused" if isinstance(err, SystemExit) else "FAIL", _root_error(err))


def _run(log, fn):
    """fn() with stdout/stderr captured into `log` -> (value, None) or (None, the exception)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            value = fn()
        return value, None
    except (Exception, SystemExit) as e:  # noqa: BLE001 — every failure is recorded, none stops the others
        buf.write("\n" + "".join(traceback.format_exception(e)))
        return None, e
    finally:
        log.write_text(buf.getvalue(), encoding="utf-8")


def check_family(name, work, threads):
    """Build `name` under work/, run 04 (per format), 06 and 07 -> {stage: Result}."""
    gp, dpo, ev = (importlib.import_module(m) for m in ("04_gen_pairs", "06_train_dpo", "07_eval"))
    import common

    res = {s: Result("-") for s in STAGES}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data, rows = write_rows(work / "data")
    model_dir, err = _run(logs / "build.log", lambda: build_extra(name, work / "model"))
    if err is not None:
        for s in STAGES:
            res[s] = Result("FAIL", "build: " + _root_error(err))
        return res

    # 04, one run per format
    pairs, cands = [], []
    for fmt in ("sequence", "grid", "pip"):
        out = work / "04" / fmt / "pairs.jsonl"
        argv = ["--data", str(data[fmt]), "--image-root", str(work / "data"), "--model", str(model_dir),
                "--out", str(out), "--max-new-tokens", "4", "--min-ppl", "0", "--threads", str(threads),
                "--threshold", "sequence=inf", "--threshold", "grid=inf", "--threshold", "pip=inf"]
        got, err = _run(logs / f"04-{fmt}.log", lambda: gp.main(gp.get_args(argv)))
        if err is not None:
            res[f"04 {fmt}"] = _failed(err)
            continue
        p, c = got
        (c,) = c
        if c["reason"].startswith("no token geometry"):
            res[f"04 {fmt}"] = Result("skip", c["reason"].split(" (known:")[0])
            continue
        bad = [] if c.get("ratio") is not None and 0 <= c["ratio"] <= 1 else [f"ratio {c.get('ratio')}"]
        n_att = len(c.get("attn_images") or [])
        if n_att != (2 if fmt == "sequence" else 1):
            bad.append(f"{n_att} per-image attention masses")
        if bad:
            res[f"04 {fmt}"] = Result("FAIL", "; ".join(bad))
            continue
        res[f"04 {fmt}"] = Result("pass", f"ratio {c['ratio']:.3f}, {c['reason']}")
        pairs += p
        cands.append((c, rows[fmt]))
    # 06: 2 steps on 04's pairs; where 04 selected none (a random model's answers run to --max-new-tokens),
    # on its candidates' answers; where no 04 run finished, on the source rows with a fixed wrong answer
    if pairs:
        source = "04's pairs"
    elif cands:
        source = "04's candidates (04 selected no pair: " + ", ".join(sorted({c["reason"] for c, _ in cands})) + ")"
    else:
        source = "the source rows, rejected 'a green one' (04 failed on every format)"
        cands = [({"answer": "", "correct": False}, row) for row in rows.values()]
    if not pairs:
        for c, row in cands:
            rejected = c["answer"] if c["answer"].strip() and not c["correct"] else "a green one"
            pairs.append({"id": row["id"], "image": row["image"], "prompt": row["conversations"][0]["value"],
                          "chosen": row["conversations"][1]["value"], "rejected": rejected, "mia": row["mia"]})
    rows06 = [{**p, "id": f"{p['id']}{k}"} for k in range(2) for p in pairs]  # >= 2 batches of 2
    pairs_file = work / "06" / "pairs.jsonl"
    pairs_file.parent.mkdir(parents=True, exist_ok=True)
    common.write_jsonl(pairs_file, rows06)
    out06 = work / "06" / "out"
    argv = ["--pairs", str(pairs_file), "--image-root", str(work / "data"), "--model", str(model_dir),
            "--out", str(out06), "--recipe", "paper", "--dtype", "float32", "--no-grad-ckpt",
            "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8",
            "--max-steps", "2", "--warmup-steps", "0", "--save-every", "0", "--threads", str(threads)]
    _, err = _run(logs / "06.log", lambda: dpo.main(dpo.get_args(argv)))
    if err is not None:
        res["06"] = _failed(err)
    else:
        log = [r for _, r in common.read_rows(out06 / "log.jsonl")]
        said = (logs / "06.log").read_text(encoding="utf-8")
        path = "fast path" if "06_train_dpo: fast path for" in said else "plain path"
        import math

        if len(log) != 2 or not all(math.isfinite(r["loss"]) for r in log):
            res["06"] = Result("FAIL", f"{len(log)} logged steps, losses {[r.get('loss') for r in log]}")
        else:
            res["06"] = Result("pass", f"{len(rows06)} rows from {source}; {path}")

    # 07: the base and 06's output on the three rows (the base alone where 06 failed)
    models = {"base": model_dir, **({"dpo": out06} if res["06"].status == "pass" else {})}
    out07 = work / "07"
    argv = [*(a for m, d in models.items() for a in ("--model", f"{m}={d}")), "--data", *(str(f) for f in data.values()),
            "--image-root", str(work / "data"), "--out", str(out07), "--max-new-tokens", "4", "--threads", str(threads)]
    _, err = _run(logs / "07.log", lambda: ev.main(ev.get_args(argv)))
    if err is not None:
        res["07"] = _failed(err)
        return res
    report = json.loads((out07 / "report.json").read_text())
    answered = {m: len((out07 / f"answers-{m}.jsonl").read_text().splitlines()) for m in models}
    if answered != {m: 3 for m in models}:
        res["07"] = Result("FAIL", f"answers per model {answered}, want 3 each")
    else:
        groups = sorted(report["base"]["groups"])
        res["07"] = Result("pass", f"3 answers x {' + '.join(models)}; groups {', '.join(groups)}"
                           + ("" if "dpo" in models else " (06 failed: the base only)"))
    return res


def table(results):
    w = max(len(n) for n in results) + 2
    lines = [f"{'family':<{w}}" + "".join(f"{s:<13}" for s in STAGES)]
    for name, res in results.items():
        lines.append(f"{name:<{w}}" + "".join(f"{res[s].status:<13}" for s in STAGES))
    lines.append("")
    for name, res in results.items():
        for s in STAGES:
            if res[s].note:
                lines.append(f"  {name} / {s}: {res[s]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("families", nargs="*", help=f"default: all of {' '.join(f.name for f in EXTRA)}")
    p.add_argument("--out", help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints, data, per-stage logs)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    names = args.families or [f.name for f in EXTRA]
    unknown = set(names) - {f.name for f in EXTRA}
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; these are: {' '.join(f.name for f in EXTRA)}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="unnamed-families-"))
    results = {}
    try:
        for name in names:
            t0 = time.time()
            print(f"== {name} ({next(f.release for f in EXTRA if f.name == name)})", flush=True)
            results[name] = check_family(name, work / name, args.threads)
            for s in STAGES:
                print(f"   {s:<12} {results[name][s]}", flush=True)
            print(f"   ({time.time() - t0:.0f} s; logs: {work / name / 'logs'})", flush=True)
    finally:
        print("\n" + table(results))
        if not args.out and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or args.out:
            print(f"\nwork folder: {work}")
    failed = [f"{n} / {s}" for n, r in results.items() for s in STAGES if r[s].status == "FAIL"]
    print(f"\n{len(failed)} stage(s) FAILED" + (": " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
