"""Raw user text → SST-2's lower-cased, PTB-style tokens → vocabulary ids.

SST-2 was tokenised Penn-Treebank style (``does n't``, ``it 's``, ``! !``), and
its splits disagree on brackets (train writes ``(``, dev/test write ``-lrb-``).
``tokenize`` maps raw text onto that scheme and is idempotent on text that is
already tokenised, so the same function prepares the data set and user requests.

A vocabulary built from SST-2's training split misses about one token in
sixteen of a new review, and the missed ones are often the telling ones
(``warmly``, ``overheated``, ``teary-eyed``). Before giving up on a word as
``<unk>``, ``Vocabulary.encode`` therefore tries the forms of it the vocabulary
does know: the word without an inflectional or derivational ending
(``warmly`` → ``warm``, ``stepping`` → ``step``, ``abilities`` → ``ability``),
then the parts of a hyphenated compound (``teary-eyed`` → ``teary eyed``).
Training encodes its phrases the same way, so the model learns with the rare
words it will be served.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The ids every vocabulary reserves: padding and unknown words.
PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

_CHARACTER_MAP = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u02bc": "'",
        "\u00b4": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": " ... ",
    }
)
_BRACKET_TOKENS = {
    "-lrb-": "(",
    "-rrb-": ")",
    "-lsb-": "[",
    "-rsb-": "]",
    "-lcb-": "{",
    "-rcb-": "}",
}
_BRACKET_PATTERN = re.compile("|".join(re.escape(token) for token in _BRACKET_TOKENS))
_OPENING_QUOTE = re.compile(r'(^|[\s(\[{])"')
_TOKEN_PATTERN = re.compile(
    r"""
      ``|''                      # PTB quotes
    | \.\.\.+ | --+              # ellipsis, dashes
    | (?:[a-z]\.){2,}            # abbreviations with inner dots: u.s. , a.k.a.
    | \b[a-z]\.(?=\s+[a-z])      # a middle initial inside a name: john f. kennedy
    | (?:mr|mrs|ms|dr|st|jr|sr|vs|etc|bros)\.(?!\w)
    | \d+(?:[.,:]\d+)+(?![\w-]) # numbers: 3.5  1,000  10:30
    | n't                        # negation clitic (split below)
    | '(?:s|re|ve|ll|d|m|em|n'?)(?!\w)  # other clitics: 's 're 'em 'n'
    | '\d0s(?!\w)                # decades: the '70s
    | [\w&]+(?:[-/'][\w&]+)*     # words; inner hyphens, slashes, apostrophes kept
    | \*+                        # *** rating stars
    | \S                         # any other single symbol: punctuation, emoji
    """,
    re.VERBOSE,
)
_NEGATION = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
_IRREGULAR_NEGATIONS = {"can't": "ca n't", "won't": "wo n't", "cannot": "can not"}


# (ending, replacements) in the order tried: longer, more specific endings first.
_ENDINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("'s", ("",)),
    ("iest", ("y",)),
    ("ies", ("y",)),
    ("ied", ("y",)),
    ("ier", ("y",)),
    ("ily", ("y",)),
    ("ingly", ("", "e")),
    ("edly", ("", "e")),
    ("fully", ("ful",)),
    ("ness", ("",)),
    ("ments", ("ment",)),
    ("ly", ("", "e", "le")),
    ("ing", ("", "e")),
    ("ed", ("", "e")),
    ("est", ("", "e")),
    ("er", ("", "e")),
    ("es", ("", "e")),
    ("s", ("",)),
)
_MIN_STEM_LENGTH = 3


def word_stems(word: str) -> Iterator[str]:
    """Candidate base forms of a word, most likely first (they need not all be words).

    ``stepping`` yields ``stepp``, ``steppe`` and then ``step``: a doubled final
    consonant before ``-ing``/``-ed``/``-er`` is undone as a last resort.
    """
    for ending, replacements in _ENDINGS:
        if not word.endswith(ending) or len(word) - len(ending) < _MIN_STEM_LENGTH:
            continue
        stem = word[: -len(ending)]
        for replacement in replacements:
            yield stem + replacement
        if stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
            yield stem[:-1]


def tokenize(text: str) -> list[str]:
    """Tokenise raw text the way SST-2 was: ``"I didn't LIKE it!!"`` → ``i did n't like it ! !``."""
    text = unicodedata.normalize("NFKC", text).translate(_CHARACTER_MAP).lower()
    text = text.replace("\\/", "/").replace("\\*", "*")  # PTB escapes in dev/test
    text = _BRACKET_PATTERN.sub(lambda match: f" {_BRACKET_TOKENS[match.group()]} ", text)
    text = _OPENING_QUOTE.sub(r"\1 `` ", text).replace('"', " '' ")
    for word, split in _IRREGULAR_NEGATIONS.items():
        text = re.sub(rf"\b{re.escape(word)}\b", split, text)
    text = _NEGATION.sub(r"\1 \2", text)
    text = _CLITIC.sub(r"\1 \2", text)
    return _TOKEN_PATTERN.findall(text)


@dataclass(frozen=True)
class Vocabulary:
    """Token ↔ id mapping; id 0 is padding and id 1 stands for unknown tokens."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.tokens[PAD_ID] != PAD_TOKEN or self.tokens[UNK_ID] != UNK_TOKEN:
            raise ValueError("a vocabulary starts with the padding and unknown tokens")
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """One id per token, except that an unknown hyphenated compound may give one per part."""
        return [token_id for token in tokens for token_id in self._encode_token(token)]

    def _encode_token(self, token: str) -> list[int]:
        ids = self._ids  # type: ignore[attr-defined]
        known = ids.get(token)
        if known is not None:
            return [known]
        stem = next((ids[stem] for stem in word_stems(token) if stem in ids), None)
        if stem is not None:
            return [stem]
        parts = [part for part in token.split("-") if part]
        if len(parts) > 1:
            return [token_id for part in parts for token_id in self._encode_token(part)]
        return [UNK_ID]

    @classmethod
    def build(cls, tokenized_texts: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Most frequent first, ties broken alphabetically so the build is reproducible."""
        counts = Counter(token for tokens in tokenized_texts for token in tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t)
        )
        return cls((PAD_TOKEN, UNK_TOKEN, *kept))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(list(self.tokens), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls(tuple(json.loads(path.read_text())))
