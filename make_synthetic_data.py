"""Learnable synthetic datasets in the exact SCAN precomp layouts, for demos, tests and benchmarks.

    python make_synthetic_data.py [--out_dir synthetic/data --vocab_dir synthetic/vocab
                                   --ann_dir synthetic/coco_ann --seed 0 --binding 0.5]

writes, deterministically from `--seed` (same seed, same bytes):
- `{out_dir}/f30k_precomp/{train,dev,test}_{caps.txt,ims.npy}` and
  `{out_dir}/coco_precomp/{train,dev,test,testall}_{caps.txt,ims.npy}` + `testall_ids.txt` (one COCO
  image id per caption line);
- `{ann_dir}/captions_val2014.json` and `instances_val2014.json` (COCO format, the 80 real category ids
  and names) for the testall images, so PMRP can be computed;
- `{vocab_dir}/{f30k,coco}_precomp_vocab.json` (vocab.py's vocabulary of train + dev).

`--noise_rate p` makes noisy correspondence as the noisy-correspondence benchmarks do (NCR, Huang et al.
NeurIPS 2021): round(p x n_train) training images, chosen from the seed, get the five captions of another
of those images (a random permutation of them without fixed points). The features, every other split and
the vocabulary (the same captions, moved) are byte for byte those of `--noise_rate 0`; the training
folder's manifest records p.

How it is learnable: every image holds 2-4 objects of COCO categories drawn with skewed frequencies (so
images share categories, and captions share words), each with a colour and a count, in one of a few
scenes. Each category, colour and scene has a fixed non-negative random prototype in feature space.
An object's regions carry its category prototype + its colour prototype + noise, the other regions
the scene prototype + noise; everything is ReLU'd like bottom-up-attention features. Captions, from
varied templates, name some of the image's objects with their colours, counts, verbs and the scene, so
words can be aligned with regions, and TF-IDF relevance (and PMRP from the annotations) is non-trivial.
A few testall images get no instance annotation, as in real COCO (PMRP drops them).

It never replaces a file it did not write: each folder it writes into gets a manifest of its files
(size and modification time), and any other file in the way (the real data, a vocabulary from
vocab.zip, the COCO annotations) stops it before it writes anything. A `{split}.h5` that np2h.py
made from its previous features is removed with them, since the loader would read it instead.
"""
import os
import sys

import numpy as np

import errors
import fileio
from errors import InputError
from layout import CAPTIONS_PER_IMAGE, REGIONS
from vocab import serialize_vocab, vocab_of_captions

MANIFEST = ".make_synthetic_data.json"  # in each folder it writes: {file name: [size, mtime_ns]} of its files
SPLITS = {"f30k_precomp": ("train", "dev", "test"), "coco_precomp": ("train", "dev", "test", "testall")}

# The 80 COCO categories: (id, name, supercategory); ids run 1..90 with gaps, as in instances_*.json.
COCO_CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"),
    (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]
IRREGULAR_PLURALS = {"person": "people", "sheep": "sheep", "mouse": "mice", "knife": "knives", "skis": "skis",
                     "scissors": "scissors", "broccoli": "broccoli", "tv": "tvs"}
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange colored"]
SCENES = ["street", "kitchen", "park", "beach", "living room", "field", "office", "restaurant"]
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
VERBS = ["sitting", "standing", "lying", "resting", "placed", "shown"]
PREPOSITIONS = ["next to", "near", "beside", "behind", "in front of", "on top of"]
# Share of object phrases that carry their object's colour ("red dog"): the phrases whose meaning depends on
# which colour goes with which category in the image (--binding; 0.5 is the data every earlier run used).
DEFAULT_BINDING = 0.5
TEMPLATES = [
    "{A} {o1} {verb} {prep} {a2} {o2} in the {scene}.",
    "There is {a1} {o1} and {a2} {o2} in a {scene}",
    "{A} {o1} {verb} in the {scene} .",
    "A photo of {a1} {o1} {prep} {a2} {o2}.",
    "{A} {o1}, {a2} {o2} and {a3} {o3} at the {scene}.",
    "Close up of {a1} {o1} {verb} {prep} {a2} {o2} .",
    "{A} {o1} that is {verb} {prep} {a2} {o2}",
    "In the {scene} {a1} {o1} is {verb} {prep} {a2} {o2}.",
]


def plural(name):
    head, _, last = name.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        word = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        word = last + "es"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


