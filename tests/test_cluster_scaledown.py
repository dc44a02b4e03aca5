"""A real scale-down of `deltaserve cluster` (2 -> 1 engine replicas): the replica Serve stops hands its sessions
to the other before it exits (`EngineReplica.__del__` -> ingress `handoff_plan` / `adopt`).

The application is deployed declaratively (`deploy_apps`, as `serve deploy` does), so changing `num_replicas`
is a config update: Serve stops one engine replica gracefully and keeps the ingress (an imperative `serve.run`
redeploy would replace the ingress too, and its session table with it). Its own local Ray (the cluster module's
fixture has shut its one down). The hand-off runs after the replica left the handle's list, so the test waits
for the `migrated` counter, not for the replica count.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.test_cluster import (ADMIN, SERVE_FLAGS, _free_port, _home, chat, conversation, counters, replicas,
                                tiny_model_dir)

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def test_scale_down_hands_sessions_off(smollm_dir, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    model = tiny_model_dir(smollm_dir, tmp_path / "model")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = serve.context._get_global_client()

        def config(engine_replicas: int | None):
            app = {"name": "deltaserve", "route_prefix": "/", "import_path": "deltaserve.cluster:build_app",
                   "args": {"model": str(model), "replicas": 2, "admin_key": ADMIN, "args": " ".join(SERVE_FLAGS)}}
            if engine_replicas is not None:
                app["deployments"] = [{"name": "EngineReplica", "num_replicas": engine_replicas}]
            return ServeDeploySchema.model_validate({"applications": [app]})

        client.deploy_apps(config(None))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=30).status_code == 200 and len(replicas(url)) == 2:
                    break
            except (httpx.HTTPError, ValueError):  # the proxy is up before the app
                pass
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.5)
        sids = [f"down-{i}" for i in range(4)]
        convs = {sid: conversation(url, sid, 2, seed=500 + i) for i, sid in enumerate(sids)}
        homes = {sid: _home(url, sid) for sid in sids}
        assert len(set(homes.values())) == 2, homes  # least-loaded placement spreads 4 new sessions
        before = counters(url)

        client.deploy_apps(config(1))
        deadline = time.monotonic() + 120
        while len(replicas(url)) != 1 or counters(url)["migrated"] - before["migrated"] < 2:
            assert time.monotonic() < deadline, (replicas(url), counters(url))
            time.sleep(0.5)
        (kept,) = [r["id"] for r in replicas(url)]
        stopped = {sid for sid in sids if homes[sid] != kept}
        assert counters(url)["migrated"] - before["migrated"] == len(stopped)
        for sid in sids:
            _, _, messages = convs[sid]
            messages.append({"role": "user", "content": "one more step"})
            r = chat(url, messages, sid)
            assert _home(url, sid) == kept
            # the moved sessions' KV came with them: only the new turn is prefilled
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= r["usage"]["prompt_tokens"] - 20, sid
        assert counters(url)["recovered"] == before["recovered"]  # nothing had to be recomputed
    finally:
        serve.shutdown()
        ray.shutdown()
