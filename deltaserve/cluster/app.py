"""`deltaserve cluster` and `deltaserve.cluster:build_app`: N engine replicas behind one ingress, on Ray Serve.

The Serve application is two deployments: `EngineReplica` (`replica.py`, the `deltaserve serve` app, N replicas,
`--replica-cpus` CPUs each) and the ingress (`ingress.py`, one replica, no CPU reserved: it only proxies).
Engine replicas are routed by `pinned.PinnedRequestRouter`, which sends each call where the ingress's policy chose.

Autoscaling: with `--min-replicas`/`--max-replicas`, the engine deployment gets Serve's `autoscaling_config`
(`min_replicas`, `max_replicas`, `initial_replicas` = `--replicas`, `target_ongoing_requests`): every request
reaches a replica through the handle, so Serve's count of ongoing requests per replica is the real load.

Importing this module does not import Ray (the CLI lists `cluster` without it); building the app does.
"""

from __future__ import annotations

import argparse
import shlex

DEFAULT_REPLICA_CPUS = 0.5  # two replicas + the ingress fit on a 2-core machine; the engine thread is not capped


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """`deltaserve serve`'s options (each engine replica gets them all) and the cluster's own."""
    from deltaserve.server.app import add_serve_arguments

    add_serve_arguments(p)
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (initial count when autoscaling)")
    p.add_argument("--min-replicas", type=int, default=None,
                   help="autoscaling: fewest engine replicas (with --max-replicas; default: no autoscaling)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most engine replicas")
    p.add_argument("--target-ongoing-requests", type=float, default=4.0,
                   help="autoscaling: requests in flight per replica Serve aims at (default %(default)s)")
    p.add_argument("--replica-cpus", type=float, default=DEFAULT_REPLICA_CPUS,
                   help="CPUs Ray reserves for each engine replica (default %(default)s; scheduling only)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: start a local Ray instance)")


def _autoscaling(args: argparse.Namespace) -> dict | None:
    lo, hi = args.min_replicas, args.max_replicas
    if lo is None and hi is None:
        return None
    lo = 1 if lo is None else lo
    hi = max(lo, args.replicas) if hi is None else hi
    if not 1 <= lo <= hi:  # no scale to zero: the ingress places a request on a running replica or answers 503
        raise SystemExit(f"error: need 1 <= --min-replicas <= --max-replicas, got {lo}, {hi}")
    return {"min_replicas": lo, "max_replicas": hi, "initial_replicas": min(max(args.replicas, lo), hi),
            "target_ongoing_requests": args.target_ongoing_requests}


def parse_cluster_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deltaserve cluster")
    add_cluster_arguments(p)
    return p.parse_args(argv)


def build_app(args: argparse.Namespace | dict | None = None):
    """The Serve application (`serve run deltaserve.cluster:build_app model=M replicas=2 ...`, or
    `serve.run(build_app(args))`). `args`: the parsed `deltaserve cluster` flags, or a dict of flag names to
    values as `serve run` passes them (`key=value` -> `--key value`; a value "true" -> bare `--key`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from deltaserve.cluster.ingress import make_ingress
    from deltaserve.cluster.pinned import PinnedRequestRouter
    from deltaserve.cluster.replica import INGRESS, EngineReplica
    from deltaserve.server.app import resolve_model

    if args is None or isinstance(args, dict):
        argv: list[str] = []
        for k, v in (args or {}).items():
            flag = "--" + k.replace("_", "-")
            if k in ("args", "argv"):
                argv += shlex.split(v)
            elif str(v).lower() == "true":
                argv.append(flag)
            else:
                argv += [flag, str(v)]
        args = parse_cluster_args(argv)
    resolve_model(args)
    if args.replicas < 1:
        raise SystemExit(f"error: --replicas must be at least 1, got {args.replicas}")
    options: dict = {"ray_actor_options": {"num_cpus": args.replica_cpus},
                     "request_router_config": RequestRouterConfig(request_router_class=PinnedRequestRouter),
                     # A turn may run for minutes; the handle's queue, not Serve's cap, is what bounds a replica.
                     "max_ongoing_requests": max(1000, args.max_running * 4),
                     "health_check_period_s": 5, "graceful_shutdown_timeout_s": args.shutdown_timeout}
    auto = _autoscaling(args)
    if auto is None:
        options["num_replicas"] = args.replicas
    else:
        options["autoscaling_config"] = auto
    engine = serve.deployment(EngineReplica, name="EngineReplica", **options).bind(args)
    ingress = serve.deployment(make_ingress(args.allowed_origins, args.max_request_bytes), name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(engine, args.admin_key)


def run_cluster(args: argparse.Namespace) -> int:
    """`deltaserve cluster`: start (or join) Ray, run the application on --host:--port, serve until SIGINT."""
    import signal
    import threading

    import ray
    from ray import serve

    if args.min_replicas is None and args.max_replicas is None and args.replicas < 1:
        raise SystemExit(f"error: --replicas must be at least 1, got {args.replicas}")
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args), name="deltaserve", route_prefix="/")
    print(f"deltaserve cluster: {args.replicas} replica(s) of {args.model} on http://{args.host}:{args.port}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
