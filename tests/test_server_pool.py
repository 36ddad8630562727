"""VLLMServerPool against two real `vllm serve` processes on loopback, one of which dies mid-run."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from treetune.data import PromptTemplate
from treetune.data.arith import arith_problems
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.engines.server_pool import (
    VLLMServerPool,
    start_local_server,
    stop_local_server,
    wait_until_healthy,
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tiny_policy_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("servers")
    procs, urls = [], []
    for i in range(2):
        port = _free_port()
        procs.append(start_local_server(tiny_policy_path, port, kv_cache_gb=0.25, log_path=str(logs / f"server{i}.log")))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs):
            wait_until_healthy(url, timeout=400, process=proc)
        yield procs, urls
    finally:
        for proc in procs:
            stop_local_server(proc)


def _requests(tokenizer, count: int, n: int = 2):
    template = PromptTemplate(style="bare")
    problems = arith_problems("validation", count)
    return [GenerationRequest(template.render_ids(p.question, tokenizer),
                              SamplingSettings(n=n, temperature=1.0, max_tokens=48, seed=i), group=p.id)
            for i, p in enumerate(problems)]


def test_treepo_rollout_through_the_servers(servers, tiny_policy_path, tmp_path):
    from treetune.data import load_problems
    from treetune.rollouts.run import RolloutArgs, make_engine, run_rollout

    _, urls = servers
    args = RolloutArgs(output_dir=str(tmp_path), engine="servers", server_urls=",".join(urls), limit=6,
                       trajectories=4, max_tokens=96, grade=False)
    engine = make_engine(args, tiny_policy_path)
    summary = run_rollout(args, engine, engine.tokenizer, load_problems("arith", "test", limit=6),
                          PromptTemplate(style="bare"), progress=False)
    assert summary["problems"] == 6 and summary["trajectories"] == 24
    assert set(engine._sticky.values()) == set(urls)  # trees spread over both servers
    engine.close()


def test_pool_generates_sticks_and_survives_a_dead_server(servers, tiny_policy_path):
    procs, urls = servers
    with VLLMServerPool(urls, model=tiny_policy_path, backoff=0.2, revive_after=600) as pool:
        requests = _requests(pool.tokenizer, 12)
        results = pool.generate(requests)
        assert len(results) == 12
        for result in results:
            assert len(result.completions) == 2
            for c in result.completions:
                assert c.token_ids and len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
                assert c.text == pool.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        placed = dict(pool._sticky)
        assert set(placed.values()) == set(urls)  # least-loaded placement used both servers
        again = pool.generate(requests)  # same groups, same servers, same seeds: same samples
        assert pool._sticky == placed
        assert [[c.token_ids for c in r.completions] for r in again] == [[c.token_ids for c in r.completions] for r in results]

        # Kill one server while a big batch is in flight: every request still comes back.
        many = _requests(pool.tokenizer, 60, n=4)
        killer = threading.Timer(0.5, lambda: os.killpg(procs[0].pid, signal.SIGKILL))  # a crash, not a shutdown
        killer.start()
        started = time.monotonic()
        results = pool.generate(many)
        killer.join()
        procs[0].wait(30)
        assert len(results) == 60 and all(len(r.completions) == 4 for r in results)
        assert procs[0].poll() is not None
        assert all(url == urls[1] for url in pool._sticky.values())
        assert time.monotonic() - started < 300