class World:
    """The fixed prototypes (category, colour, scene) and frequencies every split is drawn from."""

    def __init__(self, rng, feat_dim):
        def prototypes(n, scale, density):
            mask = rng.random((n, feat_dim)) < density
            return (np.abs(rng.standard_normal((n, feat_dim))) * mask * scale).astype(np.float32)

        self.feat_dim = feat_dim
        self.category = prototypes(len(COCO_CATEGORIES), 2.0, 0.25)
        self.colour = prototypes(len(COLOURS), 1.0, 0.15)
        self.scene = prototypes(len(SCENES), 0.8, 0.2)
        weights = 1.0 / np.arange(1, len(COCO_CATEGORIES) + 1) ** 0.9  # Zipf-like: a few categories are common
        self.category_p = weights[rng.permutation(len(COCO_CATEGORIES))] / weights.sum()


def sample_images(rng, world, n_images):
    """Per image: (scene index, [(category index, colour index, count), ...]) with 2-4 distinct categories."""
    images = []
    for _ in range(n_images):
        n_objects = int(rng.integers(2, 5))
        cats = rng.choice(len(COCO_CATEGORIES), size=n_objects, replace=False, p=world.category_p)
        objects = [(int(c), int(rng.integers(len(COLOURS))), int(rng.choice([1, 1, 1, 2, 3]))) for c in cats]
        images.append((int(rng.integers(len(SCENES))), objects))
    return images


def caption(rng, image, binding=DEFAULT_BINDING):
    """One caption naming (some of) the image's objects, in the order of a random template.

    Each object phrase names its colour with probability `binding`. Only those phrases depend on the
    colour-category binding: an image holds each of its colours on one object, so "red dog" tells it from
    an image with a red cat and a white dog, which a bag of the image's categories and colours (a pooled
    vector) cannot. With binding 0 a caption says nothing a pooled vector misses (categories, counts, scene).
    The random draws do not depend on `binding`, so every other word and every feature stays the same.
    """
    scene, objects = image
    order = rng.permutation(len(objects))
    words = {"scene": SCENES[scene], "verb": VERBS[rng.integers(len(VERBS))],
             "prep": PREPOSITIONS[rng.integers(len(PREPOSITIONS))]}
    for slot in range(3):
        cat, colour, count = objects[order[slot % len(objects)]]
        name = COCO_CATEGORIES[cat][1]
        noun = name if count == 1 else plural(name)
        if rng.random() < binding:
            noun = f"{COLOURS[colour]} {noun}"
        words[f"o{slot + 1}"] = noun
        words[f"a{slot + 1}"] = COUNT_WORDS[count] if count > 1 or rng.random() < 0.8 else "one"
    words["A"] = words["a1"].capitalize()
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(**words)


def features(rng, world, image):
    """(36, D) float32: 2-5 regions per object instance group show it, the rest the scene; all >= 0."""
    scene, objects = image
    dim = world.feat_dim
    regions = rng.standard_normal((REGIONS, dim), dtype=np.float32) * 0.3 + world.scene[scene]
    slots = rng.permutation(REGIONS)
    used = 0
    for cat, colour, count in objects:
        n_regions = min(int(rng.integers(2, 4)) + count - 1, REGIONS - used)
        rows = slots[used:used + n_regions]
        used += n_regions
        regions[rows] = (world.category[cat] + world.colour[colour]
                         + rng.standard_normal((n_regions, dim), dtype=np.float32) * 0.3)
    return np.maximum(regions, 0.0)


def written_here(path):
    """True if `path` is a file this script wrote and that nobody changed since (its folder's manifest says so)."""
    manifest = os.path.join(os.path.dirname(path), MANIFEST)
    if not os.path.isfile(path) or not os.path.isfile(manifest):
        return False
    stat = os.stat(path)
    return fileio.read_json(manifest, "manifest").get(os.path.basename(path)) == [stat.st_size, stat.st_mtime_ns]


def record(path, **settings):
    """Add the file just written at `path` to its folder's manifest, with `settings` (e.g. noise_rate) beside it."""
    manifest = os.path.join(os.path.dirname(path), MANIFEST)
    entries = fileio.read_json(manifest, "manifest") if os.path.isfile(manifest) else {}
    stat = os.stat(path)
    entries[os.path.basename(path)] = [stat.st_size, stat.st_mtime_ns]
    entries.update(settings)
    fileio.write_json(entries, manifest)


def output_files(opt):
    """Every file a run with options `opt` writes."""
    paths = []
    for data_name in opt.datasets:
        directory = os.path.join(opt.out_dir, data_name)
        paths += [os.path.join(directory, f"{split}_{kind}") for split in SPLITS[data_name]
                  for kind in ("caps.txt", "ims.npy")]
        paths.append(os.path.join(opt.vocab_dir, f"{data_name}_vocab.json"))
    if "coco_precomp" in opt.datasets:
        paths += [os.path.join(opt.out_dir, "coco_precomp", "testall_ids.txt")]
        paths += [os.path.join(opt.ann_dir, name) for name in ("captions_val2014.json", "instances_val2014.json")]
    return paths


