"""Tiny random Hugging Face teachers saved to folders, for tests (no download)."""

import torch

BOS_ID = 1  # id of "<bos>" in the tiny tokenizers below


def save_tiny_tokenizer(path, vocab_size, adds_bos):
    """A word-level tokenizer over ``vocab_size`` ids ("<unk>", "<bos>", "<eos>", "w3", ...).

    ``adds_bos``: its encoding starts every text with ``<bos>`` (as Gemma's and Llama-2's do);
    otherwise it has a BOS token that encoding never adds (as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast


def save_tiny_llama_teacher(path, vocab_size=200, hidden_size=48, num_layers=3, seed=0,
                            tokenizer=None):
    """``tokenizer``: None (weights only), "bos" (encoding adds BOS) or "plain" (it does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=96,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=BOS_ID)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        save_tiny_tokenizer(path, vocab_size, adds_bos=tokenizer == "bos")
    return model
