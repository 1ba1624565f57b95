"""The floor the API and the workers both stand on: settings, the database (engine, sessions, tables),
the artifact store, job state and job specs, and the validation scorer greedy-soup merges by.

It imports models/ and merging/ only; app/ and workers/ import it, never the other way round, so a
worker image needs no API package (tests/test_layering.py keeps it so).
"""
