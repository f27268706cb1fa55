"""The cache worker: a node-local, read-only, caching view of a remote dataset.

Layers, bottom up: a *source* (S3, later HDFS) knows how to list and read ranges; the *index*
is a persisted snapshot of the listing; the *store* keeps verified chunks on local disk with LRU
eviction; the *dataset cache* joins them (single-flight fills, read-ahead, hit accounting);
the *warmer* prefetches in the background; the *FUSE view* is a thin adapter over the dataset
cache; the *stats server* exposes counters as JSON and Prometheus metrics.
"""
