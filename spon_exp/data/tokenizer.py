"""A byte-level Hugging Face tokenizer built in code, for tiny random test models.

It is a real ``PreTrainedTokenizerFast`` (so lm-eval's HFLM and every data path treat it
like any other tokenizer) that needs no file and no network: 256 byte tokens plus EOS.
"""

from __future__ import annotations

BYTE_VOCAB_SIZE = 257  # 256 bytes + <eos>
# A plain role-tagged chat template (in bytes like any text), so lm-eval's apply_chat_template
# runs on the tiny models as it does on an Instruct model's tokenizer.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.name_or_path = "byte-tokenizer"
    fast.chat_template = CHAT_TEMPLATE
    return fast
