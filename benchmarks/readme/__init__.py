"""``benchmarks/README.md``, section by section, from ``benchmarks/results/*.json``.

``tables`` reads the results and formats markdown; ``serving`` renders the Serve benchmarks
(peers, filtered search, query scaling), ``jobs`` the batch side (index builds, control plane,
embedding throughput, answer quality), ``extrapolation`` the billion-vector arithmetic.
``benchmarks/report.py`` puts them together.
"""
