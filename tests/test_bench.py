"""bench.py as a smoke run: --quick in-process, every row present, project and baseline outputs agree; its
flop counts against torch's own."""
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
    assert set(rows[1]["index"]) == {"hnsw", "ivf"} and all(0 < v[0] <= 1 and 0 < v[1] <= 1 for v in rows[1]["index"].values())
    assert "every metric exact" in out.read_text(encoding="utf-8")
    assert "efSearch 100: " in out.read_text(encoding="utf-8") and "nprobe 4: " in out.read_text(encoding="utf-8")
    assert "large_gallery" not in bench.CASES  # the default run stays as it was
