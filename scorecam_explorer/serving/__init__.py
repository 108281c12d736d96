"""Serving the explorer to many pages at once (``scorecam-explorer app``).

- :mod:`.status`: the small JSON file through which the command tells every page's kernel
  what it is doing (loading, computing layer k of n, ready, failed).
- :mod:`.page`: what a page's kernel shows: that status until the cache is ready, then the
  explorer, or a clear message instead of a traceback.
- :mod:`.options`: the serving options (host, sessions, culling, kernel pool) and the Voila
  command line they make.
- :mod:`.voila_main`: the Voila server the command runs (a session limit with a "class is
  full" page, quiet logs); :mod:`.sessions` counts the sessions; :mod:`.kernel` starts a
  page's kernel.

Nothing here imports torch.
"""
