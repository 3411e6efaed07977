"""The embedded model's tokenizer: a small byte-level BPE with one token per digit.

Byte-level, so any text (GSM8K, MATH, unicode) tokenizes and decodes back exactly; digits
are split before BPE so arithmetic sees one token per digit. Saved as a
``PreTrainedTokenizerFast`` with a chat template::

    <|user|>
    {content}
    <|assistant|>
    {answer}<|end|>
"""

from __future__ import annotations

import random
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_latent.prompts import math_prompt
from lit_latent.embedded.checks import TASKS, check_example, final_example
from lit_latent.embedded.problems import train_problems

EOS, PAD = "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, EOS, "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% if message['role'] == 'assistant' %}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(n_problems: int = 3000, seed: int = 7) -> Iterable[str]:
    rng = random.Random(seed)
    for i, p in enumerate(train_problems(seed)):
        if i >= n_problems:
            break
        yield math_prompt(p["problem"]) + "\n" + p["solution"]
        yield check_example(rng, p, TASKS[i % len(TASKS)])[0] + "\nyes\nno\nyes\nno"
        if i % 4 == 0:
            yield "\n".join(final_example(rng, p))


def build_tokenizer(vocab_size: int = 800, n_problems: int = 3000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(n_problems), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, padding_side="left",
                                   clean_up_tokenization_spaces=False)
