"""The tokenizer maps raw text onto SST-2's PTB-style tokens; the vocabulary maps them to ids."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from models.tokenizer import PAD_ID, PAD_TOKEN, UNK_ID, UNK_TOKEN, Vocabulary, tokenize
from training.common import default_data_dir
from training.data import read_sst2


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("I didn't like it", ["i", "did", "n't", "like", "it"]),
        ("It's great, isn't it?", ["it", "'s", "great", ",", "is", "n't", "it", "?"]),
        ("I can't and won't", ["i", "ca", "n't", "and", "wo", "n't"]),
        ("cannot", ["can", "not"]),
        ("they're, we've, you'll", ["they", "'re", ",", "we", "'ve", ",", "you", "'ll"]),
        ("I'd say I'm in", ["i", "'d", "say", "i", "'m", "in"]),
        ("rock 'n' roll", ["rock", "'n'", "roll"]),
        ("Don’t", ["do", "n't"]),  # typographic apostrophe
    ],
)
def test_contractions_are_split_like_the_treebank(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Wow!!", ["wow", "!", "!"]),
        ("well...", ["well", "..."]),
        ("good -- not great", ["good", "--", "not", "great"]),
        ("a so-so, made-for-tv film.", ["a", "so-so", ",", "made-for-tv", "film", "."]),
        ('he said "wow"', ["he", "said", "``", "wow", "''"]),
        ("the u.s. version costs $1,000.50", ["the", "u.s.", "version", "costs", "$", "1,000.50"]),
        ("writer\\/director", ["writer/director"]),
        ("john f. kennedy", ["john", "f.", "kennedy"]),
        ("the farrelly bros. film", ["the", "farrelly", "bros.", "film"]),
        ("plan b.", ["plan", "b", "."]),
        ("the '70s", ["the", "'70s"]),
    ],
)
def test_punctuation_is_separated(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_text_is_lower_cased() -> None:
    assert tokenize("A GREAT Movie") == tokenize("a great movie") == ["a", "great", "movie"]


def test_unicode_is_normalised_to_the_data_set_spelling() -> None:
    assert tokenize("“Great” film — sort of…") == [
        "``",
        "great",
        "''",
        "film",
        "--",
        "sort",
        "of",
        "...",
    ]
    assert tokenize("ＦＵＬＬ width") == ["full", "width"]  # NFKC folds full-width letters
    assert tokenize("crème brûlée") == ["crème", "brûlée"]  # accents are kept, as in SST-2


def test_emoji_become_single_tokens() -> None:
    assert tokenize("Love it 😍👍") == ["love", "it", "😍", "👍"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_or_blank_text_gives_no_tokens(text: str) -> None:
    assert tokenize(text) == []


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("-lrb- a -rrb- shapeless blob", ["(", "a", ")", "shapeless", "blob"]),
        ("-lsb- sic -rsb- and -lcb- x -rcb-", ["[", "sic", "]", "and", "{", "x", "}"]),
        ("the movie (2002)", ["the", "movie", "(", "2002", ")"]),
    ],
)
def test_treebank_bracket_tokens_map_to_the_brackets_train_uses(
    text: str, tokens: list[str]
) -> None:
    assert tokenize(text) == tokens


def _sst2_sentences(split: str, limit: int) -> list[str]:
    path = default_data_dir() / "SST-2" / f"{split}.tsv"
    if not path.is_file():
        pytest.skip(f"SST-2 not found at {path}")
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [text for _, text in rows[:limit]]


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_tokenizing_is_idempotent_on_sst2_text(split: str) -> None:
    for text in _sst2_sentences(split, 2_000):
        tokens = tokenize(text)
        assert tokenize(" ".join(tokens)) == tokens, text


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_already_tokenised_sst2_text_is_kept_almost_everywhere(split: str) -> None:
    brackets = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]"}
    sentences = _sst2_sentences(split, 2_000)
    kept = sum(
        tokenize(text) == [brackets.get(t, t).replace("\\/", "/") for t in text.split()]
        for text in sentences
    )
    # The rest are abbreviations the treebank split off differently (``john f. kennedy``).
    assert kept >= 0.99 * len(sentences)


def test_vocabulary_build_encode_and_round_trip(tmp_path: Path) -> None:
    texts = [["good", "film"], ["bad", "film"], ["film", "good"]]
    vocabulary = Vocabulary.build(texts, min_count=2)
    # Most frequent first, padding and unknown reserved at the front.
    assert vocabulary.tokens == (PAD_TOKEN, UNK_TOKEN, "film", "good")
    assert vocabulary.encode(["good", "bad", "film", "unseen"]) == [3, UNK_ID, 2, UNK_ID]
    assert vocabulary.encode([]) == []
    path = tmp_path / "vocab.json"
    vocabulary.save(path)
    assert Vocabulary.load(path) == vocabulary


def test_vocabulary_must_start_with_padding_and_unknown() -> None:
    assert Vocabulary.build([["a"]]).tokens[PAD_ID] == PAD_TOKEN
    with pytest.raises(ValueError):
        Vocabulary(("a", PAD_TOKEN, UNK_TOKEN))


def test_vocabulary_build_is_reproducible_for_ties() -> None:
    first = Vocabulary.build([["b", "a", "c"]])
    second = Vocabulary.build([["c", "a", "b"]])
    assert first == second
    assert first.tokens[2:] == ("a", "b", "c")


KNOWN_WORDS = Vocabulary(
    (PAD_TOKEN, UNK_TOKEN, "warm", "step", "ability", "increase", "teary", "eyed", "gentle")
)


@pytest.mark.parametrize(
    ("word", "known_form"),
    [
        ("warmly", "warm"),  # -ly
        ("stepping", "step"),  # doubled consonant before -ing
        ("abilities", "ability"),  # -ies → -y
        ("increasing", "increase"),  # -ing with the silent e restored
        ("increases", "increase"),
        ("gently", "gentle"),  # -ly after -le
        ("warmness", "warm"),
    ],
)
def test_an_unknown_word_falls_back_to_a_known_stem(word: str, known_form: str) -> None:
    assert KNOWN_WORDS.encode([word]) == KNOWN_WORDS.encode([known_form])


def test_an_unknown_compound_falls_back_to_its_known_parts() -> None:
    teary, eyed, step = KNOWN_WORDS.encode(["teary", "eyed", "step"])
    assert KNOWN_WORDS.encode(["teary-eyed"]) == [teary, eyed]
    assert KNOWN_WORDS.encode(["warmly-stepping-zzz"]) == [
        *KNOWN_WORDS.encode(["warm"]),
        step,
        UNK_ID,
    ]


@pytest.mark.parametrize("word", ["zzz", "ly", "sly", "ing", "-", "--", "---x", "s", ""])
def test_a_word_with_no_known_form_is_one_unknown_token(word: str) -> None:
    assert KNOWN_WORDS.encode([word]) == [UNK_ID]


def test_short_words_are_not_stripped_to_a_stub() -> None:
    # "sing" must not become "s"; "wed" must not become "w" (stems keep three letters).
    vocabulary = Vocabulary((PAD_TOKEN, UNK_TOKEN, "s", "w"))
    assert vocabulary.encode(["sing", "wed"]) == [UNK_ID, UNK_ID]


def test_known_words_are_never_rewritten() -> None:
    vocabulary = Vocabulary((PAD_TOKEN, UNK_TOKEN, "warmly", "warm", "well-made"))
    assert vocabulary.encode(["warmly", "warm", "well-made"]) == [2, 3, 4]


def test_fallback_recovers_many_unknown_sst2_dev_tokens() -> None:
    data_dir = default_data_dir()
    if not (data_dir / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {data_dir}")
    vocabulary = Vocabulary.build((row.tokens for row in read_sst2(data_dir, "train")), 3)
    dev_tokens = {token for row in read_sst2(data_dir, "dev") for token in row.tokens}
    unknown_alone = len(dev_tokens - set(vocabulary.tokens))
    unknown_after = sum(vocabulary.encode([token]) == [UNK_ID] for token in dev_tokens)
    assert unknown_after < 0.8 * unknown_alone
