"""Evaluation and reports.

Metrics, scorers, data sets, the evaluation loop, the HTML report, map pictures.
"""
