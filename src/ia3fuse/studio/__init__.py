"""``ia3fuse studio``: a local web app to choose fusion weights by eye (`Studio` holds the
logic, `StudioServer` serves it; the page is in ``static/``)."""

from .session import Fusion, Studio
from .server import StudioServer, create_app

__all__ = ["Studio", "Fusion", "StudioServer", "create_app"]
