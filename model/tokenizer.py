"""CLIP's tokenizer: prompts -> [B, 77] token ids for the Stable Diffusion v1 text encoder.

Byte-level BPE in brief. The text is first cut into "words": runs of letters, single digits,
runs of punctuation/symbols, and a few English contractions ('s, 're, ...). Each word is
written as UTF-8 bytes, and each byte is shown as one printable character, so every string in
every script (emoji included) can be spelled with a 256-symbol alphabet: nothing is ever
"unknown". The word's last symbol gets an end-of-word mark `</w>`, so "cat" ending a word and
the "cat" that starts "category" are different tokens. Then BPE repeatedly glues together the
adjacent pair of symbols that comes earliest in a learned list of merges (earlier = more common
in CLIP's training text) until no pair left is in the list. Common words end up as one symbol,
rare ones as a few pieces. Each final symbol is a vocabulary entry; its index is the token id.

The vocabulary (49,408 entries) is the 256 byte symbols, the same 256 with `</w>`, one entry per
merge (the first 48,894 lines of the merge file after its header), then <|startoftext|> (49406)
and <|endoftext|> (49407). The merge file is OpenAI's, shipped in weights/ (MIT, see
weights/LICENSE-CLIP-vocab.txt). The ids are those of OpenAI's clip/simple_tokenizer.py
(test_tokenizer.py checks that), without its `regex` and `ftfy` dependencies.
"""

import gzip
import html
import unicodedata
import warnings
from pathlib import Path

import torch

VOCAB_FILE = Path(__file__).resolve().parent.parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48_894  # CLIP uses only the start of the file: 2 * 256 + 48,894 + 2 = 49,408 ids
BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|>; EOS also pads
CONTEXT_LENGTH = 77  # the text encoder has 77 positions: BOS + 75 tokens + EOS

SPECIALS = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
# Pieces CLIP's regex cuts out before looking at letters, in the order it tries them.
LITERALS = (*SPECIALS, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# ftfy (which OpenAI runs first) turns typographic quotes into ASCII ones. That is common in
# pasted prompts ("the dog’s bed") and changes the ids, so we do it too; see clean().
STRAIGHT_QUOTES = str.maketrans({**dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'"),
                                 **dict.fromkeys("\u201c\u201d\u201e\u201f", '"')})


def byte_symbols():
    """Map each byte 0..255 to the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the other 68 (space, controls, ...) are moved
    to chr(256), chr(257), ... so that no symbol is whitespace or invisible. The dict's order
    is the vocabulary order: byte symbol ids 0..255 follow it, not the byte values.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


def clean(text):
    """Undo HTML escapes, unify quotes and accents, lower-case: CLIP's text clean-up.

    OpenAI also runs ftfy.fix_text, which we cannot depend on. On ordinary text it only
    straightens quotes and NFC-composes accents, both done here; what we skip (repairing mojibake
    like "cafÃ©", ligatures like "ﬁ", full-width letters, terminal escapes) only matters for
    damaged or unusual text.
    """
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text).translate(STRAIGHT_QUOTES)
    # CLIP also collapses runs of whitespace; as whitespace only separates words, that is implicit.
    return text.strip().lower()


def char_kind(c):
    """Classify a character like CLIP's regex does: "L" letter, "N" digit/number, " " space,
    "" ignored, "." anything else (punctuation, symbols, emoji, controls)."""
    if c == "\u0345":
        # This combining mark case-folds to the letter iota, and the case-insensitive regex then
        # matches it neither as a letter nor as "anything else": CLIP drops it.
        return ""
    if c.isspace() and c not in "\x1c\x1d\x1e\x1f":  # Python counts these 4 as space, regex not
        return " "
    category = unicodedata.category(c)[0]
    return category if category in "LN" else "."


def literal_at(text, i):
    """The special token or contraction starting at text[i], or "".

    CLIP's regex is case-insensitive; on lower-case text that only matters for the long s "ſ",
    which still matches "s" (so "'ſ" counts as the contraction "'s")."""
    if text[i] in "<'":
        for literal in LITERALS:
            if text[i:i + len(literal)].replace("ſ", "s") == literal:
                return text[i:i + len(literal)]
    return ""


def split_words(text):
    """Cut cleaned text into the words that BPE sees, left to right, as CLIP's regex does:
    a special token or contraction, else a run of letters, one number character, or a run of
    other non-space characters."""
    words, i = [], 0
    while i < len(text):
        literal = literal_at(text, i)
        kind = char_kind(text[i])
        if literal:
            end = i + len(literal)
        elif kind in ("L", "N", "."):
            end = i + 1
            while kind != "N" and end < len(text) and char_kind(text[end]) == kind:
                end += 1
        else:  # space or ignored: separates words, never part of one
            i += 1
            continue
        words.append(text[i:end])
        i = end
    return words


def merge_pair(symbols, pair):
    """Replace every occurrence of `pair` in `symbols`, left to right, by the joined symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class Tokenizer:
    """tok = Tokenizer(); tok(["a photo of a sks castle"]) -> LongTensor [1, 77].

    Also tok.encode(text) -> BPE ids without BOS/EOS, tok.decode(ids) -> text."""

    def __init__(self, vocab_file=VOCAB_FILE):
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:N_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        self.byte_to_symbol = byte_symbols()
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        singles = list(self.byte_to_symbol.values())
        self.symbols = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges]
        self.symbols += list(SPECIALS)  # id -> symbol
        self.vocab = {s: i for i, s in enumerate(self.symbols)}  # symbol -> id
        self.rank = {m: r for r, m in enumerate(merges)}  # lower rank = merge earlier
        self.cache = {}  # word -> ids; prompts reuse a small set of words

    def bpe(self, word):
        """Token ids of one word (a piece from split_words)."""
        if word in SPECIALS:
            return [SPECIALS[word]]
        if word not in self.cache:
            symbols = [self.byte_to_symbol[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            while len(symbols) > 1:
                pair = min(zip(symbols, symbols[1:]), key=lambda p: self.rank.get(p, float("inf")))
                if pair not in self.rank:
                    break  # no adjacent pair was ever merged in training: done
                symbols = merge_pair(symbols, pair)
            self.cache[word] = [self.vocab[s] for s in symbols]
        return self.cache[word]

    def encode(self, text):
        """Text -> BPE ids, no BOS/EOS, no length limit."""
        return [i for word in split_words(clean(text)) for i in self.bpe(word)]

    def decode(self, ids):
        """Ids -> text (lower-cased, one space after each word)."""
        # Every character of every symbol (specials and "</w>" included) is a byte symbol.
        data = bytes(self.symbol_to_byte[c] for i in ids for c in self.symbols[i])
        # errors="replace": a cut can fall inside a multi-byte character
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts):
        """A prompt or list of prompts -> LongTensor [B, 77]: BOS, ids, EOS, padded with EOS.

        Prompts longer than 75 tokens are cut (the encoder has no more positions), with one
        warning per call that says what was dropped."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), CONTEXT_LENGTH), EOS, dtype=torch.long)
        dropped = []
        for row, text in enumerate(texts):
            ids = self.encode(text)
            keep = CONTEXT_LENGTH - 2
            if len(ids) > keep:
                dropped.append(f'prompt {row}: "{self.decode(ids[keep:]).strip()}"')
            ids = [BOS, *ids[:keep], EOS]
            out[row, :len(ids)] = torch.tensor(ids)
        if dropped:
            message = "CLIP reads at most 75 tokens; dropped the end of " + "; ".join(dropped)
            warnings.warn(message, stacklevel=2)
        return out
