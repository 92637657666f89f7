"""Tools around the library: the benchmark (bench.py, bench_gpu.sh), the DAA ablation (ablation.py), the
README's figures (plot_results.py) and the straightforward baselines they and the tests compare against
(baselines/). Run from the repository root as modules: `python -m tools.bench`, `python -m tools.ablation`,
`python -m tools.plot_results`.
"""
