"""The model registry: versions of weights, checked before anything serves them.

`keel models register` validates a directory (validate.py), estimates its GPU memory
(memory.py) and writes an immutable version manifest (store.py); configs name a version as
`weights: NAME@VERSION` or `NAME` (resolve.py). Plain Python over files; no Ray, no engine.
"""
