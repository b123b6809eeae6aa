"""The mesh's own fuzzing suite (docs/fuzzing.md).

* `mutate`: hostile MessagePack and structural/byte mutations, from a `random.Random`.
* `corpus`: valid messages of every kind, built with the codec's encoders.
* `attacks`: message number N of each attacker of a seeded run, as a pure function.
* `ledger`: what each message should get back, and the run's figures and bounds.
* `run`: the end-to-end run against a real `mesh up` (`python -m mesh.fuzz`).
"""
