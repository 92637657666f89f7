"""Word vocabulary in the SCAN format, and the tokenisation every caption goes through.

    python vocab.py --data_path data --data_name f30k_precomp [--vocab_path vocab --threshold 4]

builds the vocabulary from the split's train and dev caption files (words seen at least `threshold`
times) and writes `{vocab_path}/{data_name}_vocab.json`:

    {"word2idx": {word: int}, "idx2word": {"int": word}, "idx": int}

the format of the original release's `vocab.zip`, whose files load unchanged. Ids 0-3 are
`<pad>`, `<start>`, `<end>`, `<unk>`.
"""
import collections
import os
import sys

from nltk.tokenize import word_tokenize

import errors
import fileio
from errors import InputError
from layout import dataset_dir

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")


def tokenize(text):
    """Lower-cased word tokens; preserve_line=True skips sentence splitting (no punkt data needed)."""
    return word_tokenize(text.lower(), preserve_line=True)


class Vocabulary:
    """word <-> id maps. `vocab(word)` is the word's id, `<unk>`'s id for a word it does not know."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}  # int -> word in memory; JSON stores the keys as strings
        self.idx = 0

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        return self.word2idx.get(word, self.word2idx["<unk>"])

    def __len__(self):
        return len(self.word2idx)


def build_vocab(caption_files, threshold=4):
    """Vocabulary of the words occurring at least `threshold` times in `caption_files` (in first-seen order)."""
    return vocab_of_captions((caption for path in caption_files for caption in fileio.read_lines(path, "caption file")),
                             threshold)


def vocab_of_captions(captions, threshold=4):
    """Vocabulary of the words occurring at least `threshold` times in the iterable `captions` (first-seen order)."""
    counter = collections.Counter()
    for caption in captions:
        counter.update(tokenize(caption))
    vocab = Vocabulary()
    for word in SPECIAL_TOKENS:
        vocab.add_word(word)
    for word, count in counter.items():
        if count >= threshold:
            vocab.add_word(word)
    return vocab


def serialize_vocab(vocab, path):
    """Write `vocab` to `path` in the SCAN JSON format, atomically."""
    fileio.write_json({"word2idx": vocab.word2idx,
                       "idx2word": {str(i): w for i, w in vocab.idx2word.items()},
                       "idx": vocab.idx}, path)


def vocab_from_word2idx(word2idx, source="vocabulary"):
    """A Vocabulary from a {word: id} dict (a vocabulary file's or a checkpoint's); `source` names it in errors."""
    if not isinstance(word2idx, dict) or not all(isinstance(w, str) and isinstance(i, int) and not isinstance(i, bool)
                                                 for w, i in word2idx.items()):
        raise InputError(f"{source}: 'word2idx' is not a mapping of words to integer ids")
    if "<unk>" not in word2idx:
        raise InputError(f"{source}: the vocabulary has no '<unk>' token")
    vocab = Vocabulary()
    vocab.word2idx = dict(word2idx)
    vocab.idx2word = {i: w for w, i in word2idx.items()}
    vocab.idx = max(word2idx.values()) + 1
    return vocab


def deserialize_vocab(path):
    """Load a SCAN vocabulary JSON file (ours or the original release's)."""
    d = fileio.read_json(path, "vocabulary file")
    if not isinstance(d, dict) or "word2idx" not in d:
        raise InputError(f"{path}: not a vocabulary file (no 'word2idx')")
    return vocab_from_word2idx(d["word2idx"], path)


def encode_caption(vocab, text):
    """Token ids of `<start> tokens... <end>` for one caption."""
    return [vocab("<start>")] + [vocab(token) for token in tokenize(text)] + [vocab("<end>")]


def build_parser():
    parser = errors.ArgumentParser(description="Build {vocab_path}/{data_name}_vocab.json from the train and dev captions.")
    parser.add_argument("--data_path", default="data", help="folder holding {data_name}/")
    parser.add_argument("--data_name", default="f30k_precomp", help="{coco,f30k}_precomp, or any folder name")
    parser.add_argument("--vocab_path", default="vocab", help="output folder")
    parser.add_argument("--threshold", default=4, type=int, help="keep words seen at least this many times")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing vocabulary file that differs (a model trained with it needs it)")
    return parser


def main(argv=None):
    opt = build_parser().parse_args(argv)
    if opt.threshold < 1:
        raise InputError(f"--threshold must be at least 1 (got {opt.threshold})")
    out = os.path.join(opt.vocab_path, f"{opt.data_name}_vocab.json")
    fileio.check_output(out)
    directory = dataset_dir(opt.data_path, opt.data_name)
    vocab = build_vocab([os.path.join(directory, f"{split}_caps.txt") for split in ("train", "dev")], opt.threshold)
    if os.path.exists(out) and not opt.overwrite:
        # the same vocabulary again (a re-run) replaces nothing; another one would change the words' ids
        # under every model trained with the file, such as the released checkpoints and vocab.zip
        try:
            same = deserialize_vocab(out).word2idx == vocab.word2idx
        except InputError:
            same = False
        if same:
            print(f"{out}: already holds this vocabulary ({len(vocab)} words), unchanged")
            return
        raise InputError(f"{out}: exists and holds another vocabulary; give another --vocab_path, or --overwrite "
                         f"to replace it (models trained with it would no longer load)")
    serialize_vocab(vocab, out)
    print(f"{out}: {len(vocab)} words")


if __name__ == "__main__":
    sys.exit(errors.run(main))