def stale_features(paths):
    """The `{split}.h5` files np2h.py made from this script's earlier `{split}_ims.npy` among `paths` (to be
    removed with them); InputError for one beside no such .npy (then it is someone else's)."""
    stale = []
    for npy in (p for p in paths if p.endswith("_ims.npy")):
        h5 = npy[:-len("_ims.npy")] + ".h5"
        if os.path.lexists(h5):
            if not os.path.lexists(npy):
                raise InputError(f"{h5}: exists and was not made from this script's features; choose an empty "
                                 f"--out_dir (e.g. --out_dir synthetic/data)")
            stale.append(h5)
    return stale


def draw_split(rng, world, n_images, binding=DEFAULT_BINDING):
    """(images, caption lines, features (n_images, 36, D) float32) of one split, drawn from `rng`."""
    images = sample_images(rng, world, n_images)
    lines = [caption(rng, image, binding) for image in images for _ in range(CAPTIONS_PER_IMAGE)]
    return images, lines, np.stack([features(rng, world, image) for image in images])


def draw_datasets(opt):
    """Yield (data_name, split, images, lines, features) of every split `opt` asks for, in a fixed order.

    One random stream from `opt.seed` draws the world and then the splits in this order, so a split
    can be drawn again in memory (for the content oracle) exactly as it was written.
    """
    rng = np.random.default_rng(opt.seed)
    world = World(rng, opt.feat_dim)
    sizes = {"train": opt.n_train, "dev": opt.n_dev, "test": opt.n_test, "testall": opt.n_testall}
    for data_name in ("f30k_precomp", "coco_precomp"):  # fixed order: the bytes must not depend on --datasets order
        if data_name in opt.datasets:
            for split in SPLITS[data_name]:
                yield (data_name, split) + draw_split(rng, world, sizes[split], opt.binding)


def noisy_pairs(seed, data_name, n_images, noise_rate):
    """(chosen, source): the training images `chosen` (sorted) take the captions of images `source`.

    round(noise_rate x n_images) images, and a permutation of them without fixed points (drawn until one
    has none: a uniform derangement), from a random stream of their own so that everything else the seed
    draws stays the same. InputError when that number is 1 (one image cannot take another's captions).
    """
    n_noisy = round(noise_rate * n_images)
    if n_noisy == 1:
        raise InputError(f"--noise_rate {noise_rate} makes 1 of {n_images} training images noisy, which cannot "
                         f"take another image's captions; choose 0 or at least {1.5 / n_images:.4g}")
    rng = np.random.default_rng([seed, 2, list(SPLITS).index(data_name)])
    chosen = np.sort(rng.choice(n_images, size=n_noisy, replace=False))
    order = rng.permutation(n_noisy)
    while n_noisy and (order == np.arange(n_noisy)).any():
        order = rng.permutation(n_noisy)
    return chosen, chosen[order]


def with_noise(lines, chosen, source):
    """Caption lines (5 per image) with image chosen[k]'s five captions replaced by image source[k]'s."""
    noisy = list(lines)
    for target, origin in zip(chosen.tolist(), source.tolist()):
        noisy[CAPTIONS_PER_IMAGE * target:CAPTIONS_PER_IMAGE * (target + 1)] = \
            lines[CAPTIONS_PER_IMAGE * origin:CAPTIONS_PER_IMAGE * (origin + 1)]
    return noisy


def write_split(directory, split, lines, feats, rows_per_caption, **settings):
    """Write {split}_caps.txt and {split}_ims.npy (each image's row 5 times with rows_per_caption); the manifest
    records `settings` (the training split's noise_rate) with the captions."""
    if rows_per_caption:
        feats = np.repeat(feats, CAPTIONS_PER_IMAGE, axis=0)
    fileio.write_text("\n".join(lines) + "\n", os.path.join(directory, f"{split}_caps.txt"))
    record(os.path.join(directory, f"{split}_caps.txt"), **settings)
    fileio.save_npy(feats, os.path.join(directory, f"{split}_ims.npy"))
    record(os.path.join(directory, f"{split}_ims.npy"))


