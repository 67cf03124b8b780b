"""Evaluation of SAK: dense metrics, boundary F-measure, Delta_m and pictures."""
