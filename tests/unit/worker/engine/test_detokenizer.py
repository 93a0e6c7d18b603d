"""Incremental detokenisation: deltas never split a character, and their
concatenation always equals decoding the whole completion at once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from worker.engine.detokenizer import Detokenizer

MIXED_TEXT = (
    "Hello world! naïve café, 日本語のテキスト 🙂🚀 Ünïcödé — «quotes» and  double  spaces\n"
    "new line\ttab, Ελληνικά, русский, עברית, emoji 👩‍💻 end."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def build_sentencepiece_style_tokenizer() -> PreTrainedTokenizerBase:
    """A tiny Llama-style tokenizer: "▁" marks spaces, unknown characters fall
    back to <0xNN> byte tokens, and decoding strips the first leading space."""
    trainer = trainers.BpeTrainer(
        vocab_size=150,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"),
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer)
    # Byte tokens are ordinary (not special) vocabulary entries, as in Llama.
    vocab = trained.get_vocab()
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [tuple(merge) for merge in json.loads(trained.to_str())["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def sentencepiece_style() -> PreTrainedTokenizerBase:
    return build_sentencepiece_style_tokenizer()


def stream(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[list[str], str]:
    """Per-token deltas and the final flush."""
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.push(token) for token in ids]
    return deltas, detokenizer.flush()


def full_decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_character_split_across_byte_level_tokens_is_held_back_until_complete(smollm2):
    ids = smollm2.encode(" 日本")
    # " æ", "Ĺ", "¥" spell 日 a byte or two at a time; "æľ¬" is 本 whole.
    assert smollm2.convert_ids_to_tokens(ids) == ["Ġæ", "Ĺ", "¥", "æľ¬"]
    deltas, rest = stream(smollm2, ids)
    assert deltas == ["", "", " 日", "本"]
    assert rest == ""


def test_character_split_across_byte_fallback_tokens_is_held_back_until_complete(sentencepiece_style):
    ids = sentencepiece_style.encode("hello 日 world", add_special_tokens=False)
    tokens = sentencepiece_style.convert_ids_to_tokens(ids)
    start = tokens.index("<0xE6>")
    assert tokens[start : start + 3] == ["<0xE6>", "<0x97>", "<0xA5>"]
    deltas, rest = stream(sentencepiece_style, ids)
    # The run of byte tokens is released by the first token after it.
    assert deltas[start : start + 3] == ["", "", ""]
    assert deltas[start + 3].startswith("日")
    assert "".join(deltas) + rest == "hello 日 world"


def test_byte_fallback_run_waits_for_its_end_since_a_later_byte_can_invalidate_it(sentencepiece_style):
    ids = sentencepiece_style.convert_tokens_to_ids(["<0xC3>", "<0xA9>", "<0x88>"])
    assert full_decode(sentencepiece_style, ids[:2]) == "é"
    # As a whole the run is not UTF-8, so the tokenizer renders every byte as U+FFFD.
    assert full_decode(sentencepiece_style, ids) == "\ufffd" * 3
    deltas, rest = stream(sentencepiece_style, ids)
    assert deltas == ["", "", ""]
    assert rest == "\ufffd" * 3


def test_incomplete_character_at_the_end_is_flushed_as_replacement_character(smollm2):
    first_half = smollm2.encode(" 日本")[:2]
    deltas, rest = stream(smollm2, first_half)
    assert deltas == ["", ""]
    assert rest == full_decode(smollm2, first_half)
    assert rest.endswith("\ufffd")


def test_leading_spaces_survive_token_by_token_decoding(smollm2, sentencepiece_style):
    for tokenizer in (smollm2, sentencepiece_style):
        ids = tokenizer.encode("hello world  the fox", add_special_tokens=False)
        deltas, rest = stream(tokenizer, ids)
        assert "".join(deltas) + rest == full_decode(tokenizer, ids) == "hello world  the fox"
        assert any(delta.startswith(" ") for delta in deltas)


def test_first_token_renders_as_a_full_decode_renders_it(sentencepiece_style):
    ids = sentencepiece_style.encode(" world", add_special_tokens=False)
    deltas, rest = stream(sentencepiece_style, ids)
    assert "".join(deltas) + rest == full_decode(sentencepiece_style, ids)


def test_special_tokens_render_as_nothing(smollm2):
    ids = [smollm2.convert_tokens_to_ids("<|im_start|>"), *smollm2.encode("hi there"), smollm2.eos_token_id]
    deltas, rest = stream(smollm2, ids)
    assert deltas[0] == "" and deltas[-1] == ""
    assert "".join(deltas) + rest == "hi there"


@pytest.mark.parametrize("seed", range(5))
def test_concatenated_deltas_equal_the_full_decode_for_any_token_sequence(smollm2, sentencepiece_style, seed):
    rng = random.Random(seed)
    for tokenizer in (smollm2, sentencepiece_style):
        natural = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
        # Mix real text, random slices of it (characters cut mid-way) and
        # arbitrary ids, special tokens included.
        ids: list[int] = []
        while len(ids) < 150:
            choice = rng.random()
            if choice < 0.4:
                start = rng.randrange(len(natural))
                ids.extend(natural[start : start + rng.randrange(1, 8)])
            elif choice < 0.8:
                ids.append(rng.randrange(len(tokenizer)))
            else:
                ids.append(rng.choice(tokenizer.all_special_ids))
        deltas, rest = stream(tokenizer, ids)
        assert "".join(deltas) + rest == full_decode(tokenizer, ids)
        # A delta never ends in the middle of a character, only the flush may.
        assert not any(delta.endswith("\ufffd") for delta in deltas)


def test_work_per_token_is_bounded_by_a_small_window(smollm2):
    decoded_lengths: list[int] = []

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(smollm2, name)

        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return smollm2.decode(ids, **kwargs)

    detokenizer = Detokenizer(CountingTokenizer())  # type: ignore[arg-type]
    ids = smollm2.encode(MIXED_TEXT * 4)
    text = "".join(detokenizer.push(token) for token in ids) + detokenizer.flush()
    assert text == full_decode(smollm2, ids)
    assert max(decoded_lengths) <= 6
