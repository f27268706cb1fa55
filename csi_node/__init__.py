"""Datahoard's CSI node plugin: binds a Dataset's FUSE view, read-only, into training pods.

Modules, one job each: ``proto`` (the generated CSI stubs, behind one import), ``errors`` (the
exception-to-status decorator), ``validation`` (request checks with the spec's codes),
``mounter`` (mount syscalls and /proc/self/mountinfo), ``views`` (finding a live FUSE view),
``state`` (published targets, persisted), ``volume_lock`` (per-target try-lock),
``recovery`` (re-binding targets after a worker restart), ``usage`` (volume stats),
``identity`` and ``node`` (the two CSI services), ``logging_interceptor``, ``server`` (entry point).
"""