def content_oracle(opt, data_name="coco_precomp", split="testall", n_samples=100, seed=1):
    """Scores (n_images, n_captions) float32 of an oracle that knows each image's content, not its captions.

    Image i vs caption j gets the relevance image i would have to caption j in expectation over the
    captions the generator could write for it: c_i = mean TF-IDF row of `n_samples` captions drawn for
    image i's scene and objects, score = c_i . t_j, in the TF-IDF the relevance M fits on the split's
    captions (daa_loss.SemanticRelevance; with the image's own 5 captions for the samples this is M). A
    model that sees only the image cannot know more, so the oracle's ASP is the headroom of training.
    """
    from daa_loss import SemanticRelevance  # here, not at the top: writing the data needs no torch

    images, lines = next((im, ln) for name, sp, im, ln, _ in draw_datasets(opt) if (name, sp) == (data_name, split))
    relevance = SemanticRelevance(lines, CAPTIONS_PER_IMAGE, f"{data_name} {split}")
    rng = np.random.default_rng(seed)
    expected = np.stack([np.asarray(relevance.tfidf_rows([caption(rng, image, opt.binding) for _ in range(n_samples)])
                                    .mean(axis=0)).ravel() for image in images])  # (n_images, V)
    return np.asarray(relevance.tfidf_rows(lines) @ expected.T).T.astype(np.float32)


