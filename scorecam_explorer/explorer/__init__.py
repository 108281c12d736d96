"""The explorer: ipywidgets and Plotly panels over a Score-CAM cache.

Panels read only the cache when you interact (no torch, no forward pass): a cache computed
on a GPU server explores smoothly on a laptop. See :class:`Explorer`.
"""

from scorecam_explorer.explorer.app import Explorer

__all__ = ["Explorer"]
