"""The receive path. Loop side: nats-py subscriptions feed :mod:`.receivers`, replies are
matched to waiting requesters in :mod:`.replies`. Thread side: messages wait in a bounded
:mod:`.inbox` (its :mod:`.limits` and losses, its waiting :mod:`.readers`) for a reader
or a callback worker of a :mod:`.dispatcher`. Users hold :mod:`.subscription` objects;
:mod:`.serving` answers requests from worker threads."""
