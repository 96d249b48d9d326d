"""A tiny random Llama and a byte-level BPE tokenizer trained in memory: fast, and no download."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Test-time fine-tuning takes one gradient step per "
    "selected passage, answers with the adapted model, and then returns to the base model. "
    "SIFT selects passages that reduce the uncertainty about the answer. "
    "Nearest neighbours retrieve the most similar passages, duplicates included. "
)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(extra_text: str = "", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TRAINING_TEXT + extra_text] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def tiny_model(tokenizer, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


def save_tiny_chat_model(folder) -> str:
    """The tiny model and tokenizer as a local safetensors folder, usable as `--chat-model FOLDER`."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@torch.no_grad()
def words_only(model, tokenizer):
    """The model with every token but plain words silenced (a zero embedding row, tied head: logit
    0), so that its meaningless answers are visible words, never only whitespace."""
    for token_id in range(len(tokenizer)):
        if not tokenizer.decode([token_id], skip_special_tokens=True).strip().isalpha():
            model.get_input_embeddings().weight[token_id] = 0
    return model
