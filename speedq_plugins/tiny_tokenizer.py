"""A word-level tokenizer built in code for the tiny models (no download needed).

One vocabulary serves every tiny family: the special tokens of all four chat/image formats, the
words of the synthetic benchmark and of VLMEvalKit's MCQ prompts, digits and single letters.
Words outside it map to ``<unk>``. Token ids are stable: append new words at the end only, or the
shipped tiny weights stop matching.
"""
from __future__ import annotations

import string
from functools import lru_cache

SPECIAL_TOKENS = (
    "<pad>", "<unk>", "<s>", "</s>",
    # LLaVA / FastVLM
    "<image>",
    # InternVL
    "<img>", "</img>", "<IMG_CONTEXT>",
    # Qwen2-VL and the chat markers InternVL shares with it
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<|endoftext|>",
)

_WORDS = """
user assistant system USER ASSISTANT Question Options Answer Hint Please select the correct answer
from options option above with letter given choices directly what which how many is are there in
of a an to and or on at image picture shape shapes color colour colors object objects left right top
bottom middle center centre upper lower side corner corners position where count number largest
smallest biggest larger smaller bigger brighter darker same different than more fewer most least
red green blue yellow orange purple pink brown black white gray grey cyan magenta teal navy olive
maroon lime crimson violet indigo gold silver beige tan coral salmon
circle circles square squares triangle triangles cross crosses star stars ring rings bar bars
diamond diamonds rectangle rectangles dot dots line lines stripe stripes
one two three four five six seven eight nine ten zero none no yes true false
horizontal vertical diagonal above below next beside between inside outside near far
Describe this describe answer Yes No
""".split()


def vocabulary() -> list[str]:
    """The ordered vocabulary: special tokens, then single characters, then words."""
    words: list[str] = list(SPECIAL_TOKENS)
    for token in list(string.ascii_letters) + list(string.digits) + list(string.punctuation):
        words.append(token)
    for word in _WORDS:
        words.extend((word, word.capitalize()))
    for n in range(10, 33):
        words.append(str(n))
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


@lru_cache(maxsize=1)
def build_tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary` (word level, whitespace/punctuation split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def tiny_tokenizer_copy(**extra_special_tokens: str):
    """A private copy of the shared tiny tokenizer (processors may modify theirs), with named special
    tokens (``extra_special_tokens``) as the real checkpoints' tokenizers declare them."""
    import copy

    from transformers import PreTrainedTokenizerFast

    shared = build_tiny_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(shared.backend_tokenizer),
        bos_token=shared.bos_token, eos_token=shared.eos_token,
        unk_token=shared.unk_token, pad_token=shared.pad_token,
        extra_special_tokens=extra_special_tokens or None,
    )
