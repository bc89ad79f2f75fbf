"""Latent dashboards: max-activating examples, histograms and logit lens per latent (``examples``,
``logit_lens``), the offline pages written into ``artifact/dashboard/`` (``offline``), and the online app of
``python analyze.py artifact=DIR serve=true`` (``online``, ``server``). Format: ``docs/dashboard.md``."""
