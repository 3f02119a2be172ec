"""``edgeq matrix MATRIX.toml``: many models x many profiles, each cell one export + verify (+ device check),
content-addressed, resumable, on this machine or on a Ray cluster.

- ``spec``: the matrix file, parsed and checked.
- ``cells``: the cells, each named by the hash of its inputs, with its declared memory and Ray resources.
- ``store``: the output store, a folder per cell key; what is built, what failed and why.
- ``worker``: one cell in a process of its own (``python -m edgeq.matrix.worker``), as every executor runs it.
- ``local``: the process pool admitted by declared memory; ``ray_exec``: a Ray task per cell.
- ``events``: progress lines while it runs; ``summary``: matrix.md/.html/.json, on ``edgeq report``.
- ``run``: the whole command. Why it is built this way: docs/decisions/matrix.md.
"""
