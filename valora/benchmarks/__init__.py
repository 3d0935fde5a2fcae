"""Serving benchmark (``valora bench serve``): workloads, in-process and HTTP drivers, metrics and
reports. Benchmarks time and never assert; results are JSONL rows with device, git sha and setup.
"""
