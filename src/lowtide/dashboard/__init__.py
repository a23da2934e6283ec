"""The web dashboard, served by `lowtide serve` at / (pages under /ui/; the API stays under /v1).

A face over the runtime's services, like the API (README, "Design"): it never reaches the
store, the runner or the engines.
"""

from lowtide.dashboard.routes import install

__all__ = ["install"]
