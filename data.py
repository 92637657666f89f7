"""SCAN "precomp" data: captions, region features (.h5 or .npy), and the loaders train/eval use.

Layout: `{data_path}/{data_name}/{split}_caps.txt` (captions 5i..5i+4 describe image i)
and `{split}.h5` (dataset `feat`, written by np2h.py) or `{split}_ims.npy`, float (n, 36, D), where n is
the number of images or of captions (some releases repeat each image's row 5 times).

Features are never read whole: an HDF5 file is opened lazily in each process that reads it (an h5py
handle must not cross a fork or be pickled), an .npy is memory-mapped the same way. Training batches
also carry their block of the semantic relevance M (daa_loss.SemanticRelevance), computed in the
loader workers by a picklable collate object.
"""
import functools
import os

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import fileio
from daa_loss import SemanticRelevance
from errors import InputError
from layout import CAPTIONS_PER_IMAGE, DEV_MAX_CAPTIONS, REGIONS, dataset_dir
from vocab import encode_caption



def read_captions(data_path, data_name, split):
    """The captions of a split, one str per line of `{split}_caps.txt`."""
    return fileio.read_lines(os.path.join(dataset_dir(data_path, data_name), f"{split}_caps.txt"), "caption file")


def used_captions(captions, split, max_captions=None):
    """The captions a split is trained or scored on: the first `max_captions` if given, the dev split's
    first DEV_MAX_CAPTIONS otherwise (validation uses them, as SCAN and the original do), else all."""
    if max_captions is None and split == "dev":
        max_captions = DEV_MAX_CAPTIONS
    if max_captions is None:
        return captions
    if max_captions < CAPTIONS_PER_IMAGE or max_captions % CAPTIONS_PER_IMAGE:
        raise InputError(f"max_captions must be a positive multiple of {CAPTIONS_PER_IMAGE} (got {max_captions})")
    return captions[:max_captions]


class FeatureStore:
    """Region features of one split: `store[i]` is image i's float32 (36, D) array.

    Opens `{split}.h5` if present, else `{split}_ims.npy` (memory-mapped), only when first read in a
    process; pickling drops the handle, so DataLoader workers each open their own.
    Attributes: path, n_images, rows_per_image (1, or 5 for one row per caption), n_regions, img_dim.
    Whether they fit a model is for `check_features` to say.
    """

    def __init__(self, directory, split, n_captions):
        h5_path = os.path.join(directory, f"{split}.h5")
        npy_path = os.path.join(directory, f"{split}_ims.npy")
        if os.path.isfile(h5_path):
            self.path, self.kind = h5_path, "h5"
        elif os.path.isfile(npy_path):
            self.path, self.kind = npy_path, "npy"
        else:
            raise InputError(f"{npy_path}: feature file not found (nor {os.path.basename(h5_path)})")
        self._array, self._pid = None, None
        array = self._open()
        shape = tuple(array.shape)
        self.close()  # the parent process only needed the shape
        if len(shape) != 3 or shape[1] < 1 or shape[2] < 1:
            raise InputError(f"{self.path}: expected region features of shape (n, {REGIONS}, D), found {shape}")
        n_rows = shape[0]
        captions_file = os.path.join(directory, f"{split}_caps.txt")
        if n_rows * CAPTIONS_PER_IMAGE == n_captions:
            self.rows_per_image = 1
        elif n_rows == n_captions and n_rows % CAPTIONS_PER_IMAGE == 0:
            self.rows_per_image = CAPTIONS_PER_IMAGE
        else:
            raise InputError(f"{self.path}: {n_rows} feature rows do not match the {n_captions} captions of "
                             f"{captions_file} (need {CAPTIONS_PER_IMAGE} captions per row, or one row per caption "
                             f"with {CAPTIONS_PER_IMAGE} captions per image)")
        self.n_images = n_rows // self.rows_per_image
        self.n_regions, self.img_dim = shape[1], shape[2]

    def _open(self):
        """The array-like in this process, (re)opened after a fork or unpickling."""
        if self._array is not None and self._pid == os.getpid():
            return self._array
        self._array = None
        if self.kind == "h5":
            try:
                handle = h5py.File(self.path, "r")
            except OSError as err:
                raise InputError(f"{self.path}: not a readable HDF5 file ({err})") from None
            feat = handle.get("feat")
            if not isinstance(feat, h5py.Dataset):
                handle.close()
                raise InputError(f"{self.path}: HDF5 file has no dataset 'feat'")
            self._array = feat
        else:
            self._array = fileio.load_npy(self.path, "feature file")
        self._pid = os.getpid()
        return self._array

    def close(self):
        if self._array is not None and self.kind == "h5" and self._pid == os.getpid():
            self._array.file.close()
        self._array, self._pid = None, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"], state["_pid"] = None, None
        return state

    def __len__(self):
        return self.n_images

    def __getitem__(self, image_index):
        if not 0 <= image_index < self.n_images:
            raise IndexError(f"image {image_index} out of range (0..{self.n_images - 1})")
        # a copy: a memory-mapped row is read-only, and the batch must not keep the map alive
        return np.array(self._open()[image_index * self.rows_per_image], dtype=np.float32)


