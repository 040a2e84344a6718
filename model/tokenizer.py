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

The `tokenizers` library does the cutting, the byte symbols and the merging; this file gives it
CLIP's vocabulary, merges and word pattern, and does the text clean-up that OpenAI runs first.
The vocabulary (49,408 entries) is the 256 byte symbols, the same 256 with `</w>`, one entry per
merge (the first 48,894 lines of the merge file after its header), then <|startoftext|> (49406)
and <|endoftext|> (49407). The merge file is OpenAI's, shipped in weights/ (MIT, see
weights/LICENSE-CLIP-vocab.txt). The ids are those of OpenAI's clip/simple_tokenizer.py
(tests/test_tokenizer.py checks that), without its `regex` and `ftfy` dependencies.
"""

import gzip
import html
import unicodedata
import warnings
from pathlib import Path

import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers

VOCAB_FILE = Path(__file__).resolve().parent.parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48_894  # CLIP uses only the start of the file: 2 * 256 + 48,894 + 2 = 49,408 ids
BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|>; EOS also pads
CONTEXT_LENGTH = 77  # the text encoder has 77 positions: BOS + 75 tokens + EOS

SPECIALS = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
# CLIP's word pattern: a special token, a contraction, a run of letters, one number character,
# or a run of anything else but spaces. It is case-insensitive ((?i)), as CLIP's is; on lower-case
# text that only matters for the long s "ſ", which still matches "s" in "'s".
WORD = Regex(r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
             r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
# Spaces only separate words; "removed" + invert keeps the matches and drops what lies between.
SPLIT_WORDS = pre_tokenizers.Split(WORD, "removed", invert=True)

# ftfy (which OpenAI runs first) turns typographic quotes into ASCII ones. That is common in
# pasted prompts ("the dog’s bed") and changes the ids, so we do it too; see clean().
STRAIGHT_QUOTES = str.maketrans({**dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'"),
                                 **dict.fromkeys("\u201c\u201d\u201e\u201f", '"')})


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


def split_words(text):
    """Cut cleaned text into the words that BPE sees, left to right, as CLIP's regex does."""
    # This combining mark case-folds to the letter iota, so CLIP's case-insensitive regex matches
    # it neither as a letter nor as "anything else": it separates words, like a space.
    text = text.replace("\u0345", " ")
    return [word for word, _ in SPLIT_WORDS.pre_tokenize_str(text)]


class Tokenizer:
    """tok = Tokenizer(); tok(["a photo of a sks castle"]) -> LongTensor [1, 77].

    Also tok.encode(text) -> BPE ids without BOS/EOS, tok.decode(ids) -> text."""

    def __init__(self, vocab_file=VOCAB_FILE):
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:N_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        # ByteLevel's alphabet: each byte 0..255 as a printable character (the 68 bytes that are
        # spaces, controls or invisible become chr(256), chr(257), ...). CLIP lists them in
        # code-point order.
        singles = sorted(pre_tokenizers.ByteLevel.alphabet())
        self.symbols = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges]
        self.symbols += list(SPECIALS)  # id -> symbol
        self.vocab = {s: i for i, s in enumerate(self.symbols)}  # symbol -> id
        self.bpe = tokenizers.Tokenizer(models.BPE(self.vocab, merges, end_of_word_suffix="</w>"))
        self.bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self.bpe.decoder = decoders.ByteLevel()  # symbols -> bytes -> UTF-8, "\ufffd" where cut

    def encode(self, text):
        """Text -> BPE ids, no BOS/EOS, no length limit."""
        ids = []
        for word in split_words(clean(text)):
            # A special token is one only where CLIP's pattern cuts it out as a whole word.
            ids += [SPECIALS[word]] if word in SPECIALS else self.bpe.encode(word).ids
        return ids

    def decode(self, ids):
        """Ids -> text (lower-cased, one space after each word)."""
        return self.bpe.decode(ids, skip_special_tokens=False).replace("</w>", " ")

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
