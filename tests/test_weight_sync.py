"""Weight sync: every engine takes a perturbed copy of the tiny policy in place, its log-probs of the
sampled tokens then equal the perturbed model's, and no prefix cached under the old weights is reused."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.engines.server_pool import (
    ServerError,
    VLLMServerPool,
    start_local_server,
    stop_local_server,
    wait_until_healthy,
)
from treetune.rollouts.engines.weights import read_folder, with_tied_head, write_folder

TOL = 1e-3
# Longer than one 32-token KV block, so repeating it hits the prefix cache.
PROMPT = ("Tom has 3 apples and buys 4 more. Then he gives 2 to Ann and eats 1. "
          "How many apples does Tom have now? Answer: ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _perturbed(path: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def perturbed(tiny_policy_path):
    return _perturbed(tiny_policy_path, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_path)


def _request(tokenizer, n: int = 2, seed: int = 1, group: str | None = None) -> GenerationRequest:
    ids = tokenizer(PROMPT)["input_ids"]
    assert len(ids) > 32  # at least one full KV block
    return GenerationRequest(ids, SamplingSettings(n=n, temperature=1.0, max_tokens=16, seed=seed), group=group)


def _hf_logprobs(model, prompt_ids, token_ids) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(token_ids)])).logits[0, len(prompt_ids) - 1:-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i, t]) for i, t in enumerate(token_ids)]


def _max_gap(model, request, result) -> float:
    gaps = []
    for c in result.completions:
        assert c.token_ids and len(c.logprobs) == len(c.token_ids)
        gaps += [abs(a - b) for a, b in zip(_hf_logprobs(model, request.prompt_ids, c.token_ids), c.logprobs)]
    return max(gaps)


# -- fast: the folder format and the tied head ---------------------------------------------------

def test_write_folder_keeps_tied_names_and_with_tied_head(tiny_policy_path, tmp_path, perturbed):
    state = perturbed.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # tied
    write_folder(state.items(), tmp_path)
    back = dict(read_folder(tmp_path))
    assert set(back) == set(state)
    assert (back["lm_head.weight"] == back["model.embed_tokens.weight"]).all()
    assert not list(tmp_path.glob("*.tmp"))

    tied, untied = perturbed.config, perturbed.config.__class__(**{**perturbed.config.to_dict(), "tie_word_embeddings": False})
    without_head = [(n, t) for n, t in state.items() if n != "lm_head.weight"]
    added = with_tied_head(without_head, tied)
    assert [n for n, _ in added].count("lm_head.weight") == 1
    assert dict(added)["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert with_tied_head(list(state.items()), tied) == list(state.items())  # head already there
    assert with_tied_head(without_head, untied) == without_head  # not tied: nothing to add


def test_hf_engine_update_weights(tiny_policy_path, perturbed, tokenizer, tmp_path):
    from treetune.rollouts.engines import HFEngine

    engine = HFEngine(tiny_policy_path, dtype="float32", device="cpu")
    request = _request(tokenizer)
    before = engine.generate([request])[0]
    assert _max_gap(perturbed, request, before) > 0.01  # the perturbation matters

    engine.update_weights(named_tensors=list(perturbed.named_parameters()))  # tied head left out
    assert _max_gap(perturbed, request, engine.generate([request])[0]) < TOL

    other = _perturbed(tiny_policy_path, seed=5)
    other.save_pretrained(tmp_path / "ckpt")  # safetensors without the tied head
    engine.update_weights(folder=str(tmp_path / "ckpt"))
    assert _max_gap(other, request, engine.generate([request])[0]) < TOL

    with pytest.raises(KeyError, match="does not have"):
        engine.update_weights(named_tensors=[("model.not_a_layer.weight", perturbed.lm_head.weight)])
    with pytest.raises(ValueError, match="either"):
        engine.update_weights()


class _FakeServer(BaseHTTPRequestHandler):
    """Answers /collective_rpc as a vLLM 0.32 server does when started without the worker extension
    (HTTP 500, the text below, measured) or, with `dev_mode` off, without VLLM_SERVER_DEV_MODE (404)."""

    dev_mode = True

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/v1/models":
            self._answer(200, {"data": [{"id": "tiny", "max_model_len": 256}]})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self):  # noqa: N802
        if self.path == "/collective_rpc" and self.dev_mode:
            body = {"error": {"message": "Call to collective_rpc method failed: Worker failed with error "
                              "''CPUWorker' object has no attribute 'treetune_load_folder'', please check the "
                              "stack trace above for the root cause", "type": "InternalServerError",
                              "param": None, "code": 500}}
            status = 500
        else:
            body, status = {"detail": "Not Found"}, 404
        self._answer(status, body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("dev_mode", [True, False])
def test_pool_says_how_to_start_a_server_without_the_loader(dev_mode, perturbed):
    handler = type("Handler", (_FakeServer,), {"dev_mode": dev_mode})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pool = VLLMServerPool([url])
        with pytest.raises(ServerError) as err:
            pool.update_weights(named_tensors=list(perturbed.state_dict().items())[:2])
        message = str(err.value)
        assert "--worker-extension-cls treetune.rollouts.engines.weights.TreetuneWeightLoader" in message
        assert "VLLM_SERVER_DEV_MODE=1" in message
        assert ("no weight loader" if dev_mode else "no /collective_rpc route") in message
        assert url in pool._stale  # it keeps the old weights: no request goes there
    finally:
        server.shutdown()


# -- slow: real vLLM -------------------------------------------------------------------------------

@pytest.mark.slow
class TestServers:
    @pytest.fixture(scope="class")
    def servers(self, tiny_policy_path, tmp_path_factory):
        logs = tmp_path_factory.mktemp("servers")
        procs, urls = [], []
        for i in range(2):
            port = _free_port()
            procs.append(start_local_server(tiny_policy_path, port, kv_cache_gb=0.25, dtype="float32",
                                            log_path=str(logs / f"server{i}.log")))
            urls.append(f"http://127.0.0.1:{port}")
        try:
            for url, proc in zip(urls, procs):
                wait_until_healthy(url, timeout=400, process=proc)
            yield urls
        finally:
            for proc in procs:
                stop_local_server(proc)

    def test_every_server_takes_new_weights_and_drops_its_cache(self, servers, tiny_policy_path, perturbed):
        dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
        with VLLMServerPool(servers + [dead], model=tiny_policy_path, backoff=0.1) as pool:
            singles = [VLLMServerPool([url], model=tiny_policy_path) for url in servers]
            request = _request(pool.tokenizer, n=1)
            before = {}
            for url, single in zip(servers, singles):
                before[url] = single.generate([request])[0]
                start = single.prefix_cache_stats()
                single.generate([request])  # the same prompt again: served from the prefix cache
                assert single.prefix_cache_stats()["hits"] > start["hits"]
                assert _max_gap(perturbed, request, before[url]) > 0.01

            pool.update_weights(named_tensors=list(perturbed.state_dict().items()))
            assert pool._stale == {dead} and pool._alive() == servers  # the dead one gets no requests

            for url, single in zip(servers, singles):
                start = single.prefix_cache_stats()
                after = single.generate([request])[0]
                stats = single.prefix_cache_stats()
                assert stats["queries"] > start["queries"] and stats["hits"] == start["hits"]  # the cache was emptied
                assert _max_gap(perturbed, request, after) < TOL, url
                again = single.generate([request])[0]  # cached again, now under the new weights
                assert single.prefix_cache_stats()["hits"] > stats["hits"]
                assert _max_gap(perturbed, request, again) < TOL, url

            # Through the pool itself, trees spread over both servers, all on the new weights.
            requests = [_request(pool.tokenizer, n=2, seed=i, group=f"tree{i}") for i in range(6)]
            results = pool.generate(requests)
            assert set(pool._sticky.values()) == set(servers)
            assert max(_max_gap(perturbed, r, res) for r, res in zip(requests, results)) < TOL
            for single in singles:
                single.close()


# -- slow: in-process vLLM -----------------------------------------------------------------------

@pytest.mark.slow
class TestVLLMEngine:
    @pytest.fixture(scope="class")
    def vllm_engine(self, tiny_policy_path):
        from treetune.rollouts.engines import VLLMEngine

        with VLLMEngine(tiny_policy_path, dtype="float32", kv_cache_gb=0.25) as engine:
            yield engine

    def test_update_from_tensors_and_from_a_checkpoint(self, vllm_engine, tiny_policy_path, perturbed, tmp_path):
        engine = vllm_engine
        request = _request(engine.tokenizer, n=1)
        engine.generate([request])
        start = engine.prefix_cache_stats()
        old = engine.generate([request])[0]  # served from the prefix cache
        stats = engine.prefix_cache_stats()
        assert stats["hits"] > start["hits"]
        assert _max_gap(perturbed, request, old) > 0.01

        engine.update_weights(named_tensors=list(perturbed.state_dict().items()))
        new = engine.generate([request])[0]
        after = engine.prefix_cache_stats()
        assert after["queries"] > stats["queries"] and after["hits"] == stats["hits"]  # nothing stale reused
        assert _max_gap(perturbed, request, new) < TOL

        other = _perturbed(tiny_policy_path, seed=5)
        other.save_pretrained(tmp_path / "ckpt")  # safetensors without the tied head
        engine.update_weights(folder=str(tmp_path / "ckpt"))
        wide = _request(engine.tokenizer, n=4, seed=3)
        assert _max_gap(other, wide, engine.generate([wide])[0]) < TOL
        assert _max_gap(other, request, engine.generate([request])[0]) < TOL
