"""Analyses of a trained crosscoder: taxonomy, latent scaling, causal validation, splice-in, model card.

Each analysis is a plain function of (crosscoder, activations or models); ``report.write_analyses`` runs
them all into an artifact directory and is shared by the end-of-training callback and offline scripts.
"""
