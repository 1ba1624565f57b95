"""The floor the API and the workers both stand on: settings, the database (engine, sessions, tables),
the artifact store, job state and job specs, the validation scorer greedy-soup merges by, and the data
functions of the merge methods that choose on data (merge_inputs.py: score, Gram matrices, objective).

It imports models/ and merging/ only; app/ and workers/ import it, never the other way round, so a
worker image needs no API package (tests/test_layering.py keeps it so).
"""
