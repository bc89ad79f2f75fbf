"""The commands of ``python analyze.py``, one module each, chosen by `dispatch.analyze` from conf/analyze.yaml's keys.

- `reanalyse`: ``artifact=DIR``: re-run the analyses on a saved artifact and rewrite it.
- `serve`: ``artifact=DIR serve=true``: serve its latent dashboard with a prompt box.
- `import_checkpoint`: ``checkpoint=DIR artifact=NEW_DIR model_pair=... data=...``: a crosscoder trained
  elsewhere, written as a new artifact.
- `push`: ``artifact=DIR push_to_hub=user/name``: upload an artifact to the Hugging Face Hub.
- `sweep_summary`: ``sweep=DIR``: one table and figure across the jobs of a multirun.

Each module's ``run(cfg, overrides)`` takes the composed conf/analyze.yaml and the command line's overrides and
returns the command's figures (a dict, empty when there are none). `settings` holds what several of them share:
the analysis and dashboard settings of an artifact under the command line's overrides.
"""
