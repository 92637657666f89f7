"""bench.py as a smoke run: --quick in-process, every row present, project and baseline outputs agree."""
import pytest

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
    expected += [("DAA loss", f"N = {n}") for n in quick["daa"]]
    expected += [("PMRP", f"{n} images") for n in quick["pmrp"]]
    assert len(rows) == len(expected)
    for case, size in expected:
        found = [r for r in rows if r["case"] == case and r["size"].startswith(size)]
        assert len(found) == 1, (case, size)
        assert f"| {case} | {found[0]['size']} |" in table
    for r in rows:
        assert r["base_s"] > 0 and r["proj_s"] > 0, r["case"]
        if r["diff"] is not None:  # every measured pair is checked; rows without a baseline output have none
            assert r["diff"] <= bench.TOLERANCE, (r["case"], r["size"], r["diff"])
    assert sum(r["diff"] is None for r in rows) == 3  # the scaled np2h row and the two embedding rows
    assert "| target | measured | met |" in table
    assert not list(tmp_path.glob("bench_np2h_*"))  # the np2h files are removed
