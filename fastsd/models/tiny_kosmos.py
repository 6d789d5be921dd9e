"""A tiny, randomly initialised Kosmos-2 (model and processor), built offline.

It has the real model's classes and processor (``Kosmos2ForConditionalGeneration``,
``Kosmos2Processor`` with a CLIP image processor and an XLM-RoBERTa tokenizer), so the
captioner runs on it exactly as on ``microsoft/kosmos-2-patch14-224``, only with a few
hundred thousand random weights. Its captions are gibberish; its output format is real.

The tokenizer is a small Unigram model built with the ``tokenizers`` library: ``<s> <pad>
</s> <unk>`` at ids 0-3 like the real one, then ordinary pieces (words and single
characters, so any text tokenizes). Kosmos-2 writes its 64 image placeholders with the 64
ids after ``<unk>``, so there are well over 64 ordinary pieces. The processor then adds
the grounding tags and the 1024 ``<patch_index_XXXX>`` tokens; the text model's vocabulary
is sized to the finished tokenizer.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

from fastsd import drive
from fastsd.models.tiny import WORDS

log = logging.getLogger("fastsd")

NAME = "tiny-kosmos2"
TINY_VERSION = 1
MARKER = "fastsd_tiny.json"
IMAGE_SIZE = 32  # pixels the vision tower sees (the real model: 224)
PATCH_SIZE = 8
LATENT_QUERY_NUM = 64  # must equal the processor's num_image_tokens
# Initialisation scales far above the real model's 0.02: with them the random model's
# greedy output depends on the image (at 0.02 every image gets the same text), so tests
# comparing batched and one-at-a-time captions compare something.
INIT_STD = 1.0
VISION_INIT_FACTOR = 10.0
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_EXTRA_WORDS = """A An The Describe this image detail: snowman fire warming himself by cup
sitting next to is are there two one his her its""".split()


def _pieces() -> list[tuple[str, float]]:
    """The Unigram vocabulary: specials at 0-3, then words (cheap) and characters (dear)."""
    words = list(dict.fromkeys(WORDS + _EXTRA_WORDS))
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [(t, 0.0) for t in SPECIALS]
    pieces += [("▁" + w, -2.0) for w in words]
    pieces += [("▁", -4.0)]
    pieces += [(c, -6.0) for c in chars] + [("▁" + c, -6.5) for c in chars]
    return pieces


def build_tokenizer():
    """An XLM-RoBERTa tokenizer (tokenizers-backed) over a small Unigram vocabulary."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import XLMRobertaTokenizerFast

    pieces = _pieces()
    backend = Tokenizer(Unigram(vocab=pieces, unk_id=SPECIALS.index("<unk>"),
                                byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = XLMRobertaTokenizerFast(vocab=pieces, tokenizer_object=backend,
                                  mask_token="<unk>", model_max_length=512)
    return tok


def build_processor():
    """The Kosmos-2 processor: CLIP image processor (square resize, no crop) + tokenizer."""
    from transformers import Kosmos2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Kosmos2Processor(image_processor, build_tokenizer())


def build_model(processor, seed: int = 0):
    """A randomly initialised Kosmos2ForConditionalGeneration sized to ``processor``."""
    import torch
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    tok = processor.tokenizer
    config = Kosmos2Config(
        text_config=dict(
            vocab_size=len(tok), embed_dim=32, layers=2, ffn_dim=64, attention_heads=2,
            max_position_embeddings=512, init_std=INIT_STD, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, initializer_range=INIT_STD,
            initializer_factor=VISION_INIT_FACTOR),
        latent_query_num=LATENT_QUERY_NUM)
    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def build_pair(seed: int = 0):
    """(model, processor) in memory."""
    processor = build_processor()
    return build_model(processor, seed), processor


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny Kosmos-2 and save model and processor to ``out_dir`` (whole or absent)."""
    out_dir = Path(out_dir)
    model, processor = build_pair(seed)
    with drive.folder_writer(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        drive.atomic_write_json(tmp / MARKER, {"family": "kosmos2", "seed": seed,
                                               "version": TINY_VERSION})
    log.info("Built tiny Kosmos-2 in %s", out_dir)
    return out_dir


def ensure(root: str | Path, seed: int = 0) -> Path:
    """The folder of the tiny Kosmos-2 under ``root``, built when missing or stale."""
    path = Path(root) / (NAME + ("" if seed == 0 else f"-seed{seed}"))
    marker = path / MARKER
    if marker.is_file():
        meta = drive.read_json(marker)
        if meta.get("version") == TINY_VERSION and meta.get("seed") == seed:
            return path
    return build(path, seed)
