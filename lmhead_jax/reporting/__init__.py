"""Layer 7, reporting: reading results back and presenting them.

metrics (metrics.jsonl, curves, tokens-to-target, tables), plots (training curves),
figures_measure (figures of the measurement experiments).
Imports: any layer below.
"""