def write_coco_annotations(rng, ann_dir, image_ids, images, lines):
    """COCO-format captions_val2014.json and instances_val2014.json for the testall images."""
    coco_images = [{"id": int(i), "file_name": f"COCO_val2014_{int(i):012d}.jpg", "width": 640, "height": 480}
                   for i in image_ids]
    captions = [{"image_id": int(image_ids[j // CAPTIONS_PER_IMAGE]), "id": j + 1, "caption": line}
                for j, line in enumerate(lines)]
    # As in real COCO, a few images have no instance annotation (PMRP drops them as queries and gallery items).
    n_unannotated = len(images) // 50
    unannotated = set(rng.choice(len(images), size=n_unannotated, replace=False).tolist())
    instances, ann_id = [], 1
    for index, (image_id, (_, objects)) in enumerate(zip(image_ids, images)):
        if index in unannotated:
            continue
        for cat, _, count in objects:
            for _ in range(count):
                x, y = (int(v) for v in rng.integers(0, 400, size=2))
                w, h = (int(v) for v in rng.integers(20, 200, size=2))
                instances.append({"image_id": int(image_id), "category_id": COCO_CATEGORIES[cat][0], "id": ann_id,
                                  "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0,
                                  "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
                ann_id += 1
    info = {"description": "synthetic COCO-format annotations (make_synthetic_data.py)"}
    categories = [{"supercategory": sup, "id": cid, "name": name} for cid, name, sup in COCO_CATEGORIES]
    fileio.write_json({"info": info, "licenses": [], "images": coco_images, "annotations": captions},
                      os.path.join(ann_dir, "captions_val2014.json"))
    fileio.write_json({"info": info, "licenses": [], "images": coco_images, "annotations": instances,
                       "categories": categories}, os.path.join(ann_dir, "instances_val2014.json"))
    for name in ("captions_val2014.json", "instances_val2014.json"):
        record(os.path.join(ann_dir, name))


def build_parser():
    parser = errors.ArgumentParser(description="Write learnable synthetic f30k_precomp/coco_precomp datasets.")
    # Defaults apart from the real data's folders (data/, vocab/, pmrp_com/coco_ann/)
    parser.add_argument("--out_dir", default=os.path.join("synthetic", "data"),
                        help="data_path: gets f30k_precomp/ and coco_precomp/")
    parser.add_argument("--vocab_dir", default=os.path.join("synthetic", "vocab"),
                        help="where {data_name}_vocab.json are written")
    parser.add_argument("--ann_dir", default=os.path.join("synthetic", "coco_ann"),
                        help="folder for the COCO-format captions_val2014.json and instances_val2014.json")
    parser.add_argument("--seed", default=0, type=int, help="same seed and sizes, same bytes")
    parser.add_argument("--feat_dim", default=2048, type=int, help="region feature dimension D")
    parser.add_argument("--n_train", default=400, type=int, help="training images per dataset")
    parser.add_argument("--n_dev", default=100, type=int, help="dev images per dataset")
    parser.add_argument("--n_test", default=100, type=int, help="test images per dataset")
    parser.add_argument("--n_testall", default=500, type=int, help="COCO testall images (a multiple of 5: 1K folds)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes for quick checks: 40/10/10/25 images, feat_dim 32 (overrides the size options)")
    parser.add_argument("--datasets", nargs="+", default=["f30k_precomp", "coco_precomp"],
                        choices=["f30k_precomp", "coco_precomp"], help="which datasets to write")
    parser.add_argument("--rows_per_caption", nargs="*", default=[], metavar="SPLIT",
                        help="write these splits with one feature row per caption (each image repeated 5x)")
    parser.add_argument("--threshold", default=4, type=int, help="vocabulary word-count threshold")
    parser.add_argument("--noise_rate", default=0.0, type=float,
                        help="share p in [0, 1) of training images whose captions are another training image's "
                             "(noisy correspondence); 0 = clean")
    parser.add_argument("--binding", default=DEFAULT_BINDING, type=float,
                        help="share (0-1) of object phrases naming the object's colour, whose meaning depends on "
                             "which colour goes with which object; 0: captions a pooled image vector can match")
    return parser


def main(argv=None):
    opt = build_parser().parse_args(argv)
    if opt.tiny:
        opt.n_train, opt.n_dev, opt.n_test, opt.n_testall, opt.feat_dim = 40, 10, 10, 25, 32
    for name in ("n_train", "n_dev", "n_test", "n_testall", "feat_dim", "threshold"):
        if getattr(opt, name) < 1:
            raise InputError(f"--{name} must be at least 1 (got {getattr(opt, name)})")
    if opt.n_testall % 5:
        raise InputError(f"--n_testall must be a multiple of 5 for the five 1K-style folds (got {opt.n_testall})")
    if not 0 <= opt.noise_rate < 1:  # also refuses nan
        raise InputError(f"--noise_rate must be in [0, 1) (got {opt.noise_rate})")
    for data_name in opt.datasets:  # a noise rate that cannot be made is refused before anything is written
        noisy_pairs(opt.seed, data_name, opt.n_train, opt.noise_rate)
    if not 0 <= opt.binding <= 1:
        raise InputError(f"--binding must be a share between 0 and 1 (got {opt.binding})")
    unknown = set(opt.rows_per_caption) - {"train", "dev", "test", "testall"}
    if unknown:
        raise InputError(f"--rows_per_caption: unknown split(s) {sorted(unknown)}")
    for folder in (opt.out_dir, opt.vocab_dir, opt.ann_dir):  # before writing anything: no half-made dataset
        fileio.check_output(folder, folder=True)
    paths = output_files(opt)
    for path in paths:
        if os.path.lexists(path) and not written_here(path):
            raise InputError(f"{path}: exists and was not written by make_synthetic_data.py (or was changed since); "
                             f"choose empty folders (e.g. --out_dir synthetic/data --vocab_dir synthetic/vocab "
                             f"--ann_dir synthetic/coco_ann)")
    for h5 in stale_features(paths):
        os.remove(h5)
        print(f"{h5}: removed (np2h.py made it from the features written over now)")

    vocab_splits, vocab_captions = {}, {}
    for data_name, split, images, lines, feats in draw_datasets(opt):
        directory = os.path.join(opt.out_dir, data_name)
        if split in ("train", "dev"):  # the clean captions: noise moves them, the vocabulary stays the same bytes
            vocab_captions.setdefault(data_name, []).extend(lines)
        settings = {}
        if split == "train":
            lines = with_noise(lines, *noisy_pairs(opt.seed, data_name, len(images), opt.noise_rate))
            settings = {"noise_rate": opt.noise_rate}
        write_split(directory, split, lines, feats, split in opt.rows_per_caption, **settings)
        if split == "testall":
            # ids and boxes from a stream of their own, so the captions and features stay replayable
            annotation_rng = np.random.default_rng([opt.seed, 1])
            image_ids = np.sort(annotation_rng.choice(np.arange(1, 600000), size=len(images), replace=False))
            fileio.write_text("".join(f"{i}\n" for i in image_ids for _ in range(CAPTIONS_PER_IMAGE)),
                              os.path.join(directory, "testall_ids.txt"))
            record(os.path.join(directory, "testall_ids.txt"))
            write_coco_annotations(annotation_rng, opt.ann_dir, image_ids, images, lines)
        vocab_splits.setdefault(data_name, []).append(f"{split} {len(images)} images")
    for data_name, described in vocab_splits.items():
        directory = os.path.join(opt.out_dir, data_name)
        vocab = vocab_of_captions(vocab_captions[data_name], opt.threshold)
        serialize_vocab(vocab, os.path.join(opt.vocab_dir, f"{data_name}_vocab.json"))
        record(os.path.join(opt.vocab_dir, f"{data_name}_vocab.json"))
        print(f"{directory}: " + ", ".join(described) + f"; vocabulary {len(vocab)} words")


if __name__ == "__main__":
    sys.exit(errors.run(main))
