"""Tiny random Florence-2 and BLIP captioners (model + processor) saved to a folder, built offline.

The layouts are the real ones (transformers' own classes and configs) at toy widths; the tokenizers
are built from an in-memory vocabulary (byte-level BPE without merges for Florence-2's BART
tokenizer, a WordPiece vocabulary for BLIP's BERT tokenizer), so nothing is downloaded.
"""

import torch

from library.models.clip_tokenizer import bytes_to_unicode

IMAGE_SIDE = 16


def save_tiny_florence2(folder: str, seed: int = 0) -> str:
    from transformers import (BartTokenizer, CLIPImageProcessorPil, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor)

    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + bytes_to_unicode() + ["<mask>"]
    tokenizer = BartTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[],
                              extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}, do_center_crop=False)
    image_processor.image_seq_length = (IMAGE_SIDE // 4) ** 2 + 1  # patch stride 4, plus the pooled token
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=128, d_model=8,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=8, decoder_ffn_dim=8,
                         encoder_attention_heads=1, decoder_attention_heads=1,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=12, projection_dim=8),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def save_tiny_blip(folder: str, seed: int = 0) -> str:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
    tokens += ["cat", "dog", "photo", "of", "[DEC]"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=len(tokens) - 1,
                         pad_token_id=0, sep_token_id=3, encoder_hidden_size=16),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE_SIDE, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder
