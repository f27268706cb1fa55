"""Helpers shared by the test tiers (issue 16): fakes of the three outside worlds, and later
ports, polling, S3 servers, mounts and envtest. A package, imported as ``tests.support``."""
