"""Scale-out across replicas: the routing policy (`routing.py`, plain Python) and the Ray Serve application
(`app.py`: `deltaserve cluster`, `build_app` for `serve run deltaserve.cluster:build_app`). Ray is imported only
when the application is built."""


def build_app(args=None):
    from deltaserve.cluster.app import build_app as _build

    return _build(args)
