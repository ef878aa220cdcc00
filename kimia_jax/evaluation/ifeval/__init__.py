# Google Research IFEval instruction checkers (Apache License 2.0, "Copyright 2024 The Google
# Research Authors"; headers kept in each file), vendored verbatim as the Kimi-Audio-Evalkit ships
# them (almeval/metrics/instruction_following_eval at commit 4080c49), so that vb-ifeval verdicts
# are the Evalkit's. Excluded from ruff to stay diffable against that copy. Needs nltk (3.9.1, with
# the `punkt_tab` data package for two instructions) and langdetect.