def check_features(features, img_dim, model_source):
    """InputError unless `features` (a FeatureStore) fit a model: 36 regions (SGRAF's VisualSA has one
    BatchNorm channel per region) of `img_dim` values each. `model_source` says where the model comes
    from ("the model of CKPT", "a model with --img_dim 2048"), so that the message names both sides."""
    if (features.n_regions, features.img_dim) != (REGIONS, img_dim):
        raise InputError(f"{features.path}: {features.n_regions} regions of {features.img_dim} values per image, but "
                         f"{model_source} needs {REGIONS} regions of {img_dim} values")


class PrecompDataset(Dataset):
    """One item per caption j: (image (36, D) float tensor, caption (L,) long tensor, j, image index j // 5).

    The dev split is cut to its first DEV_MAX_CAPTIONS captions unless `max_captions` says otherwise
    (`max_captions` cuts any split; it must be a multiple of 5).
    """

    def __init__(self, data_path, data_name, split, vocab, max_captions=None):
        directory = dataset_dir(data_path, data_name)
        captions = read_captions(data_path, data_name, split)
        self.features = FeatureStore(directory, split, len(captions))  # checks counts on the full files
        captions = used_captions(captions, split, max_captions)
        self.split, self.vocab, self.captions = split, vocab, captions
        self.captions_path = os.path.join(directory, f"{split}_caps.txt")
        self.n_captions = len(captions)
        self.n_images = self.n_captions // CAPTIONS_PER_IMAGE

    @functools.cached_property
    def relevance(self):
        """SemanticRelevance of this split's captions (TF-IDF fit on the captions used, i.e. after the cut)."""
        return SemanticRelevance(self.captions, CAPTIONS_PER_IMAGE, self.captions_path)

    def image(self, image_index):
        return torch.from_numpy(self.features[image_index])

    def caption(self, caption_index):
        return torch.tensor(encode_caption(self.vocab, self.captions[caption_index]), dtype=torch.long)

    def __len__(self):
        return self.n_captions

    def __getitem__(self, j):
        image_index = j // CAPTIONS_PER_IMAGE
        return self.image(image_index), self.caption(j), j, image_index


