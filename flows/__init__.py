"""Prefect flows over tipsen/: curate, per-keyword training fan-out, evaluation, and scheduled retraining.

`flows.pipeline` holds the flows, `flows.tasks` the thin tasks they run, `flows.deploy` the deployments.
"""
