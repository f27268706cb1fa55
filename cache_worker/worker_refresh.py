"""The worker's side of a refresh (refresh.py): starting the refresher once serving, answering
``POST /refresh``, and putting a new index in every place that serves one. A part of
:class:`.worker.Worker`, which holds the state."""

from __future__ import annotations

import logging

from .index import Index
from .index_open import empty_view_problem
from .keys import KeyFilter
from .refresh import Parts, Refresher, RefreshRefused

log = logging.getLogger(__name__)


class WorkerRefresh:
    def _start_refresher(self) -> None:
        cfg = self.config
        self.refresher = Refresher(
            cfg.cache_dir, cfg.source, KeyFilter(tuple(cfg.include), tuple(cfg.exclude)),
            Parts(index=lambda: self.index, take_index=self._take_index, drop_names=self.drop_names,
                  list_source=lambda: self.source.list(), direct=cfg.direct),
            lambda summary: empty_view_problem(cfg, summary), last=self.opened.refresh)

    def ask_refresh(self, query: dict[str, list[str]]) -> tuple[int, str]:
        """``POST /refresh[?snapshot=ID&from=URL...]`` (``datahoard refresh``): start one."""
        if self.refresher is None:
            return 503, "not serving yet"
        wanted = (query.get("snapshot") or [None])[0]
        try:
            self.refresher.start(wanted, tuple(query.get("from", [])))
        except RefreshRefused as exc:
            return 409, str(exc)
        return 202, "refresh started; see refresh in /stats"

    def _take_index(self, index: Index) -> None:
        """Serve a refreshed index: the view, the "fully cached" event, warming."""
        self.index = index
        self.view.take_index(index)
        self.completeness.replace_index(index)
        if self.config.warm:
            self._start_warming()

    def drop_names(self, names: list[tuple[int, str]]) -> None:
        """Make the kernel forget names that lead elsewhere since its last look."""
        dropped = sum(self._invalidate(parent, name.encode("utf-8", "surrogateescape")) for parent, name in names)
        if names:
            log.info("dropped %d of %d changed names from the kernel's cache", dropped, len(names))
        self.view.watch_new_dirs()  # now that every new directory's name leads to it

    def _invalidate(self, parent: int, name: bytes) -> bool:
        att = self.attachment
        if att is None:
            return False
        try:
            return att.conn.notify_inval_entry(parent, name)
        except OSError as exc:  # the kernel refused it: the entry times out in METADATA_TIMEOUT
            log.warning("could not drop %r from the kernel's cache: %s", name, exc)
            return False


__all__ = ["WorkerRefresh"]
