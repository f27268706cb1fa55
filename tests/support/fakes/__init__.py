"""In-memory stand-ins for what the components talk to: a remote store (:mod:`.source`), the
kernel's mount table (:mod:`.mounter`) and the Kubernetes API (:mod:`.kube`).

Honest fakes: each enforces the contract the real one keeps (conditional reads on the listed
ETag, a bind needs both paths to exist, resourceVersion and uid preconditions, 404s), and a
shared contract suite runs against fake and real alike (``test_*_contract.py``) so they cannot
drift apart. They are for unit tests of *our* code; they are never asserted on as mocks.
"""
