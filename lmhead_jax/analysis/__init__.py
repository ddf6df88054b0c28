"""Layer 4, analysis: measurements on trained or imported models, from typed parts.

subjects (a model under measurement), measure (the bottleneck over streamed hidden states),
gram (Gram and randomized spectra of G), spectrum, directions (update directions).
Imports: core, data, training.
"""
