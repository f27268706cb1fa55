"""How a worker lets go of its FUSE connection: on SIGTERM/SIGINT a handover to the keeper
(the mount stays, requests wait in the kernel for the next worker) or an unmount, as
``serving.stop_plan`` decides; at shutdown the lease ends. A part of :class:`.worker.Worker`,
which holds the state (attach.py says where the connection comes from)."""

from __future__ import annotations

import logging

from .serving import stop_plan

log = logging.getLogger("datahoard.cache_worker.worker")  # one log for the worker, as before the split


class WorkerConnection:
    def _on_stop_signal(self, signum: int, frame) -> None:
        att = self.attachment
        if stop_plan(att is not None and att.handover, self._record is not None).handover:
            self._handing_over = True
            log.info("stopping: handing the FUSE connection over to the next worker (the mount stays)")
        else:
            log.info("stopping: unmounting %s", self.config.mountpoint)
            try:
                from .fusell.session import unmount

                unmount(self.config.mountpoint, lazy=True)
            except OSError as exc:
                log.warning("unmounting %s failed: %s", self.config.mountpoint, exc)
        if self.session is not None:
            self.session.stop()

    def _let_go_of_connection(self) -> None:
        """End the lease; after an unmount (not a handover) the keeper lets go of it too."""
        att, self.attachment = self.attachment, None
        if self.view is not None and self.view.backing is not None:
            self.view.stop_counting()  # its thread uses the native part the table frees
            self.view.backing.close()
        elif self.view is not None:
            self.view.close_native_reads()
        if att is not None:
            if att.keeper is not None and not self._handing_over:
                try:
                    att.keeper.release(self.config.mountpoint)
                except Exception as exc:  # noqa: BLE001 - the keeper drops ended connections anyway
                    log.debug("releasing the connection: %s", exc)
            att.conn.close()
        if self.attacher is not None:
            self.attacher.close()  # the lease (the keeper connection) ends here


__all__ = ["WorkerConnection"]
