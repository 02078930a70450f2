"""The benchmarks: run each as ``python -m benchmarks.<name>`` from the repository root.

A regular package, not a namespace one: Opacus 1.6 installs a top-level ``benchmarks`` package
into site-packages, which would otherwise shadow this folder once ``.[bench]`` is installed.
"""
