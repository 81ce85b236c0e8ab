"""The layout planner (`shardserve plan`): which TP x PP x replicas, dtype and KV budget to
serve a model with on a given machine, predicted from measured costs.

- footprint.py: per-rank weights, FLOPs, collectives and KV bytes, from the split table;
- costs.py: the machine's measured costs (a JSON file) and their lookups;
- measure.py: `--measure`, timing this machine;
- predict.py: layouts, validity, the step model, the recommendation;
- report.py: the table and the JSON the CLI prints.

It lives in the server package because its costs are the serving engine's (its step
structure, backends, per-step overhead, KV budget); the model side comes from
shardserve_sharding's split table and model specs, never re-derived here.
"""
