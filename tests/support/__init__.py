"""Helpers shared by the test tiers, each written once (issue 16), imported as
``from tests.support.<module> import ...`` and never through a conftest or ``sys.path``
(tests/test_support_imports.py checks that). Fixtures stay in the conftest.py files and use these.

- :mod:`.ports` a free loopback port; :mod:`.polling` the one bounded wait (``eventually``)
- :mod:`.s3server` moto over HTTP; :mod:`.faults` a fault-injecting proxy in front of it
- :mod:`.mounts` ``datahoard mount``/``umount`` as a user runs them, and the mount table
- :mod:`.envtest` etcd + kube-apiserver; :mod:`.kubelet` the parts of a cluster envtest lacks;
  :mod:`.cluster` reads of its state; :mod:`.metadata` a fake instance metadata service
- :mod:`.csi` the CSI node plugin's scratch node, views, client and containers;
  :mod:`.chart` helm runs and an audited control plane; :mod:`.nodekube` the one-node cluster;
  :mod:`.hdfs` a real single-node HDFS; :mod:`.cgroups` pod cgroups; :mod:`.results` figures
- :mod:`.fakes` in-memory fakes of the object store, the mount table and the Kubernetes API
"""
