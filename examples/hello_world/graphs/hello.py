"""Frontend → Middle → Backend: `dynamo serve graphs.hello:Frontend -f configs/hello.yaml`."""

from components.backend import Backend
from components.frontend import Frontend
from components.middle import Middle

Frontend.link(Middle).link(Backend)

__all__ = ["Backend", "Frontend", "Middle"]