def pad_captions(captions):
    """(B, L) long padded with 0 (`<pad>`) and the lengths (B,) long of a list of 1-D long tensors."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    padded = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for row, caption in enumerate(captions):
        padded[row, :len(caption)] = caption
    return padded, lengths


def collate_fn(batch):
    """Items of PrecompDataset -> (images (B,36,D), captions (B,L), lengths (B,), caption_ids (B,), image_ids (B,)).

    The items are sorted by caption length, longest first, ties in draw order (a stable sort), as the
    original's collate leaves them: the loss does not depend on the order, but SAF's BatchNorm updates
    its running statistics once per caption in this order, so the trained model does.
    """
    batch = sorted(batch, key=lambda item: len(item[1]), reverse=True)  # sorted() is stable with reverse
    images, captions, caption_ids, image_ids = zip(*batch)
    padded, lengths = pad_captions(captions)
    return (torch.stack(images), padded, lengths, torch.tensor(caption_ids, dtype=torch.long),
            torch.tensor(image_ids, dtype=torch.long))


class TrainCollate:
    """collate_fn + the batch's relevance block M (B, B) float32, M[i, j] = relevance(image_ids[i], caption_ids[j]).

    An object rather than a closure so that it pickles into spawned workers with its SemanticRelevance.
    """

    def __init__(self, relevance):
        self.relevance = relevance

    def __call__(self, batch):
        images, captions, lengths, caption_ids, image_ids = collate_fn(batch)
        block = self.relevance.block(image_ids.numpy(), caption_ids.numpy())
        return images, captions, lengths, caption_ids, image_ids, torch.from_numpy(block)


def get_train_loader(opt, vocab, distributed, pin_memory=False):
    """Shuffled training batches: 6-tuples (images, captions, lengths, caption_ids, image_ids, relevance (B,B)).

    pin_memory: page-locked batches, for a run on a GPU (asynchronous copies); never for a CPU run, where
    they would only cost (and open a CUDA context in every process of a machine that has a GPU).

    The order depends only on (opt.seed, epoch): a DistributedSampler (one replica when not distributed)
    shuffles with seed + epoch, so call `loader.sampler.set_epoch(epoch)` each epoch; a resumed run sees
    the same order. Every sample is used each epoch (the sampler pads the replicas to equal length by
    repeating a few samples), except that a last batch of a single caption is dropped: a batch of one
    has no negatives and BatchNorm cannot train on it.
    """
    dataset = PrecompDataset(opt.data_path, opt.data_name, "train", vocab)
    relevance = dataset.relevance  # fit once here, before the workers are started
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=opt.seed)
    else:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=opt.seed)
    drop_last = len(sampler) % opt.batch_size == 1
    return DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler, num_workers=opt.workers,
                      collate_fn=TrainCollate(relevance), drop_last=drop_last,
                      generator=torch.Generator().manual_seed(opt.seed),  # seeds the workers deterministically
                      pin_memory=pin_memory, persistent_workers=opt.workers > 0)


class _Images(Dataset):
    """Each image of a PrecompDataset once: (features (36, D), image index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return self.dataset.n_images

    def __getitem__(self, i):
        return self.dataset.image(i), i


class _Captions(Dataset):
    """Each caption of a PrecompDataset: (token ids (L,), caption index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return self.dataset.n_captions

    def __getitem__(self, j):
        return self.dataset.caption(j), j


def _collate_images(batch):
    images, ids = zip(*batch)
    return torch.stack(images), torch.tensor(ids, dtype=torch.long)


def _collate_captions(batch):
    captions, ids = zip(*batch)
    padded, lengths = pad_captions(captions)
    return padded, lengths, torch.tensor(ids, dtype=torch.long)


def get_eval_loaders(data_path, data_name, split, vocab, batch_size, workers, max_captions=None, pin_memory=False):
    """(image_loader, caption_loader, dataset) in file order.

    image_loader yields (images (b, 36, D), image_ids (b,)) once per unique image; caption_loader
    yields (captions (b, L), lengths (b,), caption_ids (b,)). The dev cut applies as in PrecompDataset.
    pin_memory: as get_train_loader's, for scoring on a GPU.
    """
    dataset = PrecompDataset(data_path, data_name, split, vocab, max_captions)
    image_loader = DataLoader(_Images(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                              collate_fn=_collate_images, pin_memory=pin_memory)
    caption_loader = DataLoader(_Captions(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                                collate_fn=_collate_captions, pin_memory=pin_memory)
    return image_loader, caption_loader, dataset
