"""bench.py as a smoke run: --quick in-process, every row present, project and baseline outputs agree; its
flop counts against torch's own and a hand count; its extrapolation, roofline and target verdicts."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model
from model import SimilarityModel
from tools import bench


@pytest.mark.slow
def test_quick_benchmark_has_every_row_and_the_outputs_agree(tmp_path):
    out = tmp_path / "bench.md"
    rows = bench.main(["--quick", "--out", str(out), "--tmp_dir", str(tmp_path)])
    table = out.read_text(encoding="utf-8")
    quick = bench.SIZES["quick"]
    expected = [("similarity SGR", ""), ("similarity SAF", ""), ("training step SGR", ""),
                ("training step SAF", ""), ("ASP", ""), ("TF-IDF relevance", ""),
                ("np2h", f"{quick['np2h_images']} images"), ("np2h", "COCO train"),
                ("embedding VSE", f"{quick['emb_images']} images"), ("embedding PCME", f"{quick['emb_images']} images")]
    expected += [(case, f"N = {n}") for n in quick["daa"] for case in ("DAA loss", "DAA tie_aware vs reference")]
    expected += [("PMRP", f"{n} images") for n in quick["pmrp"]] + [("PMRP, whole process", "")]
    expected += [(f"shortlist K = {k}", "") for k in quick["shortlist_k"]]
    assert len(rows) == len(expected)
    for case, size in expected:
        found = [r for r in rows if r["case"] == case and r["size"].startswith(size)]
        assert len(found) == 1, (case, size)
        assert f"| {case} | {found[0]['size']} |" in table
    for r in rows:
        assert r["base_s"] > 0 and r["proj_s"] > 0, r["case"]
        if r["diff"] is not None:  # every measured pair is checked; rows without a baseline output have none
            assert r["diff"] <= bench.TOLERANCE, (r["case"], r["size"], r["diff"])
    # the scaled np2h row, the two embedding rows and the tie_aware rows (another objective than their baseline's)
    assert sum(r["diff"] is None for r in rows) == 3 + len(quick["daa"])
    ties = [r for r in rows if r["case"] == "DAA tie_aware vs reference"]
    lines = [line for line in table.splitlines() if line.startswith("| DAA tie_aware at N = ")]
    assert [line.split(" | ")[1] for line in lines] == [f"{t['proj_s'] / t['base_s']:.2f}x" for t in ties
                                                         if t["size"] != f"N = {quick['daa'][1]}"]
    assert "| target | measured | met |" in table
    assert not list(tmp_path.glob("bench_np2h_*")) and not list(tmp_path.glob("bench_pmrp_*"))  # files removed
    assert sum(r["flops"] is not None for r in rows) == 4  # similarity and training rows: roofline column
    assert "sgemm rate" in table and "(share of sgemm)" in table


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_similarity_flops_are_the_products_torch_counts(module_name, monkeypatch):
    """similarity_flops against torch's FlopCounterMode over one eval forward (captions of one length: no
    padding, which the count leaves out), F.linear instead of oneDNN's kernel, which the counter does not see."""
    monkeypatch.setattr(model, "ONEDNN", False)
    dims, sgr_step = (20, 16, 32, 16), 3
    torch.manual_seed(0)
    sim_enc = SimilarityModel(bench.model_options(dims, 40, module_name)).sim_enc.eval()
    lengths = torch.full((4,), 5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sim_enc(torch.rand(3, 36, 32), torch.rand(4, 5, 32), lengths)
    uncounted = 2 * dims[3] * sgr_step if module_name == "SGR" else 0  # b_q . b_k per step: aten.dot, not counted
    assert bench.similarity_flops(3, lengths, dims, module_name, sgr_step) == counter.get_total_flops() + uncounted


def test_large_gallery_case_at_a_small_size(tmp_path):
    """tools.bench --cases large_gallery (not among the default cases) at 10 and 50 images: two rows, the
    streamed metrics equal the in-memory ones at the small size, the time split and the target line present."""
    out = tmp_path / "bench.md"
    rows = bench.main(["--quick", "--cases", "large_gallery", "--large_images", "50", "--out", str(out)])
    assert [r["size"].split(" images")[0] for r in rows] == ["10", "50"]
    assert rows[0]["diff"] == 0.0 and rows[1]["diff"] is None and rows[1]["extrapolated"]
    assert set(rows[1]["timers"]) == {"encoding", "products", "relevance rows", "ranking", "PMRP"}
    assert set(rows[1]["index"]) == {"hnsw", "pca", "ivf"} and all(0 < v[0] <= 1 and 0 < v[1] <= 1 for v in rows[1]["index"].values())
    assert "every metric exact" in out.read_text(encoding="utf-8")
    assert "efSearch 100: " in out.read_text(encoding="utf-8") and "nprobe 64: " in out.read_text(encoding="utf-8")
    assert "large_gallery" not in bench.CASES  # the default run stays as it was


# ------------------------------------------------------------------------------------------------
# The pure functions behind the README's benchmark table: flop counts, extrapolation, target verdicts

HAND_DIMS = (5, 3, 4, 2)  # img_dim, word_dim, d, s; R = 36 regions


def test_flop_counts_against_a_hand_count():
    """One image, one caption of L = 2 words (N = 3 nodes), d = 4, s = 2; 2 m k n flops per (m x k)(k x n).

    Per pair: attention R x d x L 576, context L x R x d 576, local W L x d x s 32, global W d x s 16, score
    head s 4 (1204); SAF's gate N x s 12 and weighted sum N x s 12 (1228). Globals: VisualSA's local
    R x d x d 1152, global d x d 32, common R x d 288, weighted sum R x d 288 (1760); TextSA's 64 + 32 +
    16 + 16 (128). SAF: 1228 + 1760 + 128 = 3116.
    SGR, 2 steps: a full step's probe N x s x (s + 1) 36, logits N x s x N 36, edges x nodes 36, W_g
    N x s x s 24 (132); the last step (node 0 only) 12 + 12 + 12 + 8 (44); the folded edge weights per step
    s^3 16 + two s^2 products 16 + s 4 (36, twice 72). 1204 + 132 + 44 + 1760 + 128 + 72 = 3340.
    Training step (SAF): image fc R x img_dim x d 1440, bi-GRU 2 words x 2 directions x 3 gates x (word_dim
    + d) x d 672, forward 1440 + 672 + 3116 = 5228, backward twice that but for the image fc's input
    gradient: 3 x 5228 - 1440 = 14244. Encoders alone: 1440 + 672 = 2112.
    """
    assert bench.similarity_flops(1, [2], HAND_DIMS, "SAF") == 3116
    assert bench.similarity_flops(1, [2], HAND_DIMS, "SGR", sgr_step=2) == 3340
    assert bench.similarity_flops(3, [2, 2], HAND_DIMS, "SAF") == 3 * 2 * 1228 + 3 * 1760 + 2 * 128
    assert bench.train_step_flops(1, [2], HAND_DIMS, "SAF") == 14244
    assert bench.train_step_flops(1, [2], HAND_DIMS, "SAF", bi_gru=False) == 3 * (5228 - 336) - 1440
    assert bench.encoder_flops({"dims": HAND_DIMS}, 1, 2) == 2112


def test_extrapolation_is_the_power_law_through_two_sizes():
    """v = a n^p through (10, 1 s) and (20, 4 s): p = 2, a = 0.01, so 16 s at n = 40 and 0.25 s at 5; a flat
    measure stays flat; time linear in n (2 s at 1000, 4 s at 2000) is 10 s at 5000."""
    for target, value in ((40, 16.0), (5, 0.25)):
        extrapolated, power = bench.extrapolate((10, 20), (1.0, 4.0), target)
        assert extrapolated == pytest.approx(value, rel=1e-12) and power == pytest.approx(2.0, rel=1e-12)
    assert bench.extrapolate((1000, 2000), (3.0, 3.0), 8000) == (pytest.approx(3.0), pytest.approx(0.0))
    assert bench.extrapolate((1000, 2000), (2.0, 4.0), 5000)[0] == pytest.approx(10.0, rel=1e-12)


def test_roofline_is_the_achieved_rate_and_its_share_of_sgemm():
    assert bench.roofline({"flops": 3e9, "proj_s": 1.5}, 4.0) == (pytest.approx(2.0), pytest.approx(0.5))
    assert bench.roofline({"flops": None, "proj_s": 1.5}, 4.0) is None and bench.roofline({"flops": 3e9}, None) is None


def test_target_verdicts():
    """Each target's verdict on rows made up to sit on either side of its goal (quick sizes: DAA N = 16, 32,
    64; PMRP 50 and 200 images; ASP 100 x 500; embedding 60 images); "no" says by how much it fell short."""
    sizes = bench.SIZES["quick"]
    rows = [bench.row("DAA loss", "N = 32", (10.0, 400.0), (2.0, 100.0)),  # 5x, 1/4 of the memory
            bench.row("DAA tie_aware vs reference", "N = 16", (2.0, 1.0), (3.0, 1.0)),  # 1.5x
            bench.row("DAA tie_aware vs reference", "N = 32", (2.0, 1.0), (9.0, 1.0)),  # not a target size
            bench.row("DAA tie_aware vs reference", "N = 64", (2.0, 1.0), (3.2, 1.0)),  # 1.6x
            bench.row("PMRP", "50 images", (40.0, 1.0), (1.0, 1.0)),  # 40x of 50x: 20 % short
            bench.row("PMRP", "200 images", (600.0, 1.0), (59.0, 4000.0)),
            bench.row("PMRP, whole process", "", (25.0, 1.0), (1.0, 1.0)),
            bench.row("ASP", "100 x 500", (20.0, 1.0), (10.0, 0.1)),  # one input matrix: 0.19 MB
            bench.row("similarity SGR", "12 x 30", (3.0, 1.0), (1.0, 1.0), diff=1e-6, flops=3e9),  # 75 %
            bench.row("similarity SAF", "12 x 30", (3.0, 1.0), (1.0, 1.0), diff=1e-7, flops=1.5e9),  # 37.5 %
            bench.row("training step SGR", "batch 12", (6.0, 1.0), (2.0, 1.0)),  # 3x
            bench.row("training step SAF", "batch 12", (5.4, 1.0), (2.0, 1.0)),  # 2.7x
            bench.row("embedding VSE", "60 images, dims", (1.0, 1.0), (119.0, 1.0), scoring_mb=0.1),  # of 0.27 MB
            bench.row("embedding PCME", "60 images, dims", (1.0, 1.0), (121.0, 1.0), scoring_mb=0.1)]
    verdicts = {target: (measured, verdict) for target, measured, verdict in bench.targets(rows, sizes, sgemm=4.0)}
    assert verdicts == {
        "DAA at N = 32: >= 5x faster, <= 1/4 of the memory": ("5.0x, 0.25 of the memory", "yes"),
        "DAA tie_aware at N = 16: <= 1.5x reference's time": ("1.50x", "yes"),
        "DAA tie_aware at N = 64: <= 1.5x reference's time": ("1.60x", "no"),
        "PMRP at 50 images: >= 50x": ("40x", "no, 20 % short"),
        "PMRP at 200 images: < 60 s and < 4 GB": ("59.0 s, 3.91 GB", "yes"),
        "pmrp_evaluation.py at 50 images, whole process: >= 25x PCME's dict loop": ("25.0x", "yes"),
        "ASP of 100 x 500, both directions: < 20 s, faster than the per-row sort, memory under one input matrix":
            ("10.0 s, 2.0x, 0 MB", "yes"),
        "similarity SGR: >= 75 % of the sgemm rate, outputs within 1e-06": ("75 %, max abs diff 1.0e-06", "yes"),
        "similarity SAF: >= 75 % of the sgemm rate, outputs within 1e-06": ("38 %, max abs diff 1.0e-07",
                                                                              "no, 50 % short"),
        "training step SGR: >= 3x the baseline": ("3.00x", "yes"),
        "training step SAF: >= 3x the baseline": ("2.70x", "no, 10 % short"),
        "embedding VSE: 60 images scored, encoding included, with R@K, ASP and PMRP in < 120 s; encoding + scoring "
        "below two score matrices of memory": ("119 s, 0 MB", "yes"),
        "embedding PCME: 60 images scored, encoding included, with R@K, ASP and PMRP in < 120 s; encoding + scoring "
        "below two score matrices of memory": ("121 s, 0 MB", "no")}
    # the scoring target fails on outputs that differ, whatever the rate
    rows = [bench.row("similarity SGR", "12 x 30", (3.0, 1.0), (1.0, 1.0), diff=2e-6, flops=4e9)]
    assert bench.targets(rows, sizes, sgemm=4.0)[0][2] == "no, outputs differ"
