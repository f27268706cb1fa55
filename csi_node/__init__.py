"""Datahoard's CSI node plugin: binds a Dataset's FUSE view, read-only, into training pods.

Modules, one job each: ``csi.proto`` and ``pluginregistration.proto`` with their committed stubs
(``genproto`` regenerates and checks them), ``errors`` (the exception-to-status decorator),
``validation`` (request checks with the spec's codes), ``mounter`` (the mount interface over
``datahoard.mounts``, bounded probes), ``views`` (finding a live FUSE view), ``state`` (published targets, persisted),
``volume_lock`` (per-target try-lock), ``recovery`` (re-binding targets after a worker
restart), ``inject`` and ``nsmount`` (repairing dead copies in other mount namespaces),
``usage`` (volume stats), ``identity`` and ``node`` (the two CSI services),
``registration`` (registering with the kubelet through its plugin-registration socket, in
place of node-driver-registrar), ``healthz`` (``/healthz`` in place of the livenessprobe
sidecar), ``logging_interceptor`` and ``server`` (the entry point behind
``datahoard csi-node``).
See README.md in this directory for deployment and recovery behaviour.
"""
