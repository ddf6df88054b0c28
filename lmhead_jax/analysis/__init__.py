"""Layer 4, analysis: measurements on trained or imported models.

subjects (the models and data that get measured), measure (the bottleneck over streamed hidden
states), gram (Gram and randomized spectra of G), spectrum, directions (update directions).
Imports: core, data, training.
"""
