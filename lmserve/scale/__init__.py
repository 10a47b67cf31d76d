"""Scaling lmserve out: replicas behind one endpoint and the routing between them.

`lmserve.scale:app` is the Ray Serve application builder (`serve run lmserve.scale:app
argv="MODEL --replicas 4"`); it is imported on first use, so the rest of this package works
without Ray installed.
"""


def __getattr__(name: str):
    if name == "app":
        from lmserve.scale.application import app

        return app
    raise AttributeError(f"module 'lmserve.scale' has no attribute {name!r}")
