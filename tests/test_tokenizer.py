"""model/tokenizer.py must give exactly the ids of OpenAI's CLIP tokenizer.

The reference is clip/simple_tokenizer.py from the clip-anytorch wheel, loaded by file path
(`import clip` would import torchvision). It needs `regex` and `ftfy`; only the tests use them.
"""

import importlib.util
import sys
import unicodedata
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model.tokenizer
from model.tokenizer import Tokenizer, split_words

BOS, EOS = 49406, 49407


def load_reference(fix_text=None):
    """OpenAI's SimpleTokenizer, optionally with ftfy.fix_text replaced."""
    found = importlib.util.find_spec("clip")  # locates the package without running its __init__
    if found is None:
        pytest.skip("clip-anytorch (the reference tokenizer) is not installed")
    path = Path(found.origin).parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if fix_text is not None:
        module.ftfy = SimpleNamespace(fix_text=fix_text)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def ref():
    return load_reference()


def reference_row(ref, text):
    """[BOS] + first 75 ids + [EOS], padded with EOS to 77: built here, not by our code."""
    ids = [BOS] + ref.encode(text)[:75] + [EOS]
    return ids + [EOS] * (77 - len(ids))


PROMPTS = [
    "a photo of a sks castle",
    "a photo of a [*] castle",
    "[*]",
    "",
    "   ",
    "A Photo Of A DOG, HELLO World",
    "Hello, world! How's it going?? ... (yes) -- #1 @home $5.99 100% a---b ~/x_y.z",
    "café crème brûlée, naïve façade, Ångström Å, Łódź, São Paulo, straße",
    "cafe\u0301 cre\u0300me",  # decomposed accents: ftfy (so OpenAI) composes them
    "Καλημέρα κόσμε, привет мир, שלום, مرحبا, नमस्ते",
    "一只猫坐在桌子上, 日本語のテキスト, 안녕하세요",
    "a cat 🐱 with a hat 🎩👒, a 👩\u200d👩\u200d👧 family, 🇫🇷 flag",
    "  lots   of\t\tspace \n\n and\r\nnewlines \u00a0nbsp  ",
    "1234567890 3.14159 1,000,000 2nd 4K 1080p ½ ² ⅷ ٣ abc123def h2o",
    "it's the dog's bone, they're here, we've, I'm, you'll, he'd, don't, 'quoted', rock'n'roll",
    "IT'S THEY'RE O'NEIL !'s ''s",
    "the dog\u2019s bed, \u201cquoted\u201d, it\u2018s",  # curly quotes: ftfy straightens them
    "Tom &amp; Jerry &lt;3 &quot;hi&quot; &#39;s &amp;amp;",
    "<|startoftext|>a<|endoftext|> b !<|endoftext|> <|ENDOFTEXT|>",
    "the do\u017f'\u017f hat \u017ftar",  # long s: CLIP's case-insensitive regex reads it as s
    "a\u0345b",  # a combining mark that CLIP's regex silently drops
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
]

# Text that ftfy repairs and we do not (see model.tokenizer.clean): compared with ftfy off.
FTFY_REPAIRS = ["cafÃ© dÃ©jÃ  vu", "ﬁne ﬂowers", "ＡＢＣ１２３", "a\x1cb\x1fc", "\x1b[31mred"]


@pytest.fixture(scope="module")
def ref_without_ftfy():
    return load_reference(fix_text=lambda t: t)


def test_vocabulary_matches_openai(tok, ref):
    assert tok.vocab == ref.encoder  # same 49,408 symbols with the same ids
    assert len(tok.vocab) == len(tok.symbols) == 49408


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_match_openai(tok, ref, text):
    assert tok([text])[0].tolist() == reference_row(ref, text)


@pytest.mark.parametrize("text", FTFY_REPAIRS)
def test_ids_match_openai_without_ftfy(tok, ref_without_ftfy, text):
    assert tok.encode(text) == ref_without_ftfy.encode(text)


def test_longer_text_matches(tok, ref):
    """A few hundred ordinary words exercise many merges."""
    licence = Path(model.tokenizer.__file__).parent.parent / "weights" / "LICENSE-CLIP-vocab.txt"
    text = model.tokenizer.__doc__ + licence.read_text()
    assert tok.encode(text) == ref.encode(text)


def assigned_chars():
    """Code points this Python's Unicode database assigns (the `regex` module may know a newer
    Unicode, and for characters unknown here the two cannot agree): all of planes 0-1, where
    the scripts, symbols and emoji live, and a sample of the CJK and private-use planes above."""
    code_points = [*range(0xD800), *range(0xE000, 0x20000), *range(0x20000, sys.maxunicode + 1, 37)]
    return [chr(c) for c in code_points if unicodedata.category(chr(c)) != "Cn"]


def test_word_splitting_matches_clip_regex(ref):
    """Our hand-written splitter against CLIP's \\p{L}/\\p{N} regex, for each character next to
    a letter, a digit and an apostrophe."""
    text = "".join(f"a{c}1'{c}" for c in assigned_chars()).lower()
    assert split_words(text) == ref.pat.findall(text)


def test_sampled_characters_match_openai(tok, ref):
    """Clean-up + byte-level BPE for a spread of characters from every script."""
    import ftfy  # the reference's own dependency
    for c in assigned_chars()[::53]:
        text = f"x{c}y {c}{c}"
        if ftfy.fix_text(text) != text:
            continue  # ftfy's repairs are tested above
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_batch_shape_dtype_and_padding(tok, ref):
    texts = ["a photo of a sks castle", "", "a [*] dog"]
    out = tok(texts)
    assert out.shape == (3, 77) and out.dtype == torch.long
    assert out.tolist() == [reference_row(ref, t) for t in texts]
    assert out[1].tolist() == [BOS] + [EOS] * 76  # empty prompt: BOS then EOS padding
    single = tok("a photo of a sks castle")  # a bare string is a batch of one
    assert single.shape == (1, 77) and torch.equal(single[0], out[0])


def test_truncation_to_77_with_one_warning(tok, ref):
    text = "a photo of a sks castle standing on a hill " * 10  # 100 tokens
    texts = [text, "a dog", text + "by the sea"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tok(texts)
    assert len(caught) == 1  # one warning per call, however many prompts were cut
    assert out.tolist() == [reference_row(ref, t) for t in texts]
    assert out[0, 0] == BOS and out[0, -1] == EOS and EOS not in out[0, 1:-1].tolist()
    message = str(caught[0].message)
    for row in (0, 2):  # names every cut prompt and the words it lost
        dropped = ref.decode(ref.encode(texts[row])[75:]).strip()
        assert f"prompt {row}" in message and dropped in message
    assert "prompt 1" not in message


def test_warns_only_past_75_tokens(tok, ref):
    seventy_five = "a " * 75
    assert len(ref.encode(seventy_five)) == 75
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = tok(seventy_five)
    assert not caught
    assert full[0].tolist() == reference_row(ref, seventy_five)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok(seventy_five + "castle")
    assert len(caught) == 1 and "castle" in str(caught[0].message)


def test_decode_round_trip(tok, ref):
    ids = tok.encode("A photo of a sks castle, 日本 🐱!")
    assert tok.decode(ids) == ref.decode(ids)
