"""Benchmarks of ia3fuse, kept in the repository (not in the installed package).

The speed and exactness scripts run as files (``python benchmarks/merge_speed.py``); the quality
suites are the ``benchmarks.quality`` package (``python -m benchmarks.quality``). See README.md here.
"""
